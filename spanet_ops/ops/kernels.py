"""The kernel-op tier: plan tensors in, result out, no autograd, no validation of user input.

Each kernel op has a schema, a fake kernel and a PyTorch default registered as
``CompositeExplicitAutograd`` (:mod:`spanet_ops.algorithms`). Faster kernels
register for a device's dispatch key and the dispatcher prefers them:

* the native extension (``csrc/``, loaded by :mod:`spanet_ops.backends`):
  ``lowrank_filter_kernel`` (CPU), the three ``spg_lowrank*_kernel`` ops (CPU and
  CUDA: ATen GEMM compositions without Python overhead) and
  ``circular_fft_filter_kernel`` (CUDA: cuFFT with the mask computed per bin);
* Triton (:mod:`spanet_ops.triton`): ``basis_filter_kernel`` on CUDA, registered
  here, imported on its first CUDA call.

The families (:mod:`.filter`, :mod:`.spf`, :mod:`.spg`) call these ops only;
nothing else chooses a backend.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import algorithms
from ..backends import triton_module
from ..masks import BOUNDARY_VALUE, squared_distance
from ..plans import plan_cache

_lib = torch.library.Library("spanet", "FRAGMENT")


def _like_x(x: Tensor, *args) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _define(schema: str, default, fake=_like_x) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, default, "CompositeExplicitAutograd")
    torch.library.register_fake(f"spanet::{name}", fake, lib=_lib)


# The separable low-rank filter on planes (..., H, W) with factored bases (plans.Factors); plane n of the N uses
# mask plane n % P.
_define(
    "lowrank_filter_kernel(Tensor x, Tensor row_factors, Tensor row_index, Tensor row_sign, int even_rows, "
    "Tensor col_factors, Tensor col_index, Tensor col_sign, Tensor weight, Tensor constant) -> Tensor",
    algorithms.lowrank_filter,
)
# The low-rank filter on planes (..., H, W) in the real basis (J, H*W): X Phi^T diag(scale_p) Phi + c_p X.
_define("basis_filter_kernel(Tensor x, Tensor basis, Tensor scale, Tensor constant) -> Tensor", algorithms.basis_filter)


def _half_regions(height: int, width: int, inside_limit: int, edge: int, device) -> tuple:
    def build():
        d2 = squared_distance(height, width, centered=False, device=device)[:, : width // 2 + 1]
        return d2 < inside_limit, d2 == edge

    return plan_cache().get(("half_regions", height, width, inside_limit, edge, device), build)


def _circular_fft_filter_default(x: Tensor, lam: Tensor, inside_limit: int, edge: int) -> Tensor:
    inside, boundary = _half_regions(x.shape[-2], x.shape[-1], inside_limit, edge, x.device)
    lam = lam.reshape(-1, 1, 1)
    # The published float32 values (1 - lam in float32), with the DFT's 1/(H W) folded in.
    scale = 1.0 / (x.shape[-2] * x.shape[-1])
    inside_value, outside_value = lam.to(x.dtype) * scale, (1.0 - lam).to(x.dtype) * scale
    half = torch.where(inside, inside_value, torch.where(boundary, BOUNDARY_VALUE * scale, outside_value))
    return algorithms.fft_filter(x, half if lam.shape[0] > 1 else half[0])


# The fft algorithm of the published circular mask on x (..., C, H, W) in the compute dtype, lam float32
# (P,) with P = 1 or C: bins with integer squared distance d2 < inside_limit get lam, d2 == edge 1/3,
# the others 1 - lam (plans.DiscThresholds).
_define(
    "circular_fft_filter_kernel(Tensor x, Tensor lam, int inside_limit, int edge) -> Tensor",
    _circular_fft_filter_default,
)


def _spg_like(first: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    # A channels_last map keeps its layout (the GEMM path computes in it without copies).
    fmt = torch.channels_last if algorithms.is_channels_last(first) else torch.contiguous_format
    shape = (first.shape[0], channels, first.shape[2], first.shape[3])
    return torch.empty(shape, dtype=dtype, device=first.device, memory_format=fmt)


# spg on the basis path, all in the compute dtype: forward (x (B, C, H, W), weight (O, C), basis (J, HW),
# scale (J, C), constant (C,)), input gradient (grad (B, O, H, W)) and weight gradient ((O, C)).
_define(
    "spg_lowrank_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor basis, Tensor scale, Tensor constant) -> Tensor",
    algorithms.spg_lowrank,
    lambda x, weight, *args: _spg_like(x, weight.shape[0], x.dtype),
)
_define(
    "spg_lowrank_input_grad_kernel(Tensor grad, Tensor weight, Tensor basis, Tensor scale, Tensor constant) -> Tensor",
    algorithms.spg_lowrank_input_grad,
    lambda grad, weight, *args: _spg_like(grad, weight.shape[1], grad.dtype),
)
_define(
    "spg_lowrank_weight_grad_kernel(Tensor grad, Tensor x, Tensor basis, Tensor scale, Tensor constant) -> Tensor",
    algorithms.spg_lowrank_weight_grad,
    lambda grad, x, *args: grad.new_empty((grad.shape[1], x.shape[1])),
)


def _basis_filter_cuda(x: Tensor, basis: Tensor, scale: Tensor, constant: Tensor) -> Tensor:
    kernels = triton_module()
    if kernels is None:  # no Triton: PyTorch's GEMMs (cuBLAS)
        return algorithms.basis_filter(x, basis, scale, constant)
    planes = x.reshape(-1, *x.shape[-2:])  # the launcher takes (N, H, W)
    return kernels.basis_filter(planes, basis, scale, constant).view(x.shape)


torch.library.register_kernel("spanet::basis_filter_kernel", "cuda", _basis_filter_cuda, lib=_lib)


def own_arithmetic(x: Tensor):
    """Context of an op's implementation: the arithmetic the op chooses itself, whatever the caller's settings.

    The ops compute in float32 (float64 for float64 input) and return their input's
    dtype: autocast reaching inside would turn their GEMMs to half precision, and
    TF32 (``set_float32_matmul_precision``, cuDNN's ``allow_tf32``) would round float32
    inputs to 10 mantissa bits, so both are switched off inside where they are on.
    A context (not a decorator) so that no frame of this module sits between a
    family's op and its kernels; a shared no-op one where there is nothing to switch.
    """
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    exact = device_type == "cuda" and x.dtype != torch.float64  # computed in float32
    if not (autocast or exact):
        return _NOTHING_TO_SWITCH
    return _OwnArithmetic(device_type, autocast, exact)


_NOTHING_TO_SWITCH = contextlib.nullcontext()


class _OwnArithmetic:
    """Autocast off (where it was on) and full float32 GEMMs and convolutions on CUDA, restored on exit."""

    __slots__ = ("_device_type", "_autocast", "_saved")

    def __init__(self, device_type: str, autocast: bool, exact: bool):
        self._device_type = device_type
        self._autocast = torch.autocast(device_type, enabled=False) if autocast else None
        self._saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) if exact else None

    def __enter__(self):
        if self._autocast is not None:
            self._autocast.__enter__()
        if self._saved is not None:
            torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = self._saved
        if self._autocast is not None:
            self._autocast.__exit__(*exc)
        return False
