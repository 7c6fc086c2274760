"""Zeta compatibility: `TransformerBlock` with the exact API of zeta's block, working.

    from vermeil.compat.zeta import TransformerBlock
    block = TransformerBlock(dim=512, heads=8)
    output = block(input_data)          # (B, T, 512) -> (B, T, 512): attn + ff, no residual (see below)

zetascale's own `zeta.structs.transformer_block.TransformerBlock` (2.8.8) cannot be constructed
(it passes `use_flash_attn` to a full `Attention`, swaps its xPos helper's arguments and drops `qk_scale`);
this is `vermeil.nn.blocks.ParallelTransformerBlock` under zeta's name.

Axis legend: B batch, T length, D model dim.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import Tensor

from vermeil.nn.blocks import ParallelTransformerBlock

__all__ = ["TransformerBlock", "convert_palm_state_dict"]


class TransformerBlock(ParallelTransformerBlock):
    """Zeta's `TransformerBlock`: PaLM's parallel attention + SwiGLU block with zeta's signature.

    Same arguments and computation as `vermeil.nn.blocks.ParallelTransformerBlock`, with one different
    default: `residual=False`. zeta's block is a line-for-line copy of PaLM-rlhf-pytorch's
    `ParallelTransformerBlock`, which returns `attn + ff` and leaves the residual to a `Residual` wrapper in
    the model; code written against zeta therefore adds `x` itself (`x = block(x) + x`), and returning the
    residual here would count `x` twice. The usage "output = transformer_block(input_data)" is this
    contract. Pass `residual=True` to get `x + attn + ff` (the default of the vermeil.nn block).

    `finetune_modules=(lora_q, lora_k, lora_v, lora_o)` may be given to the constructor (as a
    fine-tuning example does; they are registered as submodules) or to `forward`. Shapes: lora_q D -> H*Dh,
    lora_k and lora_v D -> Dh (one shared key/value head), lora_o H*Dh -> D; e.g.
    `vermeil.nn.lora.LoRA(512, 8 * 64)` or a bias-free `nn.Linear`.
    """

    # ParallelTransformerBlock's constructor with residual=False bound: the signature (and
    # inspect.signature) stays zeta's, and one definition serves both classes.
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

    Keys are those of the block itself (strip PaLM's `layers.N.fn.` prefix first). LoRA weights
    (`finetune_modules...`) belong to the model, not the block, in PaLM and are not converted.

    Raises:
        ValueError: on a key this map does not know, naming it.
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
