"""Recipes: a run config (YAML) -> model, data, loss and evaluation, for every model family.

A run config has three sections, each mapped one to one onto a dataclass by the strict converter of
`vermeil.config` (unknown keys, wrong types and bad values are named):

    model: {family: hybrid, preset: vio-small, dim: 192}    # the family's config dataclass (+ an optional preset)
    data:  {task: text, max_bytes: 4000000}                  # TextData | MQARData | SelectiveCopyingData | FlowData
    train: {steps: 2000, lr: 2.0e-3, batch_size: 16}         # vermeil.train.TrainConfig
    distributed: {strategy: fsdp2}                           # optional: vermeil.train.DistributedConfig

Families: `llm` (`ModelArgs` -> `LLM`), `mamba` (`MambaConfig` -> `MambaLM`), `hybrid` (`HybridConfig` ->
`HybridModel`), `flux` (`FluxParams` -> `Flux`, trained by `vermeil.diffusion.flow_job`). Language models train on
text (bytes of local files, by default the Python standard library) or on the synthetic long-range tasks (MQAR,
selective copying) with their accuracy. When the model section does not name `vocab_size`, it is set to the data's
vocabulary; when it names one too small for the data, that is an error.

`build_run(config)` returns a `Run` (model, train batches, loss fn, eval fn, tokenizer); `Trainer` does the rest.
Model modules are imported only for the family a config names.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.config import ConfigError, apply_overrides, from_dict, load_yaml, merge_preset, to_dict
from vermeil.train.trainer import (
    DistributedConfig,
    Hook,
    TrainConfig,
    Trainer,
    TrainResult,
    causal_lm_loss,
)

__all__ = [
    "FAMILIES",
    "TASKS",
    "FlowData",
    "FlowSampler",
    "MQARData",
    "Run",
    "RunConfig",
    "SelectiveCopyingData",
    "TaskSampler",
    "TextData",
    "build_model",
    "build_run",
    "describe_model",
    "flow_loss",
    "load_run_config",
    "model_vocab_size",
    "run_config_from_dict",
    "sample_run",
]

# Axis legend: B batch, T sequence length, V vocabulary, L points per sequence.


# ----------------------------------------------------------------------------------------------------------
# Families: name -> (module, config class, model class, presets). Imported on use only.


@dataclass(frozen=True)
class Family:
    module: str
    config_cls: str
    model_cls: str
    vocab_key: str | None  # the config field holding the vocabulary size (None: not a token model)
    default_task: str

    def load(self) -> tuple[type, type, Mapping[str, Any]]:
        mod = import_module(self.module)
        return getattr(mod, self.config_cls), getattr(mod, self.model_cls), getattr(mod, "PRESETS", {})


FAMILIES: dict[str, Family] = {
    "llm": Family("vermeil.models.llm", "ModelArgs", "LLM", "vocab_size", "text"),
    "mamba": Family("vermeil.models.mamba", "MambaConfig", "MambaLM", "vocab_size", "text"),
    "hybrid": Family("vermeil.models.hybrid", "HybridConfig", "HybridModel", "vocab_size", "text"),
    "flux": Family("vermeil.models.flux", "FluxParams", "Flux", None, "flow"),
}


# ----------------------------------------------------------------------------------------------------------
# Data configs


@dataclass
class TextData:
    """Bytes of local text files as a language-modelling corpus (byte tokens 0-255, `vermeil.data.ByteTokenizer`).

    Args:
        paths: files and folders; null means the Python standard library's source (found on any install).
        suffixes: file endings searched for in folders.
        val_fraction: share of files held out for validation (a fixed hash of each file's name).
        max_bytes: cap on the bytes read (quick runs and tests); null reads everything (about 12 MB of stdlib).
    """

    task: Literal["text"] = "text"
    paths: list[str] | None = None
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    val_fraction: float = 0.1
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise ValueError(f"max_bytes={self.max_bytes!r} must be >= 1024 (or null for the whole corpus)")

    @property
    def vocab_size(self) -> int:
        return 256  # the byte values; the ByteTokenizer's BOS/EOS/PAD (256-258) never occur in the corpus


@dataclass
class MQARData:
    """Multi-query associative recall (Zoology): `vermeil.data.mqar`, sequence length `train.seq_len`.

    Args:
        vocab_size: V, must be > train.seq_len (Zoology's rule).
        num_kv_pairs: key-value pairs per sequence (4 * num_kv_pairs <= seq_len).
        power_a: the power law of the query gaps.
        random_non_queries: fill free positions with random tokens (Zoology) instead of 0.
    """

    task: Literal["mqar"] = "mqar"
    vocab_size: int = 512
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_kv_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not self.power_a > 0:
            raise ValueError(f"power_a={self.power_a!r} must be > 0")


@dataclass
class SelectiveCopyingData:
    """Selective copying (Mamba §3.1): `vermeil.data.selective_copying`, sequence length `train.seq_len`."""

    task: Literal["selective_copying"] = "selective_copying"
    vocab_size: int = 16
    num_tokens_to_copy: int = 16

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be >= 3")
        if self.num_tokens_to_copy < 1:
            raise ValueError(f"num_tokens_to_copy={self.num_tokens_to_copy!r} must be >= 1")


@dataclass
class FlowData:
    """The cross-domain flow job of seed 004 (`vermeil.diffusion.flow_job`): a condition sequence in one space,
    a target sequence in another, learned by a small Flux with rectified flow.

    Args:
        job: "curves" (a noisy 2-D circle -> the matching points of a 3-D trefoil; paired, so the distance is the
            mean per-point error) or "points" (two 2-D shapes from `vermeil.data.DISTRIBUTIONS`, each sorted by
            angle; the distance is sliced Wasserstein-1).
        length: L points per sequence (condition and target alike).
        source, target: the shapes of the "points" job.
        noise: the condition noise of the "curves" job.
        time_sampling: flow times during training: "logit_normal" (SD3) or "uniform".
        sample_steps: Euler steps when evaluating and in `vermeil sample`.
        eval_samples: sequences generated per evaluation.
    """

    task: Literal["flow"] = "flow"
    job: Literal["curves", "points"] = "curves"
    length: int = 16
    source: str = "moons"
    target: str = "rings"
    noise: float = 0.02
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    sample_steps: int = 32
    eval_samples: int = 256

    def __post_init__(self) -> None:
        from vermeil.data import DISTRIBUTIONS

        for name in ("source", "target"):
            value = getattr(self, name)
            if value not in DISTRIBUTIONS:
                raise ValueError(f"{name}={value!r} must be one of {sorted(DISTRIBUTIONS)}")
        for name in ("length", "sample_steps", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.noise < 0:
            raise ValueError(f"noise={self.noise!r} must be >= 0")

    @property
    def channels(self) -> tuple[int, int]:
        """(condition channels, target channels)."""
        return (2, 3) if self.job == "curves" else (2, 2)

    def job_kwargs(self) -> dict[str, Any]:
        """Extra arguments of `flow_job.make_batch` for this job."""
        return (
            {"noise": self.noise} if self.job == "curves" else {"source": self.source, "target": self.target}
        )


TASKS: dict[str, type] = {
    "text": TextData,
    "mqar": MQARData,
    "selective_copying": SelectiveCopyingData,
    "flow": FlowData,
}


# ----------------------------------------------------------------------------------------------------------
# The run config


@dataclass
class _Sections:
    """The top level of a run config file (checked strictly, then each section is built on its own)."""

    model: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    distributed: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A resolved run: `family` + its model config, the data config, the `TrainConfig`, an optional name, and
    how to split the run over the processes of `torchrun` (`DistributedConfig`; ignored in one process)."""

    family: str
    model: Any
    data: Any
    train: TrainConfig
    name: str | None = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        """The plain form saved as `config.yaml`: loading it again gives the same run (presets resolved)."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out["model"] = {"family": self.family, **_model_dict(self.model)}
        out["data"] = to_dict(self.data)
        out["train"] = to_dict(self.train)
        if self.distributed != DistributedConfig():  # the default section is left out (older files unchanged)
            out["distributed"] = to_dict(self.distributed)
        return out


def _model_dict(model_config: Any) -> dict[str, Any]:
    # Keep only init fields, in order; None-valued keys are kept so that the saved config is complete.
    return to_dict(model_config)


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a `RunConfig` from a plain dict (a loaded YAML file with overrides applied), strictly.

    Raises:
        ConfigError: unknown keys or families, wrong types or values, data that does not fit the model; the
            message names the dotted key.
    """
    sections = from_dict(_Sections, data)
    model_raw = dict(sections.model)
    family_name = model_raw.pop("family", None)
    if family_name is None:
        raise ConfigError(f"model.family is required: one of {sorted(FAMILIES)}")
    if family_name not in FAMILIES:
        raise ConfigError(
            f"model.family={family_name!r} must be one of {sorted(FAMILIES)}"
            + (_did_you_mean(family_name, FAMILIES) if isinstance(family_name, str) else "")
        )
    family = FAMILIES[family_name]
    config_cls, _, presets = family.load()

    data_raw = dict(sections.data)
    task = data_raw.get("task", family.default_task)
    if task not in TASKS:
        raise ConfigError(
            f"data.task={task!r} must be one of {sorted(TASKS)}"
            + (_did_you_mean(task, TASKS) if isinstance(task, str) else "")
        )
    if (task == "flow") != (family_name == "flux"):
        need = "flow" if family_name == "flux" else "text, mqar or selective_copying"
        raise ConfigError(f"data.task={task!r} does not fit model.family={family_name!r} (it needs {need})")
    data_raw["task"] = task
    data_cfg = from_dict(TASKS[task], data_raw, path="data")
    train_cfg = from_dict(TrainConfig, sections.train, path="train")

    user_named_vocab = family.vocab_key is not None and family.vocab_key in model_raw
    if family_name == "flux" and "preset" not in model_raw:
        merged = _flux_base(model_raw, data_cfg)
    else:
        merged = merge_preset(model_raw, presets, path="model")
    if family.vocab_key is not None and not user_named_vocab:
        merged[family.vocab_key] = data_cfg.vocab_size  # the data decides, unless the config says otherwise
    if family_name == "flux":
        merged = _flux_io(merged, model_raw, data_cfg)
    model_cfg = from_dict(config_cls, merged, path="model")
    dist_cfg = from_dict(DistributedConfig, sections.distributed, path="distributed")
    run = RunConfig(family_name, model_cfg, data_cfg, train_cfg, sections.name, dist_cfg)
    _check_fit(run)
    return run


def _flux_base(user: Mapping[str, Any], data: FlowData) -> dict[str, Any]:
    """Without a preset, a flux model starts from `flow_job_params` (its axes_dim fits the head size given)."""
    from vermeil.diffusion.flow_job import flow_job_params

    shape = {k: user[k] for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks") if k in user}
    try:
        base = to_dict(flow_job_params(data.job, **shape))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return {**base, **user}


def _flux_io(merged: dict[str, Any], user: Mapping[str, Any], data: FlowData) -> dict[str, Any]:
    # The job fixes the channels: condition points in (and their mean as y), target points in and out.
    cond_ch, data_ch = data.channels
    out = dict(merged)
    for key, value in (
        ("in_channels", data_ch),
        ("out_channels", data_ch),
        ("context_in_dim", cond_ch),
        ("vec_in_dim", cond_ch),
    ):
        if key not in user:
            out[key] = value
    return out


def _check_fit(run: RunConfig) -> None:
    """Cross-section rules: the model's vocabulary holds the data's, task shapes fit `train.seq_len`."""
    data, train = run.data, run.train
    if isinstance(data, (MQARData, SelectiveCopyingData, TextData)):
        vocab = model_vocab_size(run)
        if vocab < data.vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab} must be >= the data vocabulary {data.vocab_size} (data.task={data.task})"
            )
    if isinstance(data, MQARData):
        if train.seq_len % 2:
            raise ConfigError(f"train.seq_len={train.seq_len} must be even for data.task=mqar")
        if data.vocab_size <= train.seq_len:
            raise ConfigError(
                f"data.vocab_size={data.vocab_size} must be > train.seq_len={train.seq_len} (Zoology's MQAR rule)"
            )
        if 4 * data.num_kv_pairs > train.seq_len:
            raise ConfigError(
                f"data.num_kv_pairs={data.num_kv_pairs} is too many for train.seq_len={train.seq_len} "
                "(4 * num_kv_pairs must be <= seq_len)"
            )
    if isinstance(data, SelectiveCopyingData) and train.seq_len <= 2 * data.num_tokens_to_copy + 1:
        raise ConfigError(
            f"train.seq_len={train.seq_len} must be > 2 * data.num_tokens_to_copy + 1 = "
            f"{2 * data.num_tokens_to_copy + 1}"
        )


def model_vocab_size(run: RunConfig) -> int:
    """The vocabulary size of a token model's config (0 for flux)."""
    key = FAMILIES[run.family].vocab_key
    return int(getattr(run.model, key)) if key is not None else 0


def load_run_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML file and apply `key.sub=value` overrides (see `vermeil.config.apply_overrides`).

    Raises:
        FileNotFoundError: no such file. ConfigError: malformed YAML, a bad override, a bad key or value.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {os.fspath(p)} does not exist")
    return run_config_from_dict(apply_overrides(load_yaml(p), overrides))


# ----------------------------------------------------------------------------------------------------------
# Models


def build_model(run: RunConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """The model a run config names, initialised with `torch.manual_seed(run.train.seed)`."""
    _, model_cls, _ = FAMILIES[run.family].load()
    torch.manual_seed(run.train.seed)
    kwargs = {"device": device} if device is not None else {}
    model = model_cls(run.model, **kwargs)
    if run.family == "flux":
        # flow_job's init: a zero velocity at first (adaLN-Zero style output), steadier early training.
        from vermeil.diffusion.flow_job import zero_init_output

        zero_init_output(model)
    return model


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _linear_like_params(model: nn.Module) -> tuple[int, int]:
    """(matmul parameters used per token, embedding parameters), for FLOPs; MoE experts count top_k / E."""
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    share: dict[int, float] = {}
    for module in model.modules():
        experts, top_k, n = getattr(module, "experts", None), getattr(module, "top_k", None), None
        if isinstance(experts, nn.Module) and isinstance(top_k, int):
            n = getattr(experts, "num_experts", None) or getattr(module, "num_experts", None)
        if n:
            share.update({id(p): top_k / n for p in experts.parameters()})
    per_token = 0.0
    for p in model.parameters():  # a tied tensor once
        if p.ndim >= 2 and id(p) not in embeddings:
            per_token += p.numel() * share.get(id(p), 1.0)
    # A head tied to the embedding is still a matmul per token.
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in embeddings:
            per_token += m.weight.numel()
    return int(per_token), sum(embeddings.values())


def _attention_layers(run: RunConfig) -> list[tuple[int, int | None]]:
    """(query width H * Dh, attended window or None for global) per attention layer."""
    m = run.model
    if run.family == "llm":
        out = []
        for i in range(m.n_layers):
            window = None if m.is_nope_layer(i) else m.attention_chunk_size
            out.append((m.n_heads * m.head_dim, window))
        return out
    if run.family == "hybrid":
        return [(m.heads * m.attention_head_dim, None) for k in m.layer_kinds if k != "M"]
    if run.family == "flux":
        return [(m.hidden_size, None)] * (m.depth + m.depth_single_blocks)
    return []


def describe_model(run: RunConfig, context: int | None = None, *, batch_size: int = 1) -> dict[str, Any]:
    """Parameters, forward FLOPs per token at a context length, and the inference cache's memory.

    The model is built on the meta device (no memory, any size). FLOPs follow Kaplan et al. (2020):
    `2 * N_matmul + 2 * n_attention_layers * context_eff * d_attention` per token for the forward pass (training
    is about 3x that), with MoE experts counted at `top_k / num_experts`, the attended context capped by
    chunked attention windows, plus about `9 * d_inner * d_state` per Mamba layer for the selective scan. The cache memory is what `model.setup_cache(batch_size, context)` allocates.
    """
    context = context if context is not None else run.train.seq_len
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    model = build_model(run, device="meta")
    params = _count_params(model)
    matmul, embedding = _linear_like_params(model)
    attn = 0
    for width, window in _attention_layers(run):
        ctx = min(context, window) if window else context
        attn += 2 * ctx * width
    # Selective scan: about 9 FLOPs per state element and token (exp(dt A), dt B x, the update, C h).
    scan = sum(9 * p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "A_log")
    flops = 2 * matmul + 2 * attn + scan
    info: dict[str, Any] = {
        "family": run.family,
        "model": type(model).__name__,
        "parameters": params,
        "embedding_parameters": embedding,
        "context": context,
        "forward_flops_per_token": flops,
        "train_flops_per_token": 3 * flops,
    }
    measured = _cache_bytes(model, batch_size, context)
    info["cache_bytes"] = (
        measured if measured is not None else _analytic_cache_bytes(run, batch_size, context)
    )
    return info


def _cache_bytes(model: nn.Module, batch_size: int, context: int) -> int | None:
    """Bytes of the buffers `setup_cache` adds (measured on the meta device: shapes only, no memory)."""
    if not callable(getattr(model, "setup_cache", None)):
        return None

    def cache_buffers() -> dict[int, Tensor]:
        # Rotary tables also grow in setup_cache; they are not cache.
        return {
            id(b): b
            for m in model.modules()
            if "rotary" not in type(m).__name__.lower()
            for b in m.buffers(recurse=False)
        }

    before = set(cache_buffers())
    try:
        model.setup_cache(batch_size, context, device="meta")
    except Exception:  # a cache that cannot be built on meta: report nothing rather than a wrong number
        return None
    return sum(b.numel() * b.element_size() for i, b in cache_buffers().items() if i not in before)


def _analytic_cache_bytes(run: RunConfig, batch_size: int, context: int) -> int | None:
    """float32 cache bytes by formula, for models whose `setup_cache` reads data (so cannot run on meta):
    2 * B * Hkv * S * Dh per attention layer (S capped by a chunked layer's window), B * E * (K + N) per Mamba
    layer (conv and SSM states)."""
    m, b, f32 = run.model, batch_size, 4
    if run.family == "llm":  # chunked layers keep a ring of min(chunk, context) slots
        total = 0
        for i in range(m.n_layers):
            window = None if m.is_nope_layer(i) else m.attention_chunk_size
            s = min(context, window) if window else context
            total += 2 * b * m.n_kv_heads * s * m.head_dim * f32
            if window:
                total += 8 * s  # the ring cache's int64 slot positions
        return total
    if run.family == "hybrid":
        kv = m.kv_heads or m.heads
        e = m.expand * m.dim
        total = 0
        for kind in m.layer_kinds:
            if kind in ("A", "P"):
                total += 2 * b * kv * context * m.attention_head_dim
            if kind in ("M", "P"):
                total += b * e * (m.d_conv + m.d_state)
        return total * f32
    return None


# ----------------------------------------------------------------------------------------------------------
# Data and losses


class TaskSampler:
    """An endless, seeded stream of synthetic-task batches (inputs, targets), resumable through `state_dict`."""

    def __init__(self, make: Callable[..., tuple[Tensor, Tensor]], batch_size: int, seed: int, **kwargs: Any):
        self.make = make
        self.batch_size = batch_size
        self.kwargs = kwargs
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> TaskSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.make(self.batch_size, generator=self.generator, **self.kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's own loss head when it has one (`HybridModel.loss(tokens, targets)`), else `causal_lm_loss`."""
    hook = getattr(type(model), "loss", None)
    if callable(hook):
        inputs, targets = batch
        loss = model.loss(inputs, targets)
        return loss, {}
    return causal_lm_loss(model, batch)


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def _eval_token_batches(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy over scored positions, accuracy over scored positions)."""
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    count = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = _logits(model(inputs)).float()
        flat, tgt = logits.flatten(0, 1), targets.flatten()
        total_loss += F.cross_entropy(flat, tgt, ignore_index=-100, reduction="sum").double().cpu()
        scored = tgt != -100
        correct += ((flat.argmax(-1) == tgt) & scored).sum().double().cpu()
        count += int(scored.sum())
    if count == 0:
        return math.nan, math.nan
    return float(total_loss) / count, float(correct) / count


@dataclass
class Run:
    """What a recipe builds: the model, an endless batch iterator, the loss and evaluation functions."""

    config: RunConfig
    model: nn.Module
    train_batches: Iterator[Any]
    loss_fn: Callable[[nn.Module, Any], Any]
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    tokenizer: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)


def build_run(run: RunConfig, *, model: nn.Module | None = None) -> Run:
    """Model, data, loss and evaluation of a run config (the model seeded by `train.seed`)."""
    if model is None:
        model = build_model(run)
    data, train = run.data, run.train
    device = torch.device(train.device)
    if isinstance(data, TextData):
        return _text_run(run, model, device)
    if isinstance(data, (MQARData, SelectiveCopyingData)):
        return _task_run(run, model, device)
    if isinstance(data, FlowData):
        return _flow_run(run, model)
    raise ConfigError(f"data.task={data.task!r} has no recipe")  # pragma: no cover - TASKS covers all


def _text_run(run: RunConfig, model: nn.Module, device: torch.device) -> Run:
    from vermeil.data import ByteTokenizer, WindowSampler, load_text_corpus, sequential_windows

    data, train = run.data, run.train
    corpus = load_text_corpus(
        data.paths, val_fraction=data.val_fraction, max_bytes=data.max_bytes, suffixes=tuple(data.suffixes)
    )
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if tokens.numel() < train.seq_len + 1:
            raise ConfigError(
                f"the {split} corpus has {tokens.numel()} bytes, fewer than train.seq_len + 1 = {train.seq_len + 1}"
                " (raise data.max_bytes or lower train.seq_len)"
            )
    sampler = WindowSampler(corpus.train, train.batch_size, train.seq_len, seed=train.seed)
    val_batches = list(sequential_windows(corpus.val, train.batch_size, train.seq_len, train.eval_batches))

    def eval_fn(m: nn.Module) -> dict[str, float]:
        loss, _ = _eval_token_batches(m, val_batches, device)
        return {"val_loss": loss, "val_bpb": loss / math.log(2.0)}

    extras = {"corpus_fingerprint": corpus.fingerprint, "train_bytes": corpus.train.numel()}
    return Run(run, model, sampler, lm_loss, eval_fn, ByteTokenizer(), extras)


def _task_run(run: RunConfig, model: nn.Module, device: torch.device) -> Run:
    from vermeil.data import mqar, selective_copying

    data, train = run.data, run.train
    if isinstance(data, MQARData):
        make = mqar
        kwargs = dict(
            vocab_size=data.vocab_size,
            seq_len=train.seq_len,
            num_kv_pairs=data.num_kv_pairs,
            power_a=data.power_a,
            random_non_queries=data.random_non_queries,
        )
    else:
        make = selective_copying
        kwargs = dict(
            vocab_size=data.vocab_size, seq_len=train.seq_len, num_tokens_to_copy=data.num_tokens_to_copy
        )
    sampler = TaskSampler(make, train.batch_size, train.seed, **kwargs)
    # A fixed evaluation set from its own seed: never drawn from the training stream.
    eval_gen = torch.Generator().manual_seed(train.seed + 1_000_003)
    val_batches = [make(train.batch_size, generator=eval_gen, **kwargs) for _ in range(train.eval_batches)]

    def eval_fn(m: nn.Module) -> dict[str, float]:
        loss, acc = _eval_token_batches(m, val_batches, device)
        return {"val_loss": loss, "val_accuracy": acc}

    return Run(run, model, sampler, lm_loss, eval_fn)


class FlowSampler:
    """An endless, seeded stream of (cond (B, L, Cc), data (B, L, C)) batches of the flow job; resumable."""

    def __init__(self, data: FlowData, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> FlowSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        from vermeil.diffusion.flow_job import make_batch

        d = self.data
        return make_batch(d.job, self.batch_size, d.length, self.generator, **d.job_kwargs())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def flow_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, time_sampling: str = "logit_normal"
) -> Tensor:
    """Rectified-flow loss of a Flux on (cond, data); noise and times come from the global RNG (checkpointed)."""
    from vermeil.diffusion import flow_matching_loss
    from vermeil.diffusion.flow_job import flux_model_fn

    cond, data = batch
    return flow_matching_loss(flux_model_fn(model, cond), data, kind=time_sampling)


def sample_run(
    run: RunConfig,
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    num_samples: int | None = None,
) -> float:
    """Generate target sequences for fresh conditions with a trained flux run, plot them into a PNG.

    Returns the distance to the true targets (see `FlowData`). Raises ValueError for guidance on a model
    without a guidance embedding.
    """
    from vermeil.diffusion.flow_job import plot_flow_job, sample_flow_job

    if not isinstance(run.data, FlowData):
        raise ValueError(f"sampling needs a flow run (data.task=flow), got data.task={run.data.task!r}")
    if guidance is not None:
        raise ValueError(
            f"guidance={guidance} needs a guidance-distilled model (model.guidance_embed=true); "
            "the flow job trains without one"
        )
    d = run.data
    sample = sample_flow_job(
        model,
        num_samples or d.eval_samples,
        seed=seed,
        sample_steps=steps or d.sample_steps,
        task=d.job,
        length=d.length,
        data_kwargs=d.job_kwargs(),
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_flow_job(sample, path)
    return sample.distance


class _SamplesAtEnd(Hook):
    """Write `samples.png` into the run folder when a flow run finishes (not when it was interrupted)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.out_dir is None or result.interrupted or not trainer.config.plot:
            return
        import tempfile

        main = getattr(trainer, "is_main", True)
        # Under a distributed strategy every rank samples (the forward may hold collectives); rank 0 writes.
        with tempfile.TemporaryDirectory() as tmp:
            out = trainer.out_dir / "samples.png" if main else Path(tmp) / "samples.png"
            try:
                distance = sample_run(self.run, trainer.model, out)
            except ImportError:
                return  # no matplotlib: the loss curve step already said so
        if not main:
            return
        print(
            f"samples.png: distance {distance:.4f} (vermeil sample {trainer.out_dir} draws more)",
            file=sys.stderr,
        )


def _flow_run(run: RunConfig, model: nn.Module) -> Run:
    from vermeil.diffusion.flow_job import sample_flow_job

    data, train = run.data, run.train
    sampler = FlowSampler(data, train.batch_size, train.seed)
    # A fixed evaluation set (its own seed) for the loss, with fixed noise and times.
    eval_gen = torch.Generator().manual_seed(train.seed + 1_000_003)
    val = [
        next(FlowSampler(data, train.batch_size, train.seed + 1_000_003 + i))
        for i in range(train.eval_batches)
    ]
    val_noise = [torch.randn(v[1].shape, generator=eval_gen) for v in val]
    val_t = [torch.rand(v[1].shape[0], generator=eval_gen) for v in val]

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return flow_loss(m, batch, time_sampling=data.time_sampling)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        from vermeil.diffusion import flow_matching_loss
        from vermeil.diffusion.flow_job import flux_model_fn

        losses = [
            float(flow_matching_loss(flux_model_fn(m, c), x, noise=n, t=t))
            for (c, x), n, t in zip(val, val_noise, val_t)
        ]
        sample = sample_flow_job(
            m,
            data.eval_samples,
            seed=train.seed + 2_000_003,
            sample_steps=data.sample_steps,
            task=data.job,
            length=data.length,
            data_kwargs=data.job_kwargs(),
        )
        return {"val_loss": sum(losses) / len(losses), "val_distance": sample.distance}

    return Run(run, model, sampler, loss_fn, eval_fn, hooks=[_SamplesAtEnd(run)])
