"""Training losses of language models: next-token cross-entropy (+ the MoE auxiliary loss), loss heads, and
the cross-entropy fused with the head projection and chunked over tokens (after Liger-Kernel).

A trainer loss function is `loss_fn(model, batch) -> loss | (loss, {name: scalar tensor})`; a loss head is
`(logits (B, T, V), targets (B, T)) -> loss`. Models hold no loss: they return logits.

Axis legend: B batch, T sequence length, V vocabulary, N tokens (B * T), D hidden width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.models.contract import split_output
from vermeil.nn.checks import check_probability

__all__ = [
    "HEAD_NAMES",
    "LOSS_HEADS",
    "ChunkedLossError",
    "CrossEntropyLoss",
    "LossFn",
    "LossHead",
    "capture_head_input",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "chunked_lm_loss_fn",
    "default_chunk_size",
    "head_loss",
    "lm_head",
    "lm_loss_fn",
    "loss_head",
    "register_loss_head",
]

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Mapping[str, Tensor]]"]
LossHead = Callable[[Tensor, Tensor], Tensor]  # (logits (B, T, V), targets (B, T)) -> scalar loss


def plain(value: Any) -> Any:
    """A replicated DTensor (a loss-parallel cross-entropy) as a plain tensor, differentiably; else unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value  # no import: DTensors only


