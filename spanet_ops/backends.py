"""Which kernels are present, and the choice between them.

The native extension (``spanet_ops._C``, built from ``csrc/``) registers CPU and
CUDA kernels for the ``spanet`` kernel ops when it is imported; without it the
ops run their PyTorch implementation, after one warning. Triton kernels serve
CUDA tensors when Triton is importable.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Dict

import torch
from torch import Tensor

_native = None
_native_error: str = ""


def _load_native() -> None:
    global _native, _native_error
    if os.environ.get("SPANET_DISABLE_NATIVE", "0") == "1":
        _native_error = "disabled by SPANET_DISABLE_NATIVE=1"
        return
    try:
        _native = importlib.import_module("spanet_ops._C")
    except ImportError as exc:
        _native_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "spanet_ops native extension is not available; using the PyTorch kernels "
            f"({_native_error}). Build it with `pip install -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load_native()


def native_module():
    """The imported native extension module, or None."""
    return _native


def backends() -> Dict[str, Dict[str, object]]:
    """Report each kernel family: ``{"name": {"available": bool, "reason": str}}``."""
    report = {"pytorch": {"available": True, "reason": "always present"}}
    report["native_cpu"] = {
        "available": _native is not None,
        "reason": "built" if _native is not None else _native_error,
    }
    cuda_built = bool(_native is not None and _native.has_cuda())
    if cuda_built:
        cuda_reason = f"built for sm_{_native.build_info()['cuda_archs'].replace(',', ', sm_')}"
    elif _native is not None:
        cuda_reason = _native.build_info()["cuda_reason"] or "not compiled into the extension"
    else:
        cuda_reason = _native_error
    report["native_cuda"] = {"available": cuda_built, "reason": cuda_reason}
    has_triton = triton_available()
    report["triton"] = {
        "available": has_triton,
        "reason": "serves CUDA tensors" if has_triton else "triton is not importable",
    }
    return report


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels serve tensor ``t`` (CUDA tensors, Triton importable)."""
    return t.is_cuda and triton_available()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether :mod:`spanet_ops.triton` imports (Triton present); tried once, on first use."""
    try:
        importlib.import_module("spanet_ops.triton")
    except ImportError:
        return False
    return True


def lowrank_filter(planes: Tensor, basis_h: Tensor, basis_w: Tensor, weight: Tensor, constant: Tensor) -> Tensor:
    """The fused low-rank filter on contiguous planes ``(N, H, W)`` with the best kernel present."""
    if use_triton(planes):
        from .triton import lowrank_filter as triton_lowrank_filter

        return triton_lowrank_filter(planes, basis_h, basis_w, weight, constant)
    return torch.ops.spanet.lowrank_filter_kernel(planes, basis_h, basis_w, weight, constant)


def circular_fft_filter(x: Tensor, lam: Tensor, radius: float) -> Tensor:
    """The fft algorithm of the circular-mask SPF on ``x`` (compute dtype) with the best kernel present.

    On CUDA tensors with the native CUDA kernels built: cuFFT with the mask computed per bin from
    ``(radius, lam_c)``; otherwise the op's PyTorch default (half mask from the cached plan).
    """
    return torch.ops.spanet.circular_fft_filter_kernel(x, lam, float(radius))
