"""The PyTorch algorithms: exact, device-agnostic, and the fallback of every native kernel.

All functions take tensors already in the compute dtype unless they say
otherwise; plans (:mod:`spanet_ops.plans`) supply masks and bases.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def fft_filter(x: Tensor, half_mask: Tensor) -> Tensor:
    """``irfft2(half_mask * rfft2(x))``: no shifts, no full complex spectrum (SPEC §1 facts 1-2)."""
    spectrum = torch.fft.rfft2(x, norm="ortho")
    return torch.fft.irfft2(spectrum * half_mask, s=x.shape[-2:], norm="ortho")


def _coefficient_scale(grid: Tensor, weight: Tensor) -> Tensor:
    """Map analysis coefficients ``[[Pac, Pad], [Pbc, Pbd]]`` to synthesis ones ``[[R, Q], [Q, -R]]``."""
    k, l = weight.shape[-2:]
    pac, pad = grid[..., :k, :l], grid[..., :k, l:]
    pbc, pbd = grid[..., k:, :l], grid[..., k:, l:]
    r = weight * (pac - pbd)
    q = weight * (pbc + pad)
    return torch.cat([torch.cat([r, q], dim=-1), torch.cat([q, -r], dim=-1)], dim=-2)


def analysis(x: Tensor, basis_h: Tensor, basis_w: Tensor) -> Tensor:
    """Real coefficient grid ``A x B^T`` ``(..., 2K, 2L)`` of planes ``x`` ``(..., H, W)``."""
    return basis_h @ (x @ basis_w.transpose(0, 1))


def synthesis(coefficients: Tensor, basis_h: Tensor, basis_w: Tensor) -> Tensor:
    """Planes ``A^T Z B`` ``(..., H, W)`` from coefficients ``Z`` ``(..., 2K, 2L)``."""
    return basis_h.transpose(0, 1) @ (coefficients @ basis_w)


def lowrank_filter(
    x: Tensor, basis_h: Tensor, basis_w: Tensor, weight: Tensor, constant: Tensor
) -> Tensor:
    """The low-rank filter of planes ``x`` ``(N, H, W)`` in any storage dtype.

    ``weight`` ``(P, K, L)`` and ``constant`` ``(P,)`` hold the mask's terms
    with ``N % P == 0``: plane ``n`` uses mask plane ``n % P``. Arithmetic is in
    the bases' dtype; the result has ``x``'s dtype.
    """
    n, height, width = x.shape
    planes = weight.shape[0]
    xc = x.to(basis_h.dtype).reshape(n // planes, planes, height, width)
    coefficients = _coefficient_scale(analysis(xc, basis_h, basis_w), weight)
    y = synthesis(coefficients, basis_h, basis_w)
    y = y.addcmul_(xc, constant[:, None, None])
    return y.reshape(n, height, width).to(x.dtype)


def spg_spectral(
    x: Tensor, base: Tensor, weight: Tensor, basis_h: Tensor, basis_w: Tensor, coeff_weight: Tensor
) -> Tensor:
    """``base`` plus the coefficient-space spectral part of the split-SPG aggregation (SPEC §2).

    ``x`` ``(B, C, H, W)``, ``base`` ``(B, O, H, W)`` (the dense 1x1 conv with
    bias), ``weight`` ``(O, C)``, ``coeff_weight`` ``(C, K, L)``: project every
    input channel on the bins, scale it, mix channels with ``weight``, and
    synthesise every output channel. Arithmetic in the bases' dtype; the
    result has ``base``'s dtype.
    """
    dtype = basis_h.dtype
    coefficients = _coefficient_scale(analysis(x.to(dtype), basis_h, basis_w), coeff_weight)
    mixed = torch.einsum("oc,bckl->bokl", weight.to(dtype), coefficients)
    return (base.to(dtype) + synthesis(mixed, basis_h, basis_w)).to(base.dtype)


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """A 1x1 convolution with a 2-D weight ``(O, C)``."""
    return F.conv2d(x, weight[:, :, None, None], bias)


def half_to_full(half: Tensor, width: int) -> Tensor:
    """Rebuild a full ``(..., H, W)`` real map from its first ``W//2 + 1`` columns.

    Valid for maps with ``R[k, l] == R[-k, -l]``, such as ``Re(conj(X) G)`` of
    real signals.
    """
    height = half.shape[-2]
    neg_rows = (-torch.arange(height, device=half.device)) % height
    mirrored_cols = width - torch.arange(width // 2 + 1, width, device=half.device)
    return torch.cat([half, half[..., neg_rows, :][..., mirrored_cols]], dim=-1)


def mask_gradient(x: Tensor, grad_output: Tensor) -> Tensor:
    """``Re(conj(X) G)`` in the natural layout, per plane (SPEC §1 fact 4), in the inputs' dtype."""
    spec_x = torch.fft.rfft2(x, norm="ortho")
    spec_g = torch.fft.rfft2(grad_output, norm="ortho")
    half = spec_x.real * spec_g.real + spec_x.imag * spec_g.imag
    return half_to_full(half, x.shape[-1])


def planes_of(x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """``x`` ``(..., H, W)`` as contiguous planes ``(N, H, W)``, with its leading shape."""
    return x.reshape(-1, *x.shape[-2:]).contiguous(), tuple(x.shape[:-2])
