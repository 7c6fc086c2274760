"""HybridModel: Mamba and attention layers in one model, routed sequentially or in parallel.

The layer pattern says where attention is: one letter per layer, "M" a Mamba layer and "A" an attention layer
(a string such as "MMAMMMAM" or a list of letters; `n_layers` may repeat it). `routing` says what an "A" means:

- `sequential`: the "A" layer runs attention instead of Mamba; layers run in the pattern's order (Jamba,
  mamba_ssm's `attn_layer_idx`, Bamba).
- `parallel`: the "A" layer runs a Mamba branch and an attention branch on the same normalised input and merges
  them (Falcon-H1 when every letter is "A"): `merge: sum` gives Falcon-H1's
  `ssm_out_multiplier * Mamba(x) + attn_out_multiplier * Attn(attn_in_multiplier * x)`, `merge: gate` a learned
  per-channel sigmoid gate `g * mamba + (1 - g) * attn` with `g = sigmoid(gate(x))`, and `merge: concat`
  `merge_proj(cat(mamba, attn))`. "M" layers stay Mamba-only.

Every layer is pre-norm: `h = h + mixer(norm(h))`, then a feed-forward `h = h + feed_forward(ffn_norm(h))` unless
`feed_forward: none`. Attention uses rotary positions or none (Jamba's attention layers have none).

The contract of `vermeil.models.contract`: `setup_cache(batch_size, max_seq_len)` gives each attention layer a
static KV cache and each Mamba layer a conv + SSM state; `forward(tokens, input_pos=...)` reads and writes them;
`reset_cache()` clears them; `attention_layers()`, `lm_parts` and `sequence_parallel_plan()` describe the model
to `vermeil info` and tensor parallelism. `vermeil.generation.generate` works unchanged.

The model returns logits and holds no loss: the config's `loss_head`, `ignore_index` and `z_loss` name the loss
that training builds (`vermeil.train.losses`), and weight decay is training's rule (`vermeil.train.optim`).
Configs come from YAML through `vermeil.config` (`HybridModel.from_yaml(path)`), the leaf module of strict
dataclass <-> YAML conversion that every layer may use: unknown keys and bad values are named.

Axis legend: B batch, T sequence length, D model dim, V vocabulary, H heads, Dh head dim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vermeil.config import ConfigError, apply_overrides, from_dict, load_yaml, merge_preset
from vermeil.models._state_dict import fill_tied_keys
from vermeil.models.checks import check_input_pos, check_positive_int, check_tokens
from vermeil.models.contract import AttentionLayer
from vermeil.nn.attention import Attention
from vermeil.nn.feedforward import FeedForward, SwiGLU, llama_hidden_dim
from vermeil.nn.norms import RMSNorm
from vermeil.nn.positional import RotaryEmbedding
from vermeil.nn.scan import BACKENDS
from vermeil.nn.ssm import MambaBlock

__all__ = ["PRESETS", "HybridConfig", "HybridLayer", "HybridModel", "build"]

_LETTERS = {"M": "Mamba", "A": "attention"}
_ROUTINGS = ("sequential", "parallel")
_MERGES = ("sum", "gate", "concat")
_FEED_FORWARDS = ("none", "swiglu", "mlp")


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class HybridConfig:
    """The hybrid: widths, the layer pattern, routing and merge, branch settings, and the loss training uses.

    Args:
        dim: D, the residual width.
        vocab_size: V.
        pattern: one letter per layer, "M" (Mamba) or "A" (attention), as a string or a list of letters.
        n_layers: None means len(pattern); otherwise the pattern is repeated and must divide it.
        routing: "sequential" ("A" layers run attention instead of Mamba) or "parallel" ("A" layers run
            Mamba and attention side by side and merge them).
        merge: how a parallel layer merges its branches: "sum", "gate" (learned) or "concat" (then project).
        ssm_out_multiplier, attn_out_multiplier, attn_in_multiplier: Falcon-H1's branch multipliers (parallel
            layers only).
        d_state, d_conv, expand, dt_rank: the Mamba branch (state-spaces names; dt_rank None = ceil(D / 16)).
        compile_scan: the Mamba branches run their scan through torch.compile'd chunk kernels
            (`MambaBlock`'s `compile_scan`): faster training and prefill on the CPU after a first compile.
        scan_backend: `selective_scan`'s backend in every Mamba block (`MambaBlock`'s `scan_backend`): "auto"
            (Triton kernels on CUDA when triton imports, else the chunked scan), "triton", "chunked" or "ref".
        heads, kv_heads, head_dim: the attention branch (kv_heads None = heads; head_dim None = D / heads).
        rotary: rotary positions in attention (False: none, as Jamba); rope_theta its base.
        qk_norm: None, "rms" or "l2" normalisation of queries and keys.
        window: sliding-window attention over the last `window` positions (Samba), None for global; its
            decoding cache is a `RingKVCache` of `window` slots, the one Llama 4's chunked layers use.
        feed_forward: "none", "swiglu" or "mlp" (GELU) after each mixer.
        hidden_dim: feed-forward width; None means Llama's rule for swiglu (8D/3 rounded to multiple_of) and
            4D for mlp.
        multiple_of: rounding of the swiglu width.
        norm_eps: RMSNorm eps.
        tie_embeddings: the LM head shares the embedding matrix.
        max_seq_len: initial rotary table length (grows on demand).
        initializer_range: std of the embedding init.
        loss_head: the loss training builds, by name (`vermeil.train.losses.LOSS_HEADS`: "cross_entropy").
        ignore_index, z_loss: settings of the cross-entropy head (z_loss: PaLM's logsumexp^2 term).
    """

    dim: int = 256
    vocab_size: int = 256
    pattern: str | list[str] = "MMAMMMAM"
    n_layers: int | None = None
    routing: Literal["sequential", "parallel"] = "sequential"
    merge: Literal["sum", "gate", "concat"] = "sum"
    ssm_out_multiplier: float = 1.0
    attn_out_multiplier: float = 1.0
    attn_in_multiplier: float = 1.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    compile_scan: bool = False
    scan_backend: str = "auto"
    heads: int = 4
    kv_heads: int | None = None
    head_dim: int | None = None
    rotary: bool = True
    rope_theta: float = 10000.0
    qk_norm: Literal["rms", "l2"] | None = None
    window: int | None = None
    feed_forward: Literal["none", "swiglu", "mlp"] = "swiglu"
    hidden_dim: int | None = None
    multiple_of: int = 16
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    loss_head: str = "cross_entropy"
    ignore_index: int = -100
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "heads",
            "multiple_of",
            "max_seq_len",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("n_layers", "dt_rank", "kv_heads", "head_dim", "hidden_dim", "window"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        self._check_pattern()
        for name, value, allowed in (
            ("routing", self.routing, _ROUTINGS),
            ("merge", self.merge, _MERGES),
            ("feed_forward", self.feed_forward, _FEED_FORWARDS),
            ("qk_norm", self.qk_norm, (None, "rms", "l2")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {list(allowed)}")
        kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        if self.heads % kv_heads:
            raise ValueError(f"heads={self.heads} must be divisible by kv_heads={kv_heads}")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads} (or set head_dim)")
        if self.rotary and self.attention_head_dim % 2:
            raise ValueError(f"head_dim={self.attention_head_dim} must be even with rotary=True")
        for name in ("norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        for name in ("ssm_out_multiplier", "attn_out_multiplier", "attn_in_multiplier", "z_loss"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss} must be >= 0")
        if not isinstance(self.compile_scan, bool):
            raise ValueError(f"compile_scan={self.compile_scan!r} must be true or false")
        if self.scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend={self.scan_backend!r} must be one of {BACKENDS}")
        if not isinstance(self.loss_head, str) or not self.loss_head:
            raise ValueError(f"loss_head={self.loss_head!r} must be a loss head's name (a non-empty str)")

    def _check_pattern(self) -> None:
        p = self.pattern
        ok = isinstance(p, str) or (isinstance(p, (list, tuple)) and all(isinstance(c, str) for c in p))
        if not ok:
            raise ValueError(f"pattern={p!r} must be a string such as 'MMAM' or a list of 'M'/'A' letters")
        letters = list(p)
        if not letters:
            raise ValueError(f"pattern={p!r} must hold at least one layer letter ('M' Mamba, 'A' attention)")
        for i, c in enumerate(letters):
            if c not in _LETTERS:
                raise ValueError(
                    f"pattern={p!r} has {c!r} at position {i}: layer letters must be 'M' (Mamba) or 'A' (attention)"
                )
        if self.n_layers is not None and self.n_layers % len(letters):
            raise ValueError(f"n_layers={self.n_layers} must be a multiple of len(pattern)={len(letters)}")

    @property
    def layer_letters(self) -> list[str]:
        """The pattern expanded to one letter per layer."""
        letters = list(self.pattern)
        return letters * ((self.n_layers or len(letters)) // len(letters))

    @property
    def layer_kinds(self) -> list[str]:
        """Per layer: "M" (Mamba), "A" (attention) or "P" (parallel Mamba + attention)."""
        parallel = self.routing == "parallel"
        return ["P" if (c == "A" and parallel) else c for c in self.layer_letters]

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        if self.feed_forward == "mlp":
            return 4 * self.dim
        return llama_hidden_dim(self.dim, multiple_of=self.multiple_of)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> HybridConfig:
        """Strict build from a mapping (a `preset: name` key takes a preset and puts the other keys on top)."""
        return from_dict(cls, merge_preset(data, PRESETS, path), path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> HybridConfig:
        """Read a YAML file: its `model:` section if it has one (other sections, `data:` and `train:`, belong to
        `vermeil train`; a `family:` key must say "hybrid"), else the whole file. `overrides` are dotted
        `key=value` strings (`model.routing=parallel`).

        Raises:
            ConfigError: unknown keys (named, with the nearest valid name) and bad values (named, with the rule).
        """
        data = apply_overrides(load_yaml(path), overrides)
        if "model" not in data:
            return cls.from_dict(data)
        section = data["model"]
        if isinstance(section, dict) and "family" in section:  # a `vermeil train` run config names its family
            section = dict(section)
            family = section.pop("family")
            if family != "hybrid":
                raise ConfigError(f"model.family={family!r} must be 'hybrid' for HybridConfig")
        return cls.from_dict(section, "model")


# ----------------------------------------------------------------------------------------------------------
# Modules


def _scaled(x: Tensor, multiplier: float) -> Tensor:
    return (
        x if multiplier == 1.0 else x * multiplier
    )  # a Python float fixed at construction: no branch on data


class HybridLayer(nn.Module):
    """One layer: `h = h + mixer(norm(h))`, then `h = h + feed_forward(ffn_norm(h))` if configured.

    kind "M": `mamba`; "A": `attention`; "P": both, merged (`gate` for merge="gate", `merge_proj` for "concat").
    """

    def __init__(
        self,
        kind: str,
        cfg: HybridConfig,
        rotary: nn.Module | None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("M", "A", "P"):
            raise ValueError(f"kind={kind!r} must be 'M', 'A' or 'P'")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        d = cfg.dim
        self.kind = kind
        self.merge = cfg.merge if kind == "P" else None
        self.ssm_out, self.attn_out, self.attn_in = (
            cfg.ssm_out_multiplier,
            cfg.attn_out_multiplier,
            cfg.attn_in_multiplier,
        )
        self.norm = RMSNorm(d, eps=cfg.norm_eps, **factory)
        self.mamba = None
        self.attention = None
        self.gate = None
        self.merge_proj = None
        if kind in ("M", "P"):
            self.mamba = MambaBlock(
                d,
                d_state=cfg.d_state,
                d_conv=cfg.d_conv,
                expand=cfg.expand,
                dt_rank="auto" if cfg.dt_rank is None else cfg.dt_rank,
                compile_scan=cfg.compile_scan,
                scan_backend=cfg.scan_backend,
                **factory,
            )
        if kind in ("A", "P"):
            self.attention = Attention(
                d,
                cfg.heads,
                cfg.kv_heads,
                cfg.head_dim,
                causal=True,
                qk_norm=cfg.qk_norm,
                window=cfg.window,
                rotary=rotary,
                **factory,
            )
        if self.merge == "gate":
            self.gate = nn.Linear(d, d, bias=True, **factory)
        elif self.merge == "concat":
            self.merge_proj = nn.Linear(2 * d, d, bias=False, **factory)
        if cfg.feed_forward == "none":
            self.ffn_norm = None
            self.feed_forward = None
        else:
            self.ffn_norm = RMSNorm(d, eps=cfg.norm_eps, **factory)
            if cfg.feed_forward == "swiglu":
                self.feed_forward = SwiGLU(d, cfg.ffn_hidden_dim, **factory)
            else:
                self.feed_forward = FeedForward(
                    d, cfg.ffn_hidden_dim, activation="gelu", bias=False, **factory
                )

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections writing into the residual stream (rescaled at init)."""
        out = []
        if self.mamba is not None:
            out.append(self.mamba.out_proj)
        if self.attention is not None:
            out.append(self.attention.wo)
        if self.merge_proj is not None:
            out.append(self.merge_proj)
        if isinstance(self.feed_forward, SwiGLU):
            out.append(self.feed_forward.w2)
        elif isinstance(self.feed_forward, FeedForward):
            out.append(self.feed_forward.fc2)
        return out

    def _attend(self, x: Tensor, input_pos: Tensor | None) -> Tensor:
        attn: Attention = self.attention  # type: ignore[assignment]  # kinds "A" and "P" have one
        return attn(x, input_pos=input_pos)  # without input_pos the cache is left alone

    def forward(self, h: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """h: (B, T, D) -> (B, T, D)."""
        x = self.norm(h)
        match self.kind:
            case "M":
                out = self.mamba(x, input_pos=input_pos)  # type: ignore[misc]
            case "A":
                out = self._attend(x, input_pos)
            case _:  # "P": both branches see the same normalised input
                m = _scaled(self.mamba(x, input_pos=input_pos), self.ssm_out)  # type: ignore[misc]
                a = _scaled(self._attend(_scaled(x, self.attn_in), input_pos), self.attn_out)
                match self.merge:
                    case "sum":
                        out = m + a
                    case "gate":
                        g = torch.sigmoid(self.gate(x))  # type: ignore[misc]  # (B, T, D)
                        out = a + g * (m - a)  # g * m + (1 - g) * a
                    case _:
                        out = self.merge_proj(torch.cat([m, a], dim=-1))  # type: ignore[misc]
        h = h + out
        if self.feed_forward is not None:
            h = h + self.feed_forward(self.ffn_norm(h))  # type: ignore[misc]
        return h

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", merge={self.merge!r}" if self.merge else "")


class HybridModel(nn.Module):
    """The hybrid language model: `embedding`, `layers` (`HybridLayer`), `norm_f`, `lm_head`.

    Args:
        config: the `HybridConfig`.
        device, dtype: where and how to create parameters (`torch.device("meta")` works; then `to_empty()` and
            `init_weights()`).

    `forward(tokens, input_pos=None) -> logits (B, T, V)` float32; the cache API of `vermeil.generation`.
    """

    def __init__(
        self,
        config: HybridConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        self.config = config
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        kinds = config.layer_kinds
        rotary = None
        if config.rotary and any(k != "M" for k in kinds):
            rotary = RotaryEmbedding(
                config.attention_head_dim,
                theta=config.rope_theta,
                max_seq_len=config.max_seq_len,
                device=device,
            )
        self.rope = rotary  # one table shared by every attention layer
        self.embedding = nn.Embedding(config.vocab_size, config.dim, **factory)
        self.layers = nn.ModuleList(HybridLayer(k, config, rotary, **factory) for k in kinds)
        self.norm_f = RMSNorm(config.dim, eps=config.norm_eps, **factory)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.cache_max_seq_len: int | None = None
        self.cache_batch_size: int | None = None
        self._register_load_state_dict_pre_hook(self._load_hook)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        overrides: Sequence[str] = (),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HybridModel:
        """`HybridModel(HybridConfig.from_yaml(path, overrides))`."""
        return cls(HybridConfig.from_yaml(path, overrides), device=device, dtype=dtype)

    # -- weights -----------------------------------------------------------------------------------------

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        if self.config.tie_embeddings:
            fill_tied_keys(state_dict, prefix + "embedding.weight", prefix + "lm_head.weight")

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's scheme extended to attention and feed-forward layers.

        Every block's own `reset_parameters` (S4D-real A and the dt bias in Mamba; nn.Linear defaults), then Linear
        biases zeroed except Mamba's dt bias, the learned gate at zero (g = 1/2: an even mix at start), residual
        output projections (Mamba `out_proj`, attention `wo`, `merge_proj`, feed-forward `w2`/`fc2`) re-drawn
        Kaiming-uniform and divided by sqrt(residuals per layer * n_layers), embedding normal(0,
        initializer_range), norm weights ones.
        """
        cfg = self.config
        if cfg.tie_embeddings:  # `to_empty()` after meta construction unties shared parameters: tie again
            self.lm_head.weight = self.embedding.weight
        n_res = (1 if cfg.feed_forward == "none" else 2) * len(self.layers)
        for layer in self.layers:
            for mod in layer.modules():
                if (
                    mod is not layer
                    and hasattr(mod, "reset_parameters")
                    and not isinstance(mod, RotaryEmbedding)
                ):
                    mod.reset_parameters()
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None and not name.endswith("dt_proj"):
                    nn.init.zeros_(mod.bias)
            if layer.gate is not None:
                nn.init.zeros_(layer.gate.weight)
            for lin in layer.residual_outputs():
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
                lin.weight /= math.sqrt(n_res)
        self.norm_f.reset_parameters()
        nn.init.normal_(self.embedding.weight, std=cfg.initializer_range)
        if not cfg.tie_embeddings:
            self.lm_head.reset_parameters()
        if self.rope is not None:
            self.rope.reset_parameters()  # its tables are garbage after meta construction + to_empty

    def reset_parameters(self) -> None:
        """Same as `init_weights()` (which also rebuilds the rotary tables)."""
        self.init_weights()

    def num_params(self) -> int:
        """Parameter count, a tied tensor once."""
        return sum(p.numel() for p in self.parameters())

    # -- cache -------------------------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a static KV cache (B, Hkv, max_seq_len, Dh) per attention layer (a `RingKVCache` of `window`
        slots with a sliding window) and a conv + SSM state per Mamba layer; then pass `input_pos`.
        dtype/device default to the parameters'."""
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_seq_len", max_seq_len)
        weight = self.embedding.weight
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        for layer in self.layers:
            if layer.attention is not None:
                layer.attention.setup_cache(batch_size, max_seq_len, dtype=dtype, device=device)
            if layer.mamba is not None:
                layer.mamba.setup_cache(batch_size, max_seq_len, dtype=dtype, device=device)
        if self.rope is not None:
            self.rope.cos_sin(torch.tensor([max_seq_len - 1], device=device))  # grow the table up front
        self.cache_max_seq_len, self.cache_batch_size = max_seq_len, batch_size

    def reset_cache(self) -> None:
        """Zero every KV cache and SSM state in place (a new sequence)."""
        for layer in self.layers:
            if layer.attention is not None:
                layer.attention.reset_cache()
            if layer.mamba is not None:
                layer.mamba.reset_cache()

    def delete_cache(self) -> None:
        """Drop the caches (back to plain training forwards)."""
        for layer in self.layers:
            if layer.attention is not None:
                layer.attention.delete_cache()
            if layer.mamba is not None:
                layer.mamba.delete_cache()
        self.cache_max_seq_len = self.cache_batch_size = None

    # -- self-description (vermeil.models.contract) ---------------------------------------------------------

    lm_parts = ("embedding", "norm_f", "lm_head")  # (embedding, final norm, head) for loss/sequence parallel

    def attention_layers(self) -> list[AttentionLayer]:
        """(query width H * Dh, sliding window or None) per layer that attends ("A" and parallel layers)."""
        cfg = self.config
        width = cfg.heads * cfg.attention_head_dim
        return [AttentionLayer(width, cfg.window) for kind in cfg.layer_kinds if kind != "M"]

    def check_tensor_parallel(self, *, sequence_parallel: bool, loss_parallel: bool) -> None:
        """Raise where the hybrid cannot run tensor-parallel that way (see `vermeil.models.contract`)."""
        if loss_parallel and self.config.z_loss:
            raise ValueError(
                f"loss_parallel=True does not support the hybrid's z_loss={self.config.z_loss} (its logsumexp "
                "term mixes vocab-sharded and plain tensors); set z_loss=0"
            )

    def sequence_parallel_plan(self) -> dict[str, str]:
        """Per submodule, its sequence-parallel style by name (`vermeil.models.contract` lists them): norms on
        the local tokens, Mamba on the whole sequence (its scan runs along it), attention and feed-forward
        inputs gathered with row-parallel outputs scattered back, merge weights replicated on local tokens."""
        plan: dict[str, str] = {}
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            plan[p + "norm"] = "local"
            if layer.mamba is not None:
                plan[p + "mamba"] = "whole"
            if layer.attention is not None:
                plan[p + "attention"] = "gather"
                plan[p + "attention.wo"] = "row_scatter"
            for merge in ("gate", "merge_proj"):
                if getattr(layer, merge) is not None:
                    plan[p + merge] = "local_replicated"
            if layer.feed_forward is not None:
                plan[p + "ffn_norm"] = "local"
                plan[p + "feed_forward"] = "gather"
                out = "w2" if isinstance(layer.feed_forward, SwiGLU) else "fc2"
                plan[f"{p}feed_forward.{out}"] = "row_scatter"
        return plan

    # -- forward -----------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits of every position.

        Args:
            tokens: (B, T) token ids.
            input_pos: None (a plain forward over positions 0..T-1; no cache read or written), or (T,)
                consecutive positions with a cache: the prompt (prefill), then one token at a time.

        Returns:
            (B, T, V) float32 logits.
        """
        check_tokens(tokens, self.config.vocab_size)
        if input_pos is not None:
            if self.cache_max_seq_len is None:
                input_pos = None  # no cache: rotary positions 0..T-1 are the plain forward's anyway
            else:
                check_input_pos(tokens, input_pos, self.cache_max_seq_len, self.cache_batch_size)
        h = self.embedding(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, input_pos)
        return self.lm_head(self.norm_f(h)).float()


def build(
    preset: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> HybridModel:
    """`HybridModel(HybridConfig(**PRESETS[preset], **overrides))`; an unknown preset raises with the names."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    return HybridModel(HybridConfig(**{**PRESETS[preset], **overrides}), device=device, dtype=dtype)


# "debug" is tiny and odd-sized for tests; "vio-small" is the seed's hybrid at the size of configs/hybrid_*.yaml.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        dim=37,
        vocab_size=101,
        pattern="MAMA",
        d_state=5,
        expand=2,
        heads=4,
        kv_heads=2,
        head_dim=10,
        hidden_dim=45,
        max_seq_len=64,
    ),
    "vio-small": dict(dim=128, vocab_size=256, pattern="MMAMMMAM", heads=4, d_state=16, max_seq_len=1024),
    # Jamba-v0.1's arrangement at its own width: attention every 8th layer (offset 4), no positions in attention.
    "jamba-v0.1-shape": dict(
        dim=4096,
        vocab_size=65536,
        pattern="MMMMAMMM",
        n_layers=32,
        heads=32,
        kv_heads=8,
        rotary=False,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank=256,
        hidden_dim=14336,
        tie_embeddings=False,
        max_seq_len=4096,
    ),
}
