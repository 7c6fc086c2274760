"""transformers `Mamba2ForCausalLM`, `JambaForCausalLM`, `BambaForCausalLM`, `FalconH1ForCausalLM` <-> Vermeil
`HybridModel`, both ways, strictly (every key accounted for, every shape checked). All four are one
`HybridModel` with a different layer pattern (transformers `models/{mamba2,jamba,bamba,falcon_h1}/`; each
pattern is in its `*_config` below). Initialisation-only fields and dropout are not carried.

Axis legend: L layers, D model dim, E experts, F expert hidden dim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from vermeil.interop import _NO_SPECIAL_TOKENS, _build, _check_silu, _load_strict
from vermeil.models.hybrid import HybridConfig, HybridModel

__all__ = [
    "from_transformers_bamba",
    "from_transformers_falcon_h1",
    "from_transformers_hybrid",
    "from_transformers_jamba",
    "from_transformers_mamba2",
    "hf_to_vermeil_state_dict",
    "to_transformers_bamba",
    "to_transformers_falcon_h1",
    "to_transformers_hybrid",
    "to_transformers_jamba",
    "to_transformers_mamba2",
    "transformers_class_for",
    "vermeil_to_hf_state_dict",
]

_NO_LIMIT = (0.0, math.inf)


def _refuse(cls: str, field: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{cls}: {field}={value!r} {rule}")


# per-layer renames, transformers -> Vermeil (after the layer prefix); `_TRANSPOSED` keys are also transposed
_LAYER_KEYS = {
    "input_layernorm.": "norm.",
    "pre_ff_layernorm.": "ffn_norm.",
    **{f"self_attn.{p}_proj.": f"attention.w{p}." for p in "qkvo"},
    "feed_forward.gate_proj.": "feed_forward.w1.",
    "feed_forward.up_proj.": "feed_forward.w3.",
    "feed_forward.down_proj.": "feed_forward.w2.",
    "feed_forward.router.weight": "feed_forward.router.router_DE",
    "feed_forward.experts.down_proj": "feed_forward.experts.w2",
    "mamba.": "mamba.",
}
_TRANSPOSED = ("feed_forward.router.", "feed_forward.experts.down_proj", "feed_forward.experts.w2")


def _rename(key: str, table: dict[str, str], what: str) -> str:
    """`key` with its prefix replaced by the first matching one of `table`; ValueError naming it if none."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise ValueError(f"{what} key {key!r} has no counterpart")


def _keys(cls: str) -> tuple[dict[str, str], str, dict[str, str]]:
    """The renames of `cls`, transformers -> Vermeil: top-level keys, the layer prefix, keys inside a layer."""
    if cls == "Mamba2ForCausalLM":
        top = {"backbone.embeddings.": "embedding.", "backbone.norm_f.": "norm_f.", "lm_head.": "lm_head."}
        return top, "backbone.layers.", {"norm.": "norm.", "mixer.": "mamba."}
    top = {"model.embed_tokens.": "embedding.", "model.final_layernorm.": "norm_f.", "lm_head.": "lm_head."}
    return top, "model.layers.", _LAYER_KEYS


def _convert_state(state: dict[str, Tensor], cls: str, to_vermeil: bool) -> dict[str, Tensor]:
    """`state` renamed by `_keys(cls)` read one way or the other. The experts' fused transformers weight
    gate_up_proj (E, 2F, D), gate rows first, is Vermeil's w1 and w3, (E, D, F) each."""
    top, layer_prefix, layer = _keys(cls)
    source, target, side = r"(?:backbone|model)\.layers\.", "layers.", f"{cls}:"
    if not to_vermeil:
        top, layer = ({v: k for k, v in table.items()} for table in (top, layer))
        source, target, side = r"layers\.", layer_prefix, f"{cls}: Vermeil"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(("rotary_emb.inv_freq", "mamba.mup_vector")):
            continue  # buffers transformers may carry; Vermeil rebuilds them from the config
        m = re.match(rf"^{source}(\d+)\.(.*)$", key)
        if m is None:
            out[_rename(key, top, side)] = value
            continue
        prefix, rest = f"{target}{m[1]}.", m[2]
        if rest == "feed_forward.experts.gate_up_proj":
            gate, up = value.transpose(1, 2).chunk(2, dim=2)
            out[prefix + "feed_forward.experts.w1"], out[prefix + "feed_forward.experts.w3"] = gate, up
        elif rest == "feed_forward.experts.w1":
            fused = torch.cat([value, state[key[:-1] + "3"]], dim=2).transpose(1, 2)
            out[prefix + "feed_forward.experts.gate_up_proj"] = fused
        elif rest != "feed_forward.experts.w3":
            new = _rename(rest, layer, f"{side} {key!r}: layer")
            out[prefix + new] = value.transpose(-2, -1) if rest.startswith(_TRANSPOSED) else value
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_vermeil_state_dict(state: dict[str, Tensor], cls: str) -> dict[str, Tensor]:
    """A transformers state dict of `cls` -> `HybridModel` keys; ValueError names a key mapping to nothing."""
    return _convert_state(state, cls, to_vermeil=True)


