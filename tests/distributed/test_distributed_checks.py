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
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from vermeil.distributed import apply_expert_parallel, init_distributed, parallelize, shutdown
from vermeil.distributed.checkpoint import load_checkpoint, save_checkpoint
from vermeil.nn import MoE

WORLD = 2


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


class _RunsCode:
    """Unpickling it writes `marker` (what a crafted shard would do with a real payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_crafted_shard_runs_no_code_on_load_or_export(tmp_path: Path) -> None:
    # torch's load planners unpickle a shard's non-tensor entries (an optimizer's param groups) with
    # weights_only=False: loading or exporting this folder ran the payload.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from vermeil.distributed.checkpoint import export_weights

    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    marker = tmp_path / "ran"
    optim_sd["param_groups"][0]["lr"] = _RunsCode(marker)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp_path / "ckpt")
    refused = r"is damaged: a shard holds objects other than tensors .* refused, nothing in it was run"
    with pytest.raises(ValueError, match=refused):
        fresh = nn.Linear(4, 4)
        load_checkpoint(tmp_path / "ckpt", fresh, torch.optim.AdamW(fresh.parameters()))
    assert not marker.exists()
    with pytest.raises(ValueError, match=refused):
        export_weights(tmp_path / "ckpt", tmp_path / "model.safetensors")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optimizer_state_loads_into_other_param_groups(tmp_path: Path) -> None:
    # FSDP2 (or one process) keeps build_optimizer's 2 groups, TP splits the decayed one into plain and
    # DTensor parameters (split_dtensor_groups): the load asked for the file's group 2 and called it damaged.
    from vermeil.train.optim import build_optimizer

    torch.manual_seed(0)
    model = _stack(2)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    with pytest.warns(UserWarning, match="single process"):
        save_checkpoint(tmp_path / "ckpt", model, opt)
    torch.manual_seed(1)
    fresh = _stack(2)
    weights = [fresh[0].weight, fresh[1].weight]
    groups = [
        {"params": [weights[0]], "weight_decay": 0.5},  # as TP's split, with settings the file overrides
        {"params": [weights[1]], "weight_decay": 0.5},
        {"params": [fresh[0].bias, fresh[1].bias], "weight_decay": 0.0},
    ]
    fresh_opt = torch.optim.AdamW(groups, lr=1.0)
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in fresh_opt.param_groups] == [
        (1, 0.1, 1e-2),
        (1, 0.1, 1e-2),
        (2, 0.0, 1e-2),
    ]
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_opt.state[q][key], opt.state[p][key])


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


# ------------------------------------------------------------------------------- 2 ranks, one spawn


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _errors(fn: object) -> str | None:
    try:
        fn()  # type: ignore[operator]
    except ValueError as e:
        return str(e)
    return None


def _failed_overwrite(rank: int, out_dir: Path) -> dict:
    """An FSDP2 checkpoint saved, then saved over with new weights while rank 1's disk is full."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    torch.manual_seed(0)
    model = parallelize(_stack(2), "fsdp2").model
    save_checkpoint(out_dir / "ckpt", model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    write_data = FileSystemWriter.write_data
    if rank == 1:
        FileSystemWriter.write_data = disk_full  # type: ignore[method-assign]
    try:
        save_checkpoint(out_dir / "ckpt", model)
        failed = None
    except BaseException as e:  # DCP's CheckpointException is a BaseException, save_checkpoint's an OSError
        failed = f"{type(e).__name__}: {e}"
    finally:
        FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    fresh = parallelize(_stack(2), "fsdp2").model
    try:
        load_checkpoint(out_dir / "ckpt", fresh)
        load = "loaded"
    except (ValueError, FileNotFoundError) as e:
        load = str(e)
    return {"save_failed": failed, "load": load}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", init_method="file://" + store, rank=rank, world_size=WORLD)
    out = Path(out_dir)
    torch.manual_seed(0)
    moe = apply_expert_parallel(MoE(16, 12, 4, top_k=2))
    result = {
        "ep_save": _errors(lambda: save_checkpoint(out / "ep", moe)),
        "ep_load": _errors(lambda: load_checkpoint(out / "ep", moe)),
        "overwrite": _failed_overwrite(rank, out),
    }
    torch.save(result, out / f"rank{rank}.pt")
    shutdown(exit_code=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("distributed_checks")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # children inherit it: one thread per rank
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_expert_parallel_models_are_refused_by_dcp(two_ranks: list[dict]) -> None:
    # Each rank holds other experts under the same names: DCP kept one rank's copy, and a reload gave every
    # rank those experts, silently.
    for result in two_ranks:
        for key in ("ep_save", "ep_load"):
            assert result[key] is not None, key
            assert "module 'experts' holds expert-parallel experts" in result[key]


def test_a_failed_save_over_a_checkpoint_is_never_loaded(two_ranks: list[dict]) -> None:
    # Rank 0 wrote its new shard, rank 1 failed: the old plan over new and old shards loaded as complete.
    for result in two_ranks:
        # one line naming the folder, the rank and its error, as an OSError (DCP's is a BaseException)
        failed = result["overwrite"]["save_failed"]
        assert failed.startswith("OSError: saving DCP checkpoint ") and "failed on rank(s) [1]: " in failed
        assert "No space left on device" in failed and "Traceback" not in failed
        assert "is not a DCP checkpoint folder (no .metadata file)" in result["overwrite"]["load"]


def test_split_dtensor_groups_splits_the_parameter_names_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each half kept the whole group's "param_names": names no longer matched the parameters.
    import vermeil.distributed.training as training
    from vermeil.train.optim import build_optimizer

    model = _stack(2)
    sharded = {id(model[0].weight), id(model[1].bias)}  # stand-ins for DTensors
    monkeypatch.setattr(training, "is_dtensor", lambda p: id(p) in sharded)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    training.split_dtensor_groups(opt)
    named = dict(model.named_parameters())
    split = [(g["param_names"], g["weight_decay"]) for g in opt.param_groups]
    assert split == [(["1.weight"], 0.1), (["0.weight"], 0.1), (["0.bias"], 0.0), (["1.bias"], 0.0)]
    for group in opt.param_groups:
        assert [named[n] for n in group["param_names"]] == group["params"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_parameters_saved_without_optimizer_state_load_without_it(tmp_path: Path) -> None:
    # AdamW creates a parameter's state at its first gradient: a layer never used (an idle vision tower, say)
    # has none in the checkpoint, and the load called the checkpoint damaged ('Missing key ... step').
    torch.manual_seed(0)
    model = _stack(2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model[0](torch.randn(3, 8)).sum().backward()  # layer 1 gets no gradient
    opt.step()
    with pytest.warns(UserWarning, match="single process"):
        save_checkpoint(tmp_path / "ckpt", model, opt)
    torch.manual_seed(1)
    fresh = _stack(2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert [q.shape for q in fresh_opt.state] == [p.shape for p in opt.state]  # layer 0's, as saved
    # the next step (now through both layers) is the same in both
    x = torch.randn(3, 8)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
