"""Input validation shared by every operator, backend and fake kernel.

The checks use ``torch._check_*`` so that the same code runs on real tensors
and on fake (symbolic) tensors during tracing. Errors name the problem:
``TypeError`` for a wrong dtype, ``ValueError`` for a wrong shape or value.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ALGORITHMS = ("auto", "fft", "lowrank", "reference")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for storage ``dtype``: fp64 stays fp64, everything else uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_algorithm(algorithm: str) -> None:
    """Reject an unknown algorithm name."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def check_real_floating(t: Tensor, name: str) -> None:
    """Require a real floating tensor of a supported dtype."""
    torch._check_type(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be a real floating tensor (float64, float32, float16 or bfloat16), got {t.dtype}",
    )


def check_spatial(x: Tensor, name: str = "x") -> None:
    """Require at least two (spatial) dimensions."""
    torch._check_value(
        x.dim() >= 2, lambda: f"{name} must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}"
    )


def check_mask(x: Tensor, mask: Tensor) -> None:
    """Require ``mask`` real, with ``x``'s spatial size, broadcastable to ``x`` without growing it."""
    check_real_floating(mask, "mask")
    check_spatial(mask, "mask")
    torch._check_value(
        mask.shape[-2] == x.shape[-2] and mask.shape[-1] == x.shape[-1],
        lambda: f"mask spatial size {tuple(mask.shape[-2:])} does not match x's {tuple(x.shape[-2:])}",
    )
    ok = mask.dim() <= x.dim()
    if ok:
        for m, n in zip(reversed(mask.shape[:-2]), reversed(x.shape[:-2])):
            ok = ok and (m == 1 or m == n)
    torch._check_value(
        ok, lambda: f"mask of shape {tuple(mask.shape)} is not broadcastable to x of shape {tuple(x.shape)}"
    )


def check_filter_inputs(x: Tensor, mask: Tensor, algorithm: str) -> None:
    """All checks of ``spectral_mask_filter``."""
    check_real_floating(x, "x")
    check_spatial(x)
    check_mask(x, mask)
    check_algorithm(algorithm)


def check_radius(radius: float) -> None:
    """Require a finite, non-negative radius."""
    if not (isinstance(radius, (int, float)) and math.isfinite(radius)) or radius < 0:
        raise ValueError(f"radius must be a finite non-negative number, got {radius!r}")


def check_lam_values(lam: Tensor, *, cpu_only: bool = False) -> None:
    """Require every balance in ``[0, 1]`` (reads the values: call on real tensors only).

    With ``cpu_only`` a device tensor is not read: the ops pass it on hot paths,
    where a host-device synchronisation per call would cost more than the
    filter; the public functions check device tensors before calling the ops.
    """
    if cpu_only and lam.device.type != "cpu":
        return
    if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"lam must lie in [0, 1], got {lam.tolist()}")


def check_channel_lam(x: Tensor, lam: Tensor) -> None:
    """Require ``lam`` scalar or ``(C,)`` with ``C = x.shape[-3]``."""
    torch._check_value(lam.dim() <= 1, lambda: f"lam must be 0-d or (C,), got shape {tuple(lam.shape)}")
    if lam.dim() == 1 and lam.shape[0] != 1:
        torch._check_value(
            x.dim() >= 3 and x.shape[-3] == lam.shape[0],
            lambda: f"per-channel lam has {lam.shape[0]} entries but x of shape {tuple(x.shape)} "
            f"has {x.shape[-3] if x.dim() >= 3 else 'no'} channels (dim -3)",
        )
