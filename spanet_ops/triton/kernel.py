"""The low-rank spectral filter in a real basis, as one Triton kernel, and its launcher.

For planes ``x`` ``(N, H, W)``, orthonormal basis images ``basis`` ``(J, H*W)``,
per-plane scales ``scale`` ``(P, J)`` and constants ``constant`` ``(P,)`` (plane
``n`` uses row ``n % P``)::

    y[n] = constant[p] * x[n] + sum_j scale[p, j] * <basis_j, x[n]> * basis_j

A block of ``BLOCK_PLANES`` consecutive planes is the M dimension of two skinny
GEMMs against the basis: the analysis ``C = X Phi^T`` (planes x ``J``, accumulated
over chunks of ``BLOCK_PIXELS`` pixels), the scaling ``C * scale[p]``, and the
synthesis ``Y = constant * X + C Phi``, chunk by chunk. No permutation, no cos/sin
pairing: the basis is real, so the scaling is a per-entry product. ``x`` comes
from DRAM once. A plane that fits one chunk stays in registers between the GEMMs;
a larger one is read a second time by the synthesis, from L2: the grid is then
persistent, capped so that the planes in flight fit L2
(:func:`spanet_ops.triton.tuning.candidate_configs`).

Arithmetic (:data:`spanet_ops.triton.tuning.DOT_PRECISION`; every ``tl.dot`` names
its ``input_precision``, so no global TF32 switch reaches it): float32 exact on the
FMA pipe ("ieee"), float64 exact in float64 (DMMA or DFMA), bfloat16 storage on
TF32 tensor cores (its values are exact in TF32), float16 storage on 3xTF32 (hi/lo
split of every operand). ``J`` is padded to a power of two, at least 8 for the
analysis (the dot's N) and 16 for the synthesis (the dot's reduction, ``tl.dot``'s
smallest); more than :data:`~spanet_ops.triton.tuning.MAX_BLOCK_J` basis images run
in blocks, each adding its correction to ``y``.

The kernels use ``triton.language`` builtins only (no ``tl.cdiv``/``tl.zeros``, which
are themselves ``triton.jit`` functions): the interpreter cannot call jit functions
decorated before it was switched on, as in a test process that imported Triton first.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning


@triton.jit
def _chunk(rows_ptr, k, live, HW: tl.constexpr, dtype: tl.constexpr):
    """Pixels ``k`` of the program's planes ``(BLOCK_PLANES, BLOCK_PIXELS)``, zero outside, in ``dtype``."""
    return tl.load(rows_ptr + k[None, :], mask=live[:, None] & (k < HW)[None, :], other=0.0).to(dtype)


@triton.jit
def _analysis_basis(basis_ptr, j, J: tl.constexpr, k, HW: tl.constexpr):
    """``Phi^T`` ``(BLOCK_PIXELS, len(j))`` for basis images ``j`` (rows ``>= J`` are zero)."""
    if J * HW >= 2**31:
        offs = j.to(tl.int64)[None, :] * HW + k[:, None]
    else:
        offs = j[None, :] * HW + k[:, None]
    return tl.load(basis_ptr + offs, mask=(j < J)[None, :] & (k < HW)[:, None], other=0.0)


@triton.jit
def _synthesis_basis(basis_ptr, j, j_live, J: tl.constexpr, k, HW: tl.constexpr):
    """``Phi`` ``(len(j), BLOCK_PIXELS)`` for basis images ``j`` where ``j_live``, zero elsewhere."""
    if J * HW >= 2**31:
        offs = j.to(tl.int64)[:, None] * HW + k[None, :]
    else:
        offs = j[:, None] * HW + k[None, :]
    return tl.load(basis_ptr + offs, mask=j_live[:, None] & (k < HW)[None, :], other=0.0)


@triton.jit
def _scaled_coefficients(acc, scale_ptr, p, live, j, J: tl.constexpr, JS: tl.constexpr, BLOCK_PLANES: tl.constexpr):
    """``acc * scale[p, j]``, widened to ``JS`` columns for the synthesis dot.

    ``tl.dot`` reduces over at least 16: an 8-wide block is interleaved with zeros
    (column ``2i`` holds coefficient ``i``), see :func:`_synthesis_rows`.
    """
    coef = acc * tl.load(scale_ptr + p[:, None] * J + j[None, :], mask=live[:, None] & (j < J)[None, :], other=0.0)
    if JS != j.shape[0]:
        coef = tl.reshape(tl.join(coef, tl.full(coef.shape, 0, coef.dtype)), (BLOCK_PLANES, JS))
    return coef


