"""The PyTorch algorithms: exact, device-agnostic, and the fallback of every native kernel.

All functions take tensors already in the compute dtype unless they say
otherwise; plans (:mod:`spanet_ops.plans`) supply masks and bases.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor



def fft_filter(x: Tensor, half_mask: Tensor) -> Tensor:
    """``irfft2(half_mask * rfft2(x))`` with unnormalised transforms: no shifts, no full complex spectrum.

    ``half_mask`` is the natural-layout, Hermitian-symmetrised mask's first ``W//2 + 1``
    columns with the orthonormal transforms' ``1 / (H W)`` folded in, so no pass over
    the data scales it.
    """
    spectrum = torch.fft.rfft2(x, norm="backward")
    return torch.fft.irfft2(spectrum * half_mask, s=x.shape[-2:], norm="forward")


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
    x: Tensor,
    row_factors: Tensor,
    row_index: Tensor,
    row_sign: Tensor,
    even_rows: int,
    col_factors: Tensor,
    col_index: Tensor,
    col_sign: Tensor,
    weight: Tensor,
    constant: Tensor,
) -> Tensor:
    """The separable low-rank filter of planes ``x`` ``(..., H, W)`` (``N`` planes) in any storage dtype.

    The bases come factored (:class:`spanet_ops.plans.Factors`: distinct rows, index and
    sign per row; ``even_rows`` is only a hint for kernels that fold the passes).
    ``weight`` ``(P, K, L)`` and ``constant`` ``(P,)`` hold the mask's terms with
    ``N % P == 0``: plane ``n`` uses mask plane ``n % P``. Arithmetic is in the bases'
    dtype; the result has ``x``'s dtype.
    """
    height, width = x.shape[-2:]
    n, planes = x.numel() // (height * width), weight.shape[0]
    basis_h = _unfactor(row_factors, row_index, row_sign)
    basis_w = _unfactor(col_factors, col_index, col_sign)
    xc = x.to(basis_h.dtype).reshape(n // planes, planes, height, width)
    coefficients = _coefficient_scale(analysis(xc, basis_h, basis_w), weight)
    y = synthesis(coefficients, basis_h, basis_w)
    y = y.addcmul_(xc, constant[:, None, None])
    return y.reshape(x.shape).to(x.dtype)


def _unfactor(unique: Tensor, index: Tensor, sign: Tensor) -> Tensor:
    """The full basis ``(2K, N)`` from its factors: row ``p`` is ``sign[p] * unique[index[p]]`` (zero for -1)."""
    rows = torch.cat([unique, unique.new_zeros(1, unique.shape[1])])
    return rows[index] * sign[:, None]


def basis_filter(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor) -> Tensor:
    """The low-rank filter of planes ``x`` ``(..., H, W)`` (``N`` planes) in the real basis: two GEMMs.

    ``y[n] = constant[p] x[n] + sum_j scale[p, j] <basis_j, x[n]> basis_j`` with
    ``basis`` ``(J, H*W)`` orthonormal, ``scale`` ``(P, J)``, ``constant`` ``(P,)``,
    ``p = n % P``. Arithmetic in the basis' dtype; the result has ``x``'s dtype.
    """
    height, width = x.shape[-2:]
    n, planes = x.numel() // (height * width), scale.shape[0]
    xc = x.to(basis.dtype).reshape(n // planes, planes, height * width)
    coefficients = torch.matmul(xc, basis.transpose(0, 1)).mul_(scale)
    y = torch.baddbmm(xc * constant[:, None], coefficients, basis.expand(n // planes, -1, -1))
    return y.reshape(x.shape).to(x.dtype)


def is_channels_last(x: Tensor) -> bool:
    """Whether the SPG algorithms treat ``x`` ``(B, C, H, W)`` as channels_last (else as NCHW).

    NCHW-contiguous wins a tie (``C == 1`` or ``H == W == 1``); a map that is
    neither is treated as NCHW (:func:`pixels` copies it).
    """
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def pixels(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` ``(B, C, H, W)`` as ``(B, H*W, C)`` (channels_last) or ``(B, C, H*W)``.

    A view when ``x`` is laid out that way, else a contiguous copy.
    """
    batch, channels, height, width = x.shape
    if channels_last:
        return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    return x.reshape(batch, channels, height * width)


def from_pixels(x3: Tensor, height: int, width: int, channels_last: bool) -> Tensor:
    """The inverse of :func:`pixels`: ``(B, C, H, W)`` in the layout ``x3`` came from."""
    if channels_last:
        batch, _, channels = x3.shape
        return x3.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return x3.reshape(x3.shape[0], x3.shape[1], height, width)


def dense_1x1(x3: Tensor, weight: Tensor, channels_last: bool) -> Tensor:
    """The 1x1 conv ``weight`` ``(O, C)`` of pixels ``x3`` as one GEMM (channels_last) or a batched one."""
    if channels_last:
        return torch.matmul(x3, weight.transpose(0, 1))
    return torch.matmul(weight, x3)


