"""transformers `MambaForCausalLM` <-> Vermeil `MambaLM` (state-spaces layout), both ways.

transformers keeps state-spaces' key names but one: the embedding is `backbone.embeddings` (its
`MambaModel.load_hook` renames mamba_ssm's `backbone.embedding`). transformers does not pad the vocabulary:
the converted model has pad_vocab_size_multiple=1, and going back the padded rows become real rows.
"""

from __future__ import annotations

from torch import nn

from vermeil.interop import _build, _check_silu, _load_strict
from vermeil.models.mamba import MambaConfig, MambaLM

__all__ = ["from_transformers_mamba", "hf_to_vermeil_key", "to_transformers_mamba", "vermeil_to_hf_key"]

_HF_EMBED, _VM_EMBED = "backbone.embeddings.", "backbone.embedding."

# MambaConfig field -> transformers MambaConfig field, read both ways (plus dt_rank <-> time_step_rank)
_FIELDS = {
    "d_model": "hidden_size",
    "n_layer": "num_hidden_layers",
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "norm_epsilon": "layer_norm_epsilon",
    "residual_in_fp32": "residual_in_fp32",
    "tie_embeddings": "tie_word_embeddings",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init_floor": "time_step_floor",
    "dt_scale": "time_step_scale",
    "rescale_prenorm_residual": "rescale_prenorm_residual",
}


def hf_to_vermeil_key(key: str) -> str:
    """transformers key -> Vermeil (state-spaces) key."""
    return _VM_EMBED + key[len(_HF_EMBED) :] if key.startswith(_HF_EMBED) else key


def vermeil_to_hf_key(key: str) -> str:
    """Vermeil (state-spaces) key -> transformers key."""
    return _HF_EMBED + key[len(_VM_EMBED) :] if key.startswith(_VM_EMBED) else key


def from_transformers_mamba(hf_model: nn.Module) -> MambaLM:
    """A transformers `MambaForCausalLM` as a `MambaLM` with the same weights, dtype and device."""
    hf_config = hf_model.config
    _check_silu("MambaForCausalLM", hf_config)
    width = hf_config.expand * hf_config.hidden_size
    inner = getattr(hf_config, "intermediate_size", width)
    if inner != width:
        raise ValueError(f"intermediate_size={inner} must equal expand * hidden_size = {width}")
    config = MambaConfig(
        **{ours: getattr(hf_config, theirs) for ours, theirs in _FIELDS.items()},
        dt_rank=int(hf_config.time_step_rank),
        vocab_size=hf_config.vocab_size,
        pad_vocab_size_multiple=1,
        rms_norm=True,
    )
    state = {hf_to_vermeil_key(k): v for k, v in hf_model.state_dict().items()}
    return _build(MambaLM, config, state, hf_model)


def to_transformers_mamba(model: MambaLM) -> nn.Module:
    """A `MambaLM` as a transformers `MambaForCausalLM`: its `vocab_size` is the padded row count, so its
    logits include the padding rows that Vermeil cuts off."""
    import transformers

    cfg = model.config
    if not cfg.rms_norm:
        raise ValueError("rms_norm=False (LayerNorm): transformers' Mamba has RMSNorm only")
    hf_config = transformers.MambaConfig(
        **{theirs: getattr(cfg, ours) for ours, theirs in _FIELDS.items()},
        vocab_size=cfg.padded_vocab_size,
        hidden_act="silu",
        time_step_rank=int(model.backbone.layers[0].mixer.dt_proj.in_features),
    )
    weight = model.lm_head.weight
    hf_model = transformers.MambaForCausalLM(hf_config).to(device=weight.device, dtype=weight.dtype)
    state = {vermeil_to_hf_key(k): v for k, v in model.state_dict().items()}
    _load_strict(hf_model, state, "to_transformers_mamba")
    return hf_model.train(model.training)
