"""One list of sample inputs driving the reference, gradient and opcheck tests of spanet_ops.

Each sample is a filter problem ``(x, mask, centered)`` described by a
:class:`Sample`; :func:`make` builds the tensors for a dtype. The list covers
the four SPANet stage sizes, odd and non-square sizes, maps smaller than the
disc, random general masks, per-channel masks, broadcast masks, and
non-contiguous inputs (channels_last, sliced, transposed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

import spanet_ops

#: (dtype, atol, rtol) of the operators against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@dataclass(frozen=True)
class Sample:
    name: str
    x_shape: Tuple[int, ...]
    mask_kind: str  # "circular", "circular_per_channel", "random", "random_per_channel", "broadcast_batch"
    radius: float = 2.0
    centered: bool = True
    layout: str = "contiguous"  # "contiguous", "channels_last", "sliced", "transposed"
    small: bool = True  # cheap enough for gradcheck

    def __str__(self) -> str:
        return self.name


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def make(sample: Sample, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    """Build ``(x, mask)`` for ``sample`` in ``dtype`` (the mask is float32 for circular kinds, like the paper's)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = sample.x_shape[-2:]
    x = torch.randn(sample.x_shape, generator=gen, dtype=torch.float64).to(dtype)
    x = _layout(x, sample.layout)
    channels = sample.x_shape[-3] if len(sample.x_shape) >= 3 else 1
    lams = torch.linspace(0.55, 0.95, channels)
    if sample.mask_kind == "circular":
        mask = spanet_ops.circular_mask(height, width, sample.radius, 0.7, centered=sample.centered)
    elif sample.mask_kind == "circular_per_channel":
        mask = spanet_ops.circular_mask(height, width, sample.radius, lams, centered=sample.centered)
    elif sample.mask_kind == "random":
        mask = torch.rand(height, width, generator=gen, dtype=torch.float64).to(dtype)
    elif sample.mask_kind == "random_per_channel":
        mask = torch.rand(channels, height, width, generator=gen, dtype=torch.float64).to(dtype)
    elif sample.mask_kind == "broadcast_batch":  # (B, 1, H, W): broadcast over channels, not batch
        mask = torch.rand(sample.x_shape[0], 1, height, width, generator=gen, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(sample.mask_kind)
    if requires_grad:  # gradcheck perturbs the mask too: give it x's dtype
        x = x.detach().requires_grad_()
        mask = mask.detach().to(dtype).requires_grad_()
    return x, mask


SAMPLES = [
    Sample("stage1_56", (2, 4, 56, 56), "circular", 2.0, small=False),
    Sample("stage2_28", (2, 4, 28, 28), "circular", 2.0, small=False),
    Sample("stage3_14", (2, 4, 14, 14), "circular_per_channel", 1.0),
    Sample("stage4_7", (2, 4, 7, 7), "circular", 1.0),
    Sample("odd_square", (2, 3, 9, 9), "circular", 2.0),
    Sample("non_square", (2, 3, 6, 11), "circular_per_channel", 2.0),
    Sample("odd_non_square", (1, 3, 13, 8), "circular", 1.0, centered=False),
    Sample("tiny_1x1", (2, 3, 1, 1), "circular", 2.0),
    Sample("tiny_2x2", (2, 3, 2, 2), "circular_per_channel", 2.0),
    Sample("tiny_3x5", (2, 3, 3, 5), "circular", 2.0),
    Sample("random_mask", (2, 3, 8, 7), "random"),
    Sample("random_per_channel", (2, 3, 5, 6), "random_per_channel", centered=False),
    Sample("broadcast_batch", (2, 3, 6, 6), "broadcast_batch"),
    Sample("plain_2d", (10, 12), "random"),
    Sample("channels_last", (2, 4, 10, 10), "circular_per_channel", 2.0, layout="channels_last"),
    Sample("sliced", (2, 3, 8, 9), "circular", 2.0, layout="sliced"),
    Sample("transposed", (2, 3, 7, 10), "random", layout="transposed"),
]

SMALL_SAMPLES = [s for s in SAMPLES if s.small]


def reference(x: torch.Tensor, mask: torch.Tensor, centered: bool) -> torch.Tensor:
    """The paper-literal filter in float64."""
    return spanet_ops.reference.spectral_mask_filter(x.detach().double(), mask.detach().double(), centered)