def vermeil_to_hf_state_dict(state: dict[str, Tensor], cls: str) -> dict[str, Tensor]:
    """The inverse of `hf_to_vermeil_state_dict`."""
    return _convert_state(state, cls, to_vermeil=False)


# HybridConfig field -> the transformers config field of each class, read both ways
_COMMON = {
    "dim": "hidden_size",
    "vocab_size": "vocab_size",
    "tie_embeddings": "tie_word_embeddings",
    "initializer_range": "initializer_range",
}
_MAMBA = {  # Jamba's Mamba-1 and Bamba's / Falcon-H1's Mamba-2
    "d_state": "mamba_d_state",
    "d_conv": "mamba_d_conv",
    "expand": "mamba_expand",
    "ssm_bias": "mamba_proj_bias",
    "ssm_conv_bias": "mamba_conv_bias",
}
_ATTENTION = {
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
}
_MAMBA2_ATTENTION = {  # Bamba and Falcon-H1
    **_COMMON,
    **_MAMBA,
    **_ATTENTION,
    "headdim": "mamba_d_head",
    "nheads": "mamba_n_heads",
    "ngroups": "mamba_n_groups",
    "dt_limit": "time_step_limit",
    "chunk_size": "mamba_chunk_size",
    "head_dim": "head_dim",
    "attn_bias": "attention_bias",
    "ffn_bias": "mlp_bias",
}
# Falcon-H1's scalar muP multipliers
_MULTIPLIERS = {
    "embedding_multiplier": "embedding_multiplier",
    "lm_head_multiplier": "lm_head_multiplier",
    "attn_in_multiplier": "attention_in_multiplier",
    "attn_out_multiplier": "attention_out_multiplier",
    "key_multiplier": "key_multiplier",
    "ssm_in_multiplier": "ssm_in_multiplier",
    "ssm_out_multiplier": "ssm_out_multiplier",
}
_FIELDS = {
    "Mamba2ForCausalLM": {
        **_COMMON,
        "headdim": "head_dim",
        "nheads": "num_heads",
        "ngroups": "n_groups",
        "dt_limit": "time_step_limit",
        "d_state": "state_size",
        "d_conv": "conv_kernel",
        "expand": "expand",
        "chunk_size": "chunk_size",
        "ssm_bias": "use_bias",
        "ssm_conv_bias": "use_conv_bias",
        "norm_eps": "layer_norm_epsilon",
        "residual_in_fp32": "residual_in_fp32",
    },
    "JambaForCausalLM": {
        **_COMMON,
        **_MAMBA,
        **_ATTENTION,
        "dt_rank": "mamba_dt_rank",
        "experts_per_token": "num_experts_per_tok",
    },
    "BambaForCausalLM": {**_MAMBA2_ATTENTION, "z_loss": "z_loss_coefficient"},
    "FalconH1ForCausalLM": {
        **_MAMBA2_ATTENTION,
        **_MULTIPLIERS,
        "d_ssm": "mamba_d_ssm",
        "ssm_norm": "mamba_rms_norm",
        "ssm_norm_before_gate": "mamba_norm_before_gate",
    },
}
# "nheads" is no HybridConfig field: it is ssm_inner_dim // headdim
_DEFAULTS = {f.name: f.default for f in fields(HybridConfig)}


