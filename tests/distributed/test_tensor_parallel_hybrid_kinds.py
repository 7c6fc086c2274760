"""Tensor parallelism (2 ranks, gloo on CPU) of the hybrid's newer layer kinds: Mamba-2 ("S"), a parallel
Mamba-2 + attention layer ("S+A") with Falcon-H1's multipliers and partial RoPE, a Mamba-1 layer and an MoE
feed-forward. Plain TP and sequence + loss parallelism give the single-process loss, logits and gradients
(float32, 1e-5).

Axis legend: B batch, T length, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor
from torch.distributed.tensor import DTensor

from vermeil.distributed import apply_tensor_parallel, init_distributed, shutdown
from vermeil.models.hybrid import HybridConfig, HybridModel
from vermeil.train.losses import head_loss, loss_head

WORLD = 2
VOCAB, B, T = 22, 2, 8  # T divisible by WORLD for sequence parallelism
TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = {"plain": (False, False), "sp_lp": (True, True)}


def _model() -> HybridModel:
    torch.manual_seed(0)
    return HybridModel(
        HybridConfig(
            dim=24,
            vocab_size=VOCAB,
            pattern=["S+A", "M", "S", "A"],
            ffn_pattern="DE",
            heads=4,
            kv_heads=2,
            head_dim=6,
            rotary_dim=4,
            headdim=12,
            ngroups=2,
            chunk_size=3,
            d_state=4,
            hidden_dim=20,
            num_experts=4,
            moe_aux_loss_coef=0.1,
            key_multiplier=1.5,
            attn_in_multiplier=0.8,
            ssm_out_multiplier=1.2,
            mlp_gate_multiplier=0.7,
            ssm_proj_multipliers=[0.5, 1.5, 0.8, 1.2, 0.6],
        )
    )


def _tokens() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(VOCAB, (B, T), generator=g), torch.randint(VOCAB, (B, T), generator=g)


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _case(sequence_parallel: bool, loss_parallel: bool, mesh: object | None) -> dict:
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context

    model = _model()
    if mesh is not None:
        apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    context = loss_parallel_context() if loss_parallel and mesh is not None else contextlib.nullcontext()
    tokens, targets = _tokens()
    with context:
        loss = head_loss(model, loss_head(model.config), tokens, targets)
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: _full(p.grad) for n, p in model.named_parameters()},
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    init_distributed("gloo", init_method="file://" + store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    results = {name: _case(*case, mesh) for name, case in CASES.items()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown(exit_code=0)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("tensor_parallel_hybrid_kinds")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # children inherit it: one thread per rank
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_new_kinds_match_single_process(case: str, tp_results: list[dict]) -> None:
    want = _case(*CASES[case], mesh=None)
    for got in tp_results:
        torch.testing.assert_close(got[case]["loss"], want["loss"], **TOL)
        assert got[case]["grads"].keys() == want["grads"].keys()
        for name, ref in want["grads"].items():
            torch.testing.assert_close(
                got[case]["grads"][name], ref, **TOL, msg=lambda m, n=name: f"{n}: {m}"
            )
        # attention and the dense feed-forward are split; the Mamba mixers stay whole
        sharded = got[case]["sharded"]
        assert "layers.0.attention.wq.weight" in sharded and "layers.0.feed_forward.w1.weight" in sharded
        assert not any(".mamba." in n for n in sharded)
