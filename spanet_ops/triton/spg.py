"""The spectral part of the fused split-SPG aggregation (SPEC §2) in Triton.

``out = base + A^T (sum_c W[o, c] Z[b, c]) B`` where ``Z[b, c]`` are the scaled
coefficients of input plane ``(b, c)`` and ``base`` is the 1x1 conv's output.
Three steps, none touching a full plane twice:

1. :func:`~spanet_ops.triton.passes.analyse`: one read of each input plane,
   out come its ``(2K, 2L)`` scaled coefficients (``4 K L`` floats against ``H W``).
2. Channel mixing in coefficient space: ``(O, C) @ (B, C, 4KL)``, a small GEMM
   left to cuBLAS, where such products run best.
3. :func:`~spanet_ops.triton.passes.synthesise_onto`: one read of ``base``,
   synthesis of the mixed coefficients, one write of the output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import DOT_PRECISION, unsupported_reason
from .passes import analyse, synthesise_onto


def _check(x: Tensor, base: Tensor, weight: Tensor, basis_h: Tensor, basis_w: Tensor, coeff_weight: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise ValueError(f"weight must be (C_out, {channels}), got shape {tuple(weight.shape)}")
    expected = (batch, weight.shape[0], height, width)
    if tuple(base.shape) != expected:
        raise ValueError(f"base must be {expected}, got shape {tuple(base.shape)}")
    if basis_h.dim() != 2 or basis_h.shape[1] != height or basis_h.shape[0] % 2:
        raise ValueError(f"basis_h must be (2K, {height}), got shape {tuple(basis_h.shape)}")
    if basis_w.dim() != 2 or basis_w.shape[1] != width or basis_w.shape[0] % 2:
        raise ValueError(f"basis_w must be (2L, {width}), got shape {tuple(basis_w.shape)}")
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    if tuple(coeff_weight.shape) != (channels, k, l):
        raise ValueError(f"coeff_weight must be ({channels}, {k}, {l}), got shape {tuple(coeff_weight.shape)}")


def spg_spectral(
    x: Tensor, base: Tensor, weight: Tensor, basis_h: Tensor, basis_w: Tensor, coeff_weight: Tensor
) -> Tensor:
    """``base`` plus the coefficient-space spectral part; same contract as :func:`spanet_ops.algorithms.spg_spectral`.

    Args:
        x: ``(B, C, H, W)`` input in float32, float16 or bfloat16.
        base: ``(B, O, H, W)``, the 1x1 conv with the ``1 - lam_c``-scaled weight and the bias.
        weight: ``(O, C)`` the concatenated 1x1 weight.
        basis_h, basis_w: the plan's float32 bases ``(2K, H)``, ``(2L, W)``.
        coeff_weight: ``(C, K, L)`` per-channel bin weights.

    Returns:
        A contiguous tensor of ``base``'s shape and dtype. Problems the
        kernels do not take go to ``torch.ops.spanet.spg_spectral_kernel``.
    """
    _check(x, base, weight, basis_h, basis_w, coeff_weight)
    if unsupported_reason(x, basis_h, basis_w) or base.dtype not in DOT_PRECISION or base.device != x.device:
        return torch.ops.spanet.spg_spectral_kernel(x, base, weight, basis_h, basis_w, coeff_weight)
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    basis_h, basis_w = basis_h.contiguous(), basis_w.contiguous()
    planes = x.contiguous().reshape(batch * channels, height, width)
    coefficients = analyse(planes, basis_h, basis_w, coeff_weight)  # (B*C, 2K, 2L), plane b*C+c uses c
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    # Mixing stays in float32 under autocast too: the kernels' contract is float32 arithmetic.
    with torch.autocast(x.device.type, enabled=False):
        mixed = torch.matmul(weight.to(torch.float32), coefficients.reshape(batch, channels, 4 * k * l))
    out = synthesise_onto(
        mixed.reshape(batch * out_channels, 2 * k, 2 * l),
        base.contiguous().reshape(batch * out_channels, height, width),
        basis_h,
        basis_w,
    )
    return out.reshape(base.shape)
