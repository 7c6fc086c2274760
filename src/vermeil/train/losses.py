"""Training losses of language models: next-token cross-entropy (+ the MoE auxiliary loss), and loss heads.

A loss function of the `Trainer` takes the model and one batch and returns the loss to minimise, or `(loss,
metrics)` where metrics are scalar tensors logged by name (`{"ce": ..., "aux_loss": ...}`).

A loss head is a callable `(logits (B, T, V), targets (B, T)) -> loss`. `CrossEntropyLoss` (float32, with
`ignore_index` and PaLM's z-loss) is the one shipped; `register_loss_head` adds others by name. A model config
may name its head (`HybridConfig.loss_head`, with `ignore_index` and `z_loss`): `loss_head(config)` builds it and
`lm_loss_fn(config)` turns it into the trainer's loss function. Models hold no loss: they return logits.

Axis legend: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSS_HEADS",
    "CrossEntropyLoss",
    "LossFn",
    "LossHead",
    "causal_lm_loss",
    "head_loss",
    "lm_loss_fn",
    "loss_head",
    "register_loss_head",
]

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Mapping[str, Tensor]]"]
LossHead = Callable[[Tensor, Tensor], Tensor]  # (logits (B, T, V), targets (B, T)) -> scalar loss


def logits_and_aux(output: Any) -> tuple[Tensor, Tensor | None]:
    """(logits, MoE auxiliary loss or None) of a model output: a logits tensor, or an object with `.logits`
    and optionally `.aux_loss` (the LLM's `TransformerOutput`)."""
    if isinstance(output, Tensor):
        return output, None
    return output.logits, getattr(output, "aux_loss", None)


def plain(value: Any) -> Any:
    """A replicated DTensor (a loss-parallel cross-entropy) as a plain tensor, differentiably; else unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value  # no import: DTensors only


def causal_lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy (ignore_index -100), plus the MoE auxiliary loss when the model returns one.

    Args:
        batch: (inputs (B, T), targets (B, T)); targets hold -100 where nothing is scored.

    Returns:
        (loss, {"ce": cross-entropy, "aux_loss": MoE auxiliary loss (when present)}). A model's output may be
        logits (B, T, V) or an object with `.logits` and optionally `.aux_loss` (the LLM's TransformerOutput).
    """
    inputs, targets = batch
    logits, aux = logits_and_aux(model(inputs))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    # Vocab-sharded logits (loss parallelism) give a replicated DTensor: plain before it meets the plain aux
    # loss, whose backward would otherwise receive a DTensor gradient.
    ce = plain(ce)
    if aux is None:
        return ce, {"ce": ce}
    return ce + aux, {"ce": ce, "aux_loss": aux}


# ----------------------------------------------------------------------------------------------------------
# Loss heads


class CrossEntropyLoss:
    """Token cross-entropy in float32 with `ignore_index`, plus an optional z-loss (PaLM, arXiv:2204.02311).

    loss = mean over kept tokens of [CE + z_loss * logsumexp(logits)^2]; the z term keeps the softmax
    normaliser near 1 (stabilises large-vocabulary training).
    """

    def __init__(self, ignore_index: int = -100, z_loss: float = 0.0) -> None:
        if z_loss < 0:
            raise ValueError(f"z_loss={z_loss} must be >= 0")
        self.ignore_index, self.z_loss = ignore_index, z_loss

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits: (B, T, V), targets: (B, T) -> scalar."""
        flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
        tgt = targets.reshape(-1)
        loss = F.cross_entropy(flat, tgt, ignore_index=self.ignore_index)
        if self.z_loss:
            keep = (tgt != self.ignore_index).to(flat.dtype)
            z = torch.logsumexp(flat, dim=-1)
            loss = loss + self.z_loss * (z.square() * keep).sum() / keep.sum().clamp(min=1)
        return loss

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(ignore_index={self.ignore_index}, z_loss={self.z_loss})"


# Loss heads selectable by name in a model config: name -> factory(config) -> LossHead.
LOSS_HEADS: dict[str, Callable[[Any], LossHead]] = {
    "cross_entropy": lambda cfg: CrossEntropyLoss(
        getattr(cfg, "ignore_index", -100), getattr(cfg, "z_loss", 0.0)
    ),
}


def register_loss_head(name: str, factory: Callable[[Any], LossHead]) -> None:
    """Make `loss_head: <name>` valid in configs; `factory(config)` returns the callable loss head."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"loss head name={name!r} must be a non-empty str")
    if not callable(factory):
        raise TypeError(f"factory for loss head {name!r} must be callable, got {type(factory).__name__}")
    LOSS_HEADS[name] = factory


def loss_head(config: Any) -> LossHead:
    """The loss head a model config names (`config.loss_head`; "cross_entropy" when it names none).

    Raises:
        ValueError: a name not in `LOSS_HEADS`.
    """
    name = getattr(config, "loss_head", "cross_entropy")
    if name not in LOSS_HEADS:
        raise ValueError(f"loss_head={name!r} must be one of {sorted(LOSS_HEADS)} (register_loss_head)")
    return LOSS_HEADS[name](config)


def head_loss(model: nn.Module, head: LossHead, tokens: Tensor, targets: Tensor | None = None) -> Tensor:
    """A loss head on a language model's logits.

    Args:
        tokens: (B, T) inputs.
        targets: (B, T), the token expected after each input position (the head's `ignore_index` skips one);
            None means next-token prediction on `tokens` itself (logits[:, :-1] against tokens[:, 1:]).
    """
    logits, _ = logits_and_aux(model(tokens))
    if targets is None:
        return head(logits[:, :-1], tokens[:, 1:])
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets.shape={tuple(targets.shape)} must equal tokens.shape={tuple(tokens.shape)}"
        )
    return head(logits, targets)


def lm_loss_fn(model_config: Any) -> LossFn:
    """The trainer's loss function for a language model: the config's loss head when it has a `loss_head` field
    (the loss alone, no metrics), else `causal_lm_loss` (with "ce" and the MoE "aux_loss")."""
    if not hasattr(model_config, "loss_head"):
        return causal_lm_loss
    head = loss_head(model_config)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        return head_loss(model, head, inputs, targets), {}

    return loss_fn