def dense_1x1_weight_grad(g3: Tensor, x3: Tensor, channels_last: bool) -> Tensor:
    """``sum over pixels of g x^T`` ``(O, C)`` for pixels ``g3`` (O channels) and ``x3`` (C channels)."""
    if channels_last:
        return torch.mm(g3.reshape(-1, g3.shape[-1]).transpose(0, 1), x3.reshape(-1, x3.shape[-1]))
    # Batched over B, so neither map is permuted into a (C, B*H*W) copy.
    return torch.bmm(g3, x3.transpose(1, 2)).sum(0)


def project(x3: Tensor, real_basis: Tensor, channels_last: bool) -> Tensor:
    """Coefficients ``<e_j, x_c>`` ``(B, J, C)`` of pixels ``x3`` on the basis images ``(J, H*W)``."""
    return torch.matmul(real_basis, x3 if channels_last else x3.transpose(1, 2))


def synthesise(
    out3: Tensor, coefficients: Tensor, real_basis: Tensor, channels_last: bool, inplace: bool = True
) -> Tensor:
    """``out3 + sum_j coefficients[:, j] e_j`` for coefficients ``(B, J, O)``: in place, or functional."""
    batch, basis_size, channels = coefficients.shape
    if channels_last:
        images = real_basis.transpose(0, 1).expand(batch, -1, -1)
        return out3.baddbmm_(images, coefficients) if inplace else torch.baddbmm(out3, images, coefficients)
    flat = coefficients.transpose(1, 2).reshape(batch * channels, basis_size)
    planes = out3.view(batch * channels, -1)
    if inplace:
        planes.addmm_(flat, real_basis)
        return out3
    return torch.addmm(planes, flat, real_basis).view(out3.shape)


def spg_lowrank(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    real_basis: Tensor,
    scale: Tensor,
    constant: Tensor,
    inplace: bool = True,
) -> Tensor:
    """The split-SPG aggregation ``sum_c W[:, c] SPF_c(x_c) + b`` on the low-rank path (docs/spec.md §2).

    ``x`` ``(B, C, H, W)`` (NCHW or channels_last; the result has the same
    layout), ``weight`` ``(O, C)``, ``real_basis`` ``(J, H*W)`` and the
    per-channel ``scale`` ``(J, C)``/``constant`` ``(C,)`` of
    :meth:`CircularPlan.coefficient_scales`, all in the compute dtype: one
    GEMM with the weight scaled by ``constant``, and in coefficient space a
    projection, a per-channel scale, a ``J x C x O`` channel mix and a
    synthesis added onto it. The bias rides on the constant image (row 0).
    ``inplace=False`` keeps every step functional (for graph rewriting).
    """
    height, width = x.shape[-2:]
    layout = is_channels_last(x)
    x3 = pixels(x, layout)
    mixed = torch.matmul(project(x3, real_basis, layout) * scale, weight.transpose(0, 1))
    if bias is not None:
        mixed = torch.cat([mixed[:, :1] + bias * math.sqrt(height * width), mixed[:, 1:]], dim=1)
    out3 = synthesise(dense_1x1(x3, weight * constant, layout), mixed, real_basis, layout, inplace)
    return from_pixels(out3, height, width, layout)


def spg_lowrank_input_grad(
    grad: Tensor, weight: Tensor, real_basis: Tensor, scale: Tensor, constant: Tensor
) -> Tensor:
    """``SPF(W^T g)``, the input gradient of :func:`spg_lowrank` (each channel's filter is self-adjoint).

    The transposed GEMM with the ``constant``-scaled weight, plus ``g``'s
    projection mixed by ``W^T``, scaled per input channel and synthesised. The
    result has ``grad``'s layout (NCHW or channels_last).
    """
    height, width = grad.shape[-2:]
    layout = is_channels_last(grad)
    g3 = pixels(grad, layout)
    back = dense_1x1(g3, (weight * constant).transpose(0, 1), layout)
    mixed = torch.matmul(project(g3, real_basis, layout), weight) * scale
    return from_pixels(synthesise(back, mixed, real_basis, layout), height, width, layout)


def spg_lowrank_weight_grad(grad: Tensor, x: Tensor, real_basis: Tensor, scale: Tensor, constant: Tensor) -> Tensor:
    """``sum over batch and pixels of g SPF(x)^T`` ``(O, C)``, the weight gradient of :func:`spg_lowrank`.

    ``x`` is never filtered: ``constant`` times ``g x^T`` plus the pairing of
    both projections in coefficient space (the basis is orthonormal).
    """
    layout = is_channels_last(x)
    x3, g3 = pixels(x, layout), pixels(grad, layout)
    filtered = project(x3, real_basis, layout) * scale  # (B, J, C)
    spectral = torch.mm(project(g3, real_basis, layout).flatten(0, 1).transpose(0, 1), filtered.flatten(0, 1))
    return dense_1x1_weight_grad(g3, x3, layout) * constant + spectral


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
    """``Re(conj(X) G)`` in the natural layout, per plane (docs/spec.md §1 fact 4), in the inputs' dtype."""
    spec_x = torch.fft.rfft2(x, norm="ortho")
    spec_g = torch.fft.rfft2(grad_output, norm="ortho")
    half = spec_x.real * spec_g.real + spec_x.imag * spec_g.imag
    return half_to_full(half, x.shape[-1])
