"""diffusers `FluxTransformer2DModel` <-> Vermeil `Flux` (BFL layout), by an explicit key map.

The layouts differ in three ways (black-forest-labs/flux `model.py`; diffusers `transformer_flux.py`):
    - diffusers splits q, k and v; BFL fuses them into one `qkv` Linear in `(K H Dh)` order, and the single
      blocks fuse `[q | k | v | mlp-in]` into `linear1`.
    - the final adaLN holds (scale, shift) in diffusers, (shift, scale) in BFL (see `swap_scale_shift`).
    - diffusers takes batch-shared 2-D ids and the timestep already divided by 1000; Vermeil takes per-sample
      ids (or a leading 1) and the same [0, 1] timestep, so equal inputs give equal outputs.
"""

# Shapes: D hidden size, M MLP width, Dh head dim.

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vermeil.models.flux import Flux, FluxParams

__all__ = ["flux_params_from_diffusers", "from_diffusers", "to_diffusers"]

# BFL key (suffix) -> diffusers keys concatenated along dim 0 (one key: a rename). "{}" is .weight and .bias.
_TOP: dict[str, list[str]] = {
    "img_in.{}": ["x_embedder.{}"],
    "txt_in.{}": ["context_embedder.{}"],
    "time_in.in_layer.{}": ["time_text_embed.timestep_embedder.linear_1.{}"],
    "time_in.out_layer.{}": ["time_text_embed.timestep_embedder.linear_2.{}"],
    "vector_in.in_layer.{}": ["time_text_embed.text_embedder.linear_1.{}"],
    "vector_in.out_layer.{}": ["time_text_embed.text_embedder.linear_2.{}"],
    "final_layer.linear.{}": ["proj_out.{}"],
    "final_layer.adaLN_modulation.1.{}": ["norm_out.linear.{}"],  # halves swapped, see _SWAPPED
}
_GUIDANCE: dict[str, list[str]] = {
    "guidance_in.in_layer.{}": ["time_text_embed.guidance_embedder.linear_1.{}"],
    "guidance_in.out_layer.{}": ["time_text_embed.guidance_embedder.linear_2.{}"],
}
_DOUBLE: dict[str, list[str]] = {
    "img_mod.lin.{}": ["norm1.linear.{}"],
    "txt_mod.lin.{}": ["norm1_context.linear.{}"],
    "img_attn.qkv.{}": ["attn.to_q.{}", "attn.to_k.{}", "attn.to_v.{}"],
    "txt_attn.qkv.{}": ["attn.add_q_proj.{}", "attn.add_k_proj.{}", "attn.add_v_proj.{}"],
    "img_attn.proj.{}": ["attn.to_out.0.{}"],
    "txt_attn.proj.{}": ["attn.to_add_out.{}"],
    "img_mlp.0.{}": ["ff.net.0.proj.{}"],
    "img_mlp.2.{}": ["ff.net.2.{}"],
    "txt_mlp.0.{}": ["ff_context.net.0.proj.{}"],
    "txt_mlp.2.{}": ["ff_context.net.2.{}"],
    "img_attn.norm.query_norm.scale": ["attn.norm_q.weight"],
    "img_attn.norm.key_norm.scale": ["attn.norm_k.weight"],
    "txt_attn.norm.query_norm.scale": ["attn.norm_added_q.weight"],
    "txt_attn.norm.key_norm.scale": ["attn.norm_added_k.weight"],
}
_SINGLE: dict[str, list[str]] = {
    "linear1.{}": ["attn.to_q.{}", "attn.to_k.{}", "attn.to_v.{}", "proj_mlp.{}"],
    "linear2.{}": ["proj_out.{}"],
    "modulation.lin.{}": ["norm.linear.{}"],
    "norm.query_norm.scale": ["attn.norm_q.weight"],
    "norm.key_norm.scale": ["attn.norm_k.weight"],
}
_SWAPPED = ("final_layer.adaLN_modulation.1.",)


