"""The run config: a YAML file with `model`, `data`, `train` (and optional `distributed`, `name`) sections,
each mapped one to one onto a dataclass by the strict converter of `vermeil.config` (unknown keys, wrong types
and bad values are named):

    model: {family: hybrid, preset: debug, max_seq_len: 128} # the family's config dataclass (+ an optional preset)
    data:  {task: text, max_bytes: 4000000}                  # TextData | MQARData | SelectiveCopyingData | FlowData
    train: {steps: 2000, lr: 2.0e-3, batch_size: 16}         # vermeil.train.TrainConfig
    distributed: {strategy: fsdp2}                           # optional: vermeil.distributed.DistributedConfig

A token model's `vocab_size` defaults to the data's (one too small is an error). Model modules are imported only
for the family a config names (`FAMILIES`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from vermeil.config import ConfigError, apply_overrides, did_you_mean, from_dict, load_yaml, to_dict
from vermeil.distributed.config import DistributedConfig
from vermeil.recipes.flow import FlowData
from vermeil.recipes.synthetic import MQARData, SelectiveCopyingData
from vermeil.recipes.tasks import TaskData
from vermeil.recipes.text import TextData
from vermeil.train.config import TrainConfig
from vermeil.train.losses import LOSS_HEADS

__all__ = [
    "FAMILIES",
    "TASKS",
    "Family",
    "RunConfig",
    "load_run_config",
    "model_vocab_size",
    "read_run_dir_config",
    "run_config_from_dict",
]


@dataclass(frozen=True)
class Family:
    """A model family: where its classes live, the config attribute its models carry, what it trains on."""

    module: str
    config_cls: str
    model_cls: str
    vocab_key: str | None  # the config field holding the vocabulary size (None: not a token model)
    tasks: tuple[str, ...]  # the data tasks it trains on; the first is the default
    export_to: str | None  # the library `vermeil convert --to` writes it for (None: no foreign layout)

    def load(self) -> tuple[type, type, Mapping[str, Any]]:
        mod = import_module(self.module)
        return getattr(mod, self.config_cls), getattr(mod, self.model_cls), getattr(mod, "PRESETS", {})


_LM = ("vocab_size", ("text", "mqar", "selective_copying"), "transformers")  # vocab_key, tasks, export_to
FAMILIES: dict[str, Family] = {
    "llm": Family("vermeil.models.llm", "ModelArgs", "LLM", *_LM),
    "mamba": Family("vermeil.models.mamba", "MambaConfig", "MambaLM", *_LM),
    "hybrid": Family("vermeil.models.hybrid", "HybridConfig", "HybridModel", *_LM),
    "flux": Family("vermeil.models.flux", "FluxParams", "Flux", None, ("flow",), "diffusers"),
}

TASKS: dict[str, type[TaskData]] = {
    "text": TextData,
    "mqar": MQARData,
    "selective_copying": SelectiveCopyingData,
    "flow": FlowData,
}


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
    """A resolved run (`distributed` is ignored in a single process)."""

    family: str
    model: Any
    data: Any
    train: TrainConfig
    name: str | None = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        """The plain form saved as `config.yaml`: loading it again gives the same run (presets resolved)."""
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        # Init fields in order; None-valued keys are kept so that the saved config is complete.
        out["model"] = {"family": self.family, **to_dict(self.model)}
        out["data"] = to_dict(self.data)
        out["train"] = to_dict(self.train)
        if self.distributed != DistributedConfig():  # the default section is left out (older files unchanged)
            out["distributed"] = to_dict(self.distributed)
        return out


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """A `RunConfig` from a plain dict (loaded YAML, overrides applied), strictly: ConfigError names the dotted
    key of an unknown key or family, a wrong type or value, data that does not fit the model."""
    if isinstance(data, Mapping) and "model" not in data:
        raise ConfigError("the run config has no model section (model: {family: ...}); is the file empty?")
    sections = from_dict(_Sections, data)
    model_raw, train_raw = dict(sections.model), dict(sections.train)
    family_name = model_raw.pop("family", None)
    if family_name is None:
        raise ConfigError(f"model.family is required: one of {sorted(FAMILIES)}")
    if not isinstance(family_name, str) or family_name not in FAMILIES:  # a YAML list is not hashable
        raise ConfigError(
            f"model.family={family_name!r} must be one of {sorted(FAMILIES)}"
            + did_you_mean(family_name, FAMILIES, cutoff=0.5)
        )
    family = FAMILIES[family_name]
    config_cls, _, presets = family.load()
    # Run folders written before the weight-decay rule moved to training name it in the model section.
    if "decay_embeddings" in model_raw:
        value = model_raw.pop("decay_embeddings")
        train_raw.setdefault("no_decay_embeddings", not value if isinstance(value, bool) else value)

    data_raw = dict(sections.data)
    task = data_raw.get("task", family.tasks[0])
    if not isinstance(task, str) or task not in TASKS:
        raise ConfigError(
            f"data.task={task!r} must be one of {sorted(TASKS)}" + did_you_mean(task, TASKS, cutoff=0.5)
        )
    if task not in family.tasks:
        need = " or ".join(", ".join(family.tasks).rsplit(", ", 1))
        raise ConfigError(f"data.task={task!r} does not fit model.family={family_name!r} (it needs {need})")
    data_raw["task"] = task
    data_cfg = from_dict(TASKS[task], data_raw, path="data")
    train_cfg = from_dict(TrainConfig, train_raw, path="train")
    merged = data_cfg.complete_model(family, model_raw, presets)
    model_cfg = from_dict(config_cls, merged, path="model")
    if hasattr(model_cfg, "loss_head") and model_cfg.loss_head not in LOSS_HEADS:
        raise ConfigError(
            f"model.loss_head={model_cfg.loss_head!r} must be one of {sorted(LOSS_HEADS)} "
            "(vermeil.train.register_loss_head)"
        )
    dist_cfg = from_dict(DistributedConfig, sections.distributed, path="distributed")
    run = RunConfig(family_name, model_cfg, data_cfg, train_cfg, sections.name, dist_cfg)
    data_cfg.check_fit(run)
    return run


def model_vocab_size(run: RunConfig) -> int:
    """The vocabulary size of a token model's config (0 for flux)."""
    key = FAMILIES[run.family].vocab_key
    return int(getattr(run.model, key)) if key is not None else 0


def load_run_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML file and apply `key.sub=value` overrides (`vermeil.config.apply_overrides`)."""
    p = Path(path)
    if p.is_dir():
        resume = (p / "config.yaml").is_file()
        hint = f"; to continue a run: vermeil train --resume {os.fspath(p)}" if resume else ""
        raise FileNotFoundError(f"{os.fspath(p)} is a folder, not a config file{hint}")
    if not p.is_file():
        raise FileNotFoundError(f"config file {os.fspath(p)} does not exist")
    return run_config_from_dict(apply_overrides(load_yaml(p), overrides))


def read_run_dir_config(run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """The resolved config of a run folder (`vermeil.runs.read_run_config`), with overrides applied."""
    from vermeil.runs import read_run_config

    return run_config_from_dict(apply_overrides(read_run_config(run_dir), overrides))
