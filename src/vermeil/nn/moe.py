"""Mixture of Experts: top-k router, stacked SwiGLU experts, dropless sorted dispatch, auxiliary losses.

One block covers Llama 4 (sigmoid of the top-k logits, expert input pre-scaled by the score, shared expert)
and Mixtral (softmax over all logits, top-k renormalised, expert output weighted). The fast path sorts the
(token, expert) pairs by expert and runs ONE `torch.nn.functional.grouped_mm` per projection, with no
Python loop over experts and no host sync; a per-expert loop (`backend="loop"`) is kept as the reference
and tests/nn/test_moe.py compares every backend with it, with Meta's dense formulation and with
transformers' `MixtralSparseMoeBlock` / `Llama4TextMoe`.

`torch.compile(fullgraph=True)` traces every backend except "loop", float32 included, because `grouped_mm`
runs through a custom op (`vermeil::grouped_mm`, registered on import; why at `_grouped_mm_kernel`).

Checkpoint layouts (meta-llama/llama-models `llama4/moe.py`; transformers `modeling_mixtral.py`):
    Meta Llama 4: `router_DE` (D, E), `experts.w1`/`w3` (E, D, F), `experts.w2` (E, F, D) (in x out),
    `shared_expert.w1/w3/w2.weight` (Linear). These are our names, so Meta's state dicts load as they are
    (the raw-shard names `moe_w_in_eD_F`, `w_in_shared_FD`, ... are renamed by a load hook).
    transformers Llama 4: `router.weight` = `router_DE.T`; `experts.gate_up_proj` = cat([w1, w3], -1);
    `experts.down_proj` = w2.
    transformers Mixtral (v5): `gate.weight` = `router_DE.T`; `experts.gate_up_proj` (E, 2F, D) =
    cat([w1, w3], -1).transpose(1, 2); `experts.down_proj` (E, D, F) = w2.transpose(1, 2).
"""

# Shapes: B batch, T tokens (batch and sequence flattened), D model dim, F expert hidden dim, E experts,
# K experts per token (top_k), S = T*K routed (token, expert) pairs, C per-expert capacity (padded path).

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_ints, tracing
from vermeil.nn.feedforward import SwiGLU

ScoreFunc = Literal["softmax", "sigmoid"]
MoEBackend = Literal["grouped", "padded", "loop", "dense"]
_SCORE_FUNCS = ("softmax", "sigmoid")
_BACKENDS = ("grouped", "padded", "loop", "dense")
# dtypes the CPU/CUDA grouped_mm kernels accept (float64 raises "Expected mat_a to be Float32, BFloat16 or
# Float16 matrix, got Double"); everything else takes the padded bmm.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- Sizes


