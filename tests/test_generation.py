import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from vermeil.generation import generate, logits_to_probs, sample


class Bigram(nn.Module):
    """Next token depends on the current token only; records the positions it is called with."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))
        self.calls: list[tuple[int, list[int]]] = []
        self.cache_len: int | None = None

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        self.cache_len = max_seq_len

    def reset_cache(self) -> None:
        self.cache_len = None

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        assert self.cache_len is not None, "generate must set up the cache first"
        self.calls.append((tokens.shape[1], input_pos.tolist()))
        return self.table[tokens]


class RunningSum(nn.Module):
    """A stateful model with a real cache: the next token is a function of the sum of all tokens so far."""

    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.randn(vocab) * 0.1)
        self.state: Tensor | None = None

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        self.state = torch.zeros(batch_size, dtype=torch.long)

    def reset_cache(self) -> None:
        self.state = None

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        offset = 0 if self.state is None else self.state[:, None]
        sums = tokens.cumsum(1) + offset
        if self.state is not None:
            self.state = sums[:, -1]
        return torch.nn.functional.one_hot((sums * 7 + 3) % self.vocab, self.vocab).float() * 5 + self.bias


def test_greedy_follows_the_argmax_chain_and_positions():
    model = Bigram()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, 5)
    assert out.shape == (2, 5)
    full = torch.cat([prompt, out], 1)
    for t in range(3, 8):
        assert torch.equal(full[:, t], model.table[full[:, t - 1]].argmax(-1))
    assert model.calls[0] == (3, [0, 1, 2])
    assert [c[1] for c in model.calls[1:]] == [[3], [4], [5], [6]]
    assert model.cache_len is None  # reset afterwards


def test_ragged_prompts_equal_each_prompt_alone():
    model = RunningSum()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    together = generate(model, prompts, 6)
    assert together.shape == (3, 6)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 6)
        assert torch.equal(together[row], alone[0]), (row, together[row], alone[0])
    # and the cached decode equals recomputing the whole sequence without a cache
    seq = torch.tensor([prompts[1]])
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq[0, 1:], together[1])


def test_stop_tokens_pad_finished_rows_and_end_early():
    model = Bigram(5)
    with torch.no_grad():
        model.table.zero_()
        model.table[1, 4] = 10  # 1 -> 4 (stop)
        model.table[2, 3] = 10  # 2 -> 3 -> 3 ...
        model.table[3, 3] = 10
    out = generate(model, torch.tensor([[1], [2]]), 6, stop_tokens=[4], pad_token=0)
    assert out.tolist() == [[4, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]]
    both_stop = generate(model, torch.tensor([[1], [1]]), 6, stop_tokens=[4])
    assert both_stop.tolist() == [[4], [4]]


def test_top_k_and_top_p_truncate():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert_close(logits_to_probs(logits, top_k=2)[0, 2:], torch.zeros(2))
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = logits_to_probs(logits, top_p=0.8)[0]
    assert (kept > 0).tolist() == [True, True, False, False]
    assert_close(kept[:2], probs[:2] / probs[:2].sum())
    assert (logits_to_probs(logits, top_p=0.1)[0] > 0).tolist() == [True, False, False, False]


def test_sampling_draws_from_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0]).log_softmax(-1).expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, generator=gen)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert_close(freq, torch.tensor([0.0, 1.0, 2.0]).softmax(-1), atol=0.015, rtol=0)


def test_sampling_is_reproducible_with_a_generator():
    model = Bigram()
    a = generate(model, torch.tensor([[1]]), 8, temperature=1.0, seed=3)
    b = generate(model, torch.tensor([[1]]), 8, temperature=1.0, seed=3)
    c = generate(model, torch.tensor([[1]]), 8, temperature=1.0, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments():
    model = Bigram()
    with pytest.raises(ValueError, match="temperature=-1 must be >= 0"):
        generate(model, torch.tensor([[1]]), 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        generate(model, torch.tensor([[1]]), 2, top_p=0)
    with pytest.raises(ValueError, match=r"prompt_tokens must have shape \(batch, seq\)"):
        generate(model, torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="non-empty token lists"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="max_seq_len=3 must be >= longest prompt"):
        generate(model, torch.tensor([[1, 2]]), 2, max_seq_len=3)


# ---- compiled decoding (generate(compile=True), decode_backend) ----


@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decode_backend_linear_matches_eager(rows: int, dtype: torch.dtype) -> None:
    from vermeil.generation import decode_backend

    torch._dynamo.reset()
    weight, x = torch.randn(96, 40, dtype=dtype), torch.randn(rows, 40, dtype=dtype)
    compiled = torch.compile(nn.functional.linear, backend=decode_backend, fullgraph=True, dynamic=False)
    tol = {
        torch.float64: dict(atol=1e-12, rtol=1e-12),
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    }[dtype]
    assert_close(compiled(x, weight), nn.functional.linear(x, weight), **tol)


def _decode_models() -> dict[str, nn.Module]:
    from vermeil.models import hybrid, llm, mamba

    return {
        # debug: GQA, qk norm, NoPE layers, chunked attention with its ring cache, MoE layers
        "llm": llm.LLM(llm.ModelArgs(**llm.PRESETS["debug"])),
        "mamba": mamba.MambaLM(mamba.MambaConfig(d_model=32, n_layer=2, vocab_size=64)),
        "hybrid": hybrid.HybridModel(hybrid.HybridConfig(**hybrid.PRESETS["debug"], routing="parallel")),
    }


@pytest.mark.parametrize("name", ["llm", "mamba", "hybrid"])
def test_compiled_decoding_returns_the_eager_tokens(name: str) -> None:
    torch.manual_seed(0)
    model = _decode_models()[name]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]  # ragged: teacher forcing runs through the compiled step
    eager = generate(model, prompts, 12)
    assert torch.equal(generate(model, prompts, 12, compile=True), eager)
    # the cache is rebuilt by the next call; the compiled step keeps working on the new buffers
    assert torch.equal(generate(model, prompts, 12, compile=True), eager)


# ---- the static-buffer decode loop (generate's CUDA-graph path, everything but the capture) ----


def _ragged_prompts() -> list[list[int]]:
    return [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]


def _static(model: nn.Module, prompts, n: int, **kw) -> Tensor:
    """generate's loop through StaticDecodeStep without a capture, reading "all stopped" every 3 steps."""
    from vermeil.generation import _generate

    return _generate(model, prompts, n, static=True, capture=False, stop_check_every=3, **kw)