def _swap_halves(t: Tensor) -> Tensor:
    """(scale, shift) <-> (shift, scale) along dim 0 (diffusers `swap_scale_shift`)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def _key_map(params: FluxParams) -> dict[str, list[str]]:
    """Every Vermeil (BFL) parameter name -> the diffusers names it is made of, in concatenation order."""
    out: dict[str, list[str]] = {}

    def add(table: dict[str, list[str]], bfl_prefix: str, dif_prefix: str) -> None:
        for bfl, difs in table.items():
            for suffix in ("weight", "bias") if "{}" in bfl else ("",):
                out[bfl_prefix + bfl.format(suffix)] = [dif_prefix + d.format(suffix) for d in difs]

    add(_TOP, "", "")
    if params.guidance_embed:
        add(_GUIDANCE, "", "")
    for i in range(params.depth):
        add(_DOUBLE, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
    for i in range(params.depth_single_blocks):
        add(_SINGLE, f"single_blocks.{i}.", f"single_transformer_blocks.{i}.")
    return out


def flux_params_from_diffusers(config: Any) -> FluxParams:
    """FluxParams equal to a diffusers `FluxTransformer2DModel.config` (a FrozenDict or a plain dict)."""
    cfg = dict(config)
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    patch = int(cfg.get("patch_size", 1))
    out_channels = cfg.get("out_channels") or cfg["in_channels"]
    return FluxParams(
        in_channels=int(cfg["in_channels"]),
        # diffusers' proj_out emits patch * patch * out_channels per token, as BFL LastLayer(patch_size).
        out_channels=patch * patch * int(out_channels),
        vec_in_dim=int(cfg["pooled_projection_dim"]),
        context_in_dim=int(cfg["joint_attention_dim"]),
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,  # diffusers hard-codes 4 in FeedForward and FluxSingleTransformerBlock
        num_heads=heads,
        depth=int(cfg["num_layers"]),
        depth_single_blocks=int(cfg["num_single_layers"]),
        axes_dim=[int(a) for a in cfg["axes_dims_rope"]],
        theta=10_000,  # diffusers hard-codes FluxPosEmbed(theta=10000)
        qkv_bias=True,  # diffusers' FluxAttention always has q/k/v biases
        guidance_embed=bool(cfg["guidance_embeds"]),
    )


def from_diffusers(
    transformer: nn.Module, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Flux:
    """A diffusers `FluxTransformer2DModel` as a `Flux` with BFL's names, reading only its `.config` and
    `.state_dict()`; `device` and `dtype` default to those of its first tensor. ValueError names a diffusers
    key missing or left unused, a Flux key left unfilled, and a shape mismatch."""
    params = flux_params_from_diffusers(transformer.config)
    state = transformer.state_dict()
    fused = sorted(k for k in state if ".to_qkv." in k or ".to_added_qkv." in k)
    if fused:
        raise ValueError(
            f"fused diffusers projections are not supported ({fused[:3]}...); call "
            "transformer.unfuse_qkv_projections() before converting"
        )
    first = next(iter(state.values()))
    device, dtype = device or first.device, dtype or first.dtype
    model = Flux(params, device="meta", dtype=dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    key_map = _key_map(params)
    wanted = {d for difs in key_map.values() for d in difs}
    missing, unused = sorted(wanted - set(state)), sorted(set(state) - wanted)
    unfilled = sorted(set(expected) - set(key_map))
    if missing or unused or unfilled:
        raise ValueError(
            "from_diffusers: state dicts do not line up; "
            f"diffusers keys missing: {missing}; diffusers keys not used: {unused}; Flux keys not filled: {unfilled}"
        )
    out: dict[str, Tensor] = {}
    for bfl, difs in key_map.items():
        tensor = torch.cat([state[d] for d in difs], dim=0) if len(difs) > 1 else state[difs[0]]
        if bfl.startswith(_SWAPPED):
            tensor = _swap_halves(tensor)
        if bfl not in expected:
            raise ValueError(f"key map error: {bfl} is not a Flux parameter")
        if tuple(tensor.shape) != tuple(expected[bfl]):
            raise ValueError(
                f"{bfl}: shape {tuple(tensor.shape)} built from {difs} does not match Flux's {tuple(expected[bfl])}"
            )
        out[bfl] = tensor
    model = model.to_empty(device=device)
    model.load_state_dict(out, strict=True)  # copies, casting to the model's dtype
    return model


def to_diffusers(model: Flux) -> Any:
    """A `Flux` as a diffusers `FluxTransformer2DModel` (needs diffusers) in the model's dtype and device.

    diffusers fixes theta=10000, mlp_ratio=4 and q/k/v biases: other values raise, except qkv_bias=False
    (zero biases are exact).
    """
    from diffusers import FluxTransformer2DModel  # an optional extra, imported only here

    p = model.params
    for name, value, fixed in (("theta", p.theta, 10_000), ("mlp_ratio", p.mlp_ratio, 4)):
        if value != fixed:
            raise ValueError(f"{name}={value}: diffusers' FluxTransformer2DModel hard-codes {name}={fixed}")
    ref = next(model.parameters())
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed,
        axes_dims_rope=tuple(p.axes_dim),
    ).to(device=ref.device, dtype=ref.dtype)
    ours = model.state_dict()
    d, m = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    out: dict[str, Tensor] = {}
    for bfl, difs in _key_map(p).items():
        if bfl not in ours:
            if bfl.endswith("qkv.bias"):  # qkv_bias=False: zero biases reproduce the bias-free projection
                ours[bfl] = torch.zeros(3 * d, device=ref.device, dtype=ref.dtype)
            else:
                raise ValueError(f"to_diffusers: Flux has no parameter {bfl}")
        tensor = ours[bfl]
        if bfl.startswith(_SWAPPED):
            tensor = _swap_halves(tensor)
        # fused rows are [q | k | v] (D each), plus [mlp-in] (M) in the single blocks' linear1
        parts = tensor.split([d] * 3 + [m] * (len(difs) - 3), dim=0) if len(difs) > 1 else (tensor,)
        out.update({dif: part.clone() for dif, part in zip(difs, parts, strict=True)})
    transformer.load_state_dict(out, strict=True)
    return transformer