def _hybrid_config(cls: str, config: Any, **given: Any) -> HybridConfig:
    """`HybridConfig(**given)` plus the fields `_FIELDS[cls]` names, read from `config` in HybridConfig's types
    (transformers may hold 0 for False or 1 for 1.0)."""
    _check_silu(cls, config)
    for ours, theirs in _FIELDS[cls].items():
        if ours not in given and ours != "nheads":
            value, default = getattr(config, theirs), _DEFAULTS[ours]
            given[ours] = type(default)(value) if isinstance(default, (bool, float)) else value
    max_seq_len = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)
    return HybridConfig(**given, max_seq_len=max_seq_len)


def _dt_limit(cls: str, limit: Any) -> list[float] | None:
    low, high = _NO_LIMIT if limit is None else map(float, limit)
    if not 0 <= low <= high:
        raise _refuse(cls, "time_step_limit", tuple(limit), "must be (low, high) with 0 <= low <= high")
    return None if (low, high) == _NO_LIMIT else [low, high]


def _mamba2_fields(cls: str, config: Any, d_inner: int) -> dict[str, Any]:
    """Check the Mamba-2 heads against the width `d_inner`; the clamp of dt."""
    names = _FIELDS[cls]
    headdim, nheads = getattr(config, names["headdim"]), getattr(config, names["nheads"])
    if headdim * nheads != d_inner:
        raise _refuse(
            cls, names["headdim"], headdim, f"times {names['nheads']}={nheads} must equal the width {d_inner}"
        )
    return {"dt_limit": _dt_limit(cls, config.time_step_limit)}


