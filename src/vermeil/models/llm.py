"""A Llama-4-style decoder LLM: GQA, RoPE (interleaved, llama3 scaling), NoPE layers with temperature tuning,
chunked local attention with a chunk-bounded cache, weightless qk norm, MoE layers, optional vision input.

Module and parameter names are Meta's, so the reference's state dicts load as they are, and its raw-shard keys
(fused `wqkv`, `mlp.fc1_weight`, `moe_w_in_eD_F`, ...) load through load hooks (Meta's `load_hook`s in
`llama_models/llama4/model.py`, `ffn.py`, `moe.py`). Other layouts (transformers) go through `vermeil.interop`.

Where this differs from Meta's reference (`llama_models/llama4/model.py`), on purpose:
    - it trains (Meta's forward is `@torch.inference_mode()` and its MoE detaches the expert input) and runs on
      the CPU (Meta allocates caches with `.cuda()` and needs fairscale);
    - chunked layers apply the chunk rule at every decode step (Meta builds masks only when `seqlen > 1`, so its
      one-token decode attends to the whole cache across chunk boundaries) and keep a cache of
      `attention_chunk_size` slots (`vermeil.nn.cache.RingKVCache`), not `max_seq_len`; transformers does the same
      (`DynamicSlidingWindowLayer` + `chunked_overlay`), and tests/interop checks token parity with it;
    - `head_dim` is honoured in the attention too (Meta's `Attention` uses `dim // n_heads` whatever `head_dim`
      says);
    - positions are tensors (`input_pos`), gpt-fast style, instead of an int `start_pos`.

Shapes: B batch, T query length, S key length, D model dim, H heads, Hkv kv heads, Dh head dim, V vocabulary,
C chunk size (ring-cache slots), E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vermeil.models import contract
from vermeil.models.checks import check_fields, check_input_pos, check_tokens
from vermeil.models.contract import AttentionLayer, build_preset
from vermeil.models.vision import VisionArgs, VisionEmbeddings
from vermeil.nn.attention import Attention as NNAttention
from vermeil.nn.feedforward import SwiGLU, llama_hidden_dim
from vermeil.nn.moe import MoE, moe_hidden_dim
from vermeil.nn.norms import QKNorm, RMSNorm
from vermeil.nn.positional import RopeScaling, RopeTables, RotaryEmbedding, temperature_scale

__all__ = [
    "LLM",
    "PRESETS",
    "Attention",
    "MaskedEmbedding",
    "ModelArgs",
    "MoEArgs",
    "TransformerBlock",
    "TransformerInput",
    "TransformerOutput",
    "VisionArgs",
    "build",
]


@dataclass
class MoEArgs:
    """Mixture-of-Experts settings (Meta's `MoEArgs` names, plus Vermeil's explicit choices).

    Args:
        capacity_factor, auto_scale_F: Meta's expert hidden-size rule (see `vermeil.nn.moe.moe_hidden_dim`).
        score_func: "sigmoid" (Llama 4) or "softmax" (Mixtral-style routing, renormalised, output-weighted).
        hidden_dim: explicit expert hidden size (transformers' `intermediate_size`); None applies Meta's rule.
        aux_loss_coef, z_loss_coef: weights of the load-balancing and router z losses in `aux_loss` (0: off).
        backend: MoE dispatch, see `vermeil.nn.moe.MoE`.
    """

    num_experts: int = 16
    top_k: int = 1
    capacity_factor: float = 1.0
    auto_scale_F: bool = True  # noqa: N815 (Meta's name)
    interleave_moe_layer_step: int = 1
    shared_expert: bool = True
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    hidden_dim: int | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    backend: Literal["grouped", "padded", "loop", "dense"] = "grouped"

    def __post_init__(self) -> None:
        check_fields(self)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0")


@dataclass
class ModelArgs:
    """Configuration of `LLM`, with Meta's field names (`llama_models/llama4/args.py`).

    NoPE layers (`is_nope_layer`) attend globally, with temperature tuning when `attn_temperature_tuning`; RoPE
    layers use chunked local attention when `attention_chunk_size` is set and the weightless qk norm when
    `use_qk_norm`. `max_seq_len` sizes the initial RoPE table (it grows on demand); `max_batch_size` is kept
    for Meta's configs (caches are sized by `LLM.setup_cache`).

    Vermeil additions: `hidden_dim` (dense FFN width, transformers' `intermediate_size[_mlp]`), `nope_layers` /
    `moe_layers` (layer lists, transformers' `no_rope_layers` / `moe_layers`), `rope_low_freq_factor` /
    `rope_original_max_seq_len` (Llama 3.x scaling), `tie_word_embeddings`, `embedding_init_std` (see
    `LLM.init_weights`), `attention_backend` (`vermeil.nn.Attention`'s; "flex" runs FlexAttention's
    block-sparse masks, "auto" picks it on CUDA for the chunked layers of a plain forward).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_exp: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    max_batch_size: int = 32
    use_qk_norm: bool = False
    nope_layer_interval: int | None = None
    nope_layers: list[int] | None = None
    attention_chunk_size: int | None = None
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    moe_args: MoEArgs | None = None
    moe_layers: list[int] | None = None
    vision_args: VisionArgs | None = None
    tie_word_embeddings: bool = False
    embedding_init_std: float | None = None
    attention_backend: Literal["sdpa", "math", "flash", "flex", "auto"] = "sdpa"

    def __post_init__(self) -> None:
        check_fields(self, positive=("norm_eps", "floor_scale", "ffn_dim_multiplier"), skip=("rope_theta",))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim={self.dim} must be divisible by n_heads={self.n_heads} (or set head_dim explicitly)"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates channel pairs)")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"embedding_init_std={self.embedding_init_std} must be > 0 (or None)")
        theta = self.rope_theta
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"rope_theta={theta!r} must be a finite number > 0 (RoPE's base)")
        if self.use_scaled_rope:
            # Meta's default (llama-models PR #322): only Llama 4 Scout uses scaled RoPE, with 16 / 1.
            if self.rope_scaling_factor is None:
                self.rope_scaling_factor = 16.0
            if self.rope_high_freq_factor is None:
                self.rope_high_freq_factor = 1.0
            self.rope_scaling()  # validates the constants (RopeScaling.__post_init__)
        for name in ("nope_layers", "moe_layers"):
            if (layers := getattr(self, name)) is None:
                continue
            if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in layers):
                raise ValueError(f"{name}={layers} must hold layer indices in [0, n_layers={self.n_layers})")
            setattr(self, name, sorted(set(layers)))
        if self.moe_layers is not None and self.moe_args is None:
            raise ValueError(f"moe_layers={self.moe_layers} needs moe_args")
        if isinstance(self.moe_args, dict):
            self.moe_args = MoEArgs(**self.moe_args)
        if isinstance(self.vision_args, dict):
            self.vision_args = VisionArgs(**self.vision_args)
        if self.moe_args is not None and self.moe_args.hidden_dim is None and self.ffn_exp is None:
            raise ValueError("moe_args needs ffn_exp (Meta's expert width rule) or moe_args.hidden_dim")

    def rope_scaling(self) -> RopeScaling | None:
        """The llama3 frequency scaling, or None when `use_scaled_rope` is off."""
        if not self.use_scaled_rope:
            return None
        return RopeScaling(
            factor=float(self.rope_scaling_factor),  # type: ignore[arg-type]
            low_freq_factor=float(self.rope_low_freq_factor),
            high_freq_factor=float(self.rope_high_freq_factor),  # type: ignore[arg-type]
            original_max_seq_len=self.rope_original_max_seq_len,
        )

    def is_nope_layer(self, layer_id: int) -> bool:
        """NoPE layer (no RoPE, global attention, temperature tuning): Meta's `(i + 1) % interval == 0`."""
        if self.nope_layers is not None:
            return layer_id in self.nope_layers
        return self.nope_layer_interval is not None and (layer_id + 1) % self.nope_layer_interval == 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """MoE feed-forward: Meta's `(i + 1) % interleave_moe_layer_step == 0` (step 1: every layer)."""
        if self.moe_args is None:
            return False
        if self.moe_layers is not None:
            return layer_id in self.moe_layers
        return (layer_id + 1) % self.moe_args.interleave_moe_layer_step == 0

    def dense_hidden_dim(self) -> int:
        """Dense SwiGLU width: `hidden_dim`, else Meta's `llama_hidden_dim(dim, multiple_of, multiplier)`."""
        return self.hidden_dim or llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def expert_hidden_dim(self) -> int:
        """Expert SwiGLU width: `moe_args.hidden_dim`, else Meta's MoE rule."""
        assert self.moe_args is not None  # internal: only called for MoE layers
        return self.moe_args.hidden_dim or moe_hidden_dim(
            self.dim,
            ffn_exp=float(self.ffn_exp),  # type: ignore[arg-type]
            multiple_of=self.multiple_of,
            ffn_dim_multiplier=self.ffn_dim_multiplier,
            auto_scale_F=self.moe_args.auto_scale_F,
            capacity_factor=self.moe_args.capacity_factor,
        )