def moe_hidden_dim(
    dim: int,
    *,
    ffn_exp: float = 4.0,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    auto_scale_F: bool = False,  # Meta's name
    capacity_factor: float = 1.0,
) -> int:
    """Llama 4's expert hidden size (meta-llama/llama-models `llama4/moe.py`, `MoE.__init__`).

    `h = int(ffn_exp * dim)`, `h = int(2 * h / 3)`, `h = int(ffn_dim_multiplier * h)` when given, then with
    `auto_scale_F` `h = int(h / (capacity_factor + 1))` (so a top-1 routed expert plus the shared expert cost
    what one dense FFN does), then rounded up to a multiple of `multiple_of`.
    Llama 4 Scout: `moe_hidden_dim(5120, ffn_exp=4, multiple_of=2048, ffn_dim_multiplier=1.2,
    auto_scale_F=True) == 8192` (transformers' `intermediate_size`).
    """
    check_positive_ints(dim=dim, multiple_of=multiple_of)
    if ffn_exp <= 0:
        raise ValueError(f"ffn_exp={ffn_exp!r} must be > 0")
    if ffn_dim_multiplier is not None and ffn_dim_multiplier <= 0:
        raise ValueError(f"ffn_dim_multiplier={ffn_dim_multiplier!r} must be > 0")
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be >= 0")
    h = int(ffn_exp * dim)
    h = int(2 * h / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    if auto_scale_F:
        h = int(h / (capacity_factor + 1))
    return multiple_of * math.ceil(h / multiple_of)


# --- Router math and auxiliary losses (float32, or float64 for float64 inputs)


def _fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def route(
    logits_TE: Tensor, top_k: int, *, score_func: ScoreFunc = "sigmoid", renormalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Top-k routing scores.

    "sigmoid" (Llama 4): the top-k logits through a sigmoid (every other expert scores 0).
    "softmax" (Mixtral): softmax over all E logits, then the top-k probabilities.
    `renormalize` divides the k scores by their sum (Mixtral always does; `top_k=1` then gives 1.0).
    logits_TE (T, E) -> scores_TK (T, K) float32 and topk_idx_TK (T, K) int64 expert ids, best first.
    """
    logits_TE = _fp32(logits_TE)
    match score_func:
        case "sigmoid":
            top_logits_TK, topk_idx_TK = torch.topk(logits_TE, top_k, dim=-1)
            scores_TK = torch.sigmoid(top_logits_TK)
        case "softmax":
            # top-k of the probabilities (as transformers), not of the logits, so ties resolve identically
            scores_TK, topk_idx_TK = torch.topk(logits_TE.softmax(dim=-1), top_k, dim=-1)
        case _:
            raise ValueError(f"score_func={score_func!r} must be one of {_SCORE_FUNCS}")
    if renormalize:
        scores_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True)
    return scores_TK, topk_idx_TK


def tokens_per_expert(topk_idx_TK: Tensor, num_experts: int) -> Tensor:
    """(T, K) expert ids -> (E,) int64 counts. Fixed output shape (unlike `bincount`), no host sync."""
    idx_S = topk_idx_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=idx_S.device).scatter_add_(
        0, idx_S, torch.ones_like(idx_S)
    )


def load_balancing_loss(logits_TE: Tensor, topk_idx_TK: Tensor, counts_E: Tensor | None = None) -> Tensor:
    """Switch / Mixtral load-balancing loss for one layer: `E * sum_e f_e * P_e`.

    `f_e` = (number of top-k assignments to expert e) / T, `P_e` = mean over tokens of softmax(logits)_e.
    Identical to transformers' `load_balancing_loss_func((logits_TE,), E, K)`: it equals K when routing is
    uniform. Gradients reach the router through `P_e` only (the counts are piecewise constant).
    logits_TE: (T, E); topk_idx_TK: (T, K); counts_E: (E,) `tokens_per_expert(topk_idx_TK, E)` if already
    computed. Returns a float32 scalar.
    """
    T, E = logits_TE.shape
    if counts_E is None:
        counts_E = tokens_per_expert(topk_idx_TK, E)
    probs_TE = _fp32(logits_TE).softmax(dim=-1)
    f_E = counts_E.to(probs_TE.dtype) / max(T, 1)
    P_E = probs_TE.sum(dim=0) / max(T, 1)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al., 2022, arXiv:2202.08906): mean over tokens of logsumexp(logits)^2."""
    lse_T = torch.logsumexp(_fp32(logits_TE), dim=-1)
    return lse_T.square().sum() / max(lse_T.shape[0], 1)  # a mean that gives 0, not nan, for no tokens


# --- Expert kernels on tokens already sorted by expert


def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    # grouped_mm is not covered by autocast; do what autocast would do for a matmul
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, w.dtype)


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands (static metadata only).

    Needs `F.grouped_mm` (torch >= 2.10; on CUDA `torch._grouped_mm`, the same kernel under its older private
    name, serves where the public one is missing), a compute dtype of float32, bfloat16 or float16 on CPU (bfloat16
    only on CUDA, the one dtype its docs promise there), row widths that are multiples of 16 bytes (the CPU
    kernel raises "strides should be multiple of 16 bytes" otherwise, e.g. D=37 in float32) and weights
    contiguous in their last two axes. The compute dtype is autocast's when autocast is on.
    """
    device = x.device.type
    if device not in ("cpu", "cuda") or not (
        hasattr(F, "grouped_mm") or device == "cuda" and hasattr(torch, "_grouped_mm")
    ):
        return False
    dtype = _compute_dtype(x, weights[0])
    if dtype not in _GROUPED_MM_DTYPES or (device == "cuda" and dtype != torch.bfloat16):
        return False
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return all(
        w.shape[-1] % align == 0 and w.shape[-2] % align == 0 and w.stride()[-2:] == (w.shape[-1], 1)
        for w in weights
    )


# `F.grouped_mm` wrapped as a custom op, for two reasons found in torch 2.13 on CPU:
# 1. under torch.compile its fake-tensor rule (`_meta_grouped_mm_common`) raises "Expected inputs of BF16
#    type but got mat_a.dtype=torch.float32", although the CPU kernel runs float32; the op below carries its
#    own shape rule, so float32 compiles (fullgraph) with the kernel left opaque;
# 2. its built-in backward hands the incoming gradient to the kernel as is, and the kernel rejects
#    stride-0 or transposed gradients ("Invalid strides/sizes" / "strides should be multiple of 16 bytes");
#    the backward below makes it contiguous first.
def _grouped_mm_kernel(a: Tensor, b: Tensor, offs_E: Tensor) -> Tensor:
    # looked up per call (tests count the calls through F.grouped_mm); torch._grouped_mm is the CUDA kernel's
    # name in releases without the public function (grouped_mm_supported admits it on CUDA only)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs_E)


@torch.library.custom_op("vermeil::grouped_mm", mutates_args=())
def _grouped_mm_op(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    return _grouped_mm_kernel(x_SI, w_EIO, offs_E)


@_grouped_mm_op.register_fake
def _(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    return x_SI.new_empty(x_SI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op("vermeil::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x_SI: Tensor, grad_SO: Tensor, offs_E: Tensor) -> Tensor:
    # 2D x 2D form: the shared S axis is split by offs, giving one (I, O) product per group
    return _grouped_mm_kernel(x_SI.transpose(0, 1), grad_SO, offs_E)


@_grouped_mm_weight_grad_op.register_fake
def _(x_SI: Tensor, grad_SO: Tensor, offs_E: Tensor) -> Tensor:
    return x_SI.new_empty(offs_E.shape[0], x_SI.shape[1], grad_SO.shape[1])


def _grouped_mm_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx: Any, grad_SO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_SI, w_EIO, offs_E = ctx.saved_tensors
    grad_SO = grad_SO.contiguous()
    grad_x = _grouped_mm_op(grad_SO, w_EIO.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad_op(x_SI, grad_SO, offs_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """(S, I) rows sorted by expert @ (E, I, O) -> (S, O); group e is rows offs[e-1]:offs[e]."""
    dtype = _compute_dtype(x_SI, w_EIO)
    return _grouped_mm_op(x_SI.to(dtype), w_EIO.to(dtype), offs_E)


def _swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """`(silu(x @ w1) * (x @ w3)) @ w2` with Meta-layout (in x out) weights; batched (bmm) for 3-D operands."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def grouped_swiglu(x_SD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, offs_E: Tensor) -> Tensor:
    """SwiGLU experts on sorted rows, one grouped matmul per projection.

    Args:
        x_SD: (S, D) rows sorted by expert.
        w1, w3: (E, D, F); w2: (E, F, D) (Meta layout, in x out).
        offs_E: (E,) int32 cumulative row counts; `offs_E[-1]` must equal S (rows past it come back
            uninitialised from the kernel, so the dispatch is dropless by construction).
    Returns:
        (S, D).
    """
    h_SF = F.silu(_grouped_mm(x_SD, w1, offs_E)) * _grouped_mm(x_SD, w3, offs_E)
    return _grouped_mm(h_SF, w2, offs_E)


def padded_swiglu(
    x_SD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_S: Tensor, counts_E: Tensor, offs_E: Tensor
) -> Tensor:
    """The batched fallback of `grouped_swiglu`, exact in any dtype: scatter the sorted rows into an (E, C, D)
    zero-padded buffer, run three `bmm`s, gather back. C is the largest per-expert count in eager mode (one
    host sync) and the static bound S while `tracing()` (compile, CUDA graph capture).

    Args:
        x_SD: (S, D) rows sorted by expert; expert_S: (S,) their expert ids (sorted).
        counts_E: (E,) int64 rows per expert; offs_E: (E,) their cumulative sum.
    Returns:
        (S, D).
    """
    S, D = x_SD.shape
    capacity = S if tracing() or S == 0 else int(counts_E.max())  # S: static, no host read (S/K is tighter)
    start_E = offs_E.long() - counts_E
    pos_S = torch.arange(S, device=x_SD.device) - start_E[expert_S]  # row within its expert's block
    x_ECD = x_SD.new_zeros(w1.shape[0], capacity, D).index_put((expert_S, pos_S), x_SD)
    return _swiglu(x_ECD, w1, w3, w2)[expert_S, pos_S]


# --- Modules


@dataclass
class RouterOutput:
    """What `Router` returns (float32 throughout).

    logits_TE: (T, E) router logits. scores_TK: (T, K) routing weights. topk_idx_TK: (T, K) expert ids.
    """

    logits_TE: Tensor
    scores_TK: Tensor
    topk_idx_TK: Tensor


class Router(nn.Module):
    """Top-k token-choice router with its math in float32 (float64 for float64 inputs; autocast off there, as
    torchtitan's router does).

    The weight is Meta's `router_DE` (D, E), `logits = x @ router_DE` (other layouts: module docstring).

    Args:
        dim, num_experts, top_k: D, E and K, the experts per token (1 <= K <= E).
        score_func, renormalize: see `route` ("sigmoid" for Llama 4, "softmax" and renormalize for Mixtral).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: ScoreFunc = "sigmoid",
        renormalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        if score_func not in _SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} must be one of {_SCORE_FUNCS}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.router_DE = nn.Parameter(torch.empty(dim, num_experts, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default for a (E, D) weight: U(-1/sqrt(D), 1/sqrt(D))
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.router_DE, -bound, bound)

    def forward(self, x_TD: Tensor) -> RouterOutput:
        """x_TD: (T, D) -> RouterOutput(logits_TE, scores_TK, topk_idx_TK)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = _fp32(x_TD) @ _fp32(self.router_DE)
        scores_TK, topk_idx_TK = route(
            logits_TE, self.top_k, score_func=self.score_func, renormalize=self.renormalize
        )
        return RouterOutput(logits_TE, scores_TK, topk_idx_TK)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score_func={self.score_func!r}, renormalize={self.renormalize}"
        )