def _attention_fields(cls: str, config: Any) -> dict[str, Any]:
    """The head width where transformers leaves it None; RoPE (only 'default', maybe partial)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse(cls, "rope_parameters['rope_type']", rope_type, "is not supported: only 'default' RoPE")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        rule = (
            f"gives a rotary width int(head_dim={head_dim} * factor)={rotary_dim}: it must be even and >= 2"
        )
        raise _refuse(cls, "partial_rotary_factor", factor, rule)
    rotary = None if rotary_dim == head_dim else rotary_dim
    return {"head_dim": head_dim, "rope_theta": theta, "rotary_dim": rotary}


def mamba2_config(config: Any) -> HybridConfig:
    """`Mamba2Config` -> `HybridConfig`: pattern ["S"] * L, no feed-forward."""
    cls = "Mamba2ForCausalLM"
    return _hybrid_config(
        cls,
        config,
        pattern=["S"],
        n_layers=config.num_hidden_layers,
        **_mamba2_fields(cls, config, config.expand * config.hidden_size),
        feed_forward="none",
    )


def _periodic(n: int, period: int, offset: int) -> list[bool]:
    return [i % period == offset for i in range(n)]


def jamba_config(config: Any) -> HybridConfig:
    """`JambaConfig` -> `HybridConfig`: "A" where i % attn_layer_period == attn_layer_offset, else Mamba-1
    with dt/B/C RMSNorms ("M"); MoE ("E") where i % expert_layer_period == expert_layer_offset, else SwiGLU
    ("D"); attention without positions; router softmax over all experts, top-k not renormalised. Vermeil
    sums each MoE layer's Switch load-balancing loss, transformers computes one over all layers' router logits
    concatenated: the router losses differ slightly (the forward and its gradients do not)."""
    n = config.num_hidden_layers
    attn = _periodic(n, config.attn_layer_period, config.attn_layer_offset)
    moe = _periodic(n, config.expert_layer_period, config.expert_layer_offset)
    if config.num_experts <= 1:
        moe = [False] * n  # transformers builds a dense MLP where a layer has one expert
    experts = max(config.num_experts, 1)
    return _hybrid_config(
        "JambaForCausalLM",
        config,
        pattern=["A" if a else "M" for a in attn],
        ffn_pattern=["E" if e else "D" for e in moe],
        mamba_inner_norms=True,
        head_dim=config.hidden_size // config.num_attention_heads,
        rotary=False,
        feed_forward="swiglu",
        num_experts=experts,
        experts_per_token=min(config.num_experts_per_tok, experts),
        moe_renormalize=False,
        # transformers adds the router loss only with output_router_logits (off by default)
        moe_aux_loss_coef=float(config.router_aux_loss_coef) if config.output_router_logits else 0.0,
    )


def bamba_config(config: Any) -> HybridConfig:
    """`BambaConfig` -> `HybridConfig`: "A" at `attn_layer_indices`, else "S"; SwiGLU everywhere; RoPE on the
    first head_dim * partial_rotary_factor channels. transformers averages the z loss over every position,
    Vermeil over the positions that have a target."""
    cls = "BambaForCausalLM"
    n = config.num_hidden_layers
    indices = list(config.attn_layer_indices or [])
    bad = [i for i in indices if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise _refuse(
            cls, "attn_layer_indices", indices, f"must lie in [0, num_hidden_layers={n}); {bad} do not"
        )
    return _hybrid_config(
        cls,
        config,
        pattern=["A" if i in indices else "S" for i in range(n)],
        **_mamba2_fields(cls, config, config.mamba_expand * config.hidden_size),
        **_attention_fields(cls, config),
        feed_forward="swiglu",
        z_loss=float(config.z_loss_coefficient or 0.0),
    )


def falcon_h1_config(config: Any) -> HybridConfig:
    """`FalconH1Config` -> `HybridConfig`: "S+A" everywhere (Mamba-2 and attention in parallel on one
    normalised input), SwiGLU; the muP multipliers are applied at run time, as transformers does, so gradients
    match too."""
    cls = "FalconH1ForCausalLM"
    if bool(config.mamba_proj_bias) != bool(config.projectors_bias):
        why = "Vermeil's Mamba-2 block has one bias switch for in_proj and out_proj"
        rule = f"must equal projectors_bias={config.projectors_bias}: {why}"
        raise _refuse(cls, "mamba_proj_bias", config.mamba_proj_bias, rule)
    ssm_mult = [float(m) for m in config.ssm_multipliers]
    if len(ssm_mult) != 5:
        raise _refuse(
            cls, "ssm_multipliers", config.ssm_multipliers, "must hold 5 numbers ([z, x, B, C, dt])"
        )
    mlp_mult = [float(m) for m in config.mlp_multipliers]
    if len(mlp_mult) != 2:
        raise _refuse(cls, "mlp_multipliers", config.mlp_multipliers, "must hold 2 numbers ([gate, down])")
    d_inner = config.mamba_d_ssm or config.mamba_expand * config.hidden_size
    return _hybrid_config(
        cls,
        config,
        pattern=["S+A"],
        n_layers=config.num_hidden_layers,
        d_ssm=d_inner,
        **_mamba2_fields(cls, config, d_inner),
        **_attention_fields(cls, config),
        feed_forward="swiglu",
        ssm_proj_multipliers=None if ssm_mult == [1.0] * 5 else ssm_mult,
        mlp_gate_multiplier=mlp_mult[0],
        mlp_out_multiplier=mlp_mult[1],
    )


_CONFIGS: dict[str, Callable[[Any], HybridConfig]] = {
    "Mamba2ForCausalLM": mamba2_config,
    "JambaForCausalLM": jamba_config,
    "BambaForCausalLM": bamba_config,
    "FalconH1ForCausalLM": falcon_h1_config,
}


def from_transformers_hybrid(hf_model: nn.Module) -> HybridModel:
    """Any of the four classes as a `HybridModel` with the same weights, dtype and device; ValueError names a
    config field Vermeil cannot express (with its value) or a key that does not map."""
    cls = type(hf_model).__name__
    if cls not in _CONFIGS:
        raise ValueError(f"from_transformers_hybrid: {cls} is not one of {sorted(_CONFIGS)}")
    state = hf_to_vermeil_state_dict(hf_model.state_dict(), cls)
    return _build(HybridModel, _CONFIGS[cls](hf_model.config), state, hf_model)


def transformers_class_for(config: HybridConfig) -> str:
    """The transformers class a `HybridConfig`'s layout belongs to (the converter checks the options);
    ValueError names a pattern none of the four has."""
    kinds = set(config.layer_kinds)
    if kinds == {"S"} and set(config.layer_ffns) == {"none"}:
        return "Mamba2ForCausalLM"
    if kinds == {"S+A"}:
        return "FalconH1ForCausalLM"
    if kinds <= {"M", "A"} and "M" in kinds:
        return "JambaForCausalLM"
    if kinds <= {"S", "A"}:
        return "BambaForCausalLM"
    raise ValueError(
        f"to_transformers: pattern={config.pattern!r} (layers {sorted(kinds)}) matches none of Mamba2 (all 'S', "
        "feed_forward none), Jamba ('M' and 'A'), Bamba ('S' and 'A') or FalconH1 (all 'S+A')"
    )


# What each class cannot vary: HybridConfig fields and the values they must hold; the feed-forward kinds.
_NO_MULTIPLIERS = {
    **dict.fromkeys([*_MULTIPLIERS, "mlp_gate_multiplier", "mlp_out_multiplier"], 1.0),
    "ssm_proj_multipliers": None,
}
_ATTENTION_FIXED = dict(qk_norm=None, window=None, merge="sum", residual_in_fp32=False)
_ROTARY = dict(_ATTENTION_FIXED, rotary=True, mamba_inner_norms=False)
_GATED_NORM = dict(ssm_norm=True, ssm_norm_before_gate=False, d_ssm=None)
_JAMBA = dict(rotary=False, mamba_inner_norms=True, attn_bias=False, ffn_bias=False, moe_renormalize=False)
_FIXED = {
    "Mamba2ForCausalLM": {**_NO_MULTIPLIERS, **_GATED_NORM},
    "JambaForCausalLM": {**_ATTENTION_FIXED, **_NO_MULTIPLIERS, **_JAMBA},
    "BambaForCausalLM": {**_ROTARY, **_NO_MULTIPLIERS, **_GATED_NORM},
    "FalconH1ForCausalLM": dict(_ROTARY, rotary_dim=None),
}
_FFNS = {
    "Mamba2ForCausalLM": {"none"},
    "JambaForCausalLM": {"swiglu", "moe"},
    "BambaForCausalLM": {"swiglu"},
    "FalconH1ForCausalLM": {"swiglu"},
}


def _check(cls: str, config: HybridConfig, **required: Any) -> None:
    """Every named field must hold the value the target class implies."""
    for field, want in required.items():
        if (got := getattr(config, field)) != want:
            raise _refuse(f"to_transformers({cls})", field, got, f"cannot be expressed (it must be {want!r})")


def _find_period(cls: str, what: str, marks: list[bool], key: str) -> dict[str, int]:
    """Jamba's `{key}_period` and `{key}_offset` (offset < period) with marks[i] == (i % period == offset)."""
    n = len(marks)
    for period in range(1, n + 2):
        for offset in range(period):
            if _periodic(n, period, offset) == marks:
                return {f"{key}_period": period, f"{key}_offset": offset}
    where = [i for i, m in enumerate(marks) if m]
    raise ValueError(
        f"to_transformers({cls}): {what} at {where} are not periodic (i % period == offset), as Jamba's config needs"
    )


