"""Recipes: a run config (YAML) -> model, data, loss and evaluation, for every model family.

    config.py      the run config: families, tasks, `RunConfig`, strict loading from YAML and run folders
    build.py       `build_model`, `build_run` (-> `Run`), `load_trained` (a model back from its run folder)
    tasks.py       what every task shares: the `TaskData` base, `Run`, the seeded `TaskSampler`, token evaluation
    text.py        the text task (`TextData`): bytes of local files, bits per byte
    synthetic.py   MQAR and selective copying (`MQARData`, `SelectiveCopyingData`): accuracy
    flow.py        the flow task (`FlowData`) and the cross-domain flow job of a small Flux
    describe.py    parameters, FLOPs per token and cache memory of a config's model (`vermeil info`)
    convert.py     runs from transformers / diffusers folders (`vermeil convert --from`)

`vermeil.train.Trainer` runs the `Run` that `build_run` returns.
"""

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