@pytest.mark.parametrize("name", ["llm", "mamba", "hybrid"])
def test_static_decode_loop_returns_the_eager_tokens(name: str) -> None:
    torch.manual_seed(0)
    model = _decode_models()[name]
    prompts = _ragged_prompts()
    eager = generate(model, prompts, 12, cuda_graph=False)
    assert torch.equal(_static(model, prompts, 12), eager)
    # stop tokens: each row stops at a token it generates; rows that stop first run on as padding until
    # the loop's next read of "all stopped"
    stops = [int(eager[0, 3]), int(eager[1, 5])]
    eager_stop = generate(model, prompts, 12, stop_tokens=stops, cuda_graph=False)
    assert torch.isin(eager_stop[0], torch.tensor(stops)).any()
    assert torch.equal(_static(model, prompts, 12, stop_tokens=stops), eager_stop)


def test_static_decode_loop_samples_as_eager() -> None:
    torch.manual_seed(0)
    model = _decode_models()["mamba"]
    prompts = _ragged_prompts()
    for kw in (dict(temperature=0.8), dict(temperature=1.0, top_k=5), dict(temperature=1.2, top_p=0.9)):
        eager = generate(model, prompts, 10, seed=7, cuda_graph=False, **kw)
        assert torch.equal(_static(model, prompts, 10, seed=7, **kw), eager), kw


def test_static_decode_step_reuses_its_buffers() -> None:
    from vermeil.generation import StaticDecodeStep, decode_one_token

    torch.manual_seed(0)
    model = _decode_models()["mamba"].eval()
    model.setup_cache(2, 8)
    step = StaticDecodeStep(model, 2, torch.device("cpu"))
    token_ptr, pos_ptr = step.token.data_ptr(), step.input_pos.data_ptr()
    prompt = torch.tensor([[3, 4], [5, 6]])
    model(prompt, input_pos=torch.arange(2))
    ours = [step(torch.tensor([7, 8]), 2), step(torch.tensor([9, 1]), 3)]
    assert (step.token.data_ptr(), step.input_pos.data_ptr()) == (token_ptr, pos_ptr)
    assert step.input_pos.tolist() == [3] and step.token.tolist() == [[9], [1]]
    model.reset_cache()
    model(prompt, input_pos=torch.arange(2))
    ref = [
        decode_one_token(model, torch.tensor([[7], [8]]), torch.tensor([2])),
        decode_one_token(model, torch.tensor([[9], [1]]), torch.tensor([3])),
    ]
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    model.delete_cache()


