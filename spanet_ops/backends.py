"""Which kernels are present.

The native extension (``spanet_ops._C``, built from ``csrc/``) registers CPU and
CUDA kernels for the ``spanet`` kernel ops when it is imported; without it the
ops run their PyTorch implementation, after one warning. The Triton kernels
(:mod:`spanet_ops.triton`) are registered as ``basis_filter_kernel``'s CUDA kernel
by :mod:`spanet_ops.ops.kernels` and imported on first use. The dispatcher then
picks, per device, the kernel registered for it: nothing here chooses per call.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Dict

import torch

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


def cuda_device_problem() -> str:
    """Why the native CUDA kernels cannot run on the current CUDA device ("" when they can, or without a GPU).

    The build holds SASS for ``SPANET_CUDA_ARCHS`` and PTX of the highest; another
    architecture (e.g. sm_75) needs a rebuild, which the message says how to do.
    """
    if _native is None or not _native.has_cuda() or not torch.cuda.is_available():
        return ""
    return _native.cuda_arch_problem(*torch.cuda.get_device_capability())


def backends() -> Dict[str, Dict[str, object]]:
    """Report each kernel family: ``{"name": {"available": bool, "reason": str}}``."""
    report = {"pytorch": {"available": True, "reason": "always present"}}
    report["native_cpu"] = {
        "available": _native is not None,
        "reason": "built" if _native is not None else _native_error,
    }
    cuda_built = bool(_native is not None and _native.has_cuda())
    if cuda_built:
        info = _native.build_info()
        cuda_reason = f"built for sm_{info['cuda_archs'].replace(',', ', sm_')}"
        if info.get("cuda_ptx"):
            cuda_reason += f" (+ PTX compute_{info['cuda_ptx']})"
        problem = cuda_device_problem()
        if problem:
            cuda_built, cuda_reason = False, problem
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


@functools.lru_cache(maxsize=None)
def triton_module():
    """:mod:`spanet_ops.triton` (the CUDA kernels of ``basis_filter_kernel``), imported once; None without Triton."""
    try:
        return importlib.import_module("spanet_ops.triton")
    except ImportError:
        return None


def triton_available() -> bool:
    """Whether :mod:`spanet_ops.triton` imports (Triton present); tried once, on first use."""
    return triton_module() is not None