@triton.jit
def _synthesis_rows(J_START: tl.constexpr, J: tl.constexpr, JA: tl.constexpr, JS: tl.constexpr):
    """Basis image of each synthesis row, and whether the row is live (matches :func:`_scaled_coefficients`)."""
    r = tl.arange(0, JS)
    if JS == JA:
        j = J_START + r
        return j, j < J
    j = J_START + r // 2
    return j, (r % 2 == 0) & (j < J)


@triton.jit
def _filter_block(
    x_rows,
    y_rows,
    basis_ptr,
    scale_ptr,
    p,
    live,
    cst,
    FIRST: tl.constexpr,
    J_START: tl.constexpr,
    J: tl.constexpr,
    HW: tl.constexpr,
    JA: tl.constexpr,
    JS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_PLANES: tl.constexpr,
    BLOCK_PIXELS: tl.constexpr,
):
    """Basis images ``[J_START, J_START + JA)`` of one program's planes: analysis, scaling, synthesis.

    ``FIRST``: write ``cst * x + correction``; otherwise add the correction to ``y``.
    """
    compute = basis_ptr.dtype.element_ty
    out = y_rows.dtype.element_ty
    pix = tl.arange(0, BLOCK_PIXELS)
    ja = J_START + tl.arange(0, JA)
    js, js_live = _synthesis_rows(J_START, J, JA, JS)
    if HW <= BLOCK_PIXELS:
        # One chunk per plane: x stays in registers between the two GEMMs.
        x = _chunk(x_rows, pix, live, HW, compute)
        acc = tl.dot(x, _analysis_basis(basis_ptr, ja, J, pix, HW), input_precision=PRECISION, out_dtype=compute)
        coef = _scaled_coefficients(acc, scale_ptr, p, live, ja, J, JS, BLOCK_PLANES)
        y = tl.dot(coef, _synthesis_basis(basis_ptr, js, js_live, J, pix, HW), input_precision=PRECISION, out_dtype=compute)
        if FIRST:
            y += cst[:, None] * x
        else:
            y += _chunk(y_rows, pix, live, HW, compute)
        tl.store(y_rows + pix[None, :], y.to(out), mask=live[:, None] & (pix < HW)[None, :])
    else:
        acc = tl.full((BLOCK_PLANES, JA), 0, compute)
        for k0 in range(0, HW, BLOCK_PIXELS):
            k = k0 + pix
            x = _chunk(x_rows, k, live, HW, compute)
            acc = tl.dot(x, _analysis_basis(basis_ptr, ja, J, k, HW), acc, input_precision=PRECISION, out_dtype=compute)
        coef = _scaled_coefficients(acc, scale_ptr, p, live, ja, J, JS, BLOCK_PLANES)
        for k0 in range(0, HW, BLOCK_PIXELS):
            k = k0 + pix
            # The second read of a chunk: the planes in flight are still in L2 (the grid's cap).
            y = tl.dot(coef, _synthesis_basis(basis_ptr, js, js_live, J, k, HW), input_precision=PRECISION, out_dtype=compute)
            if FIRST:
                y += cst[:, None] * _chunk(x_rows, k, live, HW, compute)
            else:
                y += _chunk(y_rows, k, live, HW, compute)
            tl.store(y_rows + k[None, :], y.to(out), mask=live[:, None] & (k < HW)[None, :])


