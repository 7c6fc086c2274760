"""HybridModel: Mamba-1, Mamba-2 and attention layers, sequential or in parallel, with dense or mixture-of-experts
feed-forwards: one class for Mamba-2 LMs, Jamba, Bamba / Granite 4.0-H and Falcon-H1.

Layer tokens of `pattern`:

    M     Mamba-1 (`MambaBlock`, or Jamba's `InnerNormMambaBlock` with `mamba_inner_norms`)
    S     Mamba-2 / SSD (`Mamba2Block`)
    A     attention (sliding over the last `window` positions when `window` is set)
    G     global attention, even when `window` is set
    X+Y   parallel: the Mamba branch X ("M" or "S") and the attention branch Y ("A" or "G") on the same
          normalised input, merged by `merge` (Falcon-H1: "S+A" in every layer); "P" is short for "M+A"

Every layer is pre-norm: `h = h + mixer(norm(h))`, then `h = h + feed_forward(ffn_norm(h))` unless its
feed-forward is none. Jamba is pattern "MMMMAMMM" with ffn_pattern "DE"; a Mamba-2 LM (transformers'
Mamba2ForCausalLM) is pattern "S" with `feed_forward: none`. `vermeil.interop.from_transformers` converts
Mamba2ForCausalLM, JambaForCausalLM, BambaForCausalLM and FalconH1ForCausalLM.

Axis legend: B batch, T sequence length, D model dim, V vocabulary, H heads, Dh head dim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from vermeil.config import ConfigError, apply_overrides, from_dict, load_yaml, merge_preset
from vermeil.models import contract
from vermeil.models.checks import check_fields, check_input_pos, check_tokens
from vermeil.models.contract import AttentionLayer, build_preset
from vermeil.nn.attention import Attention
from vermeil.nn.feedforward import FeedForward, SwiGLU, llama_hidden_dim
from vermeil.nn.hybrid_parts import GateScaledSwiGLU, InnerNormMambaBlock, PartialRotary
from vermeil.nn.mamba2 import Mamba2Block
from vermeil.nn.moe import MoE
from vermeil.nn.norms import RMSNorm
from vermeil.nn.positional import RotaryEmbedding
from vermeil.nn.scan import BACKENDS
from vermeil.nn.ssm import MambaBlock

__all__ = ["PRESETS", "HybridConfig", "HybridLayer", "HybridModel", "HybridOutput", "build"]

_SSM_LETTERS = {"M": "Mamba-1", "S": "Mamba-2"}
_ATTN_LETTERS = {"A": "attention", "G": "global attention"}
_LETTERS_HELP = (
    "'M' (Mamba-1), 'S' (Mamba-2), 'A' (attention), 'G' (global attention), 'P' (= 'M+A') or a parallel "
    "pair such as 'S+A' (it needs the list form)"
)
_FFN_LETTERS = {"D": "dense", "E": "experts", "N": "none"}
_FFN_HELP = "'D' (dense), 'E' (mixture of experts) and 'N' (none)"
_ROUTINGS = ("sequential", "parallel")
_MERGES = ("sum", "gate", "concat")
_FEED_FORWARDS = ("none", "swiglu", "mlp")


def _parse_token(token: str) -> tuple[str | None, str | None] | None:
    """A layer token -> (Mamba letter or None, attention letter or None); None for an unknown token."""
    if token == "P":
        return "M", "A"
    if token in _SSM_LETTERS:
        return token, None
    if token in _ATTN_LETTERS:
        return None, token
    ssm, plus, attn = token.partition("+")
    if plus and ssm in _SSM_LETTERS and attn in _ATTN_LETTERS:
        return ssm, attn
    return None


def _check_letters(name: str, value: object, parse: Callable[[str], object], rule: str) -> None:
    """`value` must be a non-empty string or list of tokens that `parse` accepts (returns not None)."""
    tokens = list(value) if isinstance(value, (str, list, tuple)) else []
    if not tokens or not all(isinstance(c, str) for c in tokens):
        raise ValueError(f"{name}={value!r} must be a non-empty string or list of tokens: {rule}")
    for i, c in enumerate(tokens):
        if parse(c) is None:
            raise ValueError(f"{name}={value!r} has {c!r} at position {i}: {rule}")


def _kind_of(ssm: str | None, attn: str | None) -> str:
    """The canonical token of a layer: "M", "S", "A", "G", "P" (= M+A), or "X+Y"."""
    if ssm and attn:
        return "P" if (ssm, attn) == ("M", "A") else f"{ssm}+{attn}"
    return ssm or attn  # type: ignore[return-value]


@dataclass
class HybridConfig:
    """The hybrid's shape, patterns, branch settings and Falcon-H1 multipliers, and the loss training builds.

    Args:
        dim: D, the residual width.
        pattern: one token per layer (the module docstring lists them), a string of one-letter tokens ("MMAM")
            or a list of tokens (["S", "S+A"]).
        n_layers: None means len(pattern); otherwise the pattern (and `ffn_pattern`) is repeated to it.
        routing: "sequential", or "parallel" (the older spelling of parallel layers: every "A" becomes "M+A"
            and every "G" "M+G").
        merge: a parallel layer's merge: "sum" (`ssm_out_multiplier * mamba + attn_out_multiplier * attn`,
            Falcon-H1), "gate" (`g * mamba + (1 - g) * attn`, g = sigmoid(gate(x)) per channel) or "concat"
            (`merge_proj(cat(mamba, attn))`).
        ffn_pattern: one letter per layer, repeated like `pattern`: "D" dense (`feed_forward`), "E" mixture of
            experts, "N" none; None means "D" everywhere.
        d_state, d_conv, expand: both Mamba kinds (state-spaces names): state size N, conv width K, inner width
            expand * D.
        dt_rank: Mamba-1's dt rank (None = ceil(D / 16)).
        mamba_inner_norms: Mamba-1 layers normalise dt, B and C with RMSNorms (Jamba's mixer).
        compile_scan, scan_backend: Mamba-1's scan (see `MambaBlock`).
        headdim: Mamba-2 head width P; the Mamba-2 width (`d_ssm` or expand * D) must be a multiple of it.
        ngroups: Mamba-2 groups G of B and C; must divide the Mamba-2 heads.
        chunk_size: Mamba-2's scan chunk length (speed and memory only).
        d_ssm: Mamba-2 inner width when it is not expand * D (Falcon-H1's `mamba_d_ssm`).
        ssm_norm: Mamba-2's gated RMSNorm; False gives `y * silu(z)` (Falcon-H1's `mamba_rms_norm`).
        ssm_norm_before_gate: `rms_norm(y) * silu(z)` instead of `rms_norm(y * silu(z))`.
        dt_limit: (low, high) clamp of Mamba-2's dt in whole-sequence scans (transformers' `time_step_limit`;
            the one-token step does not clamp, as transformers and mamba_ssm); None = no clamp.
        ssm_bias: bias in the Mamba in_proj and out_proj (both kinds). ssm_conv_bias: bias in their conv.
        heads, kv_heads, head_dim: the attention branch (kv_heads None = heads; head_dim None = D / heads).
        attn_bias: biases in wq, wk, wv and wo.
        rotary: rotary positions in attention (False: none, as Jamba); rope_theta its base.
        rotary_dim: rotate only the first `rotary_dim` channels of each head (Bamba's partial_rotary_factor 0.5).
        window: sliding-window size of "A" layers (Samba); its decoding cache is a `RingKVCache` of `window`
            slots.
        feed_forward: the dense feed-forward: "none", "swiglu" or "mlp" (GELU).
        hidden_dim: dense feed-forward width; None means Llama's rule for swiglu (8D/3 rounded to
            `multiple_of`) and 4D for mlp.
        num_experts, experts_per_token: the MoE layers' E and top-k (softmax router, Mixtral / Jamba).
        moe_hidden_dim: each expert's width; None = the dense width (`ffn_hidden_dim`).
        moe_renormalize: divide the top-k router weights by their sum (Mixtral: true; Jamba: false).
        moe_aux_loss_coef: weight of the Switch load-balancing loss in the output's `aux_loss` (Jamba 0.001).
        embedding_multiplier, lm_head_multiplier, ssm_in_multiplier, ssm_out_multiplier, attn_in_multiplier,
            attn_out_multiplier, key_multiplier, mlp_gate_multiplier, mlp_out_multiplier: Falcon-H1's muP
            scalars, applied at run time as transformers does (so training dynamics match too), on: the
            embedding output, the logits, every Mamba branch's input / output, every attention branch's input /
            output, the keys (as the attention scale), SwiGLU's gate pre-activation, every feed-forward's
            output. 1 is no op.
        ssm_proj_multipliers: five multipliers of the Mamba-2 in_proj rows [z, x, B, C, dt] (Falcon-H1's
            `ssm_multipliers`).
        norm_eps: eps of every RMSNorm (layer norms, the gated norm, Jamba's inner norms).
        residual_in_fp32: keep the residual stream in float32 in a lower-precision model (each norm reads it
            cast to the model dtype), as transformers' and mamba_ssm's Mamba-2.
        max_seq_len: initial rotary table length (grows on demand).
        initializer_range: std of the embedding init.
        loss_head, ignore_index, z_loss: the loss training builds (`vermeil.train.losses.LOSS_HEADS`) and the
            cross-entropy head's settings (z_loss: PaLM's logsumexp^2 term).
    """

    dim: int = 256
    vocab_size: int = 256
    pattern: str | list[str] = "MMAMMMAM"
    n_layers: int | None = None
    routing: Literal["sequential", "parallel"] = "sequential"
    merge: Literal["sum", "gate", "concat"] = "sum"
    ffn_pattern: str | list[str] | None = None
    ssm_out_multiplier: float = 1.0
    attn_out_multiplier: float = 1.0
    attn_in_multiplier: float = 1.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    mamba_inner_norms: bool = False
    compile_scan: bool = False
    scan_backend: str = "auto"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    d_ssm: int | None = None
    ssm_norm: bool = True
    ssm_norm_before_gate: bool = False
    dt_limit: list[float] | None = None
    ssm_bias: bool = False
    ssm_conv_bias: bool = True
    heads: int = 4
    kv_heads: int | None = None
    head_dim: int | None = None
    attn_bias: bool = False
    rotary: bool = True
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    qk_norm: Literal["rms", "l2"] | None = None
    window: int | None = None
    feed_forward: Literal["none", "swiglu", "mlp"] = "swiglu"
    hidden_dim: int | None = None
    multiple_of: int = 16
    ffn_bias: bool = False
    num_experts: int = 8
    experts_per_token: int = 2
    moe_hidden_dim: int | None = None
    moe_renormalize: bool = False
    moe_aux_loss_coef: float = 0.0
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_proj_multipliers: list[float] | None = None
    key_multiplier: float = 1.0
    mlp_gate_multiplier: float = 1.0
    mlp_out_multiplier: float = 1.0
    norm_eps: float = 1e-5
    residual_in_fp32: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    loss_head: str = "cross_entropy"
    ignore_index: int = -100
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, positive=("norm_eps", "rope_theta", "initializer_range"), skip=("ignore_index",))
        self._check_pattern()
        for name, value, allowed in (
            ("routing", self.routing, _ROUTINGS),
            ("merge", self.merge, _MERGES),
            ("feed_forward", self.feed_forward, _FEED_FORWARDS),
            ("qk_norm", self.qk_norm, (None, "rms", "l2")),
            ("scan_backend", self.scan_backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {list(allowed)}")
        kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        if self.heads % kv_heads:
            raise ValueError(f"heads={self.heads} must be divisible by kv_heads={kv_heads}")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads} (or set head_dim)")
        if self.rotary and self.rotary_dim is None and self.attention_head_dim % 2:
            raise ValueError(f"head_dim={self.attention_head_dim} must be even with rotary=True")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.attention_head_dim):
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.attention_head_dim}"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} must be <= num_experts={self.num_experts}"
            )
        for name in ("z_loss", "moe_aux_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not isinstance(self.loss_head, str) or not self.loss_head:
            raise ValueError(f"loss_head={self.loss_head!r} must be a loss head's name (a non-empty str)")
        self._check_lists()
        if any(kind in ("S", "S+A", "S+G") for kind in self.layer_kinds):
            self._check_mamba2()
        if self.mlp_gate_multiplier != 1.0 and self.feed_forward != "swiglu":
            raise ValueError(
                f"mlp_gate_multiplier={self.mlp_gate_multiplier} applies to SwiGLU only, but "
                f"feed_forward={self.feed_forward!r}"
            )

    def _check_lists(self) -> None:
        for name, n in (("dt_limit", 2), ("ssm_proj_multipliers", 5)):
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, (list, tuple)) and len(value) == n
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ValueError(f"{name}={value!r} must be a list of {n} numbers")
        if self.dt_limit is not None and not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"dt_limit={self.dt_limit!r} must be [low, high] with 0 <= low <= high")
        if self.ssm_proj_multipliers is not None and not all(
            math.isfinite(v) for v in self.ssm_proj_multipliers
        ):
            raise ValueError(f"ssm_proj_multipliers={self.ssm_proj_multipliers!r} must be finite")

    def _check_mamba2(self) -> None:
        width = self.ssm_inner_dim
        where = f"d_ssm={self.d_ssm}" if self.d_ssm is not None else f"expand * dim = {width}"
        if width % self.headdim:
            raise ValueError(
                f"headdim={self.headdim} must divide the Mamba-2 width {where} (heads = width / headdim)"
            )
        nheads = width // self.headdim
        if nheads % self.ngroups:
            raise ValueError(
                f"ngroups={self.ngroups} must divide the Mamba-2 heads = {where} / headdim = {nheads}"
            )

    def _check_pattern(self) -> None:
        _check_letters("pattern", self.pattern, _parse_token, f"layer tokens are {_LETTERS_HELP}")
        n = len(self.pattern)
        if self.n_layers is not None and self.n_layers % n:
            raise ValueError(f"n_layers={self.n_layers} must be a multiple of len(pattern)={n}")
        f = self.ffn_pattern
        if f is not None:
            _check_letters("ffn_pattern", f, _FFN_LETTERS.get, f"feed-forward letters are {_FFN_HELP}")
            total = self.n_layers or n
            if total % len(f):
                raise ValueError(f"ffn_pattern={f!r} of length {len(f)} must divide the {total} layers")

    @property
    def layer_letters(self) -> list[str]:
        """The pattern expanded to one token per layer."""
        letters = list(self.pattern)
        return letters * ((self.n_layers or len(letters)) // len(letters))

    @property
    def layer_kinds(self) -> list[str]:
        """Per layer, its canonical token: "M", "S", "A", "G", "P" (= "M+A"), "M+G", "S+A" or "S+G"."""
        # routing "parallel" sets a Mamba-1 branch beside every attention-only token
        beside = "M" if self.routing == "parallel" else None
        parsed = map(_parse_token, self.layer_letters)  # checked in __post_init__
        return [_kind_of(ssm or beside, attn) for ssm, attn in parsed]  # type: ignore[misc]

    @property
    def layer_ffns(self) -> list[str]:
        """Per layer, its feed-forward: "swiglu", "mlp", "moe" or "none"."""
        letters = list(self.ffn_pattern or "D")  # checked non-empty in __post_init__
        letters *= len(self.layer_letters) // len(letters)
        return [{"D": self.feed_forward, "E": "moe", "N": "none"}[c] for c in letters]

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def ssm_inner_dim(self) -> int:
        """The Mamba-2 width: `d_ssm`, or expand * dim."""
        return self.d_ssm if self.d_ssm is not None else self.expand * self.dim

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
        """Read a YAML file: its `model:` section if it has one (a `family:` key there must say "hybrid"), else
        the whole file; `overrides` are dotted `key=value` strings (`model.routing=parallel`). Raises
        ConfigError naming unknown keys (with the nearest valid name) and bad values."""
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


def _scaled(x: Tensor, multiplier: float) -> Tensor:
    # the multiplier is a Python float fixed at construction: no branch on data
    return x if multiplier == 1.0 else x * multiplier


class HybridOutput(NamedTuple):
    """A `HybridModel` with MoE layers returns logits (B, T, V) float32 and the sum of their aux losses."""

    logits: Tensor
    aux_loss: Tensor


def _mamba(ssm: str, cfg: HybridConfig, layer_idx: int, factory: dict[str, Any]) -> nn.Module:
    # the arguments both Mamba kinds take, with the same meaning
    common: dict[str, Any] = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, conv_bias=cfg.ssm_conv_bias)
    common.update(bias=cfg.ssm_bias, layer_idx=layer_idx, **factory)
    if ssm == "S":
        return Mamba2Block(
            cfg.dim,
            d_inner=cfg.ssm_inner_dim,
            in_proj_multipliers=cfg.ssm_proj_multipliers,
            headdim=cfg.headdim,
            ngroups=cfg.ngroups,
            rmsnorm=cfg.ssm_norm,
            norm_before_gate=cfg.ssm_norm_before_gate,
            norm_eps=cfg.norm_eps,
            time_step_limit=tuple(cfg.dt_limit) if cfg.dt_limit is not None else (0.0, math.inf),
            chunk_size=cfg.chunk_size,
            **common,
        )
    common.update(expand=cfg.expand, compile_scan=cfg.compile_scan, scan_backend=cfg.scan_backend)
    common["dt_rank"] = "auto" if cfg.dt_rank is None else cfg.dt_rank
    if cfg.mamba_inner_norms:
        return InnerNormMambaBlock(cfg.dim, norm_eps=cfg.norm_eps, **common)
    return MambaBlock(cfg.dim, **common)


class HybridLayer(nn.Module):
    """One layer of kind `kind` (a token of `HybridConfig.layer_kinds`): `mamba`, `attention` or both (merged
    by `gate` or `merge_proj`), then `feed_forward` of kind `ffn` ("swiglu", "mlp", "moe" or "none")."""

    def __init__(
        self,
        kind: str,
        cfg: HybridConfig,
        rotary: nn.Module | None,
        *,
        ffn: str | None = None,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        parsed = _parse_token(kind)
        if parsed is None:
            raise ValueError(f"kind={kind!r} must be a layer token: {_LETTERS_HELP}")
        ssm, attn = parsed
        ffn = cfg.feed_forward if ffn is None else ffn
        if ffn not in (*_FEED_FORWARDS, "moe"):
            raise ValueError(f"ffn={ffn!r} must be one of {[*_FEED_FORWARDS, 'moe']}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        d = cfg.dim
        self.kind = _kind_of(ssm, attn)
        self.ffn = ffn
        self.merge = cfg.merge if (ssm and attn) else None
        self.ssm_in, self.ssm_out = cfg.ssm_in_multiplier, cfg.ssm_out_multiplier
        self.attn_in, self.attn_out = cfg.attn_in_multiplier, cfg.attn_out_multiplier
        self.mlp_out = cfg.mlp_out_multiplier
        self.aux_loss: Tensor | None = None  # the MoE auxiliary loss of the last forward
        self.norm = RMSNorm(d, eps=cfg.norm_eps, **factory)
        self.mamba = _mamba(ssm, cfg, layer_idx or 0, factory) if ssm is not None else None
        self.attention = None
        if attn is not None:
            head_dim = cfg.attention_head_dim
            self.attention = Attention(
                d,
                cfg.heads,
                cfg.kv_heads,
                cfg.head_dim,
                causal=True,
                qk_norm=cfg.qk_norm,
                bias=cfg.attn_bias,
                window=cfg.window if attn == "A" else None,
                rotary=rotary,
                # Falcon-H1 multiplies the keys by key_multiplier before RoPE and the cache: the same scores
                scale=None if cfg.key_multiplier == 1.0 else cfg.key_multiplier * head_dim**-0.5,
                **factory,
            )
        self.gate = nn.Linear(d, d, bias=True, **factory) if self.merge == "gate" else None
        self.merge_proj = nn.Linear(2 * d, d, bias=False, **factory) if self.merge == "concat" else None
        self.ffn_norm = None if ffn == "none" else RMSNorm(d, eps=cfg.norm_eps, **factory)
        self.feed_forward: nn.Module | None = None  # ffn "none"
        hidden, dense = cfg.ffn_hidden_dim, dict(bias=cfg.ffn_bias, **factory)
        if ffn == "swiglu" and cfg.mlp_gate_multiplier != 1.0:
            self.feed_forward = GateScaledSwiGLU(d, hidden, gate_multiplier=cfg.mlp_gate_multiplier, **dense)
        elif ffn == "swiglu":
            self.feed_forward = SwiGLU(d, hidden, **dense)
        elif ffn == "mlp":
            self.feed_forward = FeedForward(d, hidden, activation="gelu", **dense)
        elif ffn == "moe":
            self.feed_forward = MoE(
                d,
                cfg.moe_hidden_dim or hidden,
                cfg.num_experts,
                cfg.experts_per_token,
                score_func="softmax",
                shared_expert=False,
                prescale_input=False,
                renormalize=cfg.moe_renormalize,
                aux_loss_coef=cfg.moe_aux_loss_coef,
                **factory,
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
        attn: Attention = self.attention  # type: ignore[assignment]  # attention kinds have one
        out = attn(_scaled(x, self.attn_in), input_pos=input_pos)  # without input_pos the cache is left alone
        return _scaled(out, self.attn_out)

    def _ssm(self, x: Tensor, input_pos: Tensor | None) -> Tensor:
        out = self.mamba(_scaled(x, self.ssm_in), input_pos=input_pos)  # type: ignore[misc]
        return _scaled(out, self.ssm_out)

    def forward(self, h: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """h: (B, T, D) -> (B, T, D). An MoE layer leaves its auxiliary loss in `aux_loss` (None otherwise) for the
        model to read: the layer stays a plain module call, so wrappers and hooks see it."""
        # a float32 residual stream (residual_in_fp32) enters each norm in the model's dtype
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.mamba is None:
            out = self._attend(x, input_pos)
        elif self.attention is None:
            out = self._ssm(x, input_pos)
        else:  # parallel: both branches see the same normalised input
            m = self._ssm(x, input_pos)
            a = self._attend(x, input_pos)
            match self.merge:
                case "sum":
                    out = m + a
                case "gate":
                    g = torch.sigmoid(self.gate(x))  # type: ignore[misc]  # (B, T, D)
                    out = a + g * (m - a)  # g * m + (1 - g) * a
                case _:
                    out = self.merge_proj(torch.cat([m, a], dim=-1))  # type: ignore[misc]
        h = h + out
        self.aux_loss = None
        if self.feed_forward is not None:
            y = self.feed_forward(self.ffn_norm(h.to(self.ffn_norm.weight.dtype)))  # type: ignore[union-attr]
            if self.ffn == "moe":
                y, self.aux_loss = y.out, y.aux_loss
            h = h + _scaled(y, self.mlp_out)
        return h

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ffn={self.ffn!r}" + (f", merge={self.merge!r}" if self.merge else "")


class HybridModel(nn.Module):
    """The hybrid language model: `embedding`, `layers` (`HybridLayer`), `norm_f`, `lm_head`, following
    `vermeil.models.contract`. On the meta device, call `to_empty()` and `init_weights()` afterwards."""

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
        kinds, ffns = config.layer_kinds, config.layer_ffns
        self.rope: nn.Module | None = None  # one table shared by every attention layer
        if config.rotary and any(k not in ("M", "S") for k in kinds):
            head_dim = config.attention_head_dim
            table = dict(theta=config.rope_theta, max_seq_len=config.max_seq_len, device=device)
            if config.rotary_dim is not None and config.rotary_dim != head_dim:
                self.rope = PartialRotary(head_dim, config.rotary_dim, **table)
            else:
                self.rope = RotaryEmbedding(head_dim, **table)
        self.embedding = nn.Embedding(config.vocab_size, config.dim, **factory)
        self.layers = nn.ModuleList(
            HybridLayer(k, config, self.rope, ffn=f, layer_idx=i, **factory)
            for i, (k, f) in enumerate(zip(kinds, ffns))
        )
        self.has_moe = "moe" in ffns
        self.norm_f = RMSNorm(config.dim, eps=config.norm_eps, **factory)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.cache_max_seq_len = self.cache_batch_size = None  # set by setup_cache
        self._register_load_state_dict_pre_hook(self._load_hook)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], overrides: Sequence[str] = (), **factory: Any
    ) -> HybridModel:
        """`HybridModel(HybridConfig.from_yaml(path, overrides), device=..., dtype=...)`."""
        return cls(HybridConfig.from_yaml(path, overrides), **factory)

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        if self.config.tie_embeddings:
            contract.fill_tied_keys(self, state_dict, prefix)

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's scheme extended to attention and feed-forward layers: every block's own
        `reset_parameters`, Linear biases zeroed except Mamba's dt bias, the gate at zero (g = 1/2: an even mix),
        residual output projections Kaiming-uniform divided by sqrt(residual additions in the model), embedding
        normal(0, initializer_range)."""
        cfg = self.config
        if cfg.tie_embeddings:  # `to_empty()` after meta construction unties shared parameters: tie again
            self.lm_head.weight = self.embedding.weight
        n_res = sum(1 + (layer.feed_forward is not None) for layer in self.layers)
        for layer in self.layers:
            # `apply` visits children before parents, so a block's own init (Mamba's dt_proj) has the last word
            # over the default init of its Linears; the shared rope too: garbage tables after to_empty
            layer.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
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

    reset_parameters = init_weights  # nn.Module's name for the model's scheme

    def num_params(self) -> int:
        """Parameter count, a tied tensor once."""
        return sum(p.numel() for p in self.parameters())

    def cache_modules(self) -> list[nn.Module]:
        """Every attention branch (a static KV cache (B, Hkv, max_seq_len, Dh), a `RingKVCache` of `window` slots
        when sliding) and every Mamba branch (a conv + SSM state)."""
        return [m for layer in self.layers for m in (layer.attention, layer.mamba) if m is not None]

    setup_cache, reset_cache, delete_cache = contract.setup_cache, contract.reset_cache, contract.delete_cache

    lm_parts = ("embedding", "norm_f", "lm_head")  # (embedding, final norm, head) for loss/sequence parallel

    def attention_layers(self) -> list[AttentionLayer]:
        """(query width H * Dh, sliding window or None) per layer that attends (alone or in parallel)."""
        width = self.config.heads * self.config.attention_head_dim
        return [
            AttentionLayer(width, layer.attention.window)
            for layer in self.layers
            if layer.attention is not None
        ]

    def check_tensor_parallel(self, *, sequence_parallel: bool, loss_parallel: bool) -> None:
        if loss_parallel and self.config.z_loss:
            raise ValueError(
                f"loss_parallel=True does not support the hybrid's z_loss={self.config.z_loss} (its logsumexp "
                "term mixes vocab-sharded and plain tensors); set z_loss=0"
            )

    def sequence_parallel_plan(self) -> dict[str, str]:
        """Norms on the local tokens, Mamba (both kinds) and MoE on the whole sequence, attention and dense
        feed-forward inputs gathered with row-parallel outputs scattered back, merge weights local."""
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
                if layer.ffn == "moe":
                    plan[p + "feed_forward"] = "whole:out"
                    continue
                plan[p + "feed_forward"] = "gather"
                out = "w2" if isinstance(layer.feed_forward, SwiGLU) else "fc2"
                plan[f"{p}feed_forward.{out}"] = "row_scatter"
        return plan

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor | HybridOutput:
        """tokens (B, T), input_pos None or (T,) cache positions -> (B, T, V) float32 logits, a
        `HybridOutput(logits, aux_loss)` with MoE layers."""
        check_tokens(tokens, self.config.vocab_size)
        if input_pos is not None:
            if self.cache_max_seq_len is None:
                input_pos = None  # no cache: rotary positions 0..T-1 are the plain forward's anyway
            else:
                check_input_pos(tokens, input_pos, self.cache_max_seq_len, self.cache_batch_size)
        h = _scaled(self.embedding(tokens), self.config.embedding_multiplier)  # (B, T, D)
        if self.config.residual_in_fp32:
            h = h.float()
        for layer in self.layers:
            h = layer(h, input_pos)
        h = self.norm_f(h)
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))  # (B, T, V)
        logits = _scaled(logits, self.config.lm_head_multiplier).float()
        if self.has_moe:
            aux_loss = sum(layer.aux_loss for layer in self.layers if layer.aux_loss is not None)
            return HybridOutput(logits, aux_loss)  # type: ignore[arg-type]  # an MoE layer gave one
        return logits


def build(preset: str, **overrides: Any) -> HybridModel:
    """`HybridModel(HybridConfig(**PRESETS[preset], **overrides))` (see `contract.build_preset`)."""
    return build_preset(HybridModel, HybridConfig, PRESETS, preset, overrides)


# "debug" is tiny and odd-sized for tests; "small" is the seed's hybrid at the size of configs/hybrid_*.yaml.
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
    "small": dict(dim=128, vocab_size=256, pattern="MMAMMMAM", heads=4, d_state=16, max_seq_len=1024),
    # Jamba-v0.1 (transformers' JambaConfig defaults).
    "jamba-v0.1-shape": dict(
        dim=4096,
        vocab_size=65536,
        pattern="MMMMAMMM",
        n_layers=32,
        ffn_pattern="DE",
        heads=32,
        kv_heads=8,
        rotary=False,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank=256,
        mamba_inner_norms=True,
        hidden_dim=14336,
        num_experts=16,
        experts_per_token=2,
        moe_aux_loss_coef=0.001,
        norm_eps=1e-6,
        tie_embeddings=False,
        max_seq_len=4096,
    ),
}
PRESETS["vio-small"] = PRESETS["small"]  # the older name of "small", still accepted