def test_cuda_graph_needs_cuda() -> None:
    from vermeil.generation import StaticDecodeStep

    model = _decode_models()["mamba"]
    if next(model.parameters()).is_cuda:  # pragma: no cover - the test models are built on the CPU
        pytest.skip("model on CUDA")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        generate(model, [[1, 2]], 3, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph='yes' must be True, False or None"):
        generate(model, [[1, 2]], 3, cuda_graph="yes")
    with pytest.raises(ValueError, match="capture=True needs a CUDA device"):
        StaticDecodeStep(model, 1, torch.device("cpu"), capture=True)
    # None means off on the CPU: the eager reference runs
    assert generate(model, [[1, 2]], 3).shape == (1, 3)


def test_tracing_sees_compile_and_cuda_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    # The public predicate that replaced setting torch's private `_is_compiling_flag` around a capture: the
    # models' value checks (host reads) skip themselves under torch.compile and during a CUDA graph capture.
    from vermeil.models import checks

    assert not checks.tracing()
    seen = torch.compile(lambda x: x + int(checks.tracing()), fullgraph=True, backend="eager")(
        torch.zeros(())
    )
    assert seen.item() == 1
    traced = torch.jit.trace(lambda x: x + int(checks.tracing()), torch.zeros(()))
    assert traced(torch.zeros(())).item() == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert checks.tracing()
    checks.check_tokens(
        torch.tensor([[10**6]]), vocab_size=8
    )  # out of vocab, but no host read while capturing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match="token id 1000000 is outside the vocabulary"):
        checks.check_tokens(torch.tensor([[10**6]]), vocab_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["llm", "mamba", "hybrid"])
def test_cuda_graph_decoding_returns_the_eager_tokens(name: str) -> None:  # pragma: no cover - CUDA only
    torch.manual_seed(0)
    model = _decode_models()[name].cuda()
    prompts = _ragged_prompts()
    eager = generate(model, prompts, 12, cuda_graph=False)
    assert torch.equal(generate(model, prompts, 12, cuda_graph=True), eager)
    stops = [int(eager[0, 3]), int(eager[1, 5])]
    eager_stop = generate(model, prompts, 12, stop_tokens=stops, cuda_graph=False)
    assert torch.equal(generate(model, prompts, 12, stop_tokens=stops), eager_stop)
    # sampling runs outside the graph on the replayed logits: the same draws from the same seed
    kw = dict(temperature=0.8, top_k=20, top_p=0.95, seed=3)
    assert torch.equal(
        generate(model, prompts, 12, **kw), generate(model, prompts, 12, cuda_graph=False, **kw)
    )


def test_compile_rounds_the_default_cache_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step is specialised to the cache shape: calls with other prompt lengths share a rounded one."""
    import vermeil.generation as gen

    monkeypatch.setattr(gen, "compiled_decode_one_token", lambda device_type="cpu": gen.decode_one_token)
    model = Bigram()
    lengths: list[int] = []
    setup = model.setup_cache
    model.setup_cache = lambda b, n, **kw: (lengths.append(n), setup(b, n, **kw))  # type: ignore[method-assign]
    plain = generate(model, [[1, 2, 3]], 5)
    assert torch.equal(generate(model, [[1, 2, 3]], 5, compile=True), plain)
    generate(model, [[1, 2, 3, 4, 5, 6]], 5, compile=True)
    generate(model, [[1, 2, 3]], 5, compile=True, max_seq_len=20)
    assert lengths == [8, 256, 256, 20]


def test_a_pad_token_outside_the_vocabulary_only_fills_the_output() -> None:
    # pad_token=-1 marks the slots after a stop in the output; the stopped rows that run on must still feed
    # the model ids it accepts (the LLM checks every id), in the eager and the static loop alike
    torch.manual_seed(0)
    model = _decode_models()["llm"]
    prompts = [[1, 2], [3, 4, 5]]
    free = generate(model, prompts, 6)
    stop = int(free[0, 1])
    fed: list[list[int]] = []
    out = generate(
        model, prompts, 6, stop_tokens=[stop], pad_token=-1, callback=lambda p, t: fed.append(t.tolist())
    )
    row0 = free[0, : int((free[0] == stop).nonzero()[0]) + 1].tolist()
    assert out[0].tolist() == row0 + [-1] * (6 - len(row0))
    assert any(-1 in t for t in fed)  # the callback still shows the stopped rows as pads
    assert torch.equal(_static(model, prompts, 6, stop_tokens=[stop], pad_token=-1), out)
    assert torch.equal(out[out != -1], free[out != -1])


def test_a_failed_cache_setup_leaves_no_cache_and_restores_training_mode(monkeypatch) -> None:
    # setup_cache running out of memory half way (here: at the last layer) used to leave the model in eval
    # mode, holding the caches of the layers before
    torch.manual_seed(0)
    model = _decode_models()["llm"].train()
    last = model.layers[-1].attention

    def out_of_memory(*args, **kwargs) -> None:
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(last, "setup_cache", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, [[1, 2]], 3)
    assert model.training
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    assert model.cache_max_seq_len is None


def test_pad_token_and_max_seq_len_are_checked() -> None:
    model = Bigram()
    with pytest.raises(TypeError, match="pad_token=1.5 must be an int"):
        generate(model, [[1, 2], [3]], 2, pad_token=1.5)  # used to become pad 1 silently
    with pytest.raises(ValueError, match="max_seq_len=64.0 must be a positive int"):
        generate(model, [[1, 2]], 2, max_seq_len=64.0)