@triton.jit
def _plane_block(
    block,
    x_ptr,
    y_ptr,
    basis_ptr,
    scale_ptr,
    constant_ptr,
    N,
    P,
    HW: tl.constexpr,
    J: tl.constexpr,
    JA: tl.constexpr,
    JS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_PLANES: tl.constexpr,
    BLOCK_PIXELS: tl.constexpr,
):
    """Planes ``[block * BLOCK_PLANES, (block + 1) * BLOCK_PLANES)``, all basis blocks."""
    compute = basis_ptr.dtype.element_ty
    plane = tl.arange(0, BLOCK_PLANES)
    n = block * BLOCK_PLANES + plane
    live = n < N
    p = n % P
    # The block's planes are contiguous: a 64-bit start, 32-bit offsets inside the block
    # unless the block itself reaches 2^31 elements.
    start = tl.cast(block, tl.int64) * (BLOCK_PLANES * HW)
    if BLOCK_PLANES * HW >= 2**31:
        rows = plane.to(tl.int64)[:, None] * HW
    else:
        rows = plane[:, None] * HW
    x_rows = x_ptr + start + rows
    y_rows = y_ptr + start + rows
    cst = tl.load(constant_ptr + p, mask=live, other=0.0).to(compute)
    if J == 0:
        pix = tl.arange(0, BLOCK_PIXELS)
        for k0 in range(0, HW, BLOCK_PIXELS):
            k = k0 + pix
            y = cst[:, None] * _chunk(x_rows, k, live, HW, compute)
            tl.store(y_rows + k[None, :], y.to(y_ptr.dtype.element_ty), mask=live[:, None] & (k < HW)[None, :])
    else:
        for j_start in tl.static_range(0, J, JA):
            _filter_block(
                x_rows, y_rows, basis_ptr, scale_ptr, p, live, cst,
                j_start == 0, j_start, J, HW, JA, JS, PRECISION, BLOCK_PLANES, BLOCK_PIXELS,
            )


