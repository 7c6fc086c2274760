"""Checks of vermeil.distributed found by a bug hunt: strict DCP loads, expert-parallel checkpoints refused,
argument checks shared by `parallelize` and `DistributedConfig`.

Axis legend: D model dim.

Single-process cases run here (DCP works without a process group, with torch's "single process" warning);
the expert-parallel ones spawn 2 gloo ranks (file store, one thread each), as tests/distributed/test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vermeil.distributed.checkpoint import load_checkpoint, save_checkpoint


def _stack(layers: int, dim: int = 8) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(dim, dim) for _ in range(layers)))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_checkpoint_refuses_a_checkpoint_of_a_larger_model(tmp_path: Path) -> None:
    # DCP reads only the keys it is asked for: a 3-layer checkpoint loaded silently into a 2-layer model.
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="single process"):
        save_checkpoint(tmp_path / "ckpt", _stack(3))
    model = _stack(2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError,
        match=r"does not match the model: unexpected keys \(in the checkpoint, not in the model\): "
        r"\['2\.bias', '2\.weight'\]",
    ):
        load_checkpoint(tmp_path / "ckpt", model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # untouched


@pytest.mark.parametrize(
    ("strategy", "options", "match"),
    [
        # options a strategy does not use were silently dropped (plain FSDP2, or DDP in float32)
        ("fsdp2", {"tp_size": 2}, r"tp_size=2 needs strategy 'tp' or 'fsdp2\+tp', got strategy='fsdp2'"),
        ("ddp", {"tp_size": 1}, r"tp_size=1 needs strategy 'tp' or 'fsdp2\+tp', got strategy='ddp'"),
        ("ddp", {"param_dtype": "bf16"}, r"needs strategy 'fsdp2' or 'fsdp2\+tp', got strategy='ddp'"),
        ("tp", {"reduce_dtype": "fp32"}, r"needs strategy 'fsdp2' or 'fsdp2\+tp', got strategy='tp'"),
        # parallelize said nothing of these in one process, then failed under torchrun
        ("fsdp2+tp", {}, r"strategy='fsdp2\+tp' needs tp_size"),
        ("tp", {"tp_size": 0}, r"tp_size=0 must be an int >= 1"),
        ("fsdp2+tp", {"tp_size": True}, r"tp_size=True must be an int >= 1"),
    ],
)
def test_parallelize_and_distributed_config_refuse_the_same_options(
    strategy: str, options: dict, match: str
) -> None:
    from vermeil.distributed import DistributedConfig, mixed_precision_policy, parallelize

    with pytest.raises(ValueError, match=match) as from_config:
        DistributedConfig(strategy, **options)
    dtypes = {k: options.pop(k) for k in ("param_dtype", "reduce_dtype") if k in options}
    kwargs = {**options, "mp_policy": mixed_precision_policy(**dtypes)} if dtypes else options
    with pytest.raises(ValueError, match=match) as from_parallelize:
        parallelize(_stack(1), strategy, **kwargs)  # one process: checked before the model is returned
    if not dtypes:  # the same words (mixed precision arrives as a policy object here, as dtype names there)
        config_text = str(from_config.value).replace(" (or null)", " (or None)")
        assert str(from_parallelize.value) == config_text
