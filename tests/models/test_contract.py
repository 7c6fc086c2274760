"""One contract every language model passes (`vermeil.models.contract`): the LLM, MambaLM and both routings of
HybridModel; Flux for the parts every model shares (`.config`, `attention_layers()`).

- decoding one token at a time with the static cache equals the full forward, at every position;
- a save/load round trip (safetensors) gives identical logits;
- construction on the meta device, then `to_empty` + `init_weights`, gives a working model;
- `vermeil.generation.generate` with greedy decoding equals argmax decoding by full forwards;
- one config attribute, one `setup_cache` signature, `reset_cache` / `delete_cache`, one input check, one
  output convention (`split_output`), and the self-descriptions `vermeil info` and tensor parallelism read.
"""

import inspect
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from vermeil.generation import generate
from vermeil.models import llm, mamba
from vermeil.models.contract import SEQUENCE_PARALLEL_STYLES, LanguageModel, split_output
from vermeil.models.flux import build_flux
from vermeil.models.hybrid import HybridConfig, HybridModel

VOCAB = 61


def _hybrid(routing: str, merge: str = "sum") -> Callable[..., nn.Module]:
    def build(device=None) -> nn.Module:
        cfg = HybridConfig(
            dim=32,
            vocab_size=VOCAB,
            pattern="MAM",
            routing=routing,
            merge=merge,
            heads=4,
            kv_heads=2,
            d_state=5,
            max_seq_len=64,
        )
        return HybridModel(cfg, device=device)

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llm": lambda device=None: llm.build("debug", vocab_size=VOCAB, device=device),
    "mamba": lambda device=None: mamba.build("debug", vocab_size=VOCAB, device=device),
    "hybrid-sequential": _hybrid("sequential"),
    "hybrid-parallel-gate": _hybrid("parallel", "gate"),
}


def logits(model: nn.Module, tokens: Tensor, **kwargs) -> Tensor:
    return split_output(model(tokens, **kwargs))[0]


