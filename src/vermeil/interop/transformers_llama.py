"""transformers `LlamaForCausalLM` / `Llama4ForCausalLM` (text) <-> Vermeil `LLM` (Meta's names), after
meta-llama/llama-models `llama4/model.py` and transformers `modeling_llama.py`, `modeling_llama4.py`.

RoPE pairing: transformers' Llama 1-3 rotates channel i with i + Dh/2 (`rotate_half`), Meta and Vermeil rotate
2i with 2i + 1; Meta's checkpoints reached transformers through `permute` (each head's q/k rows: evens, then
odds), so going back un-permutes and the attention scores are identical. Llama 4 keeps Meta's pairing.

Where transformers' Llama 4 and Meta's reference differ: transformers applies the chunk rule at one-token
decode too (Meta builds masks only when seqlen > 1), as Vermeil does; its temperature tuning counts positions
from the cache length, Meta and Vermeil from the token positions, and its chunk boundaries shift with left
padding: all equal for the unpadded prompts of Vermeil's generate.

Shapes: D model dim, E experts, F expert hidden dim, H heads, Dh head dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vermeil.interop import _NO_SPECIAL_TOKENS, _build, _check_silu, _load_strict
from vermeil.models.llm import LLM, ModelArgs, MoEArgs

__all__ = [
    "from_transformers_llama",
    "permute_half_to_interleaved",
    "permute_interleaved_to_half",
    "to_transformers_llama",
    "to_transformers_llama_state_dict",
    "transformers_llama_config",
]


def permute_interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Meta -> transformers q/k rows (`convert_llama_weights_to_hf.py:permute`): (H*Dh, D) -> (H*Dh, D)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """transformers -> Meta q/k rows (the inverse; torchtitan `_reverse_permute`): (H*Dh, D) -> (H*Dh, D)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_KINDS = {"LlamaForCausalLM": "llama", "Llama4ForCausalLM": "llama4"}
# ModelArgs field -> transformers config field (both Llama classes), read both ways
_FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}

# Llama 3 RoPE scaling: ModelArgs field -> its key in transformers' rope_parameters
_LLAMA3_ROPE = {
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_seq_len": "original_max_position_embeddings",
}


def _rope_args(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)  # transformers 4.x
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "llama3":
        out.update(
            {ours: float(params[theirs]) for ours, theirs in _LLAMA3_ROPE.items()}, use_scaled_rope=True
        )
        out["rope_original_max_seq_len"] = int(out["rope_original_max_seq_len"])  # a length, not a factor
    elif rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported (only 'default' and 'llama3')")
    return out


def _model_args(config: Any, kind: str) -> ModelArgs:
    common: dict[str, Any] = {ours: getattr(config, theirs, None) for ours, theirs in _FIELDS.items()}
    common.update(
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=common["head_dim"] or config.hidden_size // config.num_attention_heads,
        tie_word_embeddings=bool(common["tie_word_embeddings"]),
        **_rope_args(config),
    )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias are not supported (Llama has none)")
    if kind == "llama":
        return ModelArgs(hidden_dim=config.intermediate_size, **common)
    n = config.num_hidden_layers
    use_rope = [bool(x) for x in config.no_rope_layers[:n]]  # no_rope_layers[i] == 1: layer i USES RoPE
    chunk = config.attention_chunk_size
    expected = ["chunked_attention" if r and chunk is not None else "full_attention" for r in use_rope]
    types = list(config.layer_types[:n]) if getattr(config, "layer_types", None) else expected
    if chunk is None:
        types = ["full_attention" if t == "chunked_attention" else t for t in types]
    if types != expected:
        raise ValueError(
            f"layer_types={types} is not Llama 4's rule (chunked on RoPE layers, full on NoPE layers: {expected})"
        )
    moe_layers = list(config.moe_layers)
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    moe = (
        MoEArgs(num_experts=experts, top_k=top_k, hidden_dim=config.intermediate_size) if moe_layers else None
    )
    return ModelArgs(
        hidden_dim=config.intermediate_size_mlp,
        use_qk_norm=bool(config.use_qk_norm),
        nope_layers=[i for i, r in enumerate(use_rope) if not r],
        attention_chunk_size=chunk,
        attn_temperature_tuning=bool(config.attn_temperature_tuning),
        floor_scale=float(config.floor_scale),
        attn_scale=float(config.attn_scale),
        moe_args=moe,
        moe_layers=moe_layers or None,
        **common,
    )


