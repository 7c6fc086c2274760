"""Zeta compatibility: `TransformerBlock` with the exact API of zeta's block, working.

    from vermeil.compat.zeta import TransformerBlock
    block = TransformerBlock(dim=512, heads=8)
    output = block(input_data)          # (B batch, T length, 512) -> (B, T, 512): attn + ff, no residual

zetascale's own `zeta.structs.transformer_block.TransformerBlock` (2.8.8) cannot be constructed
(it passes `use_flash_attn` to a full `Attention`, swaps its xPos helper's arguments and drops `qk_scale`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import Tensor

from vermeil.nn.blocks import ParallelTransformerBlock

__all__ = ["TransformerBlock", "convert_palm_state_dict"]


class TransformerBlock(ParallelTransformerBlock):
    """`vermeil.nn.blocks.ParallelTransformerBlock` (PaLM's parallel attention + SwiGLU) with zeta's default
    `residual=False`.

    zeta's block copies PaLM-rlhf-pytorch's, which returns `attn + ff` and leaves the residual to a wrapper in
    the model: code written against zeta adds `x` itself (`x = block(x) + x`), so returning it here would count
    `x` twice. `residual=True` gives `x + attn + ff`.
    """

    # residual=False bound: the signature (and inspect.signature) stays zeta's, one definition serves both.
    __init__ = functools.partialmethod(ParallelTransformerBlock.__init__, residual=False)


# PaLM-rlhf-pytorch / zeta block keys -> ours (None: dropped, recomputed or a constant zero).
_PALM_KEYS: dict[str, str | None] = {
    "norm.gamma": "norm.weight",  # PaLM LayerNorm gain
    "norm.g": "norm.weight",  # zeta LayerNorm gain
    "norm.beta": None,  # PaLM: a zero buffer (no learned bias)
    "fused_attn_ff_proj.weight": "fused_attn_ff_proj.weight",
    "attn_out.weight": "attn_out.weight",
    "ff_out.2.weight": "ff_out.2.weight",
    "q_scale": "q_scale",
    "k_scale": "k_scale",
    "rotary_emb.inv_freq": None,  # persistent in PaLM; recomputed here
    "rotary_emb.scale": None,
    "mask": None,
    "pos_emb": None,
    "pos_emb_scale": None,
}


def convert_palm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map one PaLM-rlhf-pytorch / zeta parallel block's state dict onto `ParallelTransformerBlock`'s keys.

    Keys are the block's own (strip PaLM's `layers.N.fn.` prefix first); PaLM keeps LoRA weights in the model,
    so they are not converted. An unknown key raises ValueError naming it.
    """
    unknown = sorted(k for k in state_dict if k not in _PALM_KEYS)
    if unknown:
        raise ValueError(f"state_dict has keys unknown to the PaLM/zeta block map: {unknown}")
    out = {}
    for key, value in state_dict.items():
        target = _PALM_KEYS[key]
        if target is not None:
            out[target] = value
    return out
