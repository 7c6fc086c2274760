"""Tests for regional compilation (vermeil/train/regional.py) and the trainer's `train.compile` and
`train.loss_chunk_size`: which blocks are compiled on each model, one graph shared by identical blocks, compiled
training equal to eager training, the one-line fallback when compiling fails, and the chunked loss in the loop.

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from vermeil.config import ConfigError, from_dict
from vermeil.data import WindowSampler
from vermeil.models import flux, hybrid, llm, mamba
from vermeil.train import TrainConfig, Trainer, causal_lm_loss, regional
from vermeil.train.losses import lm_loss_fn
from vermeil.train.regional import (
    compile_blocks,
    compiled_calls,
    is_compiled,
    repeated_blocks,
    resolve_compile,
    uncompile_blocks,
)

VOCAB = 64


def _llm(n_layers: int = 3) -> llm.LLM:
    """Identical dense layers (no MoE, no NoPE layer): one block kind."""
    torch.manual_seed(0)
    args = llm.ModelArgs(
        dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=32
    )
    return llm.LLM(args)


def _hybrid() -> hybrid.HybridModel:
    torch.manual_seed(0)
    return hybrid.build("debug", vocab_size=VOCAB)


def _fit(model: nn.Module, loss_fn=causal_lm_loss, eval_fn=None, **kw: object) -> tuple[Trainer, list[float]]:
    data = torch.randint(0, VOCAB, (500,), generator=torch.Generator().manual_seed(1))
    base: dict[str, object] = dict(
        steps=4,
        lr=1e-2,
        warmup=1,
        batch_size=2,
        seq_len=12,
        log_every=1,
        eval_every=0,
        progress=False,
        plot=False,
    )
    base.update(kw)
    trainer = Trainer(
        model, WindowSampler(data, 2, 12, seed=3), loss_fn, TrainConfig(**base), eval_fn=eval_fn
    )  # type: ignore[arg-type]
    result = trainer.fit()
    return trainer, [r["loss"] for r in result.history if r["split"] == "train"]


class Flat(nn.Module):
    """Embedding -> head, no blocks; the head under the attribute name `head`."""

    def __init__(self, head: str = "lm_head") -> None:
        super().__init__()
        self.emb, self.head_name = nn.Embedding(VOCAB, 8), head
        setattr(self, head, nn.Linear(8, VOCAB))

    def forward(self, tokens: Tensor) -> Tensor:
        return getattr(self, self.head_name)(self.emb(tokens))


def test_resolve_compile() -> None:
    assert resolve_compile("auto", "cpu") is False
    assert resolve_compile("auto", "cuda") is True
    assert resolve_compile("auto", "cuda", world_size=2) is False
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False
    with pytest.raises(ValueError, match="compile='yes' must be true, false or 'auto'"):
        resolve_compile("yes", "cpu")


def test_train_config_compile_and_loss_chunk_size() -> None:
    assert TrainConfig().compile == "auto" and TrainConfig().loss_chunk_size == "auto"
    assert from_dict(TrainConfig, {"compile": True}).compile is True  # a YAML boolean
    assert from_dict(TrainConfig, {"compile": False, "loss_chunk_size": 0}).compile is False
    with pytest.raises(ConfigError, match="compile='fast'"):
        from_dict(TrainConfig, {"compile": "fast"})
    with pytest.raises(ValueError, match="compile='yes' must be true, false or 'auto'"):
        TrainConfig(compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_chunk_size=-1 must be 'auto' or an int >= 0"):
        TrainConfig(loss_chunk_size=-1)


def test_repeated_blocks_of_each_model() -> None:
    torch.manual_seed(0)
    names = [n for n, _ in repeated_blocks(llm.build("debug"))]
    assert names == [f"layers.{i}" for i in range(4)]  # the MoE experts inside stay in their block's graph
    mamba_lm = mamba.MambaLM(mamba.config_from_preset("debug"))
    assert [n for n, _ in repeated_blocks(mamba_lm)] == [f"backbone.layers.{i}" for i in range(3)]
    assert [n for n, _ in repeated_blocks(_hybrid())] == [f"layers.{i}" for i in range(4)]
    f = flux.build_flux("debug")
    assert [n for n, _ in repeated_blocks(f)] == ["double_blocks.0", "single_blocks.0", "single_blocks.1"]

    class Declared(nn.Module):  # diffusers' convention: the class names to compile
        _repeated_blocks = ("Linear",)

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU())

    assert [n for n, _ in repeated_blocks(Declared())] == ["a", "b.0"]


def test_identical_blocks_share_one_graph() -> None:
    """Three identical layers compile one graph (not three), the outputs equal eager, and uncompiling restores
    the plain forward; the weights' names never change."""
    from torch._dynamo.utils import counters

    model = _llm(n_layers=3)
    keys = list(model.state_dict())
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    eager = model(x).logits
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, backend="aot_eager") == ["layers.0", "layers.1", "layers.2"]
    assert compile_blocks(model, backend="aot_eager") == []  # already compiled: nothing twice
    compiled = model(x).logits
    compiled.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, eager)
    assert list(model.state_dict()) == keys
    assert uncompile_blocks(model) == 3
    assert all("forward" not in layer.__dict__ for layer in model.layers)
    torch._dynamo.reset()