@pytest.fixture(params=sorted(BUILDERS))
def name(request) -> str:
    return request.param


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def test_decode_with_cache_matches_full_forward(name):
    model = build(name)
    tokens = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        full = logits(model, tokens)
        model.setup_cache(2, 16)
        prefill = logits(model, tokens[:, :4], input_pos=torch.arange(4))
        steps = [logits(model, tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(4, 11)]
    assert_close(torch.cat([prefill, *steps], 1), full, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(name, tmp_path):
    pytest.importorskip("safetensors")
    from vermeil.checkpoint import load_weights, save_weights

    model = build(name)
    save_weights(model, tmp_path / "model.safetensors")
    torch.manual_seed(123)
    fresh = BUILDERS[name]().eval()
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert not torch.allclose(logits(fresh, tokens), logits(model, tokens))
        load_weights(fresh, tmp_path / "model.safetensors")
        assert torch.equal(logits(fresh, tokens), logits(model, tokens))


def test_meta_construction_then_init(name):
    model = BUILDERS[name](device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves whatever was in memory: make anything left uninitialised loud
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    model.init_weights()
    out = logits(model.eval(), torch.randint(0, VOCAB, (1, 5)))
    assert out.shape == (1, 5, out.shape[-1]) and torch.isfinite(out).all()


def test_greedy_generate_equals_argmax_of_full_forwards(name):
    model = build(name)
    prompt = torch.randint(0, VOCAB, (2, 5))
    new = generate(model, prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(new, seq[:, 5:])


# ---- the contract's surface ----------------------------------------------------------------------------------


def test_one_config_attribute_and_read_only_aliases():
    models = {name: build(name) for name in BUILDERS}
    models["flux"] = build_flux("debug")
    for name, model in models.items():
        assert type(model.config).__name__ in ("ModelArgs", "MambaConfig", "HybridConfig", "FluxParams"), name
    assert models["llm"].args is models["llm"].config  # Meta's name, kept for the seed's examples
    assert models["flux"].params is models["flux"].config  # BFL's name
    with pytest.raises(AttributeError):
        models["llm"].args = models["llm"].config
    with pytest.raises(AttributeError):
        models["flux"].params = models["flux"].config


def test_protocol_and_one_setup_cache_signature(name):
    model = build(name)
    assert isinstance(model, LanguageModel)
    params = list(inspect.signature(model.setup_cache).parameters.values())
    assert [p.name for p in params] == ["batch_size", "max_seq_len", "dtype", "device"]
    assert [p.kind for p in params[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    assert all(p.default is inspect.Parameter.empty for p in params[:2])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in params[2:])
    with pytest.raises(TypeError):
        model.setup_cache(2, 8, torch.float32)  # dtype is keyword-only


def test_setup_cache_runs_on_meta_with_dtype(name):
    # `vermeil info` measures the cache this way, on a model built on the meta device.
    model = BUILDERS[name](device="meta")
    model.setup_cache(3, 16, dtype=torch.bfloat16, device="meta")
    cache = [b for m in model.modules() for n, b in m.named_buffers(recurse=False) if b.is_floating_point()]
    assert any(b.is_meta and b.dtype == torch.bfloat16 for b in cache)


def test_reset_and_delete_cache(name):
    model = build(name)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        full = logits(model, tokens)
        model.setup_cache(2, 8)
        first = logits(model, tokens, input_pos=torch.arange(6))
        model.reset_cache()  # a new sequence: the same prefill gives the same logits
        assert_close(logits(model, tokens, input_pos=torch.arange(6)), first, atol=0, rtol=0)
        model.delete_cache()
        assert_close(logits(model, tokens), full, atol=0, rtol=0)  # plain forwards again


def test_output_convention(name):
    model = build(name)
    out, aux = split_output(model(torch.randint(0, VOCAB, (2, 5))))
    assert out.shape == (2, 5, VOCAB) and out.dtype == torch.float32
    assert aux is None or (aux.ndim == 0 and aux.dtype == torch.float32)
    assert split_output(out) == (out, None)
    with pytest.raises(TypeError, match="must return logits"):
        split_output((out,))


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (torch.zeros(2, 3), TypeError, "tokens must hold integer ids, got dtype=torch.float32"),
        (torch.zeros(2, 3, dtype=torch.bool), TypeError, "integer ids"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"tokens must be a \(batch, seq\) integer tensor"),
        ([[1, 2]], TypeError, "tokens must be a .* tensor, got list"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"tokens of shape \(0, 3\) is empty"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"tokens of shape \(2, 0\) is empty"),
        (torch.full((1, 2), VOCAB), ValueError, rf"token id {VOCAB} is outside the vocabulary"),
        (torch.full((1, 2), -1), ValueError, "token id -1 is outside the vocabulary"),
    ],
)
def test_one_input_check(name, tokens, error, match):
    with pytest.raises(error, match=match):
        build(name)(tokens)


def test_input_pos_is_checked_against_the_cache(name):
    model = build(name)
    model.setup_cache(2, 8)
    tokens = torch.randint(0, VOCAB, (2, 2))
    with pytest.raises(ValueError, match=r"input_pos spans \[7, 8\], outside the cache's positions"):
        model(tokens, input_pos=torch.tensor([7, 8]))
    with pytest.raises(TypeError, match="input_pos must hold integer positions"):
        model(tokens, input_pos=torch.tensor([0.0, 1.0]))


def test_tensor_parallel_description_names_real_modules(name):
    model = build(name)
    modules = dict(model.named_modules())
    assert all(part in modules for part in model.lm_parts)
    model.check_tensor_parallel(sequence_parallel=False, loss_parallel=False)
    describe = getattr(model, "sequence_parallel_plan", None)
    if name == "mamba":
        assert describe is None  # the Mamba mixers need the whole sequence: no sequence parallelism
        return
    plan = describe()
    assert plan and all(module in modules for module in plan)
    assert all(style.partition(":")[0] in SEQUENCE_PARALLEL_STYLES for style in plan.values())


def test_attention_layers():
    assert build("mamba").attention_layers() == []
    a = build("llm").config
    assert build("llm").attention_layers() == [
        (a.n_heads * a.head_dim, None if a.is_nope_layer(i) else a.attention_chunk_size)
        for i in range(a.n_layers)
    ]
    hybrid = build("hybrid-sequential")
    assert hybrid.attention_layers() == [(4 * 8, None)]  # pattern "MAM", 4 heads of 32 / 4
    windowed = HybridModel(HybridConfig(dim=32, vocab_size=VOCAB, pattern="AMA", heads=4, window=6))
    assert windowed.attention_layers() == [(32, 6), (32, 6)]
    flux = build_flux("debug")
    p = flux.config
    assert flux.attention_layers() == [(p.hidden_size, None)] * (p.depth + p.depth_single_blocks)


# (config, context, batch size): (parameters, forward FLOPs per token, cache bytes), as `vermeil info` reported
# them before the models described themselves (computed from per-family switches in recipes/describe.py).
DESCRIBED = {
    ("flux-seq2seq.yaml", 100, 3): (457155, 1004800, None),
    ("flux-seq2seq.yaml", 5000, 1): (457155, 6022400, None),
    ("hybrid-lm.yaml", 100, 3): (924032, 2002944, 337920),
    ("hybrid-lm.yaml", 5000, 1): (924032, 4511744, 2621440),
    ("hybrid_parallel.yaml", 100, 3): (2179456, 4739072, 798720),
    ("hybrid_parallel.yaml", 5000, 1): (2179456, 9756672, 5283840),
    ("hybrid_sequential.yaml", 100, 3): (1913472, 4136960, 675840),
    ("hybrid_sequential.yaml", 5000, 1): (1913472, 9154560, 5242880),
    ("llm-tiny.yaml", 100, 3): (1478784, 1980416, 616800),
    ("llm-tiny.yaml", 5000, 1): (1478784, 4532224, 2759680),
    ("mqar-attention.yaml", 100, 3): (114752, 280064, 307200),
    ("mqar-attention.yaml", 5000, 1): (114752, 2788864, 5120000),
    ("mqar-hybrid.yaml", 100, 3): (114880, 272384, 184320),
    ("mqar-hybrid.yaml", 5000, 1): (114880, 1526784, 2570240),
    ("mqar-mamba.yaml", 100, 3): (114560, 281600, 92160),
    ("mqar-mamba.yaml", 5000, 1): (114560, 281600, 30720),
    ("mqar-transformer.yaml", 100, 3): (114752, 280064, 307200),
    ("mqar-transformer.yaml", 5000, 1): (114752, 2788864, 5120000),
}


@pytest.mark.parametrize("key", sorted(DESCRIBED, key=str))
def test_describe_model_numbers_are_unchanged(key):
    from vermeil.recipes.config import load_run_config
    from vermeil.recipes.describe import describe_model

    config, context, batch_size = key
    path = Path(__file__).resolve().parents[2] / "configs" / config
    info = describe_model(load_run_config(path), context, batch_size=batch_size)
    assert (info["parameters"], info["forward_flops_per_token"], info["cache_bytes"]) == DESCRIBED[key]
    assert math.isclose(info["train_flops_per_token"], 3 * info["forward_flops_per_token"])


def test_a_tied_model_refuses_two_different_embedding_matrices(name):
    # A model that ties its head to the embedding holds one matrix: an untied checkpoint (two different
    # matrices) used to load silently, the later name overwriting the earlier; equal copies still load.
    torch.manual_seed(0)
    model = (
        llm.build("debug", vocab_size=VOCAB, tie_word_embeddings=True) if name == "llm" else build(name)
    ).eval()
    embedding, _, head = (f"{part}.weight" for part in model.lm_parts)
    assert model.get_parameter(head) is model.get_parameter(embedding)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # the same values under both names
    state[head] = state[head] + 1.0
    with pytest.raises(ValueError, match=f"{embedding} and {head} differ.*ties them"):
        model.load_state_dict(state)
    assert torch.equal(model.get_parameter(embedding), state[embedding])  # nothing was overwritten
