"""Vision input for the LLM: images -> patches -> a small ViT built from `vermeil.nn` blocks -> pixel shuffle ->
MLP adapter, placed at the token positions an image-token mask marks (Meta's `VisionEmbeddings`).

Key names follow Meta's `llama_models/llama4/vision/{embedding,encoder}.py`, but the encoder blocks are
`vermeil.nn.blocks.TransformerBlock`s (LayerNorm, GELU MLP, learned absolute positions instead of Meta's 2-D
RoPE inside the encoder), so Meta's vision weights do not load; the text side does.

Shapes: N images (tiles), C channels, H x W pixels, P patches per image (Gh x Gw grid), Dvit encoder width,
Dv output width, B batch, T tokens, Ti tokens per image after pixel shuffle.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeil.models.checks import check_fields, check_positive_int, tracing
from vermeil.nn.blocks import TransformerBlock
from vermeil.nn.norms import LayerNorm

__all__ = ["PixelShuffleMLP", "VisionArgs", "VisionEmbeddings", "VisionEncoder", "pixel_shuffle"]


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclass
class VisionArgs:
    """Vision encoder settings (Meta's `VisionArgs` names).

    Args:
        image_size, patch_size: pixels, an int (square) or (height, width).
        dim: Dvit, the encoder width; mlp_ratio: the encoder MLP's width / dim.
        output_dim: Dv, the adapter's output width (the LLM's `vision_projection` maps it to the model dim).
        pixel_shuffle_ratio: r; the patch grid shrinks by r per side and channels grow by 1 / r^2 (Llama 4: 0.5).
    """

    image_size: int | tuple[int, int] = 336
    patch_size: int | tuple[int, int] = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 4096
    pixel_shuffle_ratio: float = 0.5
    in_channels: int = 3
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):
            size = getattr(self, name)
            if not isinstance(size, int) and not (isinstance(size, (tuple, list)) and len(size) == 2):
                raise ValueError(f"{name}={size!r} must be a positive int or a pair (height, width) of them")
            for side in (size,) if isinstance(size, int) else size:
                check_positive_int(name, side)
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        if ih % ph or iw % pw:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}"
            )
        gh, gw = ih // ph, iw // pw
        if gh != gw:
            raise ValueError(f"the patch grid must be square for pixel shuffle, got {gh} x {gw}")
        r = self.pixel_shuffle_ratio
        if (
            isinstance(r, bool)
            or not isinstance(r, (int, float))
            or not 0 < r <= 1
            or abs(gh * r - round(gh * r)) > 1e-9
            or abs(1 / r**2 - round(1 / r**2)) > 1e-9
        ):
            raise ValueError(
                f"pixel_shuffle_ratio={r!r} must be in (0, 1] with grid side {gh} * r and 1 / r^2 integers"
            )
        check_fields(self, positive=("mlp_ratio",))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")

    @property
    def grid(self) -> int:
        """Patches per side before the pixel shuffle."""
        return _pair(self.image_size)[0] // _pair(self.patch_size)[0]

    @property
    def tokens_per_image(self) -> int:
        """Ti: LLM tokens one image becomes (grid * r)^2."""
        return round(self.grid * self.pixel_shuffle_ratio) ** 2


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """Meta's `pixel_shuffle_op` on a token grid: (N, P, Dvit) -> (N, P * r^2, Dvit / r^2), P a square number."""
    n, p, c = x.shape
    side = math.isqrt(p)
    x = x.view(n, side, side, c)  # (N, w, h, c) in Meta's naming
    x = x.view(n, side, round(side * ratio), round(c / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, round(side * ratio), round(side * ratio), round(c / (ratio * ratio)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.flatten(1, 2)  # (N, P * r^2, Dvit / r^2); not view(n, -1, ...), undefined for N = 0


class _Conv2dPatch(nn.Module):
    """Non-overlapping patch projection as unfold + linear (Meta's `ColumnParallelConv2dPatch`, key `_linear`)."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int], **factory: Any) -> None:
        super().__init__()
        self.patch = patch
        self._linear = nn.Linear(in_channels * patch[0] * patch[1], dim, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, P, Dvit)."""
        patches = F.unfold(x, kernel_size=self.patch, stride=self.patch)  # (N, C*ph*pw, P)
        return self._linear(patches.transpose(1, 2))


class VisionEncoder(nn.Module):
    """A ViT: images (N, C, H, W) -> (N, P + 1, Dvit), the learned class token last (Meta's order)."""

    def __init__(self, args: VisionArgs, **factory: Any) -> None:
        super().__init__()
        self.args = args
        self.image_size, self.patch_size = _pair(args.image_size), _pair(args.patch_size)
        self.conv1 = _Conv2dPatch(args.in_channels, args.dim, self.patch_size, **factory)
        self.class_embedding = nn.Parameter(torch.empty(args.dim, **factory))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(args.grid**2 + 1, args.dim, **factory))
        self.ln_pre = LayerNorm(args.dim, args.norm_eps, **factory)
        blocks = nn.ModuleList(
            TransformerBlock(
                args.dim,
                args.n_heads,
                hidden_dim=int(args.mlp_ratio * args.dim),
                feed_forward="mlp",
                norm="layer",
                norm_eps=args.norm_eps,
                causal=False,
                bias=True,
                **factory,
            )
            for _ in range(args.n_layers)
        )
        self.transformer = nn.ModuleDict({"resblocks": blocks})  # Meta's key names: transformer.resblocks.N
        self.ln_post = LayerNorm(args.dim, args.norm_eps, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.args.dim**-0.5  # Meta: `scale = dim ** -0.5` for both embeddings
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding_vlm, std=scale)
        for module in (self.conv1._linear, self.ln_pre, self.ln_post, *self.transformer["resblocks"]):
            module.reset_parameters()

    def check_images(self, images: Tensor) -> None:
        c, (h, w) = self.args.in_channels, self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise ValueError(f"images must have shape (N, C={c}, H={h}, W={w}), got {tuple(images.shape)}")

    def forward(self, images: Tensor) -> Tensor:
        self.check_images(images)
        x = self.conv1(images.to(self.conv1._linear.weight.dtype))  # (N, P, Dvit)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # (N, P + 1, Dvit)
        x = self.ln_pre(x)
        for block in self.transformer["resblocks"]:
            x = block(x)
        return self.ln_post(x)


class PixelShuffleMLP(nn.Module):
    """Pixel shuffle then Meta's `SimpleMLP`: (N, P, Dvit) -> (N, Ti, Dv)."""

    def __init__(self, ratio: float, input_dim: int, output_dim: int, **factory: Any) -> None:
        super().__init__()
        self.ratio = ratio
        c_fc = nn.Linear(round(input_dim / ratio**2), output_dim, bias=False, **factory)
        c_proj = nn.Linear(output_dim, output_dim, bias=False, **factory)
        self.mlp = nn.Sequential(OrderedDict(c_fc=c_fc, gelu1=nn.GELU(), c_proj=c_proj, gelu2=nn.GELU()))

    def reset_parameters(self) -> None:
        self.mlp.c_fc.reset_parameters()
        self.mlp.c_proj.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionEmbeddings(nn.Module):
    """images (N, C, H, W), image_mask (B, T) bool -> (B, T, Dv): zeros except at the mask's N * Ti True
    positions, which take the images' tokens in order (image 0's Ti tokens first, row by row)."""

    def __init__(
        self, args: VisionArgs, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.args = args
        self.vision_encoder = VisionEncoder(args, **factory)
        self.vision_adapter = PixelShuffleMLP(args.pixel_shuffle_ratio, args.dim, args.output_dim, **factory)
        self.output_dim = args.output_dim

    def reset_parameters(self) -> None:
        self.vision_encoder.reset_parameters()
        self.vision_adapter.reset_parameters()

    def encode(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) -> (N, Ti, Dv) projected image tokens."""
        emb = self.vision_encoder(images)[:, :-1]  # drop the class token: (N, P, Dvit)
        return self.vision_adapter(emb)

    def forward(self, images: Tensor, image_mask: Tensor) -> Tensor:
        if not isinstance(image_mask, Tensor) or image_mask.dtype != torch.bool or image_mask.ndim != 2:
            got = (
                (tuple(image_mask.shape), image_mask.dtype) if isinstance(image_mask, Tensor) else image_mask
            )
            raise ValueError(f"image_mask must be a (B, T) bool tensor, got {got}")
        self.vision_encoder.check_images(images)
        n_tokens = images.shape[0] * self.args.tokens_per_image
        # Eager check (the merge below needs the exact count): a host read, a graph break under compile
        if not tracing() and (marked := int(image_mask.sum())) != n_tokens:
            raise ValueError(
                f"image_mask marks {marked} image-token positions, but {images.shape[0]} image(s) give "
                f"{n_tokens} tokens ({self.args.tokens_per_image} per image)"
            )
        tokens = self.encode(images).reshape(-1, self.output_dim)  # (N * Ti, Dv)
        out = tokens.new_zeros(*image_mask.shape, self.output_dim)  # (B, T, Dv)
        return out.masked_scatter(image_mask[..., None], tokens)
