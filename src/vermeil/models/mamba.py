"""MambaLM: the Mamba-1 language model of state-spaces/mamba (`MambaLMHeadModel`), on Vermeil's `MambaBlock`.

Module names are state-spaces', so `mamba_ssm` checkpoints load natively; transformers' layout goes through
`vermeil.interop.transformers_mamba`.

Axis legend: B batch, T sequence length, D d_model, E d_inner = expand * D, N d_state, V (padded) vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vermeil.models import contract
from vermeil.models.checks import check_fields, check_input_pos, check_tokens
from vermeil.models.contract import AttentionLayer, build_preset, preset_config
from vermeil.nn.norms import LayerNorm, RMSNorm
from vermeil.nn.scan import BACKENDS
from vermeil.nn.ssm import MambaBlock

__all__ = ["PRESETS", "MambaConfig", "MambaLM", "MambaResidualBlock", "build"]


@dataclass
class MambaConfig:
    """Shape and init of a Mamba-1 LM; names and defaults of mamba_ssm's `MambaConfig` plus its `ssm_cfg`.

    Args:
        d_state: N, the SSM state size per channel. d_conv: width of the causal depthwise convolution.
        expand: E = expand * D inner channels.
        dt_rank: rank of the dt projection; None means ceil(D / 16) (mamba_ssm's "auto").
        pad_vocab_size_multiple: embedding and head rows are padded up to a multiple of this (mamba_ssm pads
            50277 to 50280); the extra rows are never predicted: logits are cut back to `vocab_size`.
        rms_norm: RMSNorm (True) or LayerNorm (False) in the blocks and at the end.
        residual_in_fp32: keep the residual stream in float32 whatever the parameter dtype.
        conv_bias, bias: bias on conv1d; bias on in_proj/out_proj.
        dt_min, dt_max, dt_init_floor, dt_scale: dt initialisation (log-uniform in [dt_min, dt_max]).
        rescale_prenorm_residual, n_residuals_per_layer: see `MambaLM.init_weights`.
        compile_scan, scan_backend: every block's scan (see `MambaBlock`).
    """

    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 8
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    n_residuals_per_layer: int = 1
    compile_scan: bool = False
    scan_backend: str = "auto"

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("norm_epsilon", "dt_min", "dt_max", "dt_init_floor", "dt_scale", "initializer_range"),
        )
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} must be <= dt_max={self.dt_max}")
        if self.scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend={self.scan_backend!r} must be one of {BACKENDS}")

    @property
    def d_inner(self) -> int:
        """E = expand * d_model."""
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to pad_vocab_size_multiple."""
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def block_kwargs(self) -> dict[str, Any]:
        """The `MambaBlock` arguments (state-spaces names) this config fixes."""
        shape_and_dt = ("d_state", "d_conv", "expand", "dt_min", "dt_max", "dt_scale", "dt_init_floor")
        same = (*shape_and_dt, "conv_bias", "bias", "compile_scan", "scan_backend")  # the same name in both
        dt_rank = "auto" if self.dt_rank is None else self.dt_rank
        return {n: getattr(self, n) for n in same} | {"dt_rank": dt_rank}


def _norm(cfg: MambaConfig, factory: dict[str, Any]) -> nn.Module:
    if cfg.rms_norm:
        return RMSNorm(cfg.d_model, eps=cfg.norm_epsilon, **factory)
    return LayerNorm(cfg.d_model, eps=cfg.norm_epsilon, **factory)


class MambaResidualBlock(nn.Module):
    """mamba_ssm's `Block`, "Add -> Norm -> Mixer": residual = hidden + residual; hidden = mixer(norm(residual)).

    The residual stream stays outside the block (in float32 when `residual_in_fp32`), as mamba_ssm keeps it to
    fuse "add + norm" into one kernel; this equals transformers' `h = h + mixer(norm(h))`.
    """

    def __init__(self, cfg: MambaConfig, layer_idx: int | None = None, **factory: Any) -> None:
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = _norm(cfg, factory)
        self.mixer = MambaBlock(cfg.d_model, **cfg.block_kwargs(), layer_idx=layer_idx, **factory)

    def forward(
        self, hidden: Tensor, residual: Tensor | None, input_pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """hidden, residual: (B, T, D) (residual None in the first block) -> (hidden, residual)."""
        residual = hidden if residual is None else hidden + residual
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(hidden, input_pos=input_pos), residual


class MambaBackbone(nn.Module):
    """mamba_ssm's `MixerModel`: `embedding`, `layers`, `norm_f`."""

    def __init__(self, cfg: MambaConfig, **factory: Any) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, **factory)
        self.layers = nn.ModuleList(MambaResidualBlock(cfg, i, **factory) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg, factory)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """tokens: (B, T) -> final normalised hidden states (B, T, D)."""
        hidden, residual = self.embedding(tokens), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, input_pos)
        residual = hidden + residual if residual is not None else hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class MambaLM(nn.Module):
    """Mamba-1 language model (Gu & Dao, 2023, arXiv:2312.00752): mamba_ssm's `MambaLMHeadModel`, following
    `vermeil.models.contract`. On the meta device, call `to_empty()` and `init_weights()` afterwards."""

    def __init__(
        self,
        config: MambaConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        self.config = config
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.backbone = MambaBackbone(config, **factory)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.cache_max_seq_len = self.cache_batch_size = None  # set by setup_cache
        self._register_load_state_dict_pre_hook(self._load_hook)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def _load_hook(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        if self.config.tie_embeddings:  # mamba_ssm saves both names; other checkpoints may hold one
            contract.fill_tied_keys(self, state_dict, prefix)

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's `_init_weights`: each mixer's own init (S4D-real A, dt bias by inverse softplus), Linear
        biases zeroed except the dt bias, embedding normal(0, initializer_range), and with
        `rescale_prenorm_residual` out_proj re-drawn Kaiming-uniform then divided by sqrt(n_residuals * n_layer)
        (GPT-2's scaled init for residual outputs). Norm weights: ones."""
        cfg = self.config
        if cfg.tie_embeddings:  # `to_empty()` after meta construction unties shared parameters: tie again
            self.lm_head.weight = self.backbone.embedding.weight
        for layer in self.backbone.layers:
            layer.norm.reset_parameters()
            mixer = layer.mixer
            mixer.reset_parameters()
            for lin in (mixer.in_proj, mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            if cfg.rescale_prenorm_residual:
                nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
                mixer.out_proj.weight /= math.sqrt(cfg.n_residuals_per_layer * cfg.n_layer)
        self.backbone.norm_f.reset_parameters()
        nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range)
        if not cfg.tie_embeddings:
            self.lm_head.reset_parameters()

    reset_parameters = init_weights  # nn.Module's name for the model's scheme

    def num_params(self) -> int:
        """Parameter count, a tied tensor once."""
        return sum(p.numel() for p in self.parameters())

    def cache_modules(self) -> list[nn.Module]:
        """The mixers: each holds a conv + SSM state (O(1) in the sequence length)."""
        return [layer.mixer for layer in self.backbone.layers]

    setup_cache, reset_cache, delete_cache = contract.setup_cache, contract.reset_cache, contract.delete_cache

    lm_parts = ("backbone.embedding", "backbone.norm_f", "lm_head")  # (embedding, final norm, head)

    def attention_layers(self) -> list[AttentionLayer]:
        """None: the scan FLOPs are counted from `A_log`."""
        return []

    def check_tensor_parallel(self, *, sequence_parallel: bool, loss_parallel: bool) -> None:
        """No `sequence_parallel_plan`: the mixers stay replicated."""
        cfg = self.config
        if loss_parallel and cfg.padded_vocab_size != cfg.vocab_size:
            # forward cuts the padding rows off its logits: a slice across the vocabulary shards.
            raise ValueError(
                f"loss_parallel=True needs MambaLM's padded_vocab_size={cfg.padded_vocab_size} to equal "
                f"vocab_size={cfg.vocab_size} (set pad_vocab_size_multiple so that no padding is added)"
            )

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> (B, T, vocab_size) float32 logits (the head's padding rows cut off).

        input_pos: None (no cache read or written), or (T,) consecutive positions with a cache: a chunk starting
        at 0 starts a new sequence (prefill, the chunked scan, states stored), a later chunk continues it (T = 1:
        the O(1) recurrent step).
        """
        check_tokens(tokens, self.config.vocab_size)
        if input_pos is not None:
            check_input_pos(tokens, input_pos, self.cache_max_seq_len, self.cache_batch_size)
        if self.cache_max_seq_len is None:
            input_pos = None  # no cache: positions carry nothing for a recurrence
        hidden = self.backbone(tokens, input_pos)
        logits = self.lm_head(hidden)  # (B, T, V_padded)
        return logits[..., : self.config.vocab_size].float()


def build(preset: str, **overrides: Any) -> MambaLM:
    """`MambaLM(MambaConfig(**PRESETS[preset], **overrides))` (see `contract.build_preset`)."""
    return build_preset(MambaLM, MambaConfig, PRESETS, preset, overrides)


def config_from_preset(preset: str, **overrides: Any) -> MambaConfig:
    """The `MambaConfig` of a preset, with overrides."""
    return preset_config(MambaConfig, PRESETS, preset, overrides)


# Published shapes (state-spaces/mamba-*'s config.json); "debug" is tiny and odd-sized for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(d_model=37, n_layer=3, d_state=5, vocab_size=101),
    "mamba-130m": dict(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=8),
    "mamba-370m": dict(d_model=1024, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=8),
    "mamba-790m": dict(d_model=1536, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=8),
    "mamba-1.4b": dict(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=8),
    "mamba-2.8b": dict(d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=8),
}
