"""Tensor parallelism of the models (vermeil.distributed.tensor_parallel) against one process.

Axis legend: B batch, T length, V vocabulary, D model dim, H heads, Hkv kv heads, M Flux MLP width.

One `torch.multiprocessing.spawn` (2 ranks, file store, gloo on CPU, one thread each) runs every case: the LLM
(GQA, an MoE layer with shared expert, chunked attention, a NoPE layer with temperature tuning), the hybrid
(Mamba + GQA attention; tied embeddings), a parallel-routing hybrid with a learned merge gate, MambaLM and a
tiny Flux (one double and one single block), plain TP and with sequence and/or loss parallelism. Rank 0 writes
the loss, full outputs and full gradients to tmp_path; the tests compare them with the same model in this
process (float32, 1e-5). Flux also goes through a DCP checkpoint (strided shards written in BFL's layout).
Plan errors need no processes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vermeil.distributed import (
    apply_tensor_parallel,
    init_distributed,
    parallelize,
    shutdown,
    tensor_parallel_plan,
)
from vermeil.distributed.checkpoint import load_checkpoint, save_checkpoint
from vermeil.models.flux import Flux, FluxParams
from vermeil.models.hybrid import HybridConfig, HybridModel
from vermeil.models.llm import LLM, ModelArgs, MoEArgs
from vermeil.models.mamba import MambaConfig, MambaLM
from vermeil.train.losses import head_loss, loss_head
from vermeil.train.trainer import DistributedConfig

WORLD = 2
VOCAB, B, T = 22, 2, 8  # T divisible by WORLD for sequence parallelism
TOL = {"atol": 1e-5, "rtol": 1e-5}

# name -> (model builder, sequence_parallel, loss_parallel)
CASES = {
    "llm": ("llm", False, False),
    "llm_sp_lp": ("llm", True, True),
    "hybrid": ("hybrid", False, False),
    "hybrid_sp_lp": ("hybrid", True, True),
    "hybrid_lp": ("hybrid", False, True),  # tied embedding made vocab-parallel with the head
    "hybrid_gate_sp": ("hybrid_gate", True, False),
    "mamba_lp": ("mamba", False, True),
}


def _llm(**overrides: object) -> LLM:
    """Layer 0: chunked RoPE attention + dense SwiGLU; layer 1: NoPE with temperature tuning + MoE."""
    torch.manual_seed(0)
    args = dict(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        hidden_dim=24,
        use_qk_norm=True,
        nope_layer_interval=2,
        attention_chunk_size=3,
        attn_temperature_tuning=True,
        floor_scale=2.0,
        rope_theta=10000.0,
        moe_args=MoEArgs(
            num_experts=4, top_k=2, interleave_moe_layer_step=2, hidden_dim=16, aux_loss_coef=0.1
        ),
    )
    return LLM(ModelArgs(**{**args, **overrides}))


def _hybrid(**overrides: object) -> HybridModel:
    torch.manual_seed(0)
    args = dict(
        dim=24,
        vocab_size=VOCAB,
        pattern="MA",
        heads=4,
        kv_heads=2,
        head_dim=6,
        qk_norm="rms",
        hidden_dim=20,
        d_state=4,
    )
    return HybridModel(HybridConfig(**{**args, **overrides}))


def _mamba() -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4, vocab_size=VOCAB, pad_vocab_size_multiple=2))


BUILDERS = {
    "llm": _llm,
    "hybrid": _hybrid,
    "hybrid_gate": lambda: _hybrid(routing="parallel", merge="gate", feed_forward="mlp"),
    "mamba": _mamba,
}


def _flux(**overrides: object) -> Flux:
    """One double and one single block; D = 32, H = 2, M = 2 D (linear1 = 5 blocks of D)."""
    torch.manual_seed(0)
    params = dict(
        in_channels=3,
        out_channels=3,
        vec_in_dim=4,
        context_in_dim=5,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 6, 6],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )
    return Flux(FluxParams(**{**params, **overrides}))


def _tokens() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(VOCAB, (B, T), generator=g), torch.randint(VOCAB, (B, T), generator=g)


def _flux_inputs() -> tuple[tuple[Tensor, ...], Tensor]:
    """(data, data_ids, cond, cond_ids, timesteps, y) and fixed output weights for a linear loss."""
    g = torch.Generator().manual_seed(2)
    ld, lc = 5, 3
    data, cond = torch.randn(B, ld, 3, generator=g), torch.randn(B, lc, 5, generator=g)
    data_ids = torch.randint(8, (1, ld, 3), generator=g).float()
    cond_ids = torch.zeros(1, lc, 3)
    t, y = torch.rand(B, generator=g), torch.randn(B, 4, generator=g)
    return (data, data_ids, cond, cond_ids, t, y), torch.randn(B, ld, 3, generator=g)


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _lm_loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, logits): the hybrid's own loss head, else cross-entropy (+ the LLM's MoE aux loss)."""
    if isinstance(model, HybridModel):
        return head_loss(model, loss_head(model.config), tokens, targets), model(tokens)
    out = model(tokens)
    logits, aux = (out, 0.0) if isinstance(out, Tensor) else (out.logits, out.aux_loss)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    # Loss parallel: a replicated DTensor, made plain before it meets the plain aux loss (as the trainer does).
    return (ce.full_tensor() if isinstance(ce, DTensor) else ce) + aux, logits


