"""Bad inputs that used to pass silently or fail deep inside a model: each raises one clear error that names the
argument (and the value or dtype, and the rule).

`selective_scan` with an integer `u` is tested in tests/nn/test_scan.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from vermeil.generation import generate
from vermeil.models import llm, mamba
from vermeil.models.flux import build_flux
from vermeil.models.hybrid import HybridConfig, HybridModel

VOCAB = 29

LANGUAGE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "llm": lambda: llm.build("debug", vocab_size=VOCAB),
    "mamba": lambda: mamba.build("debug", vocab_size=VOCAB),
    "hybrid": lambda: HybridModel(HybridConfig(dim=16, vocab_size=VOCAB, pattern="MA", heads=2, d_state=4)),
}


@pytest.fixture(params=sorted(LANGUAGE_MODELS))
def model(request) -> nn.Module:
    torch.manual_seed(0)
    return LANGUAGE_MODELS[request.param]().eval()


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf])
def test_generate_rejects_a_non_finite_temperature(temperature: float) -> None:
    # nan used to sample NUL bytes (argmax of all-nan probabilities); inf a uniform draw.
    with pytest.raises(ValueError, match=rf"temperature={temperature!r} must be >= 0 and finite"):
        generate(LANGUAGE_MODELS["llm"](), torch.tensor([[1, 2]]), 3, temperature=temperature)


def test_generate_rejects_a_float_prompt_tensor() -> None:
    # Used to be `.long()`-ed: 2.7 became token 2.
    with pytest.raises(
        TypeError, match=r"prompt_tokens must hold integer token ids, got dtype=torch.float32"
    ):
        generate(LANGUAGE_MODELS["llm"](), torch.tensor([[1.0, 2.7]]), 3)
    with pytest.raises(TypeError, match=r"prompt_tokens\[0\] holds 2.7: token ids must be ints"):
        generate(LANGUAGE_MODELS["llm"](), [[1, 2.7]], 3)


@pytest.mark.parametrize("stop", [-1, VOCAB, VOCAB + 100])
def test_generate_rejects_stop_tokens_outside_the_vocabulary(model: nn.Module, stop: int) -> None:
    # A stop token the model can never emit used to be accepted and never stop anything.
    with pytest.raises(
        ValueError, match=rf"stop_tokens holds {stop}, outside the vocabulary \[0, vocab_size={VOCAB}\)"
    ):
        generate(model, torch.tensor([[1, 2]]), 3, stop_tokens=[3, stop])


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 0)])
def test_generate_rejects_empty_prompts(shape: tuple[int, int]) -> None:
    with pytest.raises(
        ValueError,
        match=rf"prompt_tokens must have shape \(batch, seq\) with batch >= 1 and seq >= 1, got \({shape[0]}, {shape[1]}\)",
    ):
        generate(LANGUAGE_MODELS["llm"](), torch.zeros(shape, dtype=torch.long), 3)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_language_models_reject_an_empty_batch_or_sequence(model: nn.Module, shape: tuple[int, int]) -> None:
    # Used to fail deep inside (a reshape of 0 elements) or, for the LLM's empty batch, return empty logits.
    with pytest.raises(ValueError, match=rf"tokens of shape \({shape[0]}, {shape[1]}\) is empty"):
        model(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("theta", [math.inf, math.nan, 0.0, -1.0])
def test_llm_rejects_a_non_finite_or_non_positive_rope_theta(theta: float) -> None:
    # inf used to build a model whose RoPE rotates nothing (every frequency 0).
    with pytest.raises(ValueError, match=rf"rope_theta={theta!r} must be a finite number > 0"):
        llm.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=VOCAB, rope_theta=theta)


def _flux_inputs(
    b: int = 2, ld: int = 5, lc: int = 3, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        data=torch.randn(b, ld, 2, generator=g, dtype=dtype),
        data_ids=torch.zeros(b, ld, 3),
        cond=torch.randn(b, lc, 4, generator=g, dtype=dtype),
        cond_ids=torch.zeros(b, lc, 3),
        timesteps=torch.rand(b, generator=g, dtype=dtype),
        y=torch.randn(b, 4, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize(("b", "ld"), [(0, 5), (2, 0)])
def test_flux_rejects_empty_data(b: int, ld: int) -> None:
    with pytest.raises(ValueError, match=rf"data of shape \({b}, {ld}, 2\) is empty"):
        build_flux("debug")(**_flux_inputs(b=b, ld=ld))


def test_flux_names_the_input_in_another_dtype_than_the_weights() -> None:
    model = build_flux("debug")
    x = _flux_inputs()
    x["cond"] = x["cond"].double()
    with pytest.raises(
        TypeError, match=r"cond has dtype torch.float64 but the model's parameters are torch.float32"
    ):
        model(**x)
    x = _flux_inputs(dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"data has dtype torch.float64 but the model's parameters are torch.float32"
    ):
        model(**x)
    with torch.no_grad():  # the same inputs on a float64 model are fine
        assert model.double()(**x).dtype == torch.float64


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mamba.MambaConfig(d_model=0), r"d_model=0 must be a positive int"),
        (lambda: mamba.MambaConfig(dt_rank=-1), r"dt_rank=-1 must be a positive int"),
        (lambda: mamba.MambaConfig(rms_norm=1), r"rms_norm=1 must be true or false"),
        (lambda: mamba.MambaConfig(dt_max=math.inf), r"dt_max=inf must be a finite number"),
        (lambda: mamba.MambaConfig(dt_min=0.0), r"dt_min=0.0 must be a positive number"),
        (
            lambda: HybridConfig(attn_out_multiplier=math.nan),
            r"attn_out_multiplier=nan must be a finite number",
        ),
        (lambda: llm.ModelArgs(n_kv_heads=0), r"n_kv_heads=0 must be a positive int"),
        (lambda: llm.ModelArgs(use_qk_norm="yes"), r"use_qk_norm='yes' must be true or false"),
        (lambda: llm.MoEArgs(hidden_dim=0), r"hidden_dim=0 must be a positive int"),
    ],
)
def test_configs_check_their_fields_by_annotation(make: Callable[[], object], message: str) -> None:
    # models/checks.py: check_fields reads each field's annotation (int, int | None, bool, float).
    with pytest.raises(ValueError, match=message):
        make()


def test_config_field_checks_keep_their_exceptions() -> None:
    # ignore_index may be negative, Flux's depths may be 0: the configs skip them.
    assert HybridConfig(ignore_index=-100).ignore_index == -100
    assert build_flux("debug", depth=0, device="meta").config.depth == 0
