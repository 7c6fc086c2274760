"""Tests for vermeil/models/vision.py: pixel shuffle against Meta's op, the encoder shapes, the merge into the
LLM by mask (forward and backward on random images), and the mismatch errors.

Shapes: N images, C channels, H x W pixels, B batch, T tokens, Ti tokens per image.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.testing import assert_close

from vermeil.models.llm import LLM, ModelArgs
from vermeil.models.vision import VisionArgs, VisionEmbeddings, pixel_shuffle

# 28 x 28 pixels, 7-pixel patches: a 4 x 4 grid, shuffled to 2 x 2 = 4 tokens per image.
VISION = dict(image_size=28, patch_size=7, dim=24, n_layers=2, n_heads=3, mlp_ratio=2.0, output_dim=20)


def meta_pixel_shuffle(x: torch.Tensor, ps_ratio: float) -> torch.Tensor:
    """Transcribed from llama_models/llama4/vision/embedding.py (`PixelShuffle.forward` + `pixel_shuffle_op`)."""
    n, hw, c = x.size()
    h = w = int(math.sqrt(hw))
    x = x.view(n, h, w, -1)
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * ps_ratio), int(c / ps_ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * ps_ratio), int(w * ps_ratio), int(c / (ps_ratio * ps_ratio)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, -1, x.shape[-1])


def test_pixel_shuffle_matches_meta() -> None:
    x = torch.randn(3, 36, 8)
    assert_close(pixel_shuffle(x, 0.5), meta_pixel_shuffle(x, 0.5), atol=0, rtol=0)
    assert pixel_shuffle(x, 0.5).shape == (3, 9, 32)


def test_vision_args_errors() -> None:
    with pytest.raises(ValueError, match="image_size=30 must be divisible by patch_size=7"):
        VisionArgs(**{**VISION, "image_size": 30})
    with pytest.raises(ValueError, match="must be square"):
        VisionArgs(**{**VISION, "image_size": (28, 14)})
    with pytest.raises(ValueError, match="pixel_shuffle_ratio=0.3"):
        VisionArgs(**{**VISION, "pixel_shuffle_ratio": 0.3})
    with pytest.raises(ValueError, match="dim=24 must be divisible by n_heads=5"):
        VisionArgs(**{**VISION, "n_heads": 5})


def test_embeddings_place_tokens_by_mask() -> None:
    torch.manual_seed(0)
    emb = VisionEmbeddings(VisionArgs(**VISION))
    assert emb.args.tokens_per_image == 4
    images = torch.randn(2, 3, 28, 28)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 1:5] = True  # image 0 in row 0
    mask[1, 3:7] = True  # image 1 in row 1
    out = emb(images, mask)
    tokens = emb.encode(images)  # (2, 4, 20)
    assert out.shape == (2, 9, 20)
    assert_close(out[0, 1:5], tokens[0], atol=0, rtol=0)
    assert_close(out[1, 3:7], tokens[1], atol=0, rtol=0)
    assert (out[~mask] == 0).all()


def test_mismatch_between_images_and_mask() -> None:
    emb = VisionEmbeddings(VisionArgs(**VISION))
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, :5] = True
    with pytest.raises(ValueError, match=r"marks 5 image-token positions, but 1 image\(s\) give 4 tokens"):
        emb(torch.randn(1, 3, 28, 28), mask)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C=3, H=28, W=28\)"):
        emb.encode(torch.randn(1, 3, 14, 14))
    with pytest.raises(ValueError, match="image_mask must be a"):
        emb(torch.randn(1, 3, 28, 28), mask.long())


def test_llm_with_images_forward_backward() -> None:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53, hidden_dim=48, max_seq_len=32,
        vision_args=VisionArgs(**VISION),
    )  # fmt: skip
    model = LLM(args)
    tokens = torch.randint(0, 53, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 4:8] = True
    images = torch.randn(2, 3, 28, 28, requires_grad=True)
    image_embedding = model.embed_images(images, mask)
    out = model(tokens, image_embedding=image_embedding)
    out.logits.square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    for name in ("vision_projection.weight", "vision_embeddings.vision_encoder.conv1._linear.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    with torch.no_grad():
        text_only = model(tokens).logits
        other = model(tokens, image_embedding=model.embed_images(torch.randn(2, 3, 28, 28), mask)).logits
        # causal: positions before the first image token do not see the image; later ones do
        assert_close(other[0, :2], text_only[0, :2], atol=1e-6, rtol=0)
        assert_close(other[1, :4], text_only[1, :4], atol=1e-6, rtol=0)
        assert (other[0, 2:] - out.logits[0, 2:]).abs().max() > 1e-4
    # the image merge checks the mask against the sequence
    with pytest.raises(ValueError, match=r"image_embedding.mask must have shape \(B, T\)=\(2, 9\)"):
        model(tokens, image_embedding=type(image_embedding)(image_embedding.embedding, mask[:, :5]))
    text_model = LLM(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=53, hidden_dim=48))
    with pytest.raises(ValueError, match="no vision_args"):
        text_model(tokens, image_embedding=image_embedding)


def test_image_embeddings_compile_without_graph_breaks() -> None:
    """`embed_images` traces whole with fullgraph=True (AOTAutograd's eager backend: forward and backward as
    Inductor traces them) and equals eager: the mask's count check reads a tensor value, so it is eager-only."""
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, vocab_size=53, hidden_dim=48,
        vision_args=VisionArgs(**{**VISION, "n_layers": 1}),
    )  # fmt: skip
    model = LLM(args)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 4:8] = True
    images = torch.randn(2, 3, 28, 28)

    def embed(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.embed_images(images, mask).embedding

    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    params = list(model.vision_embeddings.parameters())
    results = []
    for fn in (compiled, embed):
        out = fn(images, mask)
        results.append((out, *torch.autograd.grad(out.square().mean(), params)))
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_without_images() -> None:
    # No images (N=0) and a mask marking no position: zeros, as any other image-free rows.
    emb = VisionEmbeddings(VisionArgs(**VISION))
    out = emb(torch.empty(0, 3, 28, 28), torch.zeros(2, 9, dtype=torch.bool))
    assert out.shape == (2, 9, 20) and not out.any()
    assert pixel_shuffle(torch.empty(0, 16, 8), 0.5).shape == (0, 4, 32)


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_size", (28, 28, 28)), ("image_size", 28.0), ("patch_size", (7,)), ("patch_size", "7")],
)
def test_vision_args_size_fields_are_ints_or_pairs(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} must be a positive int or a pair")):
        VisionArgs(**{**VISION, field: value})


def test_vision_args_pixel_shuffle_ratio_must_be_a_number() -> None:
    with pytest.raises(ValueError, match=r"pixel_shuffle_ratio='0.5' must be in \(0, 1\]"):
        VisionArgs(**{**VISION, "pixel_shuffle_ratio": "0.5"})