def test_trainer_compile_llm_equals_eager() -> None:
    """train.compile=true (Inductor, the default backend) on a tiny LLM: the same losses as eager."""
    _, eager = _fit(_llm(), compile=False)
    torch._dynamo.reset()
    trainer, compiled = _fit(_llm(), compile=True)
    assert trainer.compiled_blocks == ["layers.0", "layers.1", "layers.2"]
    assert not is_compiled(trainer.model)  # compiled for the fit only: the model leaves it as it came in
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_trainer_compile_hybrid_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hybrid (Mamba + attention layers) compiled per layer trains like eager. aot_eager here: Dynamo and
    AOTAutograd trace what Inductor would get, without a C++ build per graph on a CPU test machine."""
    import vermeil.train.trainer as trainer_module

    monkeypatch.setattr(
        trainer_module, "compile_blocks", functools.partial(regional.compile_blocks, backend="aot_eager")
    )
    model = _hybrid()
    _, eager = _fit(_hybrid(), lm_loss_fn(model.config), compile=False)
    torch._dynamo.reset()
    trainer, compiled = _fit(model, lm_loss_fn(model.config), compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_mamba_blocks_run_compiled() -> None:
    torch.manual_seed(0)
    model = mamba.MambaLM(mamba.config_from_preset("debug"))
    x = torch.randint(0, 101, (2, 8))
    eager = model(x)
    compile_blocks(model, backend="aot_eager")
    torch.testing.assert_close(model(x), eager, rtol=1e-5, atol=1e-5)
    assert compiled_calls(model) == 3
    uncompile_blocks(model)
    torch._dynamo.reset()


def test_hybrid_blocks_run_compiled() -> None:
    model = _hybrid()
    compile_blocks(model, backend="aot_eager")
    model(torch.randint(0, VOCAB, (2, 8)))
    calls = compiled_calls(model)
    uncompile_blocks(model)
    torch._dynamo.reset()
    assert calls == 4


def test_blocks_called_around_their_forward_are_reported(capsys: pytest.CaptureFixture) -> None:
    """A model that calls its blocks by another path than block(...): after the first step one line says the
    compiled blocks never ran, they are uncompiled, and training goes on eagerly."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lm_head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens: Tensor) -> Tensor:
            h = self.emb(tokens)
            for layer in self.layers:
                h = h + torch.nn.functional.linear(h, layer.weight, layer.bias)  # not layer(h)
            return self.lm_head(h)

    trainer, losses = _fit(Bypass(), compile=True, steps=2)
    assert len(losses) == 2 and trainer.compiled_blocks == [] and not is_compiled(trainer.model)
    assert "train.compile: Bypass never called its compiled blocks (layers.0, ...)" in capsys.readouterr().err


