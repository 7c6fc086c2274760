"""Recipes: a run config (YAML) -> model, data, loss and evaluation (a `Run` for `vermeil.train.Trainer`)."""

from vermeil.recipes.build import build_model, build_run, load_trained
from vermeil.recipes.config import (
    FAMILIES,
    TASKS,
    Family,
    RunConfig,
    load_run_config,
    model_vocab_size,
    read_run_dir_config,
    run_config_from_dict,
)
from vermeil.recipes.convert import foreign_run_config, load_foreign
from vermeil.recipes.describe import describe_model
from vermeil.recipes.flow import FlowData, flow_loss, flow_sampler, sample_run
from vermeil.recipes.synthetic import MQARData, SelectiveCopyingData
from vermeil.recipes.tasks import Run, TaskData, TaskSampler
from vermeil.recipes.text import TextData

__all__ = [
    "FAMILIES",
    "TASKS",
    "Family",
    "FlowData",
    "MQARData",
    "Run",
    "RunConfig",
    "SelectiveCopyingData",
    "TaskData",
    "TaskSampler",
    "TextData",
    "build_model",
    "build_run",
    "describe_model",
    "flow_loss",
    "flow_sampler",
    "foreign_run_config",
    "load_foreign",
    "load_run_config",
    "load_trained",
    "model_vocab_size",
    "read_run_dir_config",
    "run_config_from_dict",
    "sample_run",
]
