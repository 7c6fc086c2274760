"""Token generation for any model with a static cache: greedy, temperature, top-k, top-p, stop tokens, batches.

Any language model of `vermeil.models.contract` works. Prefill runs the prompt in one forward, then one token
per step, so `prefill` and `decode_one_token` compile on their own (gpt-fast `generate.py`).

A decode step is nothing but GEMVs. On the CPU, `decode_backend` lowers them to vectorised reductions (MKL's
float32 GEMV streams weights at under half the bandwidth a reduction over contiguous weight rows reaches; see
`bench/llm.py`). On CUDA a step is launch-bound instead: it is captured once as a CUDA graph and replayed.

Axis legend: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vermeil.models.contract import split_output
from vermeil.nn.checks import check_optional_positive_int, check_positive_ints

# Matrix products with at most this many rows (a decode step has B) are lowered to reductions.
_GEMV_MAX_ROWS = 8


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 and finite (0 means greedy)")
    check_optional_positive_int("top_k", top_k)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def logits_to_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Last-position logits (B, V) -> float32 sampling probabilities (B, V). Top-k keeps the k largest logits;
    top-p keeps the smallest set of tokens whose mass reaches `top_p` (at least the most likely one)."""
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from logits (B, V) -> (B,) long; temperature=0 is greedy. `argmax(p / E)`,
    E ~ Exp(1), draws from `p` without `torch.multinomial`'s host sync (gpt-fast's no_sync sampler)."""
    if temperature == 0:
        _check_sampling(temperature, top_k, top_p)
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)


@torch.no_grad()
def prefill(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """Run the prompt tokens (B, T) at positions (T,) through the model and return last logits (B, V)."""
    return split_output(model(tokens, input_pos=input_pos))[0][:, -1]


@torch.no_grad()
def decode_one_token(model: nn.Module, token: Tensor, input_pos: Tensor) -> Tensor:
    """Run one token (B, 1) at position (1,) and return its logits (B, V)."""
    return split_output(model(token, input_pos=input_pos))[0][:, -1]


def _mm_as_reduction(a: Tensor, b: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """aten.mm (M, K) @ (K, N) for small M on the CPU as a broadcast multiply and a sum over K, which Inductor
    fuses into one loop per output over a contiguous weight row. Accumulates in at least float32."""
    if a.device.type != "cpu" or out_dtype is not None or a.shape[0] > _GEMV_MAX_ROWS:
        return NotImplemented
    acc = torch.promote_types(a.dtype, torch.float32)
    return (a.unsqueeze(-1) * b.unsqueeze(0)).sum(1, dtype=acc).to(a.dtype)


def decode_backend(graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
    """A `torch.compile` backend for decode steps: Inductor plus `_mm_as_reduction` for aten.mm (plain
    Inductor where its internal entry points moved)."""
    try:
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
    except ImportError:  # pragma: no cover - depends on the torch version
        from torch._inductor import compile as compile_fx

        return compile_fx(graph, example_inputs)
    decompositions = {**select_decomp_table(), torch.ops.aten.mm.default: _mm_as_reduction}
    return compile_fx(graph, example_inputs, decompositions=decompositions)


@functools.cache
def compiled_decode_one_token(device_type: str = "cpu") -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """`decode_one_token` compiled once per process and device type (`decode_backend` on the CPU); the position
    is a tensor, so decoding never recompiles as it advances."""
    backend: str | Callable[..., Any] = decode_backend if device_type == "cpu" else "inductor"
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, backend=backend)


class StaticDecodeStep:
    """`decode_one_token` over static (B, 1) token and (1,) position buffers written in place, so that every
    step runs on the same tensors (as the model's static caches do) and can be captured as a CUDA graph.

    With `capture=True` the constructor runs `warmup_steps` eager steps on a side stream and records one step;
    a call is then two small copies and a replay, with no host synchronisation. Without it the same step
    runs eagerly (the loop is tested where graphs do not exist). Construct it after `model.setup_cache`; the
    warm-up and capture write the cache, so call `model.reset_cache()` before the prefill (`generate` does).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        device: torch.device,
        *,
        compile: bool = False,
        capture: bool = False,
        warmup_steps: int = 2,
    ) -> None:
        device = torch.device(device)
        if capture and device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA device (CUDA graphs), got device={device}")
        self.model = model
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        self._fn = compiled_decode_one_token(device.type) if compile else decode_one_token
        self.graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None  # the graph's output buffer (B, V)
        if capture:
            self._capture(warmup_steps)

    def _capture(self, warmup_steps: int) -> None:
        # Warm up on a side stream, as torch.cuda.graphs' docs ask (lazy initialisation stays out of the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup_steps, 1)):
                self._fn(self.model, self.token, self.input_pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # The models skip their value checks (host reads) under capture; the warm-up steps ran them.
        with torch.cuda.graph(graph):
            self._logits = self._fn(self.model, self.token, self.input_pos)
        self.graph = graph

    def __call__(self, token: Tensor, pos: int) -> Tensor:
        """Run one step: token (B,) at position `pos` -> logits (B, V) (a fresh tensor)."""
        self.token.copy_(token.view(-1, 1))
        self.input_pos.fill_(pos)  # a kernel with the value as its argument: no host-to-device copy
        if self.graph is None:
            return self._fn(self.model, self.token, self.input_pos)
        self.graph.replay()
        return self._logits.clone()  # type: ignore[union-attr]


def _as_padded_prompts(
    prompt_tokens: Tensor | Sequence[Sequence[int]], pad_token: int
) -> tuple[Tensor, Tensor]:
    """A (B, T) tensor or a list of token lists -> padded prompts (B, T_max) and lengths (B,)."""
    if isinstance(prompt_tokens, Tensor):
        if prompt_tokens.dim() != 2 or prompt_tokens.shape[0] == 0 or prompt_tokens.shape[1] == 0:
            raise ValueError(
                "prompt_tokens must have shape (batch, seq) with batch >= 1 and seq >= 1, got "
                f"{tuple(prompt_tokens.shape)}"
            )
        dtype = prompt_tokens.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(
                f"prompt_tokens must hold integer token ids, got dtype={dtype} (rounding ids silently would "
                "generate from a different prompt)"
            )
        batch, length = prompt_tokens.shape
        return prompt_tokens.long(), torch.full((batch,), length, device=prompt_tokens.device)
    prompts = [list(p) for p in prompt_tokens]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_tokens must be a non-empty list of non-empty token lists")
    for row, p in enumerate(prompts):
        for t in p:
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise TypeError(f"prompt_tokens[{row}] holds {t!r}: token ids must be ints")
    longest = max(len(p) for p in prompts)
    padded = torch.tensor([p + [pad_token] * (longest - len(p)) for p in prompts], dtype=torch.long)
    return padded, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def _check_stop_tokens(stop_tokens: Sequence[int], model: nn.Module) -> list[int]:
    """The stop tokens as ids in [0, vocab_size): an id the model never emits would never stop a row."""
    tokens = list(stop_tokens)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for t in tokens:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise TypeError(f"stop_tokens holds {t!r}: stop tokens must be int token ids")
        if t < 0 or (isinstance(vocab, int) and t >= vocab):
            limit = f"[0, vocab_size={vocab})" if isinstance(vocab, int) else "[0, vocab_size)"
            raise ValueError(f"stop_tokens holds {t}, outside the vocabulary {limit}")
    return [int(t) for t in tokens]


def _model_device(model: nn.Module, prompts: object) -> torch.device:
    """The device of the model's parameters (of the prompts, or the CPU, for a model without any)."""
    param = next(iter(model.parameters()), None)
    if param is not None:
        return param.device
    return prompts.device if isinstance(prompts, Tensor) else torch.device("cpu")


def _eager_step(model: nn.Module, device: torch.device, compile: bool) -> Callable[[Tensor, int], Tensor]:
    """The reference decode step: fresh (B, 1) token and (1,) position tensors every call."""
    step = compiled_decode_one_token(device.type) if compile else decode_one_token

    def decode(token: Tensor, pos: int) -> Tensor:
        return step(model, token[:, None], torch.tensor([pos], device=device))

    return decode


_COMPILED_CACHE_MULTIPLE = 256  # with compile=True the default cache length is a multiple of this
# Steps between host reads of "every row has stopped" (a sync on an accelerator); stopped rows run on.
_STOP_CHECK_EVERY = 8


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_tokens: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    *,
    pad_token: int = 0,
    max_seq_len: int | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens after each prompt -> (B, n) long, n <= N (n < N only when every
    row stopped early); the stop token is included, later slots hold `pad_token`.

    Prompts of different lengths share one static cache and one position per step, with no padding inside
    the model: the common prefix is prefilled at once, then each row is fed its own prompt tokens until they
    run out and its sampled tokens after that, so every row sees exactly what it would see alone.

    Args:
        prompt_tokens: (B, T) long, or a list of B token lists of any lengths.
        max_new_tokens: N.
        temperature: 0 is greedy; top_k, top_p: see `logits_to_probs`.
        max_seq_len: cache length; default the longest prompt + N (with `compile`, rounded up to a multiple of
            256 so that other prompt lengths reuse the compiled step; torch gives up after 8 shapes).
        callback: `callback(position, tokens)` with the (B,) tokens of each decode step (`pad_token` for
            the rows that have finished).
        compile: decode through `compiled_decode_one_token` (on the CPU the first call per model and batch
            size compiles for about 10 s, and float32 logits differ from eager in the last bits).
        cuda_graph: capture the decode step as a CUDA graph and replay it per token (`StaticDecodeStep`), with
            sampling and stop bookkeeping on the device and a host read every 8 steps. None: on when the
            model is on a CUDA device; True elsewhere raises; False keeps the eager reference step.
    """
    device = _model_device(model, prompt_tokens)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph={cuda_graph!r} must be True, False or None")
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the model on a CUDA device (CUDA graphs), but its parameters are on "
            f"{device}; use cuda_graph=None or False"
        )
    graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    return _generate(
        model,
        prompt_tokens,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        seed,
        pad_token=pad_token,
        max_seq_len=max_seq_len,
        callback=callback,
        compile=compile,
        static=graph,
        capture=graph,
        stop_check_every=_STOP_CHECK_EVERY if graph else 1,
    )


@torch.no_grad()
def _generate(
    model: nn.Module,
    prompt_tokens: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    *,
    pad_token: int = 0,
    max_seq_len: int | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    compile: bool = False,
    static: bool,
    capture: bool,
    stop_check_every: int,
) -> Tensor:
    """`generate`'s loop. `static`: decode through a `StaticDecodeStep` (captured when `capture`), else the
    eager step with fresh inputs; `stop_check_every`: steps between host reads of "every row has stopped"."""
    check_positive_ints(max_new_tokens=max_new_tokens, stop_check_every=stop_check_every)
    check_optional_positive_int("max_seq_len", max_seq_len)
    if isinstance(pad_token, bool) or not hasattr(pad_token, "__index__"):
        raise TypeError(f"pad_token={pad_token!r} must be an int (the id that fills empty output slots)")
    _check_sampling(temperature, top_k, top_p)
    prompts, lengths = _as_padded_prompts(prompt_tokens, pad_token)
    device = _model_device(model, prompts)
    prompts, lengths = prompts.to(device), lengths.to(device)
    batch, longest = prompts.shape
    shortest = int(lengths.min())
    total = longest + max_new_tokens
    if max_seq_len is None:
        max_seq_len = -(-total // _COMPILED_CACHE_MULTIPLE) * _COMPILED_CACHE_MULTIPLE if compile else total
    if max_seq_len < total:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= longest prompt + max_new_tokens = {total}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(_check_stop_tokens(stop_tokens, model), dtype=torch.long, device=device)

    new_tokens = torch.full((batch, max_new_tokens), pad_token, dtype=torch.long, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)  # tokens generated per row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        model.setup_cache(batch, max_seq_len, device=device)  # inside: a failure half way frees what it built
        if static:
            decode: Callable[[Tensor, int], Tensor] = StaticDecodeStep(
                model, batch, device, compile=compile, capture=capture
            )
            if capture:
                model.reset_cache()  # the warm-up and capture steps wrote the cache
        else:
            decode = _eager_step(model, device, compile)
        logits = prefill(model, prompts[:, :shortest], torch.arange(shortest, device=device))
        for i, pos in enumerate(range(shortest, total)):
            sampled = sample(logits, temperature, top_k, top_p, generator)
            in_prompt = pos < lengths
            forced = prompts[:, min(pos, longest - 1)]
            token = torch.where(in_prompt, forced, sampled)
            # Rows past their prompt record what they sampled, until they have N tokens or stopped.
            record = ~in_prompt & ~done & (counts < max_new_tokens)
            slot = counts.clamp(max=max_new_tokens - 1)[:, None]
            kept = new_tokens.gather(1, slot)[:, 0]
            new_tokens.scatter_(1, slot, torch.where(record, sampled, kept)[:, None])
            counts = counts + record.long()
            if stops.numel():
                done = done | (record & torch.isin(sampled, stops))
            finished = done | (counts >= max_new_tokens)
            if pos == total - 1:
                break
            # Without stop tokens only the last position finishes every row: no read back needed.
            if stops.numel() and (i + 1) % stop_check_every == 0 and bool(finished.all()):
                break
            if callback is not None:
                callback(pos, torch.where(finished, torch.full_like(token, pad_token), token))
            # A finished row runs on with its own sampled token, whose logits are never read: pad_token may
            # lie outside the vocabulary (-1 marking the output's empty slots).
            logits = decode(token, pos)
    finally:
        # Free the cache when the model can, else clear it.
        getattr(model, "delete_cache", model.reset_cache)()
        model.train(was_training)
    return new_tokens[:, : int(counts.max())]