@dataclass
class MaskedEmbedding:
    """Image features to merge into the token embeddings: embedding (B, T, Dv) as `VisionEmbeddings` places
    them, mask (B, T) or (B, T, 1) bool, True at image-token positions."""

    embedding: Tensor
    mask: Tensor


@dataclass
class TransformerInput:
    """Meta's input bundle. tokens: (B, T). tokens_position: the start position, an int shared by the batch or a
    (B,) tensor of per-row starts (per-row starts need no cache). image_embedding: optional `MaskedEmbedding`."""

    tokens: Tensor
    tokens_position: int | Tensor = 0
    image_embedding: MaskedEmbedding | None = None


@dataclass
class TransformerOutput:
    """logits: (B, T, V) float32; aux_loss: scalar sum of the MoE layers' auxiliary losses (0 without MoE)."""

    logits: Tensor
    aux_loss: Tensor


class Attention(NNAttention):
    """Llama 4 attention: `vermeil.nn.Attention` under Meta's argument names, loading Meta's fused `wqkv`.

    Args:
        use_rope: rotate q/k by the tables passed to `forward` (interleaved pairs); False makes a NoPE layer.
        use_qk_norm: `rms_norm(x, eps=norm_eps)` without weight on q and k, after RoPE.
        chunk_size: chunked local attention block C (decoding keeps a `RingKVCache` of C slots), or None.
        temperature_tuning: scale q by `temperature_scale(pos, floor_scale, attn_scale)`.
    """

    head_names = ("n_heads", "n_kv_heads")

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        use_rope: bool = True,
        use_qk_norm: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int | None = None,
        temperature_tuning: bool = False,
        floor_scale: float = 8192.0,
        attn_scale: float = 0.1,
        backend: Literal["sdpa", "math", "flash"] = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        qk_norm = QKNorm(head_dim, "rms", learnable=False, eps=norm_eps) if use_qk_norm else None
        super().__init__(
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            causal=True,
            qk_norm=qk_norm,
            qk_norm_after_rope=True,
            chunk=chunk_size,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.use_rope, self.use_qk_norm, self.temperature_tuning = use_rope, use_qk_norm, temperature_tuning
        self.floor_scale, self.attn_scale = floor_scale, attn_scale
        self._register_load_state_dict_pre_hook(self._load_hook)

    @property
    def chunk_size(self) -> int | None:
        """Meta's name for `chunk`."""
        return self.chunk

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # Meta raw shards fuse q, k, v row-wise: [H*Dh; Hkv*Dh; Hkv*Dh] (Meta `Attention.load_hook`).
        if (wqkv := state_dict.pop(prefix + "wqkv.weight", None)) is not None:
            d, r = divmod(wqkv.shape[0], self.heads + 2 * self.kv_heads)
            if r:
                raise ValueError(
                    f"{prefix}wqkv.weight has {wqkv.shape[0]} rows, not a multiple of "
                    f"n_heads + 2 * n_kv_heads = {self.heads + 2 * self.kv_heads}"
                )
            parts = wqkv.split([d * self.heads, d * self.kv_heads, d * self.kv_heads], dim=0)
            state_dict.update({f"{prefix}w{name}.weight": w for name, w in zip("qkv", parts)})

    def forward(  # type: ignore[override]
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, positions: Tensor | None
    ) -> Tensor:
        """x: (B, T, D); rope: (cos, sin), each (T, Dh/2) or (B, T, Dh/2) float32, for these positions (RoPE
        layers); positions: (T,) or (B, T), None meaning 0..T-1 without reading a cache -> (B, T, D)."""
        tables = RopeTables(rope[0], rope[1], "interleaved") if self.use_rope and rope is not None else None
        q_scale = None
        if self.temperature_tuning:  # arXiv:2501.19399, NoPE layers only
            pos = positions if positions is not None else torch.arange(x.shape[1], device=x.device)
            q_scale = temperature_scale(pos, self.floor_scale, self.attn_scale)
        return super().forward(x, input_pos=positions, rope=tables, q_scale=q_scale)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, use_rope={self.use_rope}, use_qk_norm={self.use_qk_norm}, "
            f"temperature_tuning={self.temperature_tuning}"
        )


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then a `SwiGLU` or, on MoE layers, a `vermeil.nn.moe.MoE`."""

    def __init__(self, layer_id: int, args: ModelArgs, **factory: Any) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_nope_layer = args.is_nope_layer(layer_id)
        self.is_moe_layer = args.is_moe_layer(layer_id)
        use_rope = not self.is_nope_layer
        self.attention = Attention(
            args.dim,
            args.n_heads,
            args.n_kv_heads,  # type: ignore[arg-type]
            args.head_dim,  # type: ignore[arg-type]
            use_rope=use_rope,
            use_qk_norm=args.use_qk_norm and use_rope,
            norm_eps=args.norm_eps,
            chunk_size=args.attention_chunk_size if use_rope else None,
            temperature_tuning=args.attn_temperature_tuning and not use_rope,
            floor_scale=args.floor_scale,
            attn_scale=args.attn_scale,
            backend=args.attention_backend,
            **factory,
        )
        self.feed_forward: nn.Module
        if self.is_moe_layer:
            moe = args.moe_args
            assert moe is not None
            self.feed_forward = MoE(
                args.dim,
                args.expert_hidden_dim(),
                moe.num_experts,
                moe.top_k,
                score_func=moe.score_func,
                shared_expert=moe.shared_expert,
                prescale_input=moe.score_func == "sigmoid",
                renormalize=moe.score_func == "softmax",
                aux_loss_coef=moe.aux_loss_coef,
                z_loss_coef=moe.z_loss_coef,
                backend=moe.backend,
                **factory,
            )
        else:
            self.feed_forward = SwiGLU(args.dim, args.dense_hidden_dim(), **factory)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, **factory)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, **factory)
        self._register_load_state_dict_pre_hook(self._load_hook)

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # Meta `TransformerBlock.load_hook` + `FeedForward.load_hook` (the dense FFN is our SwiGLU, so its raw
        # fused `fc1_weight` = [w1 (gate); w3 (up)] is split here).
        renames = {
            "attention.wqkv.layer_norm_weight": "attention_norm.weight",
            "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
            "feed_forward.norm.weight": "ffn_norm.weight",
            "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
        }
        for old, new in renames.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if (fc1 := state_dict.pop(prefix + "feed_forward.mlp.fc1_weight", None)) is not None:
            w1, w3 = fc1.chunk(2, dim=0)
            state_dict.update({prefix + "feed_forward.w1.weight": w1, prefix + "feed_forward.w3.weight": w3})
        for k in ("feed_forward.experts.mlp", "feed_forward.mlp_shared", "attention.wo", "attention.wqkv"):
            state_dict.pop(prefix + k + "._extra_state", None)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, positions: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> ((B, T, D), the MoE aux loss or None)."""
        h = x + self.attention(self.attention_norm(x), rope, positions)
        if self.is_moe_layer:
            moe_out = self.feed_forward(self.ffn_norm(h))
            return h + moe_out.out, moe_out.aux_loss
        return h + self.feed_forward(self.ffn_norm(h)), None