def _hf_config(model: HybridModel, cls: str) -> Any:
    import transformers

    cfg = model.config
    _check(cls, cfg, **_FIXED[cls])
    bad = sorted(set(cfg.layer_ffns) - _FFNS[cls])
    if bad:
        raise ValueError(
            f"to_transformers({cls}): feed-forward kinds {bad} cannot be expressed (only {sorted(_FFNS[cls])})"
        )
    n = len(cfg.layer_kinds)
    resolved = {  # the fields whose None means a rule
        "kv_heads": cfg.kv_heads or cfg.heads,
        "head_dim": cfg.attention_head_dim,
        "hidden_dim": cfg.ffn_hidden_dim,
        "d_ssm": cfg.ssm_inner_dim,
        "nheads": cfg.ssm_inner_dim // cfg.headdim,
        "dt_limit": _NO_LIMIT if cfg.dt_limit is None else tuple(float(v) for v in cfg.dt_limit),
        "dt_rank": cfg.dt_rank if cfg.dt_rank is not None else math.ceil(cfg.dim / 16),
    }
    kw = {
        theirs: resolved[ours] if ours in resolved else getattr(cfg, ours)
        for ours, theirs in _FIELDS[cls].items()
    }
    kw.update(num_hidden_layers=n, **_NO_SPECIAL_TOKENS)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cls == "JambaForCausalLM":
        if cfg.moe_hidden_dim not in (None, cfg.ffn_hidden_dim):
            _check(cls, cfg, moe_hidden_dim=cfg.ffn_hidden_dim)
        if cfg.attention_head_dim * cfg.heads != cfg.dim:
            _check(cls, cfg, head_dim=cfg.dim // cfg.heads)
        kw.update(
            **_find_period(cls, "attention layers", [k == "A" for k in cfg.layer_kinds], "attn_layer"),
            **_find_period(cls, "MoE layers", [f == "moe" for f in cfg.layer_ffns], "expert_layer"),
            num_experts=cfg.num_experts if "moe" in cfg.layer_ffns else 1,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
            output_router_logits=cfg.moe_aux_loss_coef > 0,
            max_position_embeddings=max(n, cfg.max_seq_len),
        )
    elif cls == "BambaForCausalLM":
        factor = 1.0 if cfg.rotary_dim is None else cfg.rotary_dim / cfg.attention_head_dim
        kw.update(
            attn_layer_indices=[i for i, k in enumerate(cfg.layer_kinds) if k == "A"],
            rope_parameters={**rope, "partial_rotary_factor": factor},
        )
    elif cls == "FalconH1ForCausalLM":
        kw.update(
            projectors_bias=cfg.ssm_bias,
            rope_parameters=rope,
            ssm_multipliers=list(cfg.ssm_proj_multipliers or [1.0] * 5),
            mlp_multipliers=[cfg.mlp_gate_multiplier, cfg.mlp_out_multiplier],
        )
    return getattr(transformers, cls.replace("ForCausalLM", "Config"))(**kw)


def to_transformers_hybrid(model: HybridModel, cls: str | None = None) -> nn.Module:
    """A `HybridModel` as transformers `cls` (default: `transformers_class_for` its config), with the same
    weights, dtype and device; ValueError names a field the class cannot express."""
    import transformers

    if not isinstance(model, HybridModel):
        raise TypeError(f"to_transformers_hybrid: expected a HybridModel, got {type(model).__name__}")
    cls = cls or transformers_class_for(model.config)
    if cls not in _CONFIGS:
        raise ValueError(f"to_transformers_hybrid: cls={cls!r} is not one of {sorted(_CONFIGS)}")
    weight = model.embedding.weight
    hf = getattr(transformers, cls)(_hf_config(model, cls)).to(device=weight.device, dtype=weight.dtype)
    _load_strict(hf, vermeil_to_hf_state_dict(model.state_dict(), cls), f"to_transformers({cls})")
    return hf.train(model.training)


def _converters(cls: str, short: str) -> tuple[Callable[[nn.Module], HybridModel], Callable[..., nn.Module]]:
    """`from_transformers_<short>` (which refuses any other class) and `to_transformers_<short>`."""

    def from_(hf_model: nn.Module) -> HybridModel:
        got = type(hf_model).__name__
        if got != cls:
            raise ValueError(f"expected a {cls}, got {got}")
        return from_transformers_hybrid(hf_model)

    def to(model: HybridModel) -> nn.Module:
        return to_transformers_hybrid(model, cls)

    from_.__name__, to.__name__ = f"from_transformers_{short}", f"to_transformers_{short}"
    from_.__doc__ = f"Convert a transformers `{cls}` into a `HybridModel` (see `from_transformers_hybrid`)."
    to.__doc__ = f"Convert a `HybridModel` into a transformers `{cls}` (see `to_transformers_hybrid`)."
    return from_, to


from_transformers_mamba2, to_transformers_mamba2 = _converters("Mamba2ForCausalLM", "mamba2")
from_transformers_jamba, to_transformers_jamba = _converters("JambaForCausalLM", "jamba")
from_transformers_bamba, to_transformers_bamba = _converters("BambaForCausalLM", "bamba")
from_transformers_falcon_h1, to_transformers_falcon_h1 = _converters("FalconH1ForCausalLM", "falcon_h1")