@triton.jit(do_not_specialize=["N_BUCKET", "CTAS_PER_SM"])
def _basis_filter_kernel(
    x_ptr,
    y_ptr,
    basis_ptr,
    scale_ptr,
    constant_ptr,
    N,
    P,
    N_BUCKET,  # the autotuning key's batch bucket (next power of two of N); unused by the code
    CTAS_PER_SM,  # the launcher's grid cap (tuning.grid_size); unused by the code
    HW: tl.constexpr,
    J: tl.constexpr,
    JA: tl.constexpr,
    JS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_PLANES: tl.constexpr,
    BLOCK_PIXELS: tl.constexpr,
):
    # Each program walks its blocks. The grid is one program per block, or capped (persistent)
    # so that the planes in flight, which the synthesis reads a second time, stay within L2.
    for block in range(tl.program_id(0), (N + BLOCK_PLANES - 1) // BLOCK_PLANES, tl.num_programs(0)):
        _plane_block(
            block, x_ptr, y_ptr, basis_ptr, scale_ptr, constant_ptr, N, P,
            HW, J, JA, JS, PRECISION, BLOCK_PLANES, BLOCK_PIXELS,
        )


#: Whether ``triton.jit`` built interpreter functions (``TRITON_INTERPRET=1`` at import):
#: they run on CPU tensors, one fixed configuration, no autotuning.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

_tuned_kernel = triton.autotune(
    configs=[config.triton() for config in tuning.CONFIG_SPACE],
    key=["N_BUCKET", "HW", "J"],  # the autotuner adds every tensor argument's dtype
    prune_configs_by={"early_config_prune": tuning.prune_configs},
)(_basis_filter_kernel)


def _check(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor) -> None:
    if x.dtype not in tuning.DOT_PRECISION:
        raise TypeError(f"basis_filter: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"basis_filter: x must be planes (N, H, W), got shape {tuple(x.shape)}")
    n, height, width = x.shape
    compute = tuning.compute_dtype(x.dtype)
    for name, t in (("basis", basis), ("scale", scale), ("constant", constant)):
        if t.dtype != compute:
            raise TypeError(f"basis_filter: {name} must be {compute} for {x.dtype} planes, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"basis_filter: {name} must be on x's device {x.device}, got {t.device}")
    if basis.dim() != 2 or basis.shape[1] != height * width:
        raise ValueError(f"basis_filter: basis must be (J, H*W) = (J, {height * width}), got shape {tuple(basis.shape)}")
    if scale.dim() != 2 or scale.shape[1] != basis.shape[0] or scale.shape[0] < 1:
        raise ValueError(f"basis_filter: scale must be (P, J) with P >= 1, J = {basis.shape[0]}, got shape {tuple(scale.shape)}")
    planes = scale.shape[0]
    if tuple(constant.shape) != (planes,):
        raise ValueError(f"basis_filter: constant must be (P,) = ({planes},), got shape {tuple(constant.shape)}")
    if n % planes:
        raise ValueError(f"basis_filter: the number of planes N = {n} must be a multiple of P = {planes}")
    expected = "cpu" if INTERPRETED else "cuda"
    if x.device.type != expected:
        where = "CPU tensors (TRITON_INTERPRET=1 at import)" if INTERPRETED else "CUDA tensors"
        raise ValueError(f"basis_filter: this build of the kernel runs on {where}, got a tensor on {x.device}")


def _launch(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor, config: Optional[tuning.Config],
            autotune: bool) -> Tensor:
    """Launch at ``config``, or through the autotuner (``autotune``), or at the interpreter's configuration."""
    x, basis, scale, constant = x.contiguous(), basis.contiguous(), scale.contiguous(), constant.contiguous()
    n, height, width = x.shape
    hw, j = height * width, basis.shape[0]
    y = torch.empty_like(x)
    if n == 0 or hw == 0:
        return y
    ja, js = tuning.basis_blocks(j)
    if j == 0:  # no basis images to read: the constant stands in for the empty pointers
        basis = scale = constant
    args = (x, y, basis, scale, constant, n, scale.shape[0], triton.next_power_of_2(n))
    meta = dict(HW=hw, J=j, JA=ja, JS=js, PRECISION=tuning.DOT_PRECISION[x.dtype])
    sms = tuning.INTERPRETER_PROGRAMS if INTERPRETED else tuning.hardware(x.device).sms
    if config is None and not autotune:
        config = tuning.INTERPRETER_CONFIG
    # Triton launches on the current device: make it x's.
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        if config is None:
            grid = lambda m: (tuning.grid_size(n, m["BLOCK_PLANES"], m["CTAS_PER_SM"], sms),)  # noqa: E731
            _tuned_kernel[grid](*args, **meta)
        else:
            _basis_filter_kernel[(tuning.grid_size(n, config.block_planes, config.ctas_per_sm, sms),)](
                *args, config.ctas_per_sm, **meta, BLOCK_PLANES=config.block_planes,
                BLOCK_PIXELS=config.block_pixels, num_warps=config.num_warps, num_stages=config.num_stages,
            )
    return y


def basis_filter(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor) -> Tensor:
    """``y[n] = constant[p] x[n] + sum_j scale[p, j] <basis_j, x[n]> basis_j`` with ``p = n % P``.

    Args:
        x: planes ``(N, H, W)``, float64, float32, float16 or bfloat16.
        basis: ``(J, H*W)`` orthonormal basis images in the compute dtype (float64 for
            float64 ``x``, else float32); ``J`` may be 0.
        scale: ``(P, J)`` per-plane scales, compute dtype; ``P >= 1`` and ``N % P == 0``.
        constant: ``(P,)`` per-plane constants, compute dtype.

    Returns:
        ``y`` ``(N, H, W)``, contiguous, in ``x``'s dtype.

    Runs on CUDA tensors (on ``x``'s device), or on CPU tensors when Triton's interpreter
    was on at import (``TRITON_INTERPRET=1``). The configuration is autotuned once per
    plane size, ``J``, dtype and power-of-two bucket of ``N``; the arithmetic per dtype is
    :data:`spanet_ops.triton.tuning.DOT_PRECISION`. Never reads tensor data on the host.

    Raises:
        TypeError: a dtype outside the contract.
        ValueError: shapes that do not fit, tensors on different devices, or a device
            this build does not run on.
    """
    _check(x, basis, scale, constant)
    return _launch(x, basis, scale, constant, None, autotune=not INTERPRETED)


def basis_filter_with_config(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor, config: tuning.Config) -> Tensor:
    """:func:`basis_filter` at one fixed :class:`~spanet_ops.triton.tuning.Config` (no autotuning).

    For tests and measurements that need a configuration the autotuner would not pick.
    """
    _check(x, basis, scale, constant)
    return _launch(x, basis, scale, constant, config, autotune=False)