class LLM(nn.Module):
    """Llama-4-style decoder (Meta's `Transformer`): embeddings, blocks, final RMSNorm, output head, following
    `vermeil.models.contract`. On the meta device, call `to_empty()` and `init_weights()` afterwards."""

    def __init__(
        self, args: ModelArgs, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        self.config = args
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, **factory)
        self.layers = nn.ModuleList(TransformerBlock(i, args, **factory) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, **factory)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False, **factory)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(
            args.head_dim,  # type: ignore[arg-type]
            theta=args.rope_theta,
            pairing="interleaved",
            max_seq_len=min(args.max_seq_len, 8192),  # grows on demand; Scout's 256k rows would be 128 MB
            scaling=args.rope_scaling(),
            device=device,
        )
        self.has_rope_layer = any(not layer.is_nope_layer for layer in self.layers)
        self.vision_embeddings = self.vision_projection = None
        if vision := args.vision_args:
            self.vision_embeddings = VisionEmbeddings(vision, **factory)
            self.vision_projection = nn.Linear(vision.output_dim, args.dim, bias=False, **factory)
        self.cache_max_seq_len = self.cache_batch_size = None  # set by setup_cache
        self._register_load_state_dict_pre_hook(self._load_hook)
        self.init_weights()

    @property
    def args(self) -> ModelArgs:
        """The config under Meta's name (`Transformer.args`); read-only, `.config` is the contract's name."""
        return self.config

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "rope.freqs", None)  # Meta's precomputed table: derived, not a weight
        if self.args.tie_word_embeddings:
            contract.fill_tied_keys(self, state_dict, prefix)

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02) -> None:
        """torchtitan's Llama scheme: truncated normal (±3 std) `init_std`, divided by sqrt(2 * (layer_id + 1))
        for the residual outputs (`wo`, `w2`, expert `w2`) so the residual stream grows slowly with depth; head
        `dim ** -0.5`. Embeddings: normal `embedding_init_std` when set, else 1 (RMSNorm follows), or
        `dim ** -0.5` when tied (small models may need less: at dim 64 a tied std of 0.125 keeps a 2-layer
        Transformer off MQAR's induction circuit, 0.02 finds it; README, MQAR)."""
        dim, emb_std, tied = self.args.dim, self.args.embedding_init_std, self.args.tie_word_embeddings

        def trunc(std: float, *weights: Tensor) -> None:
            for w in weights:
                nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)

        nn.init.normal_(self.tok_embeddings.weight, std=emb_std or (dim**-0.5 if tied else 1.0))
        if not tied:
            trunc(dim**-0.5, self.output.weight)
        for layer in self.layers:
            depth_std = init_std / math.sqrt(2 * (layer.layer_id + 1))
            att, ff = layer.attention, layer.feed_forward
            trunc(init_std, att.wq.weight, att.wk.weight, att.wv.weight)
            trunc(depth_std, att.wo.weight)
            if isinstance(ff, MoE):
                trunc(init_std, ff.router.router_DE, ff.experts.w1, ff.experts.w3)
                trunc(depth_std, ff.experts.w2)
                ff = ff.shared_expert
            if ff is not None:
                trunc(init_std, ff.w1.weight, ff.w3.weight)
                trunc(depth_std, ff.w2.weight)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.rope.inv_freq.device.type != "meta":
            self.rope.reset_parameters()
        if self.vision_embeddings is not None:
            self.vision_embeddings.reset_parameters()
            trunc(init_std, self.vision_projection.weight)  # type: ignore[union-attr]

    reset_parameters = init_weights  # nn.Module's name for the model's scheme

    def cache_modules(self) -> list[nn.Module]:
        """Every layer's attention (a ring of `min(attention_chunk_size, max_seq_len)` slots on chunked layers)."""
        return [layer.attention for layer in self.layers]

    setup_cache, reset_cache, delete_cache = contract.setup_cache, contract.reset_cache, contract.delete_cache
    lm_parts = ("tok_embeddings", "norm", "output")  # (embedding, final norm, head), Meta's names

    def attention_layers(self) -> list[AttentionLayer]:
        """Every layer attends: RoPE layers over at most `attention_chunk_size` positions, NoPE layers globally."""
        width = self.config.n_heads * self.config.head_dim  # type: ignore[operator]
        return [AttentionLayer(width, layer.attention.chunk) for layer in self.layers]

    def check_tensor_parallel(self, *, sequence_parallel: bool, loss_parallel: bool) -> None:
        if sequence_parallel and self.vision_projection is not None:
            raise ValueError(
                "sequence_parallel=True does not support an LLM with vision_args (image embeddings are merged into "
                "the whole sequence); use sequence_parallel=False"
            )

    def sequence_parallel_plan(self) -> dict[str, str]:
        """torchtitan's Llama layout, in the styles of `vermeil.models.contract` (attention takes x, rope,
        positions; an MoE layer keeps the local part of its `MoEOutput.out`)."""
        plan: dict[str, str] = {}
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            plan[p + "attention_norm"] = "local"
            plan[p + "attention"] = "gather:3"
            plan[p + "attention.wo"] = "row_scatter"
            plan[p + "ffn_norm"] = "local"
            if layer.is_moe_layer:  # the shared expert inside all-reduces as in plain tensor parallelism
                plan[p + "feed_forward"] = "whole:out"
            else:
                plan[p + "feed_forward"] = "gather"
                plan[p + "feed_forward.w2"] = "row_scatter"
        return plan

    def embed_images(self, images: Tensor, image_mask: Tensor) -> MaskedEmbedding:
        """images (N, C, H, W), in the order their tokens appear, placed where `image_mask` (B, T) is True ->
        the `MaskedEmbedding` to pass as `image_embedding`."""
        if self.vision_embeddings is None:
            raise ValueError("this model has no vision encoder (ModelArgs.vision_args is None)")
        return MaskedEmbedding(self.vision_embeddings(images, image_mask), image_mask)

    def _positions(self, tokens: Tensor, input_pos: Tensor | int | None) -> Tensor | None:
        b, t = tokens.shape
        if isinstance(input_pos, int):
            if self.has_rope_layer and input_pos + t > self.rope.max_seq_len:
                # A known end: size the table now, as eager CPU lookups would (on an accelerator and under
                # compile a lookup past it reads out of bounds; it reads no positions back there).
                self.rope.reserve(input_pos + t)
            input_pos = torch.arange(input_pos, input_pos + t, device=tokens.device)
        if input_pos is None:
            return None  # a plain forward over 0..T-1: the cache (if any) is neither read nor written
        limit = self.cache_max_seq_len
        if limit is not None:  # (T,) only: one position per step for the whole batch
            if t > limit:
                raise ValueError(f"prompt of {t} tokens is longer than the cache (max_seq_len={limit})")
            check_input_pos(tokens, input_pos, limit, self.cache_batch_size)
        elif input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
            raise TypeError(f"input_pos must hold integer positions, got dtype={input_pos.dtype}")
        elif input_pos.ndim not in (1, 2) or input_pos.shape[-1] != t:
            raise ValueError(f"input_pos must have shape (T={t},) or (B, T), got {tuple(input_pos.shape)}")
        elif input_pos.ndim == 2 and input_pos.shape[0] not in (1, b):
            raise ValueError(f"input_pos of shape {tuple(input_pos.shape)} must have batch 1 or {b}")
        return input_pos

    def forward(
        self,
        tokens: Tensor | TransformerInput,
        input_pos: Tensor | int | None = None,
        image_embedding: MaskedEmbedding | None = None,
    ) -> TransformerOutput:
        """tokens (B, T) or a `TransformerInput` (then nothing else) -> `TransformerOutput`.

        input_pos: None (0..T-1, no cache read or written), an int start, (T,) positions (with a cache: where
        the new keys go), or (B, T) per-row positions (no cache). image_embedding: the masked positions take
        `vision_projection(features)` instead of the token embedding.
        """
        if isinstance(tokens, TransformerInput):
            if input_pos is not None or image_embedding is not None:
                raise ValueError("pass a TransformerInput or tokens/input_pos/image_embedding, not both")
            tokens, start, image_embedding = tokens.tokens, tokens.tokens_position, tokens.image_embedding
            if isinstance(start, Tensor) and start.ndim == 1:
                if start.shape[0] != tokens.shape[0]:
                    raise ValueError(
                        f"tokens_position of shape {tuple(start.shape)} must hold one start per row "
                        f"(batch={tokens.shape[0]})"
                    )
                input_pos = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
            else:  # one start for the whole batch: an int or a 0-d tensor
                input_pos = int(start) if isinstance(start, Tensor) else start
        check_tokens(tokens, self.config.vocab_size)
        positions = self._positions(tokens, input_pos)
        b, t = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if image_embedding is not None:
            h = self._merge_image(h, image_embedding)

        rope = self.rope.tables(positions, seq_len=t) if self.has_rope_layer else None  # once per forward
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, rope, positions)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        logits = self.output(self.norm(h)).float()
        return TransformerOutput(logits, aux_loss)

    def _merge_image(self, h: Tensor, image_embedding: MaskedEmbedding) -> Tensor:
        if self.vision_projection is None:
            raise ValueError("image_embedding given, but this model has no vision_args")
        emb, mask = image_embedding.embedding, image_embedding.mask
        if mask.dtype != torch.bool:
            raise TypeError(f"image_embedding.mask must be bool, got {mask.dtype}")
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        bt, dv = tuple(h.shape[:2]), self.vision_projection.in_features
        if mask.shape != bt:
            raise ValueError(f"image_embedding.mask must have shape (B, T)={bt}, got {tuple(mask.shape)}")
        if emb.shape != (*bt, dv):
            raise ValueError(
                f"image_embedding.embedding must have shape (B, T, Dv)={(*bt, dv)}, got {tuple(emb.shape)}"
            )
        h_image = self.vision_projection(emb.to(self.vision_projection.weight.dtype)).to(h.dtype)
        return torch.where(mask[..., None], h_image, h)  # Meta: h * ~mask + h_image * mask

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (shared tensors once); optionally without the token embedding table."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings and not self.args.tie_word_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total


