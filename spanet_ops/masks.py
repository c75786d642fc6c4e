"""Spectral masks: the published circular mask and layout conversions.

Layouts (SPEC §1):

* *centred* — the paper's layout, after ``fftshift``: the zero frequency sits at
  row ``H // 2``, column ``W // 2``.
* *natural* — the DFT's own layout: bin ``k`` of an axis of length ``N`` has
  signed frequency ``k`` for ``k < (N + 1) // 2`` and ``k - N`` otherwise.

``ifftshift`` maps the first onto the second, for odd and even sizes alike.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .validation import check_lam_values, check_radius

#: The published mask's value on the disc's boundary (``d == r``), as float32.
BOUNDARY_VALUE = torch.tensor(1.0 / 3.0, dtype=torch.float32).item()

LamLike = Union[float, Sequence[float], Tensor]


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
    """Integer squared distance ``u^2 + v^2`` of every bin from the zero frequency."""
    freqs = centred_offsets if centered else signed_frequencies
    u = freqs(height, device)
    v = freqs(width, device)
    return u[:, None] ** 2 + v[None, :] ** 2


def circular_regions(height: int, width: int, radius: float, *, centered: bool, device=None):
    """Boolean maps ``(inside, boundary)`` of the bins with ``d < r`` and ``d == r``.

    Distances are compared squared, in integers against ``r**2``, so the
    boundary test is exact.
    """
    d2 = squared_distance(height, width, centered=centered, device=device)
    r2 = float(radius) ** 2
    return d2 < r2, d2 == r2


def lam_tensor(lam: LamLike, device=None) -> Tensor:
    """``lam`` as a float32 tensor (0-d for a scalar, ``(C,)`` per channel).

    Python numbers are range-checked here; a tensor's values are checked where
    they are used (reading them here would synchronise and break tracing).
    """
    if isinstance(lam, Tensor):
        if lam.is_complex() or not lam.is_floating_point():
            raise TypeError(f"lam must be a real floating tensor, got dtype {lam.dtype}")
        if lam.dim() > 1:
            raise ValueError(f"lam must be a scalar or a per-channel vector (C,), got shape {tuple(lam.shape)}")
        return lam.to(device=device if device is not None else lam.device, dtype=torch.float32)
    values = [lam] if isinstance(lam, (int, float)) else list(lam)
    if not all(isinstance(v, (int, float)) for v in values):
        raise TypeError(f"lam must be a float or a sequence of floats, got {lam!r}")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    return torch.tensor(lam, dtype=torch.float32, device=device)


def circular_mask_values(lam: Tensor):
    """The three published mask values ``(inside, boundary, outside)`` for float32 ``lam``.

    ``1 - lam`` is computed in float32, as the published code does.
    """
    lam = lam.to(torch.float32)
    outside = 1.0 - lam
    boundary = torch.full_like(lam, BOUNDARY_VALUE)
    return lam, boundary, outside


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
    with ``d == radius`` exactly hold ``1/3`` and all others ``1 - lam``
    (SPEC §1). Values are computed in float32, like the published code, and
    then cast to ``dtype`` (default float32).

    Args:
        height, width: spatial size; any positive sizes, including maps
            smaller than the disc.
        radius: non-negative disc radius in bins.
        lam: balance in ``[0, 1]``: a float, or a per-channel sequence/tensor
            ``(C,)`` giving a ``(C, H, W)`` mask.
        centered: centred (fftshifted, the paper's) layout if True, natural
            DFT layout otherwise.

    Returns:
        ``(H, W)`` for a scalar ``lam``, ``(C, H, W)`` for a per-channel one.
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    check_radius(radius)
    lam_t = lam_tensor(lam, device=device)
    check_lam_values(lam_t)
    inside, boundary = circular_regions(int(height), int(width), radius, centered=centered, device=lam_t.device)
    v_in, v_edge, v_out = (v[..., None, None] for v in circular_mask_values(lam_t))
    mask = torch.where(inside, v_in, torch.where(boundary, v_edge, v_out))
    return mask.to(dtype or torch.float32)