def causal_lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy plus the MoE auxiliary loss when the model returns one (`split_output`).

    batch: (inputs (B, T), targets (B, T)), targets -100 where unscored -> (loss, {"ce", "aux_loss"}).
    """
    inputs, targets = batch
    logits, aux = split_output(model(inputs))
    ce = _mean_cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), -100)
    # Vocab-sharded logits (loss parallelism) give a replicated DTensor: plain before it meets the plain aux
    # loss, whose backward would otherwise receive a DTensor gradient.
    return _with_aux(plain(ce), aux)


def _mean_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """F.cross_entropy's mean over the kept targets, but 0 (and zero gradients) when none is kept, as the
    chunked cross-entropy: a batch that scores nothing is no divergence (its nan mean stopped the trainer).
    The same float32 sum and division as F.cross_entropy's mean, so scored batches give the same bits."""
    total = plain(F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum"))
    return total / (targets != ignore_index).sum().clamp(min=1).to(total.dtype)


def _with_aux(ce: Tensor, aux: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    if aux is None:
        return ce, {"ce": ce}
    return ce + aux, {"ce": ce, "aux_loss": aux}


class CrossEntropyLoss:
    """Token cross-entropy in float32 with `ignore_index`, plus an optional z-loss (PaLM, arXiv:2204.02311).

    loss = mean over kept tokens of [CE + z_loss * logsumexp(logits)^2]; the z term keeps the softmax
    normaliser near 1 (stabilises large-vocabulary training).
    """

    def __init__(self, ignore_index: int = -100, z_loss: float = 0.0) -> None:
        if not 0 <= z_loss < math.inf:  # nan or inf would make every loss nan or inf
            raise ValueError(f"z_loss={z_loss} must be a finite number >= 0")
        self.ignore_index, self.z_loss = ignore_index, z_loss

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits: (B, T, V), targets: (B, T) -> scalar."""
        flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
        tgt = targets.reshape(-1)
        loss = _mean_cross_entropy(flat, tgt, self.ignore_index)
        if self.z_loss:
            keep = (tgt != self.ignore_index).to(flat.dtype)
            z = torch.logsumexp(flat, dim=-1)
            loss = loss + self.z_loss * (z.square() * keep).sum() / keep.sum().clamp(min=1)
        return loss

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(ignore_index={self.ignore_index}, z_loss={self.z_loss})"


# Loss heads selectable by name in a model config: name -> factory(config) -> LossHead.
LOSS_HEADS: dict[str, Callable[[Any], LossHead]] = {
    "cross_entropy": lambda c: CrossEntropyLoss(getattr(c, "ignore_index", -100), getattr(c, "z_loss", 0.0)),
}


def register_loss_head(name: str, factory: Callable[[Any], LossHead]) -> None:
    """Make `loss_head: <name>` valid in configs; `factory(config)` returns the callable loss head."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"loss head name={name!r} must be a non-empty str")
    if not callable(factory):
        raise TypeError(f"factory for loss head {name!r} must be callable, got {type(factory).__name__}")
    LOSS_HEADS[name] = factory


def loss_head(config: Any) -> LossHead:
    """The loss head a model config names (`config.loss_head`; "cross_entropy" when it names none)."""
    name = getattr(config, "loss_head", "cross_entropy")
    if name not in LOSS_HEADS:
        raise ValueError(f"loss_head={name!r} must be one of {sorted(LOSS_HEADS)} (register_loss_head)")
    return LOSS_HEADS[name](config)


def head_loss(model: nn.Module, head: LossHead, tokens: Tensor, targets: Tensor | None = None) -> Tensor:
    """A loss head on a language model's logits for tokens (B, T) and targets (B, T); targets=None scores
    next-token prediction on `tokens` itself (logits[:, :-1] against tokens[:, 1:])."""
    logits, _ = split_output(model(tokens))
    if targets is None:
        return head(logits[:, :-1], tokens[:, 1:])
    _check_targets(tokens, targets)
    return head(logits, targets)


def _check_targets(tokens: Tensor, targets: Tensor) -> None:
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets.shape={tuple(targets.shape)} must equal tokens.shape={tuple(tokens.shape)}"
        )


def lm_loss_fn(model_config: Any) -> LossFn:
    """The trainer's loss function for a language model: the config's loss head (no metrics) when the config
    has a `loss_head` field, else `causal_lm_loss`."""
    if not hasattr(model_config, "loss_head"):
        return causal_lm_loss
    head = loss_head(model_config)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        return head_loss(model, head, inputs, targets), {}

    loss_fn.loss_head = head  # type: ignore[attr-defined]  # what chunked_lm_loss_fn reads
    return loss_fn


def default_chunk_size(n_tokens: int, vocab: int, dim: int) -> int:
    """Liger-Kernel's rule (`ops/fused_linear_cross_entropy.py`): `ceil(V / D)` chunks, so one chunk of logits
    is about the size of the hidden states (N, D), rounded up to a power of two; at least min(256, N) tokens,
    since every chunk adds a pass over grad_weight (V, D)."""
    chunks = max(1, -(-vocab // max(dim, 1)))
    rows = max(1, -(-n_tokens // chunks), min(256, n_tokens))
    return 1 << (rows - 1).bit_length()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one pass over token chunks: each chunk's logits (c, V) are reduced to the
    loss, turned in place into their gradient, multiplied into grad_hidden and grad_weight, and dropped.
    Backward only scales the stored gradients by the incoming scalar: three matmuls, as unfused."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # (N, D)
        weight: Tensor,  # (V, D)
        bias: Tensor | None,  # (V,)
        targets: Tensor,  # (N,) int64
        chunk_size: int,
        ignore_index: int,
        z_loss: float,
        label_smoothing: float,
        mean: bool,
        grads: bool,
    ) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        keep = targets != ignore_index
        safe = torch.where(keep, targets, torch.zeros_like(targets))  # ignored rows gather a valid column
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # The divisor stays on the device (no host read); 0 kept tokens give a 0 loss, not nan.
        scale = 1.0 / keep.sum().clamp(min=1).to(acc) if mean else hidden.new_ones((), dtype=acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        need_h, need_w, need_b = (grads and ctx.needs_input_grad[i] for i in range(3))  # False for no bias
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]  # (c, D)
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)  # (c, V), input dtype
            logits = logits.to(acc)  # the float32 upcast of one chunk only
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            tgt = safe[start:end, None]
            target_logit = logits.gather(1, tgt).squeeze(1)
            if label_smoothing:
                # (1 - eps) * CE + eps * mean_v(lse - logit_v): F.cross_entropy's label smoothing.
                row = lse - (1 - label_smoothing) * target_logit - label_smoothing * logits.mean(dim=-1)
            else:
                row = lse - target_logit
            if z_loss:
                row = row + z_loss * lse.square()
            weight_row = keep[start:end].to(acc) * scale  # (c,): 0 on ignored rows
            total = total + (row * weight_row).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d row / d logits = softmax * (1 + 2 z lse) - (1 - eps) onehot - eps / V, in place over the logits.
            grad = logits.sub_(lse[:, None]).exp_()
            if z_loss:
                grad.mul_((1 + 2 * z_loss * lse)[:, None])
            grad.scatter_add_(1, tgt, torch.full_like(target_logit[:, None], -(1 - label_smoothing)))
            if label_smoothing:
                grad.sub_(label_smoothing / vocab)
            grad.mul_(weight_row[:, None])
            if grad_b is not None:
                grad_b.add_(grad.sum(dim=0))
            g = grad.to(hidden.dtype)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[start:end])
            if grad_w is not None:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, h)
                else:  # a bf16/fp16 product per chunk, summed in float32 across chunks
                    grad_w.add_(g.T @ h)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            grad_h * grad_out.to(h_dtype) if grad_h is not None else None,
            (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
            (grad_b * grad_out).to(b_dtype) if grad_b is not None else None,
            *[None] * 7,  # the non-tensor arguments
        )


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, targets)` without ever holding the (N, V) logits.

    One chunk's logits are computed in the input (or autocast) dtype, as `nn.Linear` would, upcast to float32,
    reduced and, with gradients enabled, turned into grad_hidden and grad_weight at once (Liger-Kernel's
    `LigerFusedLinearCrossEntropyLoss`; torchtune's `CEWithChunkedOutputLoss` chunks alike). Peak extra
    memory: one float32 chunk of logits, grad_weight (V, D) float32 and grad_hidden (N, D). The gradient is
    computed in the forward: no double backward, and a forward under `torch.no_grad()` cannot backpropagate.

    Args:
        hidden: (..., D), the head's input; leading axes are flattened to N tokens.
        weight: (V, D), the head's weight; bias: (V,) or None.
        targets: (...) int64, the leading shape of `hidden`.
        chunk_size: tokens per chunk; None: `default_chunk_size(N, V, D)`.
        z_loss: PaLM's z-loss coefficient (`z_loss * logsumexp(logits)^2` per token; arXiv:2204.02311).
        label_smoothing: as `F.cross_entropy`'s, in [0, 1).
        reduction: "mean" over the kept tokens (0 when none is, where `F.cross_entropy` gives nan) or "sum".

    Returns the scalar loss in float32 (float64 for float64 inputs).
    """
    if hidden.ndim < 2:
        raise ValueError(f"hidden must have shape (..., D), got {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, D={hidden.shape[-1]}) to match hidden {tuple(hidden.shape)}, got "
            f"{tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets.shape={tuple(targets.shape)} must equal hidden.shape[:-1]={tuple(hidden.shape[:-1])}"
        )
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 class ids, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V={weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (or None)")
    if not z_loss >= 0:
        raise ValueError(f"z_loss={z_loss!r} must be >= 0")
    check_probability("label_smoothing", label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    dim = hidden.shape[-1]
    flat, tgt = hidden.reshape(-1, dim), targets.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat.shape[0], weight.shape[0], dim)
    device_type = flat.device.type
    if torch.is_autocast_enabled(device_type):
        # What nn.Linear does under autocast: the matmul in the autocast dtype (the casts are differentiable).
        dtype = torch.get_autocast_dtype(device_type)
        flat, weight = flat.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != flat.dtype:
        raise TypeError(
            f"hidden ({flat.dtype}) and weight ({weight.dtype}) must share a dtype outside autocast"
        )
    with torch.autocast(device_type, enabled=False):
        args = (chunk_size, ignore_index, float(z_loss), float(label_smoothing), reduction == "mean")
        return _ChunkedLinearCrossEntropy.apply(flat, weight, bias, tgt, *args, torch.is_grad_enabled())


class ChunkedLossError(RuntimeError):
    """The model does not fit the chunked loss (its forward skips or transforms the head's output)."""


# Where the output head (an nn.Linear (D -> V)) is looked for on a model that does not name it in `lm_parts`.
HEAD_NAMES = ("output", "lm_head")


def lm_head(model: nn.Module) -> nn.Linear | None:
    """The nn.Linear output head of a language model (the third of its `lm_parts`, else one of `HEAD_NAMES`),
    or None."""
    parts = getattr(model, "lm_parts", None)
    names = [parts[2]] if isinstance(parts, tuple) and len(parts) == 3 else list(HEAD_NAMES)
    for name in names:
        try:
            head = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(head, nn.Linear):
            return head
    return None


class _HeadInput:
    """What `capture_head_input` saw: the head, its input and the placeholder logits it returned instead."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.hidden: Tensor | None = None
        self.placeholder: Tensor | None = None

    def head_args(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The head's input, and its weight (and bias) rows the model's logits kept (MambaLM cuts its padded
        vocabulary), after checking that the model returned the head's output unchanged but for that cut and
        `.float()`."""
        ph = self.placeholder
        if self.hidden is None or ph is None:
            raise ChunkedLossError(
                "the chunked loss (train.loss_chunk_size) needs the model to call its head (the nn.Linear of "
                "lm_parts, or named output / lm_head) in forward, and it did not: set train.loss_chunk_size=0"
            )
        same = (
            logits.data_ptr() == ph.data_ptr()
            and all(s == 0 for s in logits.stride())
            and tuple(logits.shape[:-1]) == tuple(ph.shape[:-1])
            and logits.shape[-1] <= ph.shape[-1]
        )
        if not same:
            raise ChunkedLossError(
                "the chunked loss (train.loss_chunk_size) needs the model's logits to be its head's output "
                "(optionally cut to the vocabulary and upcast), but this model transforms them: set "
                "train.loss_chunk_size=0"
            )
        vocab = logits.shape[-1]
        bias = self.head.bias[:vocab] if self.head.bias is not None else None
        return self.hidden, self.head.weight[:vocab], bias


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[_HeadInput]:
    """Within the block, `lm_head(model)` records its input (B, T, D) and returns a zero-stride float32
    placeholder of the logits' shape instead of computing them (no memory, no matmul)."""
    head = lm_head(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output head (an nn.Linear named by its lm_parts, or output / "
            "lm_head): the chunked loss cannot capture its hidden states"
        )
    seen = _HeadInput(head)
    own = head.__dict__.get("forward")

    def forward(x: Tensor) -> Tensor:
        seen.hidden = x
        # float32 so that the model's `.float()` is a no-op view, not a (B, T, V) copy.
        seen.placeholder = x.new_zeros((), dtype=torch.float32).expand(*x.shape[:-1], head.out_features)
        return seen.placeholder

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del head.forward
        if own is not None:
            head.forward = own  # type: ignore[method-assign]


def chunked_lm_loss_fn(loss_fn: LossFn, model: nn.Module, chunk_size: int | None = None) -> LossFn | None:
    """`loss_fn` with the head and cross-entropy fused (`chunked_cross_entropy`), or None where there is no
    equivalent: only `causal_lm_loss` and `lm_loss_fn`'s `CrossEntropyLoss` heads, on a model with a head."""
    head = getattr(loss_fn, "loss_head", None)
    causal = loss_fn is causal_lm_loss
    if lm_head(model) is None or not (causal or type(head) is CrossEntropyLoss):
        return None
    ce = CrossEntropyLoss() if causal else head
    options = dict(chunk_size=chunk_size, ignore_index=ce.ignore_index, z_loss=ce.z_loss)

    def chunked(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        if not causal:
            _check_targets(inputs, targets)
        with capture_head_input(model) as seen:
            logits, aux = split_output(model(inputs))
        hidden, weight, bias = seen.head_args(logits)
        loss = chunked_cross_entropy(hidden, weight, targets, bias=bias, **options)
        return _with_aux(loss, aux) if causal else (loss, {})

    return chunked
