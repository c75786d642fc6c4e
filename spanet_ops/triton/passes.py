"""Analysis and synthesis as separate, tiled passes.

Used by the split-SPG aggregation (channels are mixed between the two
passes) and by the low-rank filter for planes too large for one program
(then the input is read twice and the output written once).

* :func:`analyse`: one read of each plane (tile by tile), out come its scaled
  coefficients ``Z`` ``(N, 2K, 2L)`` in float32. A tiled plane's tiles write
  partial coefficients that are summed afterwards (deterministically, no
  atomics).
* :func:`synthesise_onto`: ``out = s * base + A^T M B`` per plane, tile by tile,
  with ``s`` the mask constant of the plane (low-rank filter, ``base = x``)
  or 1 (split-SPG, ``base`` the 1x1 conv's output).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    AUTOTUNE_KEY,
    CONFIGS,
    DOT_PRECISION,
    coefficient_offsets,
    frequency_blocks,
    half_swap,
    load_basis,
    prune_configs,
    scale_grids,
    scaled_coefficients,
    synthesise,
    tiling,
)


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _analysis_kernel(
    x_ptr,
    z_ptr,
    bh_ptr,
    bw_ptr,
    w_ptr,
    N,
    P,
    H,
    W,
    K,
    L,
    TILES_H,
    TILES_W,
    TH: tl.constexpr,
    TW: tl.constexpr,
    KP: tl.constexpr,
    LP: tl.constexpr,
    PRECISION: tl.constexpr,
    PLANES: tl.constexpr,
):
    # Axis 0: groups of PLANES planes; axis 1: tiles. Plane n uses weight plane n % P and
    # writes its tile's partial coefficients to z[n, tile] (z is (N, TILES_H * TILES_W, 2K, 2L)).
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    h0 = (tile // TILES_W) * TH
    w0 = (tile % TILES_W) * TW
    a = load_basis(bh_ptr, K, H, h0, KP, TH, False)  # (2KP, TH)
    bt = load_basis(bw_ptr, L, W, w0, LP, TW, True)  # (TW, 2LP)
    swap_h = half_swap(KP)
    swap_w = half_swap(LP)
    rows = h0 + tl.arange(0, TH)
    cols = w0 + tl.arange(0, TW)
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    z_offs, z_mask = coefficient_offsets(K, L, KP, LP)
    for i in range(PLANES):
        n = pid * PLANES + i
        x = tl.load(x_ptr + n.to(tl.int64) * H * W + offs, mask=inside & (n < N), other=0.0).to(tl.float32)
        wf, wg = scale_grids(w_ptr, n % P, K, L, KP, LP)
        z = scaled_coefficients(x, a, bt, swap_h, swap_w, wf, wg, PRECISION)
        z_start = (n.to(tl.int64) * (TILES_H * TILES_W) + tile) * (4 * K * L)
        tl.store(z_ptr + z_start + z_offs, z, mask=z_mask & (n < N))


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _synthesis_kernel(
    m_ptr,
    base_ptr,
    out_ptr,
    bh_ptr,
    bw_ptr,
    c_ptr,
    N,
    P,
    H,
    W,
    K,
    L,
    TILES_H,
    TILES_W,
    TH: tl.constexpr,
    TW: tl.constexpr,
    KP: tl.constexpr,
    LP: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_BASE: tl.constexpr,
    PLANES: tl.constexpr,
):
    # Plane n's coefficients are m[n] (2K, 2L); with SCALE_BASE its base is scaled by c[n % P].
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    h0 = (tile // TILES_W) * TH
    w0 = (tile % TILES_W) * TW
    at = load_basis(bh_ptr, K, H, h0, KP, TH, True)  # (TH, 2KP)
    b = load_basis(bw_ptr, L, W, w0, LP, TW, False)  # (2LP, TW)
    rows = h0 + tl.arange(0, TH)
    cols = w0 + tl.arange(0, TW)
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    z_offs, z_mask = coefficient_offsets(K, L, KP, LP)
    for i in range(PLANES):
        n = pid * PLANES + i
        live = inside & (n < N)
        z = tl.load(m_ptr + n.to(tl.int64) * (4 * K * L) + z_offs, mask=z_mask & (n < N), other=0.0)
        start = n.to(tl.int64) * H * W
        base = tl.load(base_ptr + start + offs, mask=live, other=0.0).to(tl.float32)
        if SCALE_BASE:
            base = base * tl.load(c_ptr + n % P).to(tl.float32)
        y = base + synthesise(z, at, b, PRECISION)
        tl.store(out_ptr + start + offs, y.to(out_ptr.dtype.element_ty), mask=live)


def _grid(n: int, tiles: int):
    return lambda meta: (triton.cdiv(n, meta["PLANES"]), tiles)


def analyse(planes: Tensor, basis_h: Tensor, basis_w: Tensor, weight: Tensor) -> Tensor:
    """Scaled coefficients ``(N, 2K, 2L)`` float32 of contiguous planes ``(N, H, W)``; plane n uses ``weight[n % P]``."""
    n, height, width = planes.shape
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    th, tw, tiles_h, tiles_w = tiling(height, width)
    kp, lp = frequency_blocks(k, l)
    tiles = tiles_h * tiles_w
    partial = torch.empty(n, tiles, 2 * k, 2 * l, device=planes.device, dtype=torch.float32)
    if n:
        _analysis_kernel[_grid(n, tiles)](
            planes,
            partial,
            basis_h,
            basis_w,
            weight.to(torch.float32).contiguous(),
            n,
            weight.shape[0],
            height,
            width,
            k,
            l,
            tiles_h,
            tiles_w,
            TH=th,
            TW=tw,
            KP=kp,
            LP=lp,
            PRECISION=DOT_PRECISION[planes.dtype],
        )
    return partial[:, 0] if tiles == 1 else partial.sum(dim=1)


def synthesise_onto(
    coefficients: Tensor, base: Tensor, basis_h: Tensor, basis_w: Tensor, constant: Optional[Tensor] = None
) -> Tensor:
    """``constant[n % P] * base[n] + A^T coefficients[n] B`` for contiguous ``base`` ``(N, H, W)``, in ``base``'s dtype.

    ``coefficients`` ``(N, 2K, 2L)`` float32; without ``constant`` the base is added unscaled.
    """
    n, height, width = base.shape
    k, l = basis_h.shape[0] // 2, basis_w.shape[0] // 2
    th, tw, tiles_h, tiles_w = tiling(height, width)
    kp, lp = frequency_blocks(k, l)
    out = torch.empty_like(base)
    if n == 0:
        return out
    scale = constant is not None
    constant = constant.to(torch.float32).contiguous() if scale else coefficients  # unread without SCALE_BASE
    _synthesis_kernel[_grid(n, tiles_h * tiles_w)](
        coefficients.contiguous(),
        base,
        out,
        basis_h,
        basis_w,
        constant,
        n,
        constant.shape[0] if scale else 1,
        height,
        width,
        k,
        l,
        tiles_h,
        tiles_w,
        TH=th,
        TW=tw,
        KP=kp,
        LP=lp,
        PRECISION=DOT_PRECISION[base.dtype],
        SCALE_BASE=scale,
    )
    return out
