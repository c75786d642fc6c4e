"""Spectral masks: the published circular mask, its exact geometry, and layout conversions.

Layouts:

* *centred* — the paper's layout, after ``fftshift``: the zero frequency sits at
  row ``H // 2``, column ``W // 2``.
* *natural* — the DFT's own layout: bin ``k`` of an axis of length ``N`` has
  signed frequency ``k`` for ``k < (N + 1) // 2`` and ``k - N`` otherwise.

``ifftshift`` maps the first onto the second, for odd and even sizes alike.

The published mask holds ``lam`` where the distance ``d`` of a bin from the zero
frequency is below the radius ``r``, ``1/3`` where ``d == r`` exactly and
``1 - lam`` elsewhere. Distances of bins are square roots of integers, so every
decision here is made exactly on the integer squared distance against ``r**2``
computed as a rational number (no float squaring: ``r = 1e-160`` would
underflow, ``r = 1e160`` overflow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .validation import check_lams, check_radius

#: The published mask's value on the disc's boundary (``d == r``), as float32.
BOUNDARY_VALUE = torch.tensor(1.0 / 3.0, dtype=torch.float32).item()

LamLike = Union[float, Sequence[float], Tensor]


@dataclass(frozen=True)
class DiscThresholds:
    """Exact integer form of ``d < r`` and ``d == r`` for bins of integer squared distance ``d2``.

    ``d < r`` iff ``d2 < inside_limit``; ``d == r`` iff ``d2 == edge`` (``edge`` is
    -1 when ``r**2`` is not an integer, so no bin lies on the circle). Both are
    clamped to ``max_d2 + 1`` for radii beyond every bin of the map.
    """

    inside_limit: int
    edge: int


def disc_thresholds(radius: float, max_d2: int) -> DiscThresholds:
    """The exact :class:`DiscThresholds` of ``radius`` for maps whose bins have ``d2 <= max_d2``."""
    r2 = Fraction(check_radius(radius)) ** 2  # exact: a float is a dyadic rational
    inside_limit = min(math.ceil(r2), max_d2 + 1)
    edge = int(r2) if r2.denominator == 1 and r2 <= max_d2 else -1
    return DiscThresholds(inside_limit, edge)


def signed_frequencies(n: int, device=None) -> Tensor:
    """Signed frequency of each bin of an ``n``-point DFT in the natural layout."""
    k = torch.arange(n, device=device)
    return torch.where(k < (n + 1) // 2, k, k - n)


def centred_offsets(n: int, device=None) -> Tensor:
    """Signed frequency of each bin of an ``n``-point DFT in the centred layout."""
    return torch.arange(n, device=device) - n // 2


def to_natural(mask: Tensor) -> Tensor:
    """Move a centred mask ``(..., H, W)`` to the natural DFT layout (``ifftshift``)."""
    return torch.fft.ifftshift(mask, dim=(-2, -1))


def to_centred(mask: Tensor) -> Tensor:
    """Move a natural-layout mask ``(..., H, W)`` to the centred layout (``fftshift``)."""
    return torch.fft.fftshift(mask, dim=(-2, -1))


def squared_distance(height: int, width: int, *, centered: bool, device=None) -> Tensor:
    """Integer squared distance ``u^2 + v^2`` of every bin from the zero frequency (int64)."""
    freqs = centred_offsets if centered else signed_frequencies
    u = freqs(height, device)
    v = freqs(width, device)
    return u[:, None] ** 2 + v[None, :] ** 2


def max_squared_distance(height: int, width: int) -> int:
    """The largest integer squared distance of a bin of an ``H x W`` map."""
    return (height // 2) ** 2 + (width // 2) ** 2


def circular_regions(height: int, width: int, radius: float, *, centered: bool, device=None):
    """Boolean maps ``(inside, boundary)`` of the bins with ``d < r`` and ``d == r`` (decided exactly)."""
    d2 = squared_distance(height, width, centered=centered, device=device)
    limits = disc_thresholds(radius, max_squared_distance(height, width))
    return d2 < limits.inside_limit, d2 == limits.edge


def circular_mask_values(lam: Tensor):
    """The three published mask values ``(inside, boundary, outside)`` for float32 ``lam``.

    ``1 - lam`` is computed in float32, as the published code does.
    """
    lam = lam.to(torch.float32)
    outside = 1.0 - lam
    boundary = torch.full_like(lam, BOUNDARY_VALUE)
    return lam, boundary, outside


def lam_values(lam: LamLike) -> tuple:
    """A float or a sequence of floats as a validated tuple of balances (a tensor is read on the host)."""
    if isinstance(lam, Tensor):
        if lam.is_complex() or not lam.is_floating_point():
            raise TypeError(f"lam must be a real floating tensor, got dtype {lam.dtype}")
        if lam.dim() > 1:
            raise ValueError(f"lam must be a scalar or a vector, got shape {tuple(lam.shape)}")
        lam = lam.detach().reshape(-1).tolist()
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam = [lam]
    return check_lams(lam)


def circular_mask(
    height: int,
    width: int,
    radius: float,
    lam: LamLike,
    *,
    centered: bool = True,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Tensor:
    """The published SPANet circular mask, for any ``height`` x ``width``.

    Bins at distance ``d < radius`` from the zero frequency hold ``lam``, bins
    with ``d == radius`` exactly hold ``1/3`` and all others ``1 - lam``.
    Values are computed in float32, like the published code, and then cast to
    ``dtype`` (default float32).

    Args:
        height, width: spatial size; any positive sizes, including maps
            smaller than the disc.
        radius: non-negative disc radius in bins.
        lam: balance in ``[0, 1]``: a float, or a per-channel sequence/tensor
            ``(C,)`` giving a ``(C, H, W)`` mask (a tensor is read on the host).
        centered: centred (fftshifted, the paper's) layout if True, natural
            DFT layout otherwise.

    Returns:
        ``(H, W)`` for a scalar ``lam``, ``(C, H, W)`` for a per-channel one.
    """
    if isinstance(height, bool) or isinstance(width, bool) or int(height) < 1 or int(width) < 1:
        raise ValueError(f"mask size must be positive integers, got {height}x{width}")
    check_radius(radius)
    per_channel = isinstance(lam, Tensor) and lam.dim() == 1 or not isinstance(lam, (int, float, Tensor))
    lam_t = torch.tensor(lam_values(lam), dtype=torch.float32, device=device)
    if not per_channel:
        lam_t = lam_t.reshape(())
    inside, boundary = circular_regions(int(height), int(width), radius, centered=centered, device=lam_t.device)
    v_in, v_edge, v_out = (v[..., None, None] for v in circular_mask_values(lam_t))
    mask = torch.where(inside, v_in, torch.where(boundary, v_edge, v_out))
    return mask.to(dtype or torch.float32)