_SWIGLU = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))  # transformers name, Meta's


def _ffn(i: int, kind: str) -> str:
    return f"model.layers.{i}." + ("mlp." if kind == "llama" else "feed_forward.")


def _renames(args: ModelArgs, kind: str) -> list[tuple[str, str]]:
    """(transformers name, Vermeil name) of every tensor that is only renamed."""
    pairs = [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    for i in range(args.n_layers):
        hf, ours, ff = f"model.layers.{i}.", f"layers.{i}.", _ffn(i, kind)
        pairs += [(hf + f"self_attn.{p}_proj.weight", ours + f"attention.w{p}.weight") for p in "qkvo"]
        pairs.append((hf + "input_layernorm.weight", ours + "attention_norm.weight"))
        pairs.append((hf + "post_attention_layernorm.weight", ours + "ffn_norm.weight"))
        ours += "feed_forward."
        if args.is_moe_layer(i):
            pairs.append((ff + "experts.down_proj", ours + "experts.w2"))
            ff, ours = ff + "shared_expert.", ours + "shared_expert."
        pairs += [(ff + f"{h}.weight", ours + f"{o}.weight") for h, o in _SWIGLU]
    return pairs


def _convert_state(sd: dict[str, Tensor], args: ModelArgs, kind: str, to_vermeil: bool) -> dict[str, Tensor]:
    """`_renames` read one way or the other, plus the q/k row permutation (Llama 1-3), the MoE router
    (E, D) <-> `router_DE` transposed, and gate_up_proj <-> experts' w1 | w3."""
    src, dst = (0, 1) if to_vermeil else (1, 0)
    if to_vermeil:
        sd = {"lm_head.weight": sd["model.embed_tokens.weight"], **sd}  # tied: no lm_head entry
    out = {pair[dst]: sd[pair[src]] for pair in _renames(args, kind)}
    permute = permute_half_to_interleaved if to_vermeil else permute_interleaved_to_half
    for i in range(args.n_layers):
        ours, ff = f"layers.{i}.feed_forward.", _ffn(i, kind)
        if kind == "llama":
            for p, heads in (("q", args.n_heads), ("k", args.n_kv_heads)):
                pair = (f"model.layers.{i}.self_attn.{p}_proj.weight", f"layers.{i}.attention.w{p}.weight")
                out[pair[dst]] = permute(out[pair[dst]], heads)  # type: ignore[arg-type]
        if args.is_moe_layer(i):
            router = (ff + "router.weight", ours + "router.router_DE")
            out[router[dst]] = sd[router[src]].T
            fused, w1, w3 = ff + "experts.gate_up_proj", ours + "experts.w1", ours + "experts.w3"
            if to_vermeil:  # gate_up_proj: (E, D, 2F), gate first
                out[w1], out[w3] = sd[fused].chunk(2, dim=-1)
            else:
                out[fused] = torch.cat([sd[w1], sd[w3]], dim=-1)
    # loading copies; the public state dict going out holds its own tensors
    return out if to_vermeil else {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_transformers_llama(hf_model: nn.Module) -> LLM:
    """A transformers `LlamaForCausalLM` or text `Llama4ForCausalLM` as an `LLM` (same dtype and device);
    ValueError on another class, biases, RoPE types but default and llama3, or layer types against Llama 4's."""
    name = type(hf_model).__name__
    if name not in _KINDS:
        raise ValueError(f"expected LlamaForCausalLM or Llama4ForCausalLM, got {name}")
    _check_silu(name, hf_model.config)
    args = _model_args(hf_model.config, _KINDS[name])
    state = _convert_state(hf_model.state_dict(), args, _KINDS[name], to_vermeil=True)
    return _build(LLM, args, state, hf_model)


def _target(model: LLM) -> str:
    a = model.args
    llama4 = a.moe_args is not None or a.use_qk_norm or a.attention_chunk_size is not None
    return "llama4" if llama4 or any(layer.is_nope_layer for layer in model.layers) else "llama"


def transformers_llama_config(model: LLM, target: str | None = None) -> Any:
    """The `LlamaConfig` (target "llama") or `Llama4TextConfig` ("llama4") describing `model`; None picks
    llama4 when the model uses MoE, NoPE, chunking or qk norm."""
    import transformers

    a = model.args
    target = target or _target(model)
    if target == "llama" and _target(model) == "llama4":
        raise ValueError("target='llama' cannot express MoE, NoPE layers, chunked attention or qk norm")
    if a.vision_args is not None:
        raise ValueError("vision weights have no transformers counterpart here (text models only)")
    if a.moe_args is not None and (a.moe_args.score_func != "sigmoid" or not a.moe_args.shared_expert):
        raise ValueError("transformers' Llama 4 MoE needs score_func='sigmoid' and a shared expert")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.use_scaled_rope:
        rope.update({theirs: getattr(a, ours) for ours, theirs in _LLAMA3_ROPE.items()}, rope_type="llama3")
    common: dict[str, Any] = {theirs: getattr(a, ours) for ours, theirs in _FIELDS.items()}
    common.update(rope_parameters=rope, **_NO_SPECIAL_TOKENS)
    if target == "llama":
        return transformers.LlamaConfig(intermediate_size=a.dense_hidden_dim(), **common)
    moe = a.moe_args
    return transformers.Llama4TextConfig(
        intermediate_size=a.expert_hidden_dim() if moe is not None else a.dense_hidden_dim(),
        intermediate_size_mlp=a.dense_hidden_dim(),
        num_local_experts=moe.num_experts if moe is not None else 1,
        num_experts_per_tok=moe.top_k if moe is not None else 1,
        moe_layers=[i for i in range(a.n_layers) if a.is_moe_layer(i)],
        use_qk_norm=a.use_qk_norm,
        no_rope_layers=[int(not a.is_nope_layer(i)) for i in range(a.n_layers)],
        # transformers' Llama 4 always builds chunked masks for its RoPE layers: without chunking, chunks of
        # max_seq_len, which no sequence the model takes can cross
        attention_chunk_size=a.attention_chunk_size or a.max_seq_len,
        attn_temperature_tuning=a.attn_temperature_tuning,
        floor_scale=int(a.floor_scale) if float(a.floor_scale).is_integer() else a.floor_scale,
        attn_scale=a.attn_scale,
        **common,
    )


def to_transformers_llama_state_dict(model: LLM, target: str | None = None) -> dict[str, Tensor]:
    """`model`'s weights under transformers' names (Llama: q/k rows permuted to the half-split layout)."""
    return _convert_state(model.state_dict(), model.args, target or _target(model), to_vermeil=False)


def to_transformers_llama(model: LLM, target: str | None = None) -> nn.Module:
    """The transformers `LlamaForCausalLM` or `Llama4ForCausalLM` (`target` as in `transformers_llama_config`)
    holding `model`'s weights."""
    import transformers

    target = target or _target(model)
    config = transformers_llama_config(model, target)
    cls = transformers.LlamaForCausalLM if target == "llama" else transformers.Llama4ForCausalLM
    ref = model.tok_embeddings.weight
    hf = cls(config).to(dtype=ref.dtype, device=ref.device)
    _load_strict(hf, to_transformers_llama_state_dict(model, target), f"to_transformers({cls.__name__})")
    return hf.train(model.training)