def build(preset: str, **overrides: Any) -> LLM:
    """`LLM(ModelArgs(**PRESETS[preset], **overrides))` (see `contract.build_preset`)."""
    return build_preset(LLM, ModelArgs, PRESETS, preset, overrides)


# Published shapes (Meta's params.json / transformers configs); "debug" is tiny and odd-sized for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        dim=48,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        vocab_size=101,
        multiple_of=16,
        hidden_dim=74,
        rope_theta=10000.0,
        max_seq_len=64,
        use_qk_norm=True,
        nope_layer_interval=4,
        attention_chunk_size=5,
        attn_temperature_tuning=True,
        floor_scale=3.0,
        moe_args=dict(num_experts=4, top_k=2, interleave_moe_layer_step=2, hidden_dim=40),
    ),
    # Llama 3.2 1B (params.json / HF config): tied embeddings, llama3 scaling factor 32.
    "llama3.2-1b": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
        rope_scaling_factor=32.0,
        rope_high_freq_factor=4.0,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    # Llama 4 Scout 17B-16E, text part (Meta params.json; scaled RoPE 16 / 1 is Meta's default for Scout).
    "llama4-scout-text": dict(
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=202048,
        multiple_of=2048,
        ffn_dim_multiplier=1.2,
        ffn_exp=4.0,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
        max_seq_len=262144,
        use_qk_norm=True,
        nope_layer_interval=4,
        attention_chunk_size=8192,
        attn_temperature_tuning=True,
        floor_scale=8192.0,
        attn_scale=0.1,
        moe_args=dict(
            num_experts=16, top_k=1, capacity_factor=1.0, auto_scale_F=True, interleave_moe_layer_step=1
        ),
    ),
}