def _lm_case(builder: str, sequence_parallel: bool, loss_parallel: bool, mesh: object | None) -> dict:
    """One forward + backward; with a mesh, TP first (and loss_parallel() around loss and backward)."""
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context

    model = BUILDERS[builder]()
    if mesh is not None:
        apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    context = loss_parallel_context() if loss_parallel and mesh is not None else contextlib.nullcontext()
    with context:
        loss, logits = _lm_loss(model, *_tokens())
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss  # replicated: no collective
        loss.backward()
    return {
        "loss": loss.detach(),
        "logits": _full(logits),
        "grads": {n: _full(p.grad) for n, p in model.named_parameters()},
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
    }


def _flux_case(mesh: object | None, out_dir: Path | None = None) -> dict:
    """Forward + backward of a linear loss; with a mesh, also the state dict and a DCP round trip."""
    model = _flux()
    result: dict = {}
    if mesh is not None:
        apply_tensor_parallel(model, mesh)
        qkv = model.double_blocks[0].img_attn.qkv.weight
        result["qkv_local"] = qkv.to_local().detach().clone()
        result["state_dict"] = {k: _full(v) for k, v in model.state_dict().items()}
    inputs, w = _flux_inputs()
    out = model(*inputs)
    (out * w).sum().backward()
    result["out"] = out.detach()
    result["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
    if mesh is not None and out_dir is not None:
        # One AdamW step, then model + optimizer state through DCP (strided shards in the file's plain layout).
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt.step()
        save_checkpoint(out_dir / "flux_ckpt", model, opt)
        result["saved"] = {n: _full(p) for n, p in model.named_parameters()}
        torch.manual_seed(1)
        fresh = apply_tensor_parallel(Flux(model.params), mesh)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        load_checkpoint(out_dir / "flux_ckpt", fresh, fresh_opt)
        result["reloaded"] = {n: _full(p) for n, p in fresh.named_parameters()}
        result["reloaded_exp_avg"] = {
            n: _full(fresh_opt.state[p]["exp_avg"]) for n, p in fresh.named_parameters()
        }
        result["exp_avg"] = {n: _full(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}
    return result


def _worker(rank: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    init_distributed("gloo", init_method="file://" + store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    results = {name: _lm_case(*case, mesh) for name, case in CASES.items()}
    results["flux"] = _flux_case(mesh, Path(out_dir))
    errors = []
    try:  # Flux's fused projections cannot be sharded again by FSDP2: refused before any collective
        parallelize(_flux(), "fsdp2+tp", tp_size=WORLD)
    except ValueError as e:
        errors.append(str(e))
    results["errors"] = errors
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown(exit_code=0)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("tensor_parallel")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # children inherit it: one thread per rank
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return tmp, ranks[0], ranks[1]


def _assert_grads(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_language_models_match_single_process(case: str, tp_results: tuple[Path, dict, dict]) -> None:
    _, rank0, rank1 = tp_results
    builder, sequence_parallel, loss_parallel = CASES[case]
    want = _lm_case(builder, sequence_parallel, loss_parallel, mesh=None)
    for got in (rank0[case], rank1[case]):
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)
        torch.testing.assert_close(got["logits"], want["logits"], **TOL)
        _assert_grads(got["grads"], want["grads"])


def test_language_models_are_really_split(tp_results: tuple[Path, dict, dict]) -> None:
    _, rank0, _ = tp_results
    llm = rank0["llm"]["sharded"]
    for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
        assert f"layers.0.{name}.weight" in llm
    for name in (
        "experts.w1",
        "experts.w3",
        "experts.w2",
        "shared_expert.w1.weight",
        "shared_expert.w2.weight",
    ):
        assert f"layers.1.feed_forward.{name}" in llm  # routed experts split on F, shared expert Megatron
    assert "layers.0.feed_forward.w2.weight" in llm and "output.weight" not in llm  # head replicated
    assert {"output.weight", "tok_embeddings.weight", "norm.weight"} <= set(rank0["llm_sp_lp"]["sharded"])
    hybrid = rank0["hybrid"]["sharded"]
    assert "layers.1.attention.wk.weight" in hybrid and not any(".mamba." in n for n in hybrid)
    # Tied embedding: one DTensor serves as embedding and head (named once), vocab-sharded.
    assert "embedding.weight" in rank0["hybrid_lp"]["sharded"]
    assert "lm_head.weight" not in rank0["hybrid_lp"]["grads"]
    assert "layers.1.gate.weight" in rank0["hybrid_gate_sp"]["sharded"]
    assert rank0["mamba_lp"]["sharded"] == ["backbone.embedding.weight"]


def test_flux_matches_single_process(tp_results: tuple[Path, dict, dict]) -> None:
    _, rank0, rank1 = tp_results
    want = _flux_case(mesh=None)
    for got in (rank0["flux"], rank1["flux"]):
        torch.testing.assert_close(got["out"], want["out"], **TOL)
        _assert_grads(got["grads"], want["grads"])


def test_flux_fused_qkv_shard_holds_the_ranks_heads(tp_results: tuple[Path, dict, dict]) -> None:
    _, rank0, rank1 = tp_results
    full = _flux().double_blocks[0].img_attn.qkv.weight.detach()  # (3D, D) = [q; k; v], H = 2 heads of 16
    q, k, v = full.chunk(3)
    for r, got in enumerate((rank0["flux"]["qkv_local"], rank1["flux"]["qkv_local"])):
        head = slice(16 * r, 16 * (r + 1))  # rank r holds head r of q, of k and of v
        torch.testing.assert_close(got, torch.cat((q[head], k[head], v[head])), atol=0, rtol=0)


def test_flux_state_dict_and_checkpoint_keep_the_original_layout(
    tp_results: tuple[Path, dict, dict],
) -> None:
    tmp, rank0, _ = tp_results
    flux = rank0["flux"]
    reference = _flux().state_dict()  # BFL key names, unsharded layout
    assert flux["state_dict"].keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(
            flux["state_dict"][name], value, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    # Back into a freshly initialised TP model: weights and AdamW moments exactly as saved.
    for name, saved in flux["saved"].items():
        torch.testing.assert_close(flux["reloaded"][name], saved, atol=0, rtol=0)
        torch.testing.assert_close(flux["reloaded_exp_avg"][name], flux["exp_avg"][name], atol=0, rtol=0)
    # And into a plain single-process Flux: the files hold the unsharded layout.
    model = _flux()
    torch.manual_seed(3)
    model.reset_parameters()
    with pytest.warns(UserWarning, match="single process"):
        load_checkpoint(tmp / "flux_ckpt", model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, flux["saved"][name], atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_flux_fsdp2_plus_tp_is_refused(tp_results: tuple[Path, dict, dict]) -> None:
    _, rank0, _ = tp_results
    (error,) = rank0["errors"]
    assert "strategy='fsdp2+tp' does not support fused projections split block by block" in error


# ------------------------------------------------------------------------------- single process, no spawn


def _styles(plan: dict) -> dict[str, str]:
    return {name: type(style).__name__ for name, style in plan.items()}


def test_plan_names_llm_moe_and_flux_layouts() -> None:
    llm = _styles(tensor_parallel_plan(_llm(), 2))
    assert llm["layers.1.attention.wq"] == "ColwiseParallel"
    assert llm["layers.1.attention.wo"] == "RowwiseParallel"
    assert llm["layers.1.feed_forward.experts"] == "_ExpertTensorParallel"
    assert llm["layers.1.feed_forward.shared_expert.w3"] == "ColwiseParallel"
    assert "output" not in llm and "layers.0.attention_norm" not in llm
    loop = _styles(
        tensor_parallel_plan(
            _llm(moe_args=MoEArgs(4, 2, interleave_moe_layer_step=2, hidden_dim=16, backend="loop")), 2
        )
    )
    assert "layers.1.feed_forward.experts" not in loop  # the loop backend indexes weights: experts replicated
    sp = _styles(tensor_parallel_plan(_llm(), 2, sequence_parallel=True, loss_parallel=True))
    assert sp["layers.0.attention_norm"] == sp["norm"] == "SequenceParallel"
    assert sp["layers.0.attention"] == "PrepareModuleInput"
    assert sp["layers.1.feed_forward"] == "_SequenceGathered"
    assert sp["tok_embeddings"] == "_SequenceShardedEmbedding" and sp["output"] == "_VocabParallelHead"
    flux = tensor_parallel_plan(_flux(), 2)
    assert repr(flux["double_blocks.0.img_attn.qkv"]) == "_FusedColwiseParallel(chunks=3)"
    assert repr(flux["single_blocks.0.linear1"]) == "_FusedColwiseParallel(chunks=5)"  # [q; k; v; mlp (2 D)]
    assert repr(flux["single_blocks.0.linear2"]) == "_FusedRowwiseParallel(chunks=3)"  # [attention; mlp]
    assert _styles(flux)["double_blocks.0.txt_mlp.2"] == "RowwiseParallel"
    assert not any("mod" in name or name.startswith(("img_in", "final_layer")) for name in flux)


@pytest.mark.parametrize(
    ("build", "kwargs", "match"),
    [
        (
            lambda: _llm(n_heads=6, n_kv_heads=3, head_dim=8),
            {},
            r"n_kv_heads=3 of module 'layers\.0\.attention' must be divisible by .* tp_size=2",
        ),
        (
            lambda: _llm(n_heads=3, n_kv_heads=1, head_dim=8),
            {},
            r"n_heads=3 of module 'layers\.0\.attention' must be divisible by the tensor-parallel degree tp_size=2",
        ),
        (
            lambda: _llm(vocab_size=23),
            {"loss_parallel": True},
            r"vocab_size=23 of module 'output' must be divisible by .* tp_size=2",
        ),
        (
            lambda: _llm(moe_args=MoEArgs(4, 2, interleave_moe_layer_step=2, hidden_dim=15)),
            {},
            r"hidden_dim=15 of module 'layers\.1\.feed_forward' must be divisible",
        ),
        (
            lambda: _flux(num_heads=1, axes_dim=[8, 12, 12]),
            {},
            r"num_heads=1 of module 'double_blocks\.0\.img_attn' must be divisible",
        ),
        (
            lambda: _flux(mlp_ratio=1.5),
            {},
            r"mlp_hidden_dim=48 of module 'single_blocks\.0' must be a multiple of hidden_size=32",
        ),
        (
            _flux,
            {"sequence_parallel": True},
            r"sequence_parallel=True supports .*LLM and .*HybridModel, got Flux",
        ),
        (
            _flux,
            {"loss_parallel": True},
            r"loss_parallel=True needs a language model with a known head .*, got Flux",
        ),
        (
            lambda: _hybrid(z_loss=1e-4),
            {"loss_parallel": True},
            r"loss_parallel=True does not support the hybrid's z_loss=0.0001",
        ),
        (
            lambda: MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=VOCAB)),
            {"loss_parallel": True},
            r"padded_vocab_size=24 to equal vocab_size=22",
        ),
        (_llm, {"loss_parallel": 1}, r"loss_parallel=1 must be a bool"),
    ],
)
def test_plan_errors_name_the_module_value_and_rule(
    build: Callable[[], nn.Module], kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        tensor_parallel_plan(build(), 2, **kwargs)


def test_plan_has_one_attention_entry_for_every_attention() -> None:
    # vermeil.nn.Attention and anything built on it (the LLM's Meta-named attention, a user's subclass) get
    # the same entries, with a learnable qk norm's scales as partial-gradient replicas.
    from vermeil.nn.attention import Attention
    from vermeil.nn.norms import QKNorm

    class MyAttention(Attention):
        pass

    for module in (
        Attention(32, 4, 2, qk_norm="rms", window=3),
        MyAttention(32, 4, 2, chunk=5),
        _llm().layers[0].attention,
        Attention(32, 4, 2, qk_norm=QKNorm(8, learnable=False)),
    ):
        plan = _styles(tensor_parallel_plan(module, 2))
        assert {k: v for k, v in plan.items() if k in ("wq", "wk", "wv", "wo")} == {
            "wq": "ColwiseParallel",
            "wk": "ColwiseParallel",
            "wv": "ColwiseParallel",
            "wo": "RowwiseParallel",
        }
        learnable = getattr(getattr(module.qk_norm, "query_norm", None), "scale", None) is not None
        assert ("qk_norm.query_norm" in plan) == learnable


def test_plan_rejects_llm_kv_cache() -> None:
    model = _llm()
    model.setup_cache(1, 8)
    with pytest.raises(
        ValueError, match=r"module 'layers\.0\.attention' has a KV cache: tensor-parallel decoding"
    ):
        tensor_parallel_plan(model, 2)
    model.delete_cache()
    assert tensor_parallel_plan(model, 2)


def test_sequence_and_loss_parallel_config_is_checked() -> None:
    assert DistributedConfig("tp", sequence_parallel=True, loss_parallel=True).loss_parallel
    with pytest.raises(
        ValueError, match=r"sequence_parallel=true needs strategy 'tp' or 'fsdp2\+tp', got strategy='fsdp2'"
    ):
        DistributedConfig("fsdp2", sequence_parallel=True)
    with pytest.raises(ValueError, match=r"loss_parallel='yes' must be a bool"):
        DistributedConfig("tp", loss_parallel="yes")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"loss_parallel=True needs strategy 'tp' or 'fsdp2\+tp', got strategy='ddp'"
    ):
        parallelize(_llm(), "ddp", loss_parallel=True)


def test_sequence_parallel_styles_come_from_the_model_by_name() -> None:
    # The models describe their sequence-parallel layout with plain style names (vermeil.models.contract);
    # this file maps each name to one ParallelStyle, and a name it does not know is refused with the list.
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel

    from vermeil.distributed.tensor_parallel import _SequenceGathered

    model = _llm()
    described = model.sequence_parallel_plan()
    plan = tensor_parallel_plan(model, 2, sequence_parallel=True)
    expected = {
        "local": SequenceParallel,
        "gather": PrepareModuleInput,
        "row_scatter": RowwiseParallel,
        "whole": _SequenceGathered,
    }
    for name, style in described.items():
        assert isinstance(plan[name], expected[style.partition(":")[0]]), (name, style)
    assert plan["layers.1.feed_forward"].output_field == "out"  # "whole:out": MoEOutput.out cut back

    class Odd(nn.Module):
        def sequence_parallel_plan(self) -> dict[str, str]:
            return {"x": "scatter_everything"}

    with pytest.raises(ValueError, match=r"entry 'x' has style 'scatter_everything'; the styles are 'local'"):
        tensor_parallel_plan(Odd(), 2, sequence_parallel=True)
