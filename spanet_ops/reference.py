"""Paper-literal reference implementations. Every test compares against these.

They follow the published code step by step — ``fft2``, ``fftshift``, mask,
``ifftshift``, ``ifft2``, ``.real`` on full complex tensors — and are kept
simple on purpose; they are slow and, like ``torch.fft``, refuse half
precision on the CPU.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import BOUNDARY_VALUE


def spectral_mask_filter(x: Tensor, mask: Tensor, centered: bool = True) -> Tensor:
    """``Re(ifft2(ifftshift(mask * fftshift(fft2(x)))))`` with orthonormal transforms (Eq. 17)."""
    spectrum = torch.fft.fft2(x, norm="ortho")
    if centered:
        spectrum = torch.fft.fftshift(spectrum, dim=(-2, -1))
    spectrum = spectrum * mask
    if centered:
        spectrum = torch.fft.ifftshift(spectrum, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="ortho").real


def circular_mask(height: int, width: int, radius: float, lam: float) -> Tensor:
    """The published centred mask ``(H, W)``, bin by bin with a Euclidean distance (float32)."""
    return _circular_mask(int(height), int(width), float(radius), float(lam)).clone()


@functools.lru_cache(maxsize=256)
def _circular_mask(height: int, width: int, radius: float, lam: float) -> Tensor:
    lam32 = torch.tensor(lam, dtype=torch.float32)
    mask = torch.empty(height, width, dtype=torch.float32)
    for u in range(height):
        for v in range(width):
            d = math.sqrt((u - height // 2) ** 2 + (v - width // 2) ** 2)
            if d < radius:
                mask[u, v] = lam32
            elif d == radius:
                mask[u, v] = BOUNDARY_VALUE
            else:
                mask[u, v] = 1.0 - lam32
    return mask


def spectral_pooling_filter(x: Tensor, radius: float, lam) -> Tensor:
    """SPF of ``x`` ``(..., C, H, W)``; ``lam`` a float or a per-channel sequence ``(C,)``."""
    height, width = x.shape[-2:]
    lams = torch.as_tensor(lam, dtype=torch.float32).reshape(-1).tolist()
    masks = torch.stack([circular_mask(height, width, radius, v) for v in lams])  # (C or 1, H, W)
    return spectral_mask_filter(x, masks.to(x.device) if len(lams) > 1 else masks[0].to(x.device))


def spg_aggregate(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    lams: Sequence[float],
    radius: float,
) -> Tensor:
    """The published split-SPG aggregation: chunk, SPF per chunk, 1x1 conv per chunk, sum."""
    chunks = torch.chunk(x, len(lams), dim=1)
    out = 0
    for chunk, weight, bias, lam in zip(chunks, weights, biases, lams):
        filtered = spectral_pooling_filter(chunk, radius, lam)
        out = out + F.conv2d(filtered, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    return out