def test_compile_failure_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A block whose compiled version fails: one line on stderr, and the run trains eagerly from the same
    step (same data, same RNG), so its losses equal an eager run's."""

    def broken_compile(fn, **kw):  # type: ignore[no-untyped-def]
        def run(*args: object, **kwargs: object) -> Tensor:
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")

        return run

    _, eager = _fit(_llm(), compile=False)
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", broken_compile)
    trainer, fallen = _fit(_llm(), compile=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train.compile")]
    assert lines == [
        "train.compile: the compiled blocks failed (RuntimeError: InductorError: no working C++ compiler); "
        "training continues eagerly (set train.compile=false to skip compiling)"
    ]
    assert trainer.compiled_blocks == []
    assert all("forward" not in layer.__dict__ for layer in trainer.model.layers)
    assert fallen == eager


def test_compile_failure_in_evaluation_falls_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Compiled blocks that train but fail under evaluation (no_grad): one line, and the evaluation reruns
    eagerly with the same result as an eager run's."""
    real_compile = torch.compile

    def eval_breaks(fn, **kw):  # type: ignore[no-untyped-def]
        compiled = real_compile(fn, **{**kw, "backend": "aot_eager"})

        def run(*args: object, **kwargs: object) -> object:
            if not torch.is_grad_enabled():
                raise RuntimeError("no graph for evaluation")
            return compiled(*args, **kwargs)

        return run

    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"val_loss": float(causal_lm_loss(m, (x, x.roll(-1, 1)))[0])}

    eager_trainer, eager = _fit(_llm(), eval_fn=eval_fn, compile=False, steps=2)
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", eval_breaks)
    trainer, losses = _fit(_llm(), eval_fn=eval_fn, compile=True, steps=2)
    assert "train.compile: the compiled blocks failed (RuntimeError: no graph for evaluation)" in (
        capsys.readouterr().err
    )
    torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-5)
    val = [r["val_loss"] for r in trainer.history if r["split"] == "val"]
    eager_val = [r["val_loss"] for r in eager_trainer.history if r["split"] == "val"]
    torch.testing.assert_close(val, eager_val, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_without_repeated_blocks_says_so(capsys: pytest.CaptureFixture) -> None:
    trainer, losses = _fit(Flat(), compile=True, steps=1)
    assert trainer.compiled_blocks == [] and len(losses) == 1
    assert "train.compile: Flat has no repeated blocks" in capsys.readouterr().err


def test_trainer_chunked_loss_equals_full_logits() -> None:
    full_trainer, full = _fit(_llm(), loss_chunk_size=0)
    chunked_trainer, chunked = _fit(_llm(), loss_chunk_size=8)
    assert not full_trainer.loss_chunked and chunked_trainer.loss_chunked
    assert chunked_trainer.loss_fn is not causal_lm_loss
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    auto_trainer, _ = _fit(_llm(), steps=1)  # "auto" on the CPU: full logits
    assert not auto_trainer.loss_chunked and auto_trainer.loss_fn is causal_lm_loss


def test_auto_chunked_loss_falls_back_to_full_logits(monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """`loss_chunk_size=auto` (chunking on CUDA) on a hybrid whose logits are scaled (Falcon-H1's lm_head_multiplier,
    in every converted Falcon-H1): the first step restarts with full logits instead of failing the run."""
    import vermeil.train.trainer as T

    def model() -> nn.Module:
        torch.manual_seed(0)
        return hybrid.build("debug", vocab_size=VOCAB, lm_head_multiplier=0.5)

    _, full = _fit(model(), lm_loss_fn(model().config), loss_chunk_size=0)
    monkeypatch.setattr(T, "_auto_chunks", lambda device, world_size: True)  # what CUDA gives
    trainer, auto = _fit(model(), lm_loss_fn(model().config))
    assert "transforms them; training continues with full logits" in capsys.readouterr().err
    assert not trainer.loss_chunked and auto == full
    with pytest.raises(RuntimeError, match="transforms them: set train.loss_chunk_size=0"):
        _fit(model(), lm_loss_fn(model().config), loss_chunk_size=8)  # an explicit size still refuses


def test_trainer_chunked_loss_refused_where_it_cannot_apply() -> None:
    with pytest.raises(
        ValueError, match=r"train.loss_chunk_size=8 .* named output or lm_head\): set it to 0"
    ):
        _fit(Flat(head="proj"), loss_chunk_size=8)
    with pytest.raises(ValueError, match="needs causal_lm_loss or a cross_entropy loss head"):
        _fit(_llm(), lambda m, b: m(b[0]).logits.mean(), loss_chunk_size=8)
