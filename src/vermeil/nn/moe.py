"""Mixture of Experts: top-k router, stacked SwiGLU experts, dropless sorted dispatch, auxiliary losses.

One block covers Llama 4 and Mixtral (presets at `MoE`). The fast path sorts the (token, expert) pairs by
expert and runs one `F.grouped_mm` per projection, with no loop over experts and no host sync; the
per-expert loop (`backend="loop"`) is the reference. Parameter names are Meta's (meta-llama/llama-models
`llama4/moe.py`), so its state dicts load as they are; transformers' layouts convert in `vermeil.interop`.
"""

# Shapes: B batch, T tokens (batch and sequence flattened), D model dim, F expert hidden dim, E experts,
# K experts per token (top_k), S = T*K routed (token, expert) pairs, C per-expert capacity (padded path).

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.nn.checks import check_positive_int, check_positive_ints, tracing
from vermeil.nn.feedforward import SwiGLU

ScoreFunc = Literal["softmax", "sigmoid"]
MoEBackend = Literal["grouped", "padded", "loop", "dense"]
_SCORE_FUNCS, _BACKENDS = get_args(ScoreFunc), get_args(MoEBackend)
# dtypes the grouped_mm kernels accept; everything else (float64) takes the padded bmm
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def moe_hidden_dim(
    dim: int,
    *,
    ffn_exp: float = 4.0,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    auto_scale_F: bool = False,
    capacity_factor: float = 1.0,
) -> int:
    """Llama 4's expert hidden size (meta-llama/llama-models `llama4/moe.py`, `MoE.__init__`).

    `auto_scale_F` divides by `capacity_factor + 1`, so a top-1 routed expert plus the shared expert cost
    what one dense FFN does. Llama 4 Scout: `moe_hidden_dim(5120, ffn_exp=4, multiple_of=2048,
    ffn_dim_multiplier=1.2, auto_scale_F=True) == 8192` (transformers' `intermediate_size`).
    """
    check_positive_ints(dim=dim, multiple_of=multiple_of)
    for name, value in (("ffn_exp", ffn_exp), ("ffn_dim_multiplier", ffn_dim_multiplier)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be > 0 and finite")
    if not (capacity_factor >= 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor!r} must be >= 0 and finite")
    h = int(ffn_exp * dim)
    h = int(2 * h / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    if auto_scale_F:
        h = int(h / (capacity_factor + 1))
    if h <= 0:  # rounding up to multiple_of would keep 0
        raise ValueError(
            f"the Llama 4 rule gives a hidden size of 0 (dim={dim}, ffn_exp={ffn_exp}, "
            f"ffn_dim_multiplier={ffn_dim_multiplier}, auto_scale_F={auto_scale_F}, "
            f"capacity_factor={capacity_factor})"
        )
    return multiple_of * math.ceil(h / multiple_of)


def _fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def route(
    logits_TE: Tensor, top_k: int, *, score_func: ScoreFunc = "sigmoid", renormalize: bool = False
) -> tuple[Tensor, Tensor]:
    """logits_TE (T, E) -> scores_TK (T, K) float32 and topk_idx_TK (T, K) expert ids, best first.

    "sigmoid" (Llama 4): sigmoid of the top-k logits. "softmax" (Mixtral): the top-k of softmax over all E.
    `renormalize` divides the k scores by their sum (Mixtral does).
    """
    if logits_TE.ndim != 2:
        raise ValueError(f"logits_TE must have shape (T, E), got {tuple(logits_TE.shape)}")
    check_positive_int("top_k", top_k)
    if top_k > logits_TE.shape[-1]:
        raise ValueError(f"top_k={top_k} must be <= num_experts={logits_TE.shape[-1]} (logits_TE.shape[-1])")
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
    """Switch / Mixtral load-balancing loss `E * sum_e f_e * P_e`, a float32 scalar (K for uniform routing).

    `f_e` = top-k assignments to expert e / T, `P_e` = mean over tokens of softmax(logits_TE)_e (the only path
    of the gradient); as transformers' `load_balancing_loss_func((logits_TE,), E, K)`. counts_E: if computed.
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


def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    # grouped_mm is not covered by autocast; do what autocast would do for a matmul
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, w.dtype)


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether `F.grouped_mm` (torch >= 2.10; or `torch._grouped_mm` on CUDA) takes these operands.

    Needs a compute dtype (autocast's when on) of float32, bfloat16 or float16 on CPU, bfloat16 on CUDA (the
    one its docs promise), rows of a multiple of 16 bytes and weights contiguous in their last two axes.
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


# `F.grouped_mm` wrapped as a custom op (torch 2.13, CPU): its fake-tensor rule rejects float32 under
# torch.compile, which the op's own shape rule avoids; and its backward hands stride-0 or transposed
# gradients to a kernel that rejects them, which ours makes contiguous first.
def _grouped_mm_kernel(a: Tensor, b: Tensor, offs_E: Tensor) -> Tensor:
    # looked up per call: tests count the calls through F.grouped_mm
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


def _grouped_mm_backward(ctx: Any, grad_SO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_SI, w_EIO, offs_E = ctx.saved_tensors
    grad_SO = grad_SO.contiguous()
    grad_x = _grouped_mm_op(grad_SO, w_EIO.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad_op(x_SI, grad_SO, offs_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(
    _grouped_mm_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
)


def _grouped_mm(x_SI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """(S, I) rows sorted by expert @ (E, I, O) -> (S, O); group e is rows offs[e-1]:offs[e]."""
    dtype = _compute_dtype(x_SI, w_EIO)
    return _grouped_mm_op(x_SI.to(dtype), w_EIO.to(dtype), offs_E)


def _swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """`(silu(x @ w1) * (x @ w3)) @ w2` with Meta-layout (in x out) weights; batched (bmm) for 3-D operands."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def grouped_swiglu(x_SD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, offs_E: Tensor) -> Tensor:
    """SwiGLU experts on rows x_SD (S, D) sorted by expert, one grouped matmul per projection -> (S, D).

    w1, w3: (E, D, F); w2: (E, F, D). offs_E: (E,) int32 cumulative row counts; `offs_E[-1]` must equal S
    (rows past it come back uninitialised from the kernel).
    """
    h_SF = F.silu(_grouped_mm(x_SD, w1, offs_E)) * _grouped_mm(x_SD, w3, offs_E)
    return _grouped_mm(h_SF, w2, offs_E)


def padded_swiglu(
    x_SD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_S: Tensor, counts_E: Tensor, offs_E: Tensor
) -> Tensor:
    """`grouped_swiglu` for any dtype: the rows scattered into an (E, C, D) zero-padded buffer, three `bmm`s,
    gathered back. expert_S: (S,) the rows' experts; counts_E: (E,) int64 rows per expert. C is the largest
    count in eager mode (one host sync), the static bound S while `tracing()`.
    """
    S, D = x_SD.shape
    capacity = S if tracing() or S == 0 else int(counts_E.max())
    start_E = offs_E.long() - counts_E
    pos_S = torch.arange(S, device=x_SD.device) - start_E[expert_S]  # row within its expert's block
    x_ECD = x_SD.new_zeros(w1.shape[0], capacity, D).index_put((expert_S, pos_S), x_SD)
    return _swiglu(x_ECD, w1, w3, w2)[expert_S, pos_S]


@dataclass
class RouterOutput:
    """What `Router` returns, float32: logits_TE (T, E), scores_TK (T, K), topk_idx_TK (T, K) expert ids."""

    logits_TE: Tensor
    scores_TK: Tensor
    topk_idx_TK: Tensor


class Router(nn.Module):
    """Top-k token-choice router, `logits = x @ router_DE` (D, E), in float32 with autocast off (as
    torchtitan's); float64 stays. score_func, renormalize: as `route`.
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
    """E SwiGLU experts as stacked weights in Meta's layout (in x out): `w1` (gate) and `w3` (up) (E, D, F),
    `w2` (down) (E, F, D); expert e computes `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`. Meta's raw-shard keys
    (`moe_w_in_eD_F`, ...) load through a hook.
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
        """Rows x_SD (S, D) sorted by expert -> (S, D) in the compute dtype; arguments as `padded_swiglu`.
        `grouped`: use `grouped_swiglu` where `grouped_mm_supported`."""
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

    out: (..., D), x's shape.
    aux_loss: `aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss`, for the training loss (0 with
        the default coefficients, as Llama 4); the two losses are unweighted.
    router_logits: (T, E) float32, T = all leading axes flattened. tokens_per_expert: (E,) int64.
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

    Presets: Llama 4 = the defaults; Mixtral = `score_func="softmax", renormalize=True, shared_expert=False,
    prescale_input=False`. Unlike Meta's reference (inference mode, detached expert input), everything trains.

    Args:
        hidden_dim: F, each expert's (and the shared expert's) hidden size; see `moe_hidden_dim`.
        backend: "grouped" (one `grouped_mm` per projection, or the padded bmm where `grouped_mm_supported`
            is False), "padded" (a capacity-padded (E, C, D) bmm), "loop" (the reference, one iteration per
            expert) or "dense" (every expert on every token: Meta's formulation, E/K times the FLOPs).
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
        # Meta keeps `router_DE` on the MoE; its raw shards rename the shared expert and carry gate statistics
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

    # routed experts, one method per backend; each returns (T, D) in x's dtype
    def _weighted(self, expert: Callable[[Tensor], Tensor], x: Tensor, score: Tensor) -> Tensor:
        """expert(score * x) with `prescale_input`, else score * expert(x) (score float32, as transformers)."""
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
        """x: (..., D) -> `MoEOutput`."""
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
