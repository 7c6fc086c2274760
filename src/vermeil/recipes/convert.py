"""Runs to and from transformers / diffusers `save_pretrained` folders, converted by `vermeil.interop`.

Loads offline (`local_files_only=True`) and safetensors only (no pickle); transformers and diffusers are imported
only when a conversion asks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vermeil.recipes.config import FAMILIES, TASKS, RunConfig, run_config_from_dict
from vermeil.train.config import TrainConfig

__all__ = [
    "FROM_DIFFUSERS",
    "FROM_TRANSFORMERS",
    "foreign_run_config",
    "import_optional",
    "load_foreign",
    "quiet",
]

# transformers class (config.json "architectures") -> run family; diffusers class (config.json "_class_name")
FROM_TRANSFORMERS = {
    "LlamaForCausalLM": "llm",
    "Llama4ForCausalLM": "llm",
    "MambaForCausalLM": "mamba",
    "Mamba2ForCausalLM": "hybrid",
    "JambaForCausalLM": "hybrid",
    "BambaForCausalLM": "hybrid",
    "FalconH1ForCausalLM": "hybrid",
}
FROM_DIFFUSERS = {"FluxTransformer2DModel": "flux"}


def _folder_class(src: Path, key: str, library: str) -> str:
    """The class a save_pretrained folder names in its config.json (`architectures[0]` or `_class_name`)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{library} folder {os.fspath(src)} does not exist")
    config = src / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a {library} save_pretrained folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{os.fspath(config)} is not valid JSON: {e}") from None
    value = data.get(key) if isinstance(data, dict) else None
    name = value[0] if isinstance(value, list) and value else value
    return name if isinstance(name, str) else "<none>"


def import_optional(name: str) -> Any:
    """Import an optional library, or raise ImportError saying how to install it."""
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"this conversion needs {name}: pip install {name}") from None


@contextlib.contextmanager
def quiet(library: Any) -> Iterator[None]:
    """Silence a library's progress bars and warnings while loading (restored after): an error stays one line."""
    log = getattr(getattr(library, "utils", None), "logging", None)
    if log is None or not hasattr(log, "disable_progress_bar"):
        yield
        return
    bars, verbosity = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def load_foreign(
    kind: Literal["transformers", "diffusers"], src: str | os.PathLike[str]
) -> tuple[str, Any, nn.Module]:
    """(run family, foreign model, its Vermeil conversion), both in eval mode, of a save_pretrained folder.

    Raises FileNotFoundError (no folder or config.json), ValueError (a class no family converts), ImportError.
    """
    src = Path(src)
    key, families = (
        ("architectures", FROM_TRANSFORMERS) if kind == "transformers" else ("_class_name", FROM_DIFFUSERS)
    )
    cls_name = _folder_class(src, key, kind)
    if cls_name not in families:
        raise ValueError(f"{os.fspath(src)} holds a {cls_name}; supported {kind} classes: {sorted(families)}")
    library = import_optional(kind)
    cls = getattr(library, cls_name, None)
    if cls is None:
        raise ImportError(f"this {kind} ({library.__version__}) has no {cls_name}")
    if not any(src.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{os.fspath(src)} has no .safetensors weights: only safetensors are read, never pickled .bin "
            "files (save_pretrained(..., safe_serialization=True) writes them)"
        )
    with quiet(library):
        # Safetensors only (no pickle is unpickled); a concrete class runs no code from the folder.
        kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
        rescale = False
        if kind == "transformers":
            config = kwargs["config"] = cls.config_class.from_pretrained(src, local_files_only=True)
            # transformers' Mamba and Mamba-2 `_init_weights` divide out_proj by sqrt(n_layers) when this
            # init-only flag is set, after the checkpoint is loaded: off while loading, restored after.
            rescale = getattr(config, "rescale_prenorm_residual", False) is True
            if rescale:
                config.rescale_prenorm_residual = False
        foreign = cls.from_pretrained(src, **kwargs).eval()
        if rescale:
            foreign.config.rescale_prenorm_residual = True
    from vermeil import interop

    convert = interop.from_transformers if kind == "transformers" else interop.from_diffusers
    return families[cls_name], foreign, convert(foreign).eval()


def foreign_run_config(family: str, model: nn.Module, name: str | None = None) -> RunConfig:
    """The `RunConfig` of a converted model (its family's first task), checked by a `run_config_from_dict` round
    trip. Flux keeps its channels, so `vermeil sample` only works for a model of the flow job's shape."""
    config = model.config  # the contract's one config attribute
    data = TASKS[FAMILIES[family].tasks[0]].for_model(config)
    run = RunConfig(family, config, data, TrainConfig(), name)
    return run_config_from_dict(run.to_dict())


def export_model(
    family: str,
    model: nn.Module,
    out: str | os.PathLike[str],
    target: Literal["transformers", "diffusers"] | None = None,
) -> Any:
    """Write a model as a `save_pretrained` folder of `target` (default: the family's library); returns the
    foreign model. ValueError for a family without a layout in `target`."""
    target = target or FAMILIES[family].export_to or "transformers"  # no layout: refused just below
    families = [name for name, fam in FAMILIES.items() if fam.export_to == target]
    if family not in families:
        need = " or ".join(", ".join(families).rsplit(", ", 1))
        raise ValueError(
            f"a {family!r} model cannot be exported to {target}; --to {target} needs a run of family {need}"
        )
    library = import_optional(target)
    with quiet(library):
        if target == "transformers":
            from vermeil.interop import to_transformers as convert
        else:
            from vermeil.interop.diffusers_flux import to_diffusers as convert
        foreign = convert(model)
        # Written false: transformers' Mamba `_init_weights` rescales out_proj after loading a folder that sets
        # this init-only flag, so the folder would load with other weights (see `load_foreign`).
        config = foreign.config
        rescale = getattr(config, "rescale_prenorm_residual", None)
        if rescale:
            config.rescale_prenorm_residual = False
        try:
            foreign.save_pretrained(out, safe_serialization=True)
        finally:
            if rescale:
                config.rescale_prenorm_residual = rescale
    return foreign
