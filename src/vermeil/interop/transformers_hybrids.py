"""transformers `Mamba2ForCausalLM`, `JambaForCausalLM`, `BambaForCausalLM`, `FalconH1ForCausalLM` <-> Vermeil
`HybridModel`, both ways, strictly (every key accounted for, every shape checked).

All four are one `HybridModel` with a different layer pattern (transformers `models/{mamba2,jamba,bamba,
falcon_h1}/modeling_*.py`):

    Mamba2     pattern ["S"] * L, no feed-forward             mixer keys under `backbone.layers.N.mixer.`
    Jamba      "A" where i % attn_layer_period == attn_layer_offset, else "M" (Mamba-1 with dt/B/C RMSNorms,
               `mamba_inner_norms`); MoE feed-forward ("E") where i % expert_layer_period ==
               expert_layer_offset, else dense SwiGLU ("D"); attention without positions; router softmax
               over all experts, top-k not renormalised
    Bamba      "A" at attn_layer_indices, else "S"; SwiGLU everywhere; RoPE on the first
               head_dim * partial_rotary_factor channels (`rotary_dim`)
    FalconH1   "S+A" everywhere (Mamba-2 and attention in parallel on one normalised input), SwiGLU; the
               muP multipliers are config fields applied at run time, as transformers does, so gradients match
               too (`embedding_multiplier`, `lm_head_multiplier`, `attn_in/out_multiplier`, `key_multiplier`
               as the attention scale, `ssm_in/out_multiplier`, `ssm_proj_multipliers` = `ssm_multipliers`
               over in_proj's [z, x, B, C, dt] rows, `mlp_gate/out_multiplier` = `mlp_multipliers`)

Key map per layer N (`model.layers.N.` -> `layers.N.`; Mamba2: `backbone.layers.N.` and `mixer.` -> `mamba.`):

    transformers                                   Vermeil                        transform
    model.embed_tokens / backbone.embeddings       embedding
    input_layernorm / norm (Mamba2)                norm
    mamba.* / mixer.*                              mamba.* (same names)
    self_attn.{q,k,v,o}_proj                       attention.{wq,wk,wv,wo}
    pre_ff_layernorm                               ffn_norm
    feed_forward.{gate,up,down}_proj               feed_forward.{w1,w3,w2}
    feed_forward.router.weight (E, D)              feed_forward.router.router_DE  transpose
    feed_forward.experts.gate_up_proj (E, 2F, D)   feed_forward.experts.w1 | w3   split rows (gate first),
                                                                                  transpose to (E, D, F)
    feed_forward.experts.down_proj (E, D, F)       feed_forward.experts.w2        transpose to (E, F, D)
    model.final_layernorm / backbone.norm_f        norm_f
    lm_head                                        lm_head

What is refused, naming the field: an activation other than silu, a RoPE type other than "default", Falcon-H1
with `mamba_proj_bias != projectors_bias` (Vermeil's Mamba-2 block has one bias switch for in_proj and
out_proj), `ssm_multipliers` / `mlp_multipliers` of the wrong length, a rotary width that is odd, attention
layer indices outside the model; going back, any pattern or option the target class has no field for.

Training losses: Jamba's router loss is carried as `moe_aux_loss_coef` (`router_aux_loss_coef` when
`output_router_logits` is on, else 0, as transformers adds it only then); Vermeil sums each MoE layer's Switch
load-balancing loss, transformers computes one over all layers' router logits concatenated, so the two differ
slightly (the forward and its gradients do not). Bamba's `z_loss_coefficient` becomes `z_loss` (transformers
averages the logsumexp^2 over every position, Vermeil over the positions that have a target).

Mamba2's `residual_in_fp32` (its residual stream in float32 under bf16, the default) is carried as the config
field of the same name. Not carried (they do not change a forward): initialisation-only fields, dropout. transformers is imported inside the `to_transformers_*`
functions only.

Axis legend: L layers, D model dim, E experts, F expert hidden dim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vermeil.interop import _check_silu, _load_strict
from vermeil.models.hybrid import HybridConfig, HybridModel
from vermeil.nn.hybrid_parts import PartialRotary, SegmentScaledLinear
from vermeil.nn.positional import RotaryEmbedding

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

# per-layer renames, transformers -> Vermeil (after the layer prefix)
_LAYER_KEYS = {
    "input_layernorm.": "norm.",
    "pre_ff_layernorm.": "ffn_norm.",
    "self_attn.q_proj.": "attention.wq.",
    "self_attn.k_proj.": "attention.wk.",
    "self_attn.v_proj.": "attention.wv.",
    "self_attn.o_proj.": "attention.wo.",
    "feed_forward.gate_proj.": "feed_forward.w1.",
    "feed_forward.up_proj.": "feed_forward.w3.",
    "feed_forward.down_proj.": "feed_forward.w2.",
    "mamba.": "mamba.",
}


def _refuse(cls: str, field: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{cls}: {field}={value!r} {rule}")


# ----------------------------------------------------------------------------------------------------------
# State dicts


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


def hf_to_vermeil_state_dict(state: dict[str, Tensor], cls: str) -> dict[str, Tensor]:
    """A transformers state dict of `cls` -> `HybridModel` keys (experts split and transposed, router transposed).

    Raises:
        ValueError: a key that maps to nothing, named.
    """
    top, _, renames = _keys(cls)
    layer_re = re.compile(r"^(?:backbone|model)\.layers\.(\d+)\.(.*)$")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq") or key.endswith("mamba.mup_vector"):
            continue  # buffers transformers may carry; Vermeil rebuilds them from the config
        m = layer_re.match(key)
        if m is None:
            out[_rename(key, top, f"{cls}:")] = value
            continue
        i, rest = m.groups()
        prefix = f"layers.{i}."
        if rest == "feed_forward.router.weight":
            out[prefix + "feed_forward.router.router_DE"] = value.t()
        elif rest == "feed_forward.experts.gate_up_proj":
            gate, up = value.chunk(2, dim=1)  # (E, F, D) each
            out[prefix + "feed_forward.experts.w1"] = gate.transpose(1, 2)
            out[prefix + "feed_forward.experts.w3"] = up.transpose(1, 2)
        elif rest == "feed_forward.experts.down_proj":
            out[prefix + "feed_forward.experts.w2"] = value.transpose(1, 2)
        else:
            out[prefix + _rename(rest, renames, f"{cls}: {key!r}: layer")] = value
    return {k: v.contiguous() for k, v in out.items()}


def vermeil_to_hf_state_dict(state: dict[str, Tensor], cls: str) -> dict[str, Tensor]:
    """The inverse of `hf_to_vermeil_state_dict`."""
    hf_top, layer_prefix, hf_renames = _keys(cls)
    top, renames = ({v: k for k, v in table.items()} for table in (hf_top, hf_renames))
    layer_re = re.compile(r"^layers\.(\d+)\.(.*)$")
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = layer_re.match(key)
        if m is None:
            out[_rename(key, top, f"{cls}: Vermeil")] = value
            continue
        i, rest = m.groups()
        prefix = f"{layer_prefix}{i}."
        if rest == "feed_forward.router.router_DE":
            out[prefix + "feed_forward.router.weight"] = value.t()
        elif rest.startswith("feed_forward.experts."):
            experts.setdefault(prefix, {})[rest.rsplit(".", 1)[1]] = value
        else:
            out[prefix + _rename(rest, renames, f"{cls}: Vermeil {key!r}: layer")] = value
    for prefix, w in experts.items():
        out[prefix + "feed_forward.experts.gate_up_proj"] = torch.cat(
            [w["w1"].transpose(1, 2), w["w3"].transpose(1, 2)], dim=1
        )
        out[prefix + "feed_forward.experts.down_proj"] = w["w2"].transpose(1, 2)
    return {k: v.contiguous() for k, v in out.items()}


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary tables, in_proj multipliers) are garbage after meta + `to_empty`."""
    for mod in model.modules():
        if isinstance(mod, (RotaryEmbedding, PartialRotary)):
            mod.reset_parameters()
        elif isinstance(mod, SegmentScaledLinear):
            mod.scale = mod._scale(mod.weight.device)


