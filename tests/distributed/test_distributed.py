"""Tests for vermeil.distributed: DDP, FSDP2, tensor, FSDP2+TP and expert parallelism against one process; DCP.

Axis legend: B batch, T length, V vocabulary, D model dim.

Multi-process runs use `torch.multiprocessing.spawn` with a file store (2 ranks, 4 for the 2-D FSDP2+TP mesh;
gloo on CPU, one thread each); the ranks write full tensors to files in tmp_path and the parent compares them
with a single-process reference computed here. Children leave through `shutdown(exit_code=0)` (barrier, destroy_process_group, os._exit), which
avoids gloo's teardown abort.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vermeil.distributed import (
    DEFAULT_BLOCK_NAMES,
    ExpertParallelExperts,
    apply_ddp,
    apply_expert_parallel,
    apply_fsdp2,
    apply_tensor_parallel,
    average_gradients,
    init_distributed,
    is_main_process,
    mixed_precision_policy,
    parallelize,
    rank_zero_only,
    shutdown,
    tensor_parallel_plan,
)
from vermeil.distributed.checkpoint import export_weights, load_checkpoint, save_checkpoint
from vermeil.distributed.training import clip_grad_norm
from vermeil.nn import MoE, RMSNorm, RotaryEmbedding, TransformerBlock

WORLD = 2
VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, SEQ, LOCAL_BATCH = 23, 37, 4, 2, 8, 38, 7, 2
STEPS, LR = 3, 1e-3
TOL = {"atol": 1e-5, "rtol": 1e-5}


class TinyLM(nn.Module):
    """Embedding, two GQA rotary TransformerBlocks (QK-norm), final norm, head. tokens (B, T) -> (B, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        rotary = RotaryEmbedding(HEAD_DIM, max_seq_len=16)
        self.layers = nn.ModuleList(
            TransformerBlock(DIM, HEADS, KV_HEADS, HEAD_DIM, hidden_dim=HIDDEN, rotary=rotary, qk_norm="rms")
            for _ in range(2)
        )
        self.norm = RMSNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def _batches(world: int = WORLD) -> list[tuple[Tensor, Tensor]]:
    """STEPS global batches (world * LOCAL_BATCH, SEQ) of tokens and targets, identical in every process."""
    g = torch.Generator().manual_seed(1)
    shape = (world * LOCAL_BATCH, SEQ)
    return [
        (torch.randint(VOCAB, shape, generator=g), torch.randint(VOCAB, shape, generator=g))
        for _ in range(STEPS)
    ]


def _loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """STEPS AdamW steps; returns the first step's gradients and the final parameters (full tensors)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    first_grads: dict[str, Tensor] = {}
    for step, (tokens, targets) in enumerate(batches):
        _loss(model, tokens, targets).backward()
        if step == 0:  # full_tensor() is a collective: every rank runs it, in the same order
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}
    return {"grads": {n.removeprefix("module."): g for n, g in first_grads.items()}, "params": params}


def _hybrid() -> nn.Module:
    """A tiny Mamba + GQA attention hybrid (vermeil.models.hybrid), seeded."""
    from vermeil.models.hybrid import HybridConfig, HybridModel

    torch.manual_seed(0)
    config = HybridConfig(
        dim=DIM,
        vocab_size=VOCAB,
        pattern="MA",
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        qk_norm="rms",
        hidden_dim=HIDDEN,
        d_state=4,
    )
    return HybridModel(config)


def _forward_backward(model: nn.Module, tokens: Tensor, targets: Tensor) -> dict:
    """Logits and full gradients of one cross-entropy backward."""
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {"logits": _full(logits), "grads": {n: _full(p.grad) for n, p in model.named_parameters()}}


def _fsdp2_extras(rank: int, model: nn.Module, batches: list[tuple[Tensor, Tensor]], out_dir: str) -> dict:
    """Checkpoint + resume, and a bf16 mixed-precision run (FSDP2 worker only)."""
    result: dict = {"not_sharded": [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]}
    # Save model + AdamW state after STEPS steps; a fresh FSDP2 model resumed from it must take the same
    # next step as the uninterrupted model.
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens, targets = batches[0]
    _loss(model, tokens, targets).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    save_checkpoint(Path(out_dir) / "ckpt", model, opt)
    result["saved"] = {n: _full(p) for n, p in model.named_parameters()}
    torch.manual_seed(1)
    resumed = apply_fsdp2(TinyLM(), ["layers.0", "TransformerBlock"])  # by module name and by class name
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=LR)
    load_checkpoint(Path(out_dir) / "ckpt", resumed, resumed_opt)
    losses = []
    for m, o in ((model, opt), (resumed, resumed_opt)):
        loss = _loss(m, *batches[1])
        loss.backward()
        o.step()
        losses.append(loss.detach())
    result["next_losses"] = losses
    result["next_params"] = [{n: _full(p) for n, p in m.named_parameters()} for m in (model, resumed)]
    # bf16 compute with float32 sharded parameters and float32 gradient reduction; default block names.
    bf16 = apply_fsdp2(_model(), mp_policy=mixed_precision_policy("bf16", "fp32"))
    logits = bf16(tokens)
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    result["bf16"] = {
        "logits_dtype": str(logits.dtype),
        "param_dtypes": sorted({str(p.dtype) for p in bf16.parameters()}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in bf16.parameters()}),
        "loss": loss.detach(),
    }
    return result


EP_DIM, EP_HIDDEN, EP_EXPERTS, EP_TOKENS = 16, 12, 4, (2, 5)  # widths multiple of 4: the grouped_mm path


def _moe() -> MoE:
    torch.manual_seed(0)
    return MoE(EP_DIM, EP_HIDDEN, EP_EXPERTS, top_k=2, score_func="softmax", renormalize=True)


def _moe_data() -> tuple[Tensor, Tensor]:
    """Inputs (WORLD * 2, 5, D) and fixed output weights for a linear loss, identical in every process."""
    g = torch.Generator().manual_seed(2)
    shape = (WORLD * EP_TOKENS[0], EP_TOKENS[1], EP_DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _ep_worker(rank: int, out_dir: str) -> None:
    errors = []
    for bad in (MoE(EP_DIM, EP_HIDDEN, 3, top_k=1), MoE(EP_DIM, EP_HIDDEN, 4, top_k=1, backend="loop")):
        try:
            apply_expert_parallel(nn.ModuleDict({"moe": bad}))
        except ValueError as e:  # raised before any collective, on every rank alike
            errors.append(str(e))
    moe = apply_expert_parallel(_moe())
    x, w = (t[rank * EP_TOKENS[0] : (rank + 1) * EP_TOKENS[0]] for t in _moe_data())
    x.requires_grad_(True)
    out = moe(x).out
    (out * w).sum().backward()  # this rank's loss, on its own tokens only
    average_gradients(moe)  # -> gradients of the mean of the ranks' losses
    grad_norm = clip_grad_norm(list(moe.parameters()), math.inf)  # every expert counted, on every rank
    result = {
        "grad_norm": grad_norm,
        "out": out.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in moe.named_parameters()},
        "errors": errors,
        "local_experts": moe.experts.local.num_experts
        if isinstance(moe.experts, ExpertParallelExperts)
        else 0,
    }
    torch.save(result, Path(out_dir) / f"ep{rank}.pt")


def _worker_2d(rank: int, out_dir: str) -> None:
    """4 ranks: TP inside pairs (0, 1) and (2, 3), FSDP2 across the pairs; 3 AdamW steps."""
    par = parallelize(_model(), "fsdp2+tp", tp_size=2, block_types_or_names=[TransformerBlock])
    assert (par.dp_rank, par.dp_size, par.tp_size) == (rank // 2, 2, 2)
    local = slice(par.dp_rank * 2 * LOCAL_BATCH, (par.dp_rank + 1) * 2 * LOCAL_BATCH)  # both TP ranks alike
    wq = par.model.layers[0].attention.wq.weight
    result = _train(par.model, [(x[local], y[local]) for x, y in _batches(4)])
    result["wq_placements"] = [(type(pl).__name__, pl.dim) for pl in wq.placements]
    if rank == 0:
        torch.save(result, Path(out_dir) / "result.pt")


def _worker(rank: int, store: str, out_dir: str, strategy: str, ckpt: str | None, world: int) -> None:
    torch.set_num_threads(1)
    # gloo explicitly: these tests keep the models on the CPU even where CUDA exists.
    init_distributed("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.save(
        {"main": is_main_process(), "rank_zero_only": rank_zero_only(lambda: rank)()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    if strategy == "ep":
        _ep_worker(rank, out_dir)
        shutdown(exit_code=0)
    if strategy == "fsdp2+tp":
        _worker_2d(rank, out_dir)
        shutdown(exit_code=0)
    model = _model()
    batches = _batches()
    if strategy in ("ddp", "fsdp2"):
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        batches = [(x[local], y[local]) for x, y in batches]
        if strategy == "ddp":
            model = apply_ddp(model)
        else:
            par = parallelize(model, "fsdp2", block_types_or_names=[TransformerBlock])
            assert (par.dp_rank, par.dp_size, par.tp_size) == (rank, WORLD, 1)
            model = par.model
        result: dict = _train(model, batches)
        if strategy == "fsdp2":
            result.update(_fsdp2_extras(rank, model, batches, out_dir))
    else:  # tensor parallel, every rank sees the same global batch
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        apply_tensor_parallel(model, mesh)
        tokens, targets = batches[0]
        result = _forward_backward(model, tokens, targets)
        result["local_wq_shape"] = tuple(model.layers[0].attention.wq.weight.to_local().shape)
        if ckpt is not None:  # an FSDP2 checkpoint resharded onto the TP layout
            load_checkpoint(ckpt, model)
            result["loaded"] = {n: _full(p) for n, p in model.named_parameters()}
        hybrid = apply_tensor_parallel(_hybrid(), mesh)  # attention + SwiGLU sharded, Mamba replicated
        result["hybrid"] = _forward_backward(hybrid, tokens, targets)
        result["hybrid_sharded"] = sorted(n for n, p in hybrid.named_parameters() if isinstance(p, DTensor))
    if rank == 0:
        torch.save(result, Path(out_dir) / "result.pt")
    shutdown(exit_code=0)


def _spawn(
    tmp: Path, strategy: str, monkeypatch: pytest.MonkeyPatch, ckpt: Path | None = None, world: int = WORLD
) -> dict:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # children inherit it: one thread per rank on a small machine
    store = tmp / "store"
    mp.spawn(
        _worker, args=(str(store), str(tmp), strategy, ckpt and str(ckpt), world), nprocs=world, join=True
    )
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert ranks[0] == {"main": True, "rank_zero_only": 0}
    assert ranks[1:] == [{"main": False, "rank_zero_only": None}] * (world - 1)
    if strategy == "ep":
        return {r: torch.load(tmp / f"ep{r}.pt", weights_only=True) for r in range(WORLD)}
    return torch.load(tmp / "result.pt", weights_only=True)


def _reference() -> tuple[TinyLM, dict[str, dict[str, Tensor]]]:
    model = _model()
    return model, _train(model, _batches())


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    with pytest.MonkeyPatch.context() as mpatch:
        return tmp, _spawn(tmp, "fsdp2", mpatch)


def _assert_matches(result: dict, reference: dict) -> None:
    for kind in ("grads", "params"):
        assert result[kind].keys() == reference[kind].keys()
        for name, ref in reference[kind].items():
            torch.testing.assert_close(
                result[kind][name], ref, **TOL, msg=lambda m, n=name, k=kind: f"{k} {n}: {m}"
            )


def test_ddp_matches_single_process_on_concatenated_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _spawn(tmp_path, "ddp", monkeypatch)
    _, reference = _reference()
    _assert_matches(result, reference)


def test_fsdp2_matches_single_process_on_concatenated_batch(fsdp2_run: tuple[Path, dict]) -> None:
    _, result = fsdp2_run
    assert result["not_sharded"] == []  # every parameter became a sharded DTensor
    _, reference = _reference()
    _assert_matches(result, reference)


def test_fsdp2_checkpoint_loads_in_single_process(fsdp2_run: tuple[Path, dict]) -> None:
    tmp, result = fsdp2_run
    model = _model()  # freshly initialised: differs from the trained weights until loaded
    assert not torch.equal(model.head.weight, result["saved"]["head.weight"])
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp / "ckpt", model)  # model only: the optimizer entries are simply not read
    loaded = dict(model.named_parameters())
    assert loaded.keys() == result["saved"].keys()
    for name, saved in result["saved"].items():
        torch.testing.assert_close(loaded[name], saved, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp2_checkpoint_exports_to_safetensors(fsdp2_run: tuple[Path, dict], tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from vermeil.checkpoint import load_weights

    ckpt_dir, result = fsdp2_run
    export_weights(ckpt_dir / "ckpt", tmp_path / "model.safetensors", {"step": "4"})
    model = _model()
    load_weights(model, tmp_path / "model.safetensors")  # strict: every key present, none extra
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p, result["saved"][name], atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fsdp2_resumed_run_continues_uninterrupted_one(fsdp2_run: tuple[Path, dict]) -> None:
    _, result = fsdp2_run
    uninterrupted, resumed = result["next_losses"]
    torch.testing.assert_close(resumed, uninterrupted, atol=0, rtol=0)
    a, b = result["next_params"]
    assert a.keys() == b.keys() == result["saved"].keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The step really moved the weights (AdamW state restored, not a no-op).
    assert not torch.equal(a["head.weight"], result["saved"]["head.weight"])


def test_fsdp2_bf16_mixed_precision_policy(fsdp2_run: tuple[Path, dict]) -> None:
    _, result = fsdp2_run
    info = result["bf16"]
    assert info["logits_dtype"] == "torch.bfloat16"  # computed in bf16 ...
    assert info["param_dtypes"] == info["grad_dtypes"] == ["torch.float32"]  # ... sharded state stays fp32
    tokens, targets = _batches()[0]
    reference = _loss(_model(), tokens[:LOCAL_BATCH], targets[:LOCAL_BATCH]).detach()
    torch.testing.assert_close(info["loss"], reference, atol=5e-2, rtol=0)  # bf16 has ~3 significant digits


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory, fsdp2_run: tuple[Path, dict]) -> dict:
    tmp = tmp_path_factory.mktemp("tp")
    with pytest.MonkeyPatch.context() as mpatch:
        return _spawn(tmp, "tp", mpatch, ckpt=fsdp2_run[0] / "ckpt")


def _assert_forward_backward_matches(result: dict, model: nn.Module) -> None:
    tokens, targets = _batches()[0]
    reference = _forward_backward(model, tokens, targets)
    torch.testing.assert_close(result["logits"], reference["logits"], **TOL)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, ref in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], ref, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def test_tensor_parallel_matches_single_process(tp_run: dict) -> None:
    # Rank 0 really held a shard: H / tp query heads of HEAD_DIM rows each.
    assert tp_run["local_wq_shape"] == (HEADS // WORLD * HEAD_DIM, DIM)
    _assert_forward_backward_matches(tp_run, _model())


def test_tensor_parallel_hybrid_matches_single_process(tp_run: dict) -> None:
    hybrid = tp_run["hybrid_sharded"]
    assert "layers.1.attention.wk.weight" in hybrid and "layers.1.feed_forward.w2.weight" in hybrid
    assert not any(".mamba." in n for n in hybrid)  # Mamba blocks stay replicated
    _assert_forward_backward_matches(tp_run["hybrid"], _hybrid())


def test_fsdp2_checkpoint_loads_under_tensor_parallel(tp_run: dict, fsdp2_run: tuple[Path, dict]) -> None:
    # The FSDP2 checkpoint (rows sharded over ranks) loaded exactly into the TP layout (Colwise/Rowwise).
    saved = fsdp2_run[1]["saved"]
    assert tp_run["loaded"].keys() == saved.keys()
    for name, value in saved.items():
        torch.testing.assert_close(
            tp_run["loaded"][name], value, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_expert_parallel_matches_single_process_moe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranks = _spawn(tmp_path, "ep", monkeypatch)
    moe = _moe()  # all experts, both ranks' tokens
    x, w = _moe_data()
    x.requires_grad_(True)
    out = moe(x).out
    ((out * w).sum() / WORLD).backward()  # the mean over ranks of each rank's summed loss
    n = EP_TOKENS[0]
    assert [ranks[r]["local_experts"] for r in range(WORLD)] == [EP_EXPERTS // WORLD] * WORLD
    indivisible, loop = ranks[0]["errors"]
    assert (
        indivisible == "num_experts=3 of MoE 'moe' must be divisible by the expert-parallel degree ep_size=2"
    )
    assert loop == "MoE 'moe' has backend='loop'; expert parallelism needs 'grouped' or 'padded'"
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["out"], out[r * n : (r + 1) * n].detach(), **TOL)
        # each rank's input gradient is of its own loss, i.e. WORLD times its share of the mean
        torch.testing.assert_close(ranks[r]["x_grad"] / WORLD, x.grad[r * n : (r + 1) * n], **TOL)
    for name, p in moe.named_parameters():
        if name.startswith("experts."):
            local = name.replace("experts.", "experts.local.")
            got = torch.cat([ranks[r]["grads"][local] for r in range(WORLD)])  # rank r holds experts r*El..
        else:
            got = ranks[0]["grads"][name]
            torch.testing.assert_close(ranks[1]["grads"][name], got, atol=0, rtol=0)  # replicated: identical
        torch.testing.assert_close(got, p.grad, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    norm = torch.nn.utils.get_total_norm([p.grad for p in moe.parameters()], 2.0)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["grad_norm"], norm, **TOL)


def test_fsdp2_plus_tp_matches_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _spawn(tmp_path, "fsdp2+tp", monkeypatch, world=4)  # 4 single-threaded ranks, 2-D mesh
    # FSDP2 shards the TP shard's rows again: (dp, tp) placements (_StridedShard(0), Shard(0)).
    (dp_kind, dp_dim), tp_placement = result["wq_placements"]
    assert "Shard" in dp_kind and dp_dim == 0 and tp_placement == ("Shard", 0)
    model = _model()
    _assert_matches(result, _train(model, _batches(4)))


# ------------------------------------------------------------------------------- single process, no spawn


def test_tensor_parallel_plan_names_megatron_layout() -> None:
    plan = tensor_parallel_plan(_model(), 2)
    styles = {name: type(style).__name__ for name, style in plan.items()}
    for i in range(2):
        p = f"layers.{i}."
        for proj in ("wq", "wk", "wv"):
            assert styles.pop(p + "attention." + proj) == "ColwiseParallel"
        assert styles.pop(p + "attention.wo") == "RowwiseParallel"
        assert styles.pop(p + "feed_forward.w1") == "ColwiseParallel"
        assert styles.pop(p + "feed_forward.w3") == "ColwiseParallel"
        assert styles.pop(p + "feed_forward.w2") == "RowwiseParallel"
        for half in ("query_norm", "key_norm"):
            assert styles.pop(p + f"attention.qk_norm.{half}") == "SequenceParallel"
    assert styles == {}  # embedding, norms and head stay replicated


def test_tensor_parallel_plan_mlp_feed_forward() -> None:
    block = TransformerBlock(16, 2, feed_forward="mlp", hidden_dim=24)
    plan = tensor_parallel_plan(nn.ModuleDict({"block": block}), 2)
    assert type(plan["block.feed_forward.fc1"]).__name__ == "ColwiseParallel"
    assert type(plan["block.feed_forward.fc2"]).__name__ == "RowwiseParallel"


@pytest.mark.parametrize(
    ("heads", "kv_heads", "hidden", "match"),
    [
        (3, 3, 8, r"heads=3 of module 'layers\.0\.attention' must be divisible by .* tp_size=2"),
        (4, 1, 8, r"kv_heads=1 of module 'layers\.0\.attention' must be divisible by .* tp_size=2"),
        (4, 2, 9, r"hidden_dim=9 of module 'layers\.0\.feed_forward' must be divisible by .* tp_size=2"),
    ],
)
def test_tensor_parallel_indivisible_sizes_are_clear_errors(
    heads: int, kv_heads: int, hidden: int, match: str
) -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([TransformerBlock(24, heads, kv_heads, 8, hidden_dim=hidden)])
    with pytest.raises(ValueError, match=match):
        tensor_parallel_plan(model, 2)
    assert tensor_parallel_plan(model, 1)  # degree 1 always divides


def test_tensor_parallel_plan_rejects_kv_cache() -> None:
    model = _model()
    model.layers[1].attention.setup_cache(1, 8)
    with pytest.raises(
        ValueError, match=r"module 'layers\.1\.attention' has a KV cache: tensor-parallel decoding"
    ):
        tensor_parallel_plan(model, 2)
    model.layers[1].attention.delete_cache()
    assert tensor_parallel_plan(model, 2)


def test_tensor_parallel_plan_rejects_bad_degree() -> None:
    with pytest.raises(ValueError, match=r"tp_size=0 must be an int >= 1"):
        tensor_parallel_plan(_model(), 0)


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert is_main_process()
    assert rank_zero_only(lambda x: x + 1)(1) == 2
    shutdown()  # nothing to tear down, and no exit without exit_code


def test_init_distributed_rejects_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' must be an integer"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        init_distributed()


def test_apply_fsdp2_and_policy_argument_errors() -> None:
    with pytest.raises(TypeError, match="block_types_or_names='TransformerBlock' must be an iterable"):
        apply_fsdp2(_model(), "TransformerBlock")
    with pytest.raises(ValueError, match=r"param_dtype='half' must be a torch.dtype, None or one of"):
        mixed_precision_policy("half")
    policy = mixed_precision_policy("bf16", "fp32")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert "TransformerBlock" in DEFAULT_BLOCK_NAMES and "MambaBlock" in DEFAULT_BLOCK_NAMES


def test_single_process_checkpoint_round_trip(tmp_path: Path) -> None:
    saved = _model()
    with pytest.warns(UserWarning, match="single process"):
        save_checkpoint(tmp_path / "ckpt", saved)
    torch.manual_seed(1)
    model = TinyLM()
    assert not torch.equal(model.head.weight, saved.head.weight)
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp_path / "ckpt", model)
    for (name, a), (_, b) in zip(saved.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_parallelize_single_process_and_bad_strategy() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"strategy='zero3' must be one of \('none', 'ddp', 'fsdp2', 'tp'"):
        parallelize(model, "zero3")
    par = parallelize(model, "fsdp2")  # no process group: the same config runs in one process unchanged
    assert par.model is model and (par.dp_rank, par.dp_size, par.tp_size, par.mesh) == (0, 1, 1, None)