class Experts(nn.Module):
    """E SwiGLU experts held as stacked weights in Meta's layout (in x out):
    `w1` (gate) and `w3` (up) of shape (E, D, F), `w2` (down) of shape (E, F, D).

    Expert e computes `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`; `forward` runs rows already sorted by expert
    (`MoE` does the routing, sorting and combining). Meta's raw-shard keys `moe_w_in_eD_F`,
    `moe_w_swiglu_eD_F` (E*D, F) and `moe_w_out_eF_D` (E*F, D) load into w1, w3, w2 through a load hook.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(self._load_meta_raw)

    def reset_parameters(self) -> None:
        # per expert, nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w, fan_in in ((self.w1, self.dim), (self.w3, self.dim), (self.w2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)

    def _load_meta_raw(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
    ) -> None:
        E, D = self.num_experts, self.dim
        for raw, ours, shape in (
            ("moe_w_in_eD_F", "w1", (E, D, -1)),
            ("moe_w_swiglu_eD_F", "w3", (E, D, -1)),
            ("moe_w_out_eF_D", "w2", (E, -1, D)),
        ):
            if prefix + raw in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + raw).view(shape)

    def forward(
        self, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, offs_E: Tensor, *, grouped: bool = True
    ) -> Tensor:
        """Run each row through its expert. Rows must be sorted by expert.

        Args:
            x_SD: (S, D) rows sorted by expert; expert_S: (S,) their expert ids.
            counts_E: (E,) int64 rows per expert (summing to S); offs_E: (E,) int32 cumulative counts.
            grouped: use `grouped_swiglu` when `grouped_mm_supported`, else `padded_swiglu`.
        Returns:
            (S, D), in the compute dtype (x's, or autocast's).
        """
        # Under tensor parallelism (vermeil.distributed) the weights are DTensors sharded on F: each rank runs
        # its F/tp slice of every expert on plain local tensors, and the caller sums the partial outputs.
        w1, w3, w2 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2))
        if grouped and grouped_mm_supported(x_SD, w1, w3, w2):
            return grouped_swiglu(x_SD, w1, w3, w2, offs_E)
        return padded_swiglu(x_SD, w1, w3, w2, expert_S, counts_E, offs_E)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}"


@dataclass
class MoEOutput:
    """What `MoE.forward` returns.

    out: (..., D) the block output (same leading shape as the input).
    aux_loss: scalar, `aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss`: add it to the training
        loss (0 with the default coefficients, as Llama 4).
    load_balancing_loss: scalar, unweighted (see `load_balancing_loss`).
    z_loss: scalar, unweighted (see `router_z_loss`).
    router_logits: (T, E) float32, T = all leading axes flattened.
    tokens_per_expert: (E,) int64 routed pairs per expert (for logging balance).
    """

    out: Tensor
    aux_loss: Tensor
    load_balancing_loss: Tensor
    z_loss: Tensor
    router_logits: Tensor
    tokens_per_expert: Tensor


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward block: router, E SwiGLU experts, optional shared SwiGLU expert.

    `out = shared_expert(x) + sum_{e in topk(x)} g_e(x)`, where with `prescale_input=True` (Llama 4)
    `g_e(x) = expert_e(score_e * x)` and otherwise (Mixtral) `g_e(x) = score_e * expert_e(x)`.

    Presets: Llama 4 = defaults (`score_func="sigmoid", shared_expert=True, prescale_input=True`);
    Mixtral = `score_func="softmax", renormalize=True, shared_expert=False, prescale_input=False`.
    Unlike Meta's reference (inference mode, detached expert input), everything here trains.

    Args:
        dim, num_experts, top_k, score_func, renormalize: as `Router`.
        hidden_dim: F, each expert's hidden size (the shared expert uses it too); see `moe_hidden_dim`.
        shared_expert: add a dense SwiGLU expert seen by every token (`shared_expert.w1/w3/w2`).
        prescale_input: scale the expert input by the score (Llama 4) instead of its output (Mixtral).
        aux_loss_coef, z_loss_coef: weights of the two losses in `MoEOutput.aux_loss`.
        backend: how the routed experts run, recorded as `self.backend`:
            "grouped" (default): sort pairs by expert, one `grouped_mm` per projection; falls back to the
                padded bmm when `grouped_mm_supported` is False (float64, widths not 16-byte aligned);
            "padded": the sort plus a capacity-padded (E, C, D) bmm;
            "loop": the reference, one Python iteration per expert;
            "dense": every expert on every token with zero scores off the top-k (Meta's formulation, E/K
                times the FLOPs).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: ScoreFunc = "sigmoid",
        shared_expert: bool = True,
        prescale_input: bool = True,
        renormalize: bool = False,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        backend: MoEBackend = "grouped",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # dim, hidden_dim, num_experts, top_k and score_func are checked by Router and Experts below
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
        for name, coef in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if not coef >= 0:
                raise ValueError(f"{name}={coef!r} must be >= 0")
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.prescale_input, self.backend = prescale_input, backend
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        factory = {"device": device, "dtype": dtype}
        self.router = Router(
            dim, num_experts, top_k, score_func=score_func, renormalize=renormalize, **factory
        )
        self.experts = Experts(dim, hidden_dim, num_experts, **factory)
        self.shared_expert = SwiGLU(dim, hidden_dim, **factory) if shared_expert else None
        self.register_load_state_dict_pre_hook(self._load_meta)

    def reset_parameters(self) -> None:
        for part in (self.router, self.experts, self.shared_expert):
            if part is not None:
                part.reset_parameters()

    def _load_meta(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # Meta's module layout keeps `router_DE` on the MoE itself; its raw shards also use other names for
        # the shared expert and carry gate statistics that Meta's own load hook drops.
        renames = {
            "router_DE": "router.router_DE",
            "w_in_shared_FD.weight": "shared_expert.w1.weight",
            "w_swiglu_FD.weight": "shared_expert.w3.weight",
            "w_out_shared_DF.weight": "shared_expert.w2.weight",
        }
        for old, new in renames.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        for dropped in ("running_gate_stats_3E", "global_gate_stats_3E", "expert_activation_DE"):
            state_dict.pop(prefix + dropped, None)

    # --- routed experts, one method per backend; all return (T, D) in x's dtype ---------------------------

    def _weighted(self, expert: Callable[[Tensor], Tensor], x: Tensor, score: Tensor) -> Tensor:
        """expert(score * x) with `prescale_input` (Llama 4), else score * expert(x) (Mixtral; score float32,
        as transformers). score broadcasts over x's last axis."""
        if self.prescale_input:
            return expert(x * score.to(x.dtype))
        return expert(x) * score

    def _forward_sorted(
        self, x_TD: Tensor, scores_TK: Tensor, topk_idx_TK: Tensor, counts_E: Tensor
    ) -> Tensor:
        # Fixed output shapes, no host sync (tests/nn/test_moe.py watches): CUDA-graph capturable, fullgraph.
        # Pair s = t*K + k; the stable sort keeps token order inside each expert's block (deterministic).
        expert_S, order_S = torch.sort(topk_idx_TK.reshape(-1), stable=True)
        token_S = torch.div(order_S, self.top_k, rounding_mode="floor")
        score_S1 = scores_TK.reshape(-1).index_select(0, order_S).unsqueeze(-1)
        offs_E = counts_E.cumsum(0, dtype=torch.int32)
        # index_select, whose backward is index_add; x_TD[token_S] would backpropagate through index_put with
        # accumulate, which sorts the indices again on CUDA
        x_SD = x_TD.index_select(0, token_S)
        grouped = self.backend == "grouped"
        y_SD = self._weighted(
            lambda x: self.experts(x, expert_S, counts_E, offs_E, grouped=grouped), x_SD, score_S1
        )
        # index_add (not a sort back + sum): one pass, and its backward is a gather; the K contributions of
        # a token are summed in float32 (or float64) and rounded once, as transformers does
        acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        out_TD = x_TD.new_zeros(x_TD.shape, dtype=acc_dtype).index_add(0, token_S, y_SD.to(acc_dtype))
        return out_TD.to(x_TD.dtype)

    def _forward_loop(self, x_TD: Tensor, scores_TK: Tensor, topk_idx_TK: Tensor) -> Tensor:
        w1, w3, w2 = self.experts.w1, self.experts.w3, self.experts.w2
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            token_idx, k_idx = torch.where(topk_idx_TK == e)
            expert = partial(_swiglu, w1=w1[e], w3=w3[e], w2=w2[e])
            y_ND = self._weighted(expert, x_TD[token_idx], scores_TK[token_idx, k_idx].unsqueeze(-1))
            out_TD = out_TD.index_add(0, token_idx, y_ND.to(x_TD.dtype))
        return out_TD

    def _forward_dense(self, x_TD: Tensor, scores_TK: Tensor, topk_idx_TK: Tensor) -> Tensor:
        w1, w3, w2 = self.experts.w1, self.experts.w3, self.experts.w2
        E = self.num_experts
        scores_ET1 = scores_TK.new_zeros(x_TD.shape[0], E).scatter(1, topk_idx_TK, scores_TK).T.unsqueeze(-1)
        expert = partial(_swiglu, w1=w1, w3=w3, w2=w2)
        return self._weighted(expert, x_TD.expand(E, *x_TD.shape), scores_ET1).sum(0).to(x_TD.dtype)

    def forward(self, x: Tensor) -> MoEOutput:
        """x: (..., D) -> MoEOutput(out (..., D), aux_loss, load_balancing_loss, z_loss, router_logits (T, E),
        tokens_per_expert (E,)), T = all leading axes of x flattened."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        routing = self.router(x_TD)
        logits_TE, scores_TK, topk_idx_TK = routing.logits_TE, routing.scores_TK, routing.topk_idx_TK
        counts_E = tokens_per_expert(topk_idx_TK, self.num_experts)
        match self.backend:
            case "grouped" | "padded":
                routed_TD = self._forward_sorted(x_TD, scores_TK, topk_idx_TK, counts_E)
            case "loop":
                routed_TD = self._forward_loop(x_TD, scores_TK, topk_idx_TK)
            case _:
                routed_TD = self._forward_dense(x_TD, scores_TK, topk_idx_TK)
        out_TD = routed_TD if self.shared_expert is None else self.shared_expert(x_TD) + routed_TD
        lb_loss = load_balancing_loss(logits_TE, topk_idx_TK, counts_E)
        z_loss = router_z_loss(logits_TE)
        aux_loss = self.aux_loss_coef * lb_loss + self.z_loss_coef * z_loss
        return MoEOutput(out_TD.view(x.shape), aux_loss, lb_loss, z_loss, logits_TE, counts_E)

    def extra_repr(self) -> str:
        return f"prescale_input={self.prescale_input}, backend={self.backend!r}"