def _build(config: HybridConfig, hf_model: nn.Module) -> HybridModel:
    cls = type(hf_model).__name__
    weight = next(iter(hf_model.parameters()))
    state = hf_to_vermeil_state_dict(hf_model.state_dict(), cls)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embedding.weight"]
    model = HybridModel(config, device="meta", dtype=weight.dtype)
    model.to_empty(device=weight.device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    _rebuild_buffers(model)
    _load_strict(model, state, f"from_transformers({cls})")
    return model.train(hf_model.training)


# ----------------------------------------------------------------------------------------------------------
# transformers -> Vermeil configs


def _dt_limit(cls: str, limit: Any) -> list[float] | None:
    if limit is None:
        return None
    low, high = (float(v) for v in limit)
    if (low, high) == _NO_LIMIT:
        return None
    if not 0 <= low <= high:
        raise _refuse(cls, "time_step_limit", tuple(limit), "must be (low, high) with 0 <= low <= high")
    return [low, high]


def _rope(cls: str, config: Any, head_dim: int) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse(cls, "rope_parameters['rope_type']", rope_type, "is not supported: only 'default' RoPE")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise _refuse(
            cls,
            "partial_rotary_factor",
            factor,
            f"gives a rotary width int(head_dim={head_dim} * factor)={rotary_dim}: it must be even and >= 2",
        )
    return {"rope_theta": theta, "rotary_dim": None if rotary_dim == head_dim else rotary_dim}


def _attention_fields(cls: str, config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = config.num_key_value_heads or heads
    return {"heads": heads, "kv_heads": kv, "head_dim": head_dim, "attn_bias": bool(config.attention_bias)}


# HybridConfig's Mamba-2 fields -> their names in Mamba2Config and in BambaConfig / FalconH1Config ("nheads"
# is no HybridConfig field: it is ssm_inner_dim // headdim).
_SSM_NAMES = {
    "headdim": ("head_dim", "mamba_d_head"),
    "nheads": ("num_heads", "mamba_n_heads"),
    "ngroups": ("n_groups", "mamba_n_groups"),
    "d_state": ("state_size", "mamba_d_state"),
    "d_conv": ("conv_kernel", "mamba_d_conv"),
    "chunk_size": ("chunk_size", "mamba_chunk_size"),
    "ssm_bias": ("use_bias", "mamba_proj_bias"),
    "ssm_conv_bias": ("use_conv_bias", "mamba_conv_bias"),
}


# Falcon-H1's scalar muP multipliers: HybridConfig field -> FalconH1Config field.
_MULTIPLIERS = {
    "embedding_multiplier": "embedding_multiplier",
    "lm_head_multiplier": "lm_head_multiplier",
    "attn_in_multiplier": "attention_in_multiplier",
    "attn_out_multiplier": "attention_out_multiplier",
    "key_multiplier": "key_multiplier",
    "ssm_in_multiplier": "ssm_in_multiplier",
    "ssm_out_multiplier": "ssm_out_multiplier",
}


def _ssm_names(cls: str) -> dict[str, str]:
    return {ours: names[cls != "Mamba2ForCausalLM"] for ours, names in _SSM_NAMES.items()}


def _mamba2_fields(cls: str, config: Any, d_inner: int) -> dict[str, Any]:
    names = _ssm_names(cls)
    fields = {ours: getattr(config, theirs) for ours, theirs in names.items()}
    headdim, nheads = fields["headdim"], fields.pop("nheads")
    if headdim * nheads != d_inner:
        raise _refuse(
            cls, names["headdim"], headdim, f"times {names['nheads']}={nheads} must equal the width {d_inner}"
        )
    for bias in ("ssm_bias", "ssm_conv_bias"):
        fields[bias] = bool(fields[bias])
    return {**fields, "dt_limit": _dt_limit(cls, config.time_step_limit)}


def _common(config: Any) -> dict[str, Any]:
    return {
        "dim": config.hidden_size,
        "vocab_size": config.vocab_size,
        "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "max_seq_len": min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096),
        "initializer_range": float(getattr(config, "initializer_range", 0.02)),
    }


def mamba2_config(config: Any) -> HybridConfig:
    """`Mamba2Config` -> `HybridConfig` (pattern of "S" layers, no feed-forward)."""
    cls = "Mamba2ForCausalLM"
    _check_silu(cls, config)
    return HybridConfig(
        **_common(config),
        pattern=["S"],
        n_layers=config.num_hidden_layers,
        expand=config.expand,
        **_mamba2_fields(cls, config, config.expand * config.hidden_size),
        feed_forward="none",
        norm_eps=float(config.layer_norm_epsilon),
        residual_in_fp32=bool(config.residual_in_fp32),
    )


def _periodic(n: int, period: int, offset: int) -> list[bool]:
    return [i % period == offset for i in range(n)]


def jamba_config(config: Any) -> HybridConfig:
    """`JambaConfig` -> `HybridConfig` (Mamba-1 with inner norms, NoPE attention, MoE every other layer)."""
    cls = "JambaForCausalLM"
    _check_silu(cls, config)
    n = config.num_hidden_layers
    attn = _periodic(n, config.attn_layer_period, config.attn_layer_offset)
    moe = _periodic(n, config.expert_layer_period, config.expert_layer_offset)
    if config.num_experts <= 1:
        moe = [False] * n  # transformers builds a dense MLP where a layer has one expert
    return HybridConfig(
        **_common(config),
        pattern=["A" if a else "M" for a in attn],
        ffn_pattern=["E" if e else "D" for e in moe],
        d_state=config.mamba_d_state,
        d_conv=config.mamba_d_conv,
        expand=config.mamba_expand,
        dt_rank=int(config.mamba_dt_rank),
        mamba_inner_norms=True,
        ssm_bias=bool(config.mamba_proj_bias),
        ssm_conv_bias=bool(config.mamba_conv_bias),
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        rotary=False,
        feed_forward="swiglu",
        hidden_dim=config.intermediate_size,
        num_experts=max(config.num_experts, 1),
        experts_per_token=min(config.num_experts_per_tok, max(config.num_experts, 1)),
        moe_renormalize=False,
        # transformers adds the router loss only with output_router_logits (off by default)
        moe_aux_loss_coef=float(config.router_aux_loss_coef) if config.output_router_logits else 0.0,
        norm_eps=float(config.rms_norm_eps),
    )


def bamba_config(config: Any) -> HybridConfig:
    """`BambaConfig` -> `HybridConfig` (Mamba-2, attention at `attn_layer_indices` with partial RoPE, SwiGLU)."""
    cls = "BambaForCausalLM"
    _check_silu(cls, config)
    n = config.num_hidden_layers
    indices = list(config.attn_layer_indices or [])
    bad = [i for i in indices if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise _refuse(
            cls, "attn_layer_indices", indices, f"must lie in [0, num_hidden_layers={n}); {bad} do not"
        )
    attn = _attention_fields(cls, config)
    return HybridConfig(
        **_common(config),
        pattern=["A" if i in indices else "S" for i in range(n)],
        expand=config.mamba_expand,
        **_mamba2_fields(cls, config, config.mamba_expand * config.hidden_size),
        **attn,
        **_rope(cls, config, attn["head_dim"]),
        feed_forward="swiglu",
        hidden_dim=config.intermediate_size,
        ffn_bias=bool(config.mlp_bias),
        norm_eps=float(config.rms_norm_eps),
        z_loss=float(config.z_loss_coefficient or 0.0),
    )


def falcon_h1_config(config: Any) -> HybridConfig:
    """`FalconH1Config` -> `HybridConfig` (Mamba-2 and attention in parallel in every layer, muP multipliers)."""
    cls = "FalconH1ForCausalLM"
    _check_silu(cls, config)
    if bool(config.mamba_proj_bias) != bool(config.projectors_bias):
        raise _refuse(
            cls,
            "mamba_proj_bias",
            config.mamba_proj_bias,
            f"must equal projectors_bias={config.projectors_bias}: Vermeil's Mamba-2 block has one bias switch "
            "for in_proj and out_proj",
        )
    ssm_mult = [float(m) for m in config.ssm_multipliers]
    if len(ssm_mult) != 5:
        raise _refuse(
            cls, "ssm_multipliers", config.ssm_multipliers, "must hold 5 numbers ([z, x, B, C, dt])"
        )
    mlp_mult = [float(m) for m in config.mlp_multipliers]
    if len(mlp_mult) != 2:
        raise _refuse(cls, "mlp_multipliers", config.mlp_multipliers, "must hold 2 numbers ([gate, down])")
    d_inner = (
        config.mamba_d_ssm if config.mamba_d_ssm is not None else config.mamba_expand * config.hidden_size
    )
    attn = _attention_fields(cls, config)
    fields = _mamba2_fields(cls, config, d_inner)
    return HybridConfig(
        **_common(config),
        pattern=["S+A"],
        n_layers=config.num_hidden_layers,
        d_ssm=d_inner,
        **fields,
        ssm_norm=bool(config.mamba_rms_norm),
        ssm_norm_before_gate=bool(config.mamba_norm_before_gate),
        **attn,
        **_rope(cls, config, attn["head_dim"]),
        feed_forward="swiglu",
        hidden_dim=config.intermediate_size,
        ffn_bias=bool(config.mlp_bias),
        norm_eps=float(config.rms_norm_eps),
        **{ours: float(getattr(config, theirs)) for ours, theirs in _MULTIPLIERS.items()},
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
    """Convert any of the four classes into a `HybridModel` with the same weights, dtype and device.

    Raises:
        ValueError: a config field Vermeil cannot express (named, with its value), or keys that do not map.
    """
    cls = type(hf_model).__name__
    if cls not in _CONFIGS:
        raise ValueError(f"from_transformers_hybrid: {cls} is not one of {sorted(_CONFIGS)}")
    return _build(_CONFIGS[cls](hf_model.config), hf_model)


def _expect(cls: str) -> Callable[[nn.Module], HybridModel]:
    def convert(hf_model: nn.Module) -> HybridModel:
        got = type(hf_model).__name__
        if got != cls:
            raise ValueError(f"expected a {cls}, got {got}")
        return from_transformers_hybrid(hf_model)

    convert.__name__ = f"from_transformers_{_SHORT[cls]}"
    convert.__doc__ = f"Convert a transformers `{cls}` into a `HybridModel` (see `from_transformers_hybrid`)."
    return convert


_SHORT = {
    "Mamba2ForCausalLM": "mamba2",
    "JambaForCausalLM": "jamba",
    "BambaForCausalLM": "bamba",
    "FalconH1ForCausalLM": "falcon_h1",
}
from_transformers_mamba2 = _expect("Mamba2ForCausalLM")
from_transformers_jamba = _expect("JambaForCausalLM")
from_transformers_bamba = _expect("BambaForCausalLM")
from_transformers_falcon_h1 = _expect("FalconH1ForCausalLM")


# ----------------------------------------------------------------------------------------------------------
# Vermeil -> transformers


def transformers_class_for(config: HybridConfig) -> str:
    """The transformers class a `HybridConfig`'s layout belongs to (options are checked by the converter).

    All "S" layers without feed-forward: Mamba2; all "S+A": FalconH1; "M" and "A" only: Jamba; "S" and "A"
    only: Bamba.

    Raises:
        ValueError: a layout none of the four has, naming the pattern.
    """
    kinds = set(config.layer_kinds)
    ffns = set(config.layer_ffns)
    if kinds == {"S"} and ffns == {"none"}:
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


def _check(cls: str, config: HybridConfig, **required: Any) -> None:
    """Every named field must hold the value the target class implies."""
    for field, want in required.items():
        got = getattr(config, field)
        if got != want:
            raise ValueError(
                f"to_transformers({cls}): {field}={got!r} cannot be expressed (it must be {want!r})"
            )


def _no_mults(cls: str, config: HybridConfig) -> None:
    ones = dict.fromkeys([*_MULTIPLIERS, "mlp_gate_multiplier", "mlp_out_multiplier"], 1.0)
    _check(cls, config, **ones, ssm_proj_multipliers=None)


def _limit(config: HybridConfig) -> tuple[float, float]:
    return _NO_LIMIT if config.dt_limit is None else (float(config.dt_limit[0]), float(config.dt_limit[1]))


def _ffn_only(cls: str, config: HybridConfig, allowed: set[str]) -> None:
    bad = sorted(set(config.layer_ffns) - allowed)
    if bad:
        raise ValueError(
            f"to_transformers({cls}): feed-forward kinds {bad} cannot be expressed (only {sorted(allowed)})"
        )


def _hf_config(model: HybridModel, cls: str) -> Any:
    import transformers

    cfg = model.config
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=len(cfg.layer_kinds),
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.initializer_range,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    attn_common = dict(num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads or cfg.heads)
    if cls != "Mamba2ForCausalLM":
        _check(cls, cfg, qk_norm=None, window=None, merge="sum", residual_in_fp32=False)
    ssm = {  # the Mamba-2 fields under the target's names (unused by Jamba's Mamba-1 layers)
        theirs: cfg.ssm_inner_dim // cfg.headdim if ours == "nheads" else getattr(cfg, ours)
        for ours, theirs in _ssm_names(cls).items()
    }
    if cls == "Mamba2ForCausalLM":
        _no_mults(cls, cfg)
        _check(cls, cfg, ssm_norm=True, ssm_norm_before_gate=False, d_ssm=None)
        return transformers.Mamba2Config(
            **common,
            **ssm,
            expand=cfg.expand,
            layer_norm_epsilon=cfg.norm_eps,
            time_step_limit=_limit(cfg),
            residual_in_fp32=cfg.residual_in_fp32,
        )
    if cls == "JambaForCausalLM":
        _no_mults(cls, cfg)
        _check(
            cls,
            cfg,
            rotary=False,
            mamba_inner_norms=True,
            attn_bias=False,
            ffn_bias=False,
            moe_renormalize=False,
        )
        _ffn_only(cls, cfg, {"swiglu", "moe"})
        n = len(cfg.layer_kinds)
        attn_p, attn_o = _find_period(cls, "attention layers", [k == "A" for k in cfg.layer_kinds])
        moe_p, moe_o = _find_period(cls, "MoE layers", [f == "moe" for f in cfg.layer_ffns])
        if cfg.moe_hidden_dim not in (None, cfg.ffn_hidden_dim):
            _check(cls, cfg, moe_hidden_dim=cfg.ffn_hidden_dim)
        head_dim = cfg.attention_head_dim
        if head_dim * cfg.heads != cfg.dim:
            _check(cls, cfg, head_dim=cfg.dim // cfg.heads)
        return transformers.JambaConfig(
            **common,
            **attn_common,
            intermediate_size=cfg.ffn_hidden_dim,
            rms_norm_eps=cfg.norm_eps,
            num_experts=cfg.num_experts if "moe" in cfg.layer_ffns else 1,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
            output_router_logits=cfg.moe_aux_loss_coef > 0,
            expert_layer_period=moe_p,
            expert_layer_offset=moe_o,
            attn_layer_period=attn_p,
            attn_layer_offset=attn_o,
            mamba_d_state=cfg.d_state,
            mamba_d_conv=cfg.d_conv,
            mamba_expand=cfg.expand,
            mamba_dt_rank=cfg.dt_rank if cfg.dt_rank is not None else math.ceil(cfg.dim / 16),
            mamba_conv_bias=cfg.ssm_conv_bias,
            mamba_proj_bias=cfg.ssm_bias,
            max_position_embeddings=max(n, cfg.max_seq_len),
        )
    _ffn_only(cls, cfg, {"swiglu"})
    _check(cls, cfg, rotary=True, mamba_inner_norms=False)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    head_dim = cfg.attention_head_dim
    factor = 1.0 if cfg.rotary_dim is None else cfg.rotary_dim / head_dim
    mamba = dict(
        **ssm,
        time_step_limit=_limit(cfg),
        intermediate_size=cfg.ffn_hidden_dim,
        rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.attn_bias,
        mlp_bias=cfg.ffn_bias,
        head_dim=head_dim,
    )
    if cls == "BambaForCausalLM":
        _no_mults(cls, cfg)
        _check(cls, cfg, ssm_norm=True, ssm_norm_before_gate=False, d_ssm=None)
        return transformers.BambaConfig(
            **common,
            **attn_common,
            **mamba,
            mamba_expand=cfg.expand,
            attn_layer_indices=[i for i, k in enumerate(cfg.layer_kinds) if k == "A"],
            rope_parameters={**rope, "partial_rotary_factor": factor},
            z_loss_coefficient=cfg.z_loss,
        )
    _check(cls, cfg, rotary_dim=None)
    mults = cfg.ssm_proj_multipliers or [1.0] * 5
    return transformers.FalconH1Config(
        **common,
        **attn_common,
        **mamba,
        mamba_d_ssm=cfg.ssm_inner_dim,
        mamba_expand=cfg.expand,
        mamba_rms_norm=cfg.ssm_norm,
        mamba_norm_before_gate=cfg.ssm_norm_before_gate,
        projectors_bias=cfg.ssm_bias,
        rope_parameters=rope,
        **{theirs: getattr(cfg, ours) for ours, theirs in _MULTIPLIERS.items()},
        ssm_multipliers=list(mults),
        mlp_multipliers=[cfg.mlp_gate_multiplier, cfg.mlp_out_multiplier],
    )


def _find_period(cls: str, what: str, marks: list[bool]) -> tuple[int, int]:
    """(period, offset) with offset < period such that marks[i] == (i % period == offset), the smallest period."""
    n = len(marks)
    for period in range(1, n + 2):
        for offset in range(period):
            if _periodic(n, period, offset) == marks:
                return period, offset
    where = [i for i, m in enumerate(marks) if m]
    raise ValueError(
        f"to_transformers({cls}): {what} at {where} are not periodic (i % period == offset), as Jamba's config needs"
    )


def to_transformers_hybrid(model: HybridModel, cls: str | None = None) -> nn.Module:
    """Convert a `HybridModel` into the transformers class its layout belongs to (`transformers_class_for`), or
    into `cls` when given, with the same weights, dtype and device.

    Raises:
        ValueError: a layout or option the class cannot express, naming the field.
    """
    import transformers

    if not isinstance(model, HybridModel):
        raise TypeError(f"to_transformers_hybrid: expected a HybridModel, got {type(model).__name__}")
    cls = cls or transformers_class_for(model.config)
    if cls not in _CONFIGS:
        raise ValueError(f"to_transformers_hybrid: cls={cls!r} is not one of {sorted(_CONFIGS)}")
    hf_config = _hf_config(model, cls)
    weight = model.embedding.weight
    hf = getattr(transformers, cls)(hf_config).to(device=weight.device, dtype=weight.dtype)
    state = vermeil_to_hf_state_dict(model.state_dict(), cls)
    _load_strict(hf, state, f"to_transformers({cls})")
    return hf.train(model.training)


def _to(cls: str) -> Callable[[HybridModel], nn.Module]:
    def convert(model: HybridModel) -> nn.Module:
        return to_transformers_hybrid(model, cls)

    convert.__name__ = f"to_transformers_{_SHORT[cls]}"
    convert.__doc__ = f"Convert a `HybridModel` into a transformers `{cls}` (see `to_transformers_hybrid`)."
    return convert


to_transformers_mamba2 = _to("Mamba2ForCausalLM")
to_transformers_jamba = _to("JambaForCausalLM")
to_transformers_bamba = _to("BambaForCausalLM")
to_transformers_falcon_h1 = _to("FalconH1ForCausalLM")
