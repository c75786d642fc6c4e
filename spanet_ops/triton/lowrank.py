"""The fused low-rank spectral filter in Triton: one read and one write of every plane.

Each program holds the padded bases in registers and filters ``PLANES``
consecutive planes ``(H, W)``: analysis ``A x B^T`` with two ``tl.dot``, the
per-bin scaling to ``[[R, Q], [Q, -R]]``, synthesis ``A^T Z B`` with two more,
plus ``c x``. Storage in float32/float16/bfloat16, arithmetic in float32.
The filter is self-adjoint, so the same kernel computes the backward pass.
Planes too large for one program are tiled: the tiled analysis and synthesis
passes of :mod:`spanet_ops.triton.passes` (two reads and one write).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    AUTOTUNE_KEY,
    CONFIGS,
    DOT_PRECISION,
    frequency_blocks,
    half_swap,
    load_basis,
    prune_configs,
    scale_grids,
    scaled_coefficients,
    synthesise,
    tiling,
    unsupported_reason,
)
from .passes import analyse, synthesise_onto


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _lowrank_filter_kernel(
    x_ptr,
    y_ptr,
    bh_ptr,
    bw_ptr,
    w_ptr,
    c_ptr,
    N,
    P,
    H,
    W,
    K,
    L,
    TH: tl.constexpr,
    TW: tl.constexpr,
    KP: tl.constexpr,
    LP: tl.constexpr,
    PRECISION: tl.constexpr,
    PLANES: tl.constexpr,
):
    pid = tl.program_id(0)
    # The whole plane is one (TH, TW) tile.
    a = load_basis(bh_ptr, K, H, 0, KP, TH, False)  # (2KP, TH)
    at = load_basis(bh_ptr, K, H, 0, KP, TH, True)  # (TH, 2KP)
    b = load_basis(bw_ptr, L, W, 0, LP, TW, False)  # (2LP, TW)
    bt = load_basis(bw_ptr, L, W, 0, LP, TW, True)  # (TW, 2LP)
    swap_h = half_swap(KP)
    swap_w = half_swap(LP)
    rows = tl.arange(0, TH)
    cols = tl.arange(0, TW)
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    for i in range(PLANES):
        n = pid * PLANES + i
        live = inside & (n < N)
        p = n % P  # plane n uses mask plane n % P
        start = n.to(tl.int64) * H * W
        x = tl.load(x_ptr + start + offs, mask=live, other=0.0).to(tl.float32)
        wf, wg = scale_grids(w_ptr, p, K, L, KP, LP)
        z = scaled_coefficients(x, a, bt, swap_h, swap_w, wf, wg, PRECISION)
        y = synthesise(z, at, b, PRECISION) + tl.load(c_ptr + p).to(tl.float32) * x
        tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=live)


def _check(planes: Tensor, basis_h: Tensor, basis_w: Tensor, weight: Tensor, constant: Tensor) -> None:
    if planes.dim() != 3:
        raise ValueError(f"planes must be (N, H, W), got shape {tuple(planes.shape)}")
    n, height, width = planes.shape
    if basis_h.dim() != 2 or basis_h.shape[1] != height or basis_h.shape[0] % 2:
        raise ValueError(f"basis_h must be (2K, {height}), got shape {tuple(basis_h.shape)}")
    if basis_w.dim() != 2 or basis_w.shape[1] != width or basis_w.shape[0] % 2:
        raise ValueError(f"basis_w must be (2L, {width}), got shape {tuple(basis_w.shape)}")
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    if weight.dim() != 3 or tuple(weight.shape[1:]) != (k, l):
        raise ValueError(f"weight must be (P, {k}, {l}), got shape {tuple(weight.shape)}")
    p = weight.shape[0]
    if p == 0 or n % p:
        raise ValueError(f"the number of planes ({n}) must be a multiple of the weight's planes ({p})")
    if tuple(constant.shape) != (p,):
        raise ValueError(f"constant must be ({p},), got shape {tuple(constant.shape)}")


def lowrank_filter(planes: Tensor, basis_h: Tensor, basis_w: Tensor, weight: Tensor, constant: Tensor) -> Tensor:
    """The low-rank filter of ``planes`` ``(N, H, W)``; same contract as :func:`spanet_ops.algorithms.lowrank_filter`.

    Args:
        planes: ``(N, H, W)`` in float32, float16 or bfloat16 (storage dtype).
        basis_h, basis_w: the plan's float32 bases ``(2K, H)`` and ``(2L, W)``.
        weight: ``(P, K, L)`` per-bin weights, ``N % P == 0``; plane ``n`` uses ``n % P``.
        constant: ``(P,)`` the mask's constant per mask plane.

    Returns:
        The filtered planes, contiguous, in ``planes``' dtype.

    Planes larger than one program's tile run as two tiled passes.
    Problems the kernels do not take (a float64 compute dtype, many
    frequencies, tensors on another device; see
    :func:`spanet_ops.triton.common.unsupported_reason`) go to
    ``torch.ops.spanet.lowrank_filter_kernel``, which is exact for all.
    """
    _check(planes, basis_h, basis_w, weight, constant)
    if unsupported_reason(planes, basis_h, basis_w):
        return torch.ops.spanet.lowrank_filter_kernel(planes, basis_h, basis_w, weight, constant)
    x = planes.contiguous()
    n, height, width = x.shape
    if n == 0:
        return torch.empty_like(x)
    basis_h, basis_w = basis_h.contiguous(), basis_w.contiguous()
    weight, constant = weight.to(torch.float32).contiguous(), constant.to(torch.float32).contiguous()
    th, tw, tiles_h, tiles_w = tiling(height, width)
    if tiles_h * tiles_w > 1:
        return synthesise_onto(analyse(x, basis_h, basis_w, weight), x, basis_h, basis_w, constant)
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    kp, lp = frequency_blocks(k, l)
    y = torch.empty_like(x)
    _lowrank_filter_kernel[lambda meta: (triton.cdiv(n, meta["PLANES"]),)](
        x,
        y,
        basis_h,
        basis_w,
        weight,
        constant,
        n,
        weight.shape[0],
        height,
        width,
        k,
        l,
        TH=th,
        TW=tw,
        KP=kp,
        LP=lp,
        PRECISION=DOT_PRECISION[x.dtype],
    )
    return y
