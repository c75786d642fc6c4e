"""Input validation shared by every operator family, backend and fake kernel.

The same checks run on real tensors and on fake (symbolic) tensors while
tracing: :func:`require` raises at once on a concrete condition and hands a
symbolic one to ``torch._check_*`` (which records it without a guard). Errors
name the problem: ``TypeError`` for a wrong dtype or argument type,
``ValueError`` for a wrong shape, device or value. Nothing here reads tensor data.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

ALGORITHMS = ("auto", "fft", "lowrank", "reference")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def require(condition, message: Callable[[], str], error: type = ValueError) -> None:
    """Raise ``error(message())`` unless ``condition`` holds (concrete fast path; symbolic via ``torch._check``)."""
    if condition is True:
        return
    if condition is False:
        raise error(message())
    (torch._check_type if error is TypeError else torch._check_value)(condition, message)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for storage ``dtype``: fp64 stays fp64, everything else uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_algorithm(algorithm) -> str:
    """Reject an unknown algorithm name (or a non-string); returns it."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    return algorithm


def check_radius(radius) -> float:
    """Require a real, finite, non-negative radius (``bool`` is not a number here); returns it as a float."""
    if type(radius) is float and 0.0 <= radius < math.inf:
        return radius
    if isinstance(radius, bool) or not isinstance(radius, Real):
        raise TypeError(f"radius must be a real number, got {type(radius).__name__} {radius!r}")
    value = float(radius)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"radius must be a finite non-negative number, got {radius!r}")
    return value


def check_lams(lams) -> Tuple[float, ...]:
    """Require a non-empty sequence of balances in ``[0, 1]`` (Python numbers); returns them as floats."""
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Sequence):
        raise TypeError(f"lams must be a sequence of floats, got {type(lams).__name__}")
    values = tuple(lams)
    if not values:
        raise ValueError("lams must hold at least one balance")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"lams must be floats, got {v!r} in {list(values)!r}")
        if not 0.0 <= float(v) <= 1.0:  # also refuses NaN
            raise ValueError(f"lam must lie in [0, 1], got {v!r} in {list(values)!r}")
    return tuple(float(v) for v in values)


def check_real_floating(t: Tensor, name: str) -> None:
    """Require a real floating tensor of a supported dtype."""
    require(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be a real floating tensor (float64, float32, float16 or bfloat16), got {t.dtype}",
        TypeError,
    )


def check_same_device(x: Tensor, other: Optional[Tensor], x_name: str, other_name: str) -> None:
    """Require ``other`` (if given) on ``x``'s device: a kernel would read the wrong memory otherwise."""
    if other is not None:
        require(
            other.device == x.device,
            lambda: f"{other_name} is on {other.device} but {x_name} is on {x.device}; move both to one device",
        )


def check_spatial(x: Tensor, name: str = "x") -> None:
    """Require at least two (spatial) dimensions, neither of size zero.

    Empty batch or channel dims are fine (the result is empty, as aten's);
    an empty plane has no DFT, and torch.fft refuses it too.
    """
    require(
        x.dim() >= 2, lambda: f"{name} must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}"
    )
    require(
        x.shape[-2] != 0 and x.shape[-1] != 0,
        lambda: f"{name} has an empty plane (H, W) = {tuple(x.shape[-2:])}: the spectral filter needs H, W >= 1",
    )


def plainly_valid(x: Tensor, *others: Optional[Tensor]) -> bool:
    """The checks' fast path: eager, concrete shapes, supported dtypes, every tensor on ``x``'s device.

    A False answer means only "check in full" (which then names the problem); while
    tracing the full checks always run, on symbolic shapes.
    """
    if torch.compiler.is_compiling() or x.dtype not in FLOAT_DTYPES:
        return False
    device = x.device
    return all(t is None or (t.dtype in FLOAT_DTYPES and t.device == device) for t in others)


def check_mask(x: Tensor, mask: Tensor) -> None:
    """Require ``mask`` real, on ``x``'s device, with ``x``'s spatial size, broadcastable to ``x`` without growing it."""
    check_real_floating(mask, "mask")
    check_same_device(x, mask, "x", "mask")
    require(
        mask.dim() >= 2, lambda: f"mask must have at least 2 dims (..., H, W), got shape {tuple(mask.shape)}"
    )
    require(
        mask.shape[-2] == x.shape[-2] and mask.shape[-1] == x.shape[-1],
        lambda: f"mask spatial size {tuple(mask.shape[-2:])} does not match x's {tuple(x.shape[-2:])}",
    )
    ok = mask.dim() <= x.dim()
    if ok:
        for m, n in zip(reversed(mask.shape[:-2]), reversed(x.shape[:-2])):
            ok = ok and (m == 1 or m == n)
    require(
        ok, lambda: f"mask of shape {tuple(mask.shape)} is not broadcastable to x of shape {tuple(x.shape)}"
    )


def check_chunked_lams(channels: Optional[int], lams: Tuple[float, ...], what: str) -> None:
    """Require ``len(lams)`` balances to split ``channels`` channels with ``torch.chunk`` into one chunk each.

    ``channels`` is None when ``x`` has no channel dim; then only one balance fits.
    """
    if len(lams) == 1:
        return
    if channels is None:
        raise ValueError(f"{what}: {len(lams)} balances need a channel dim (..., C, H, W), but x has none")
    chunks = len(chunk_sizes(channels, len(lams))) if channels else 0
    require(
        chunks == len(lams),
        lambda: f"{what}: {channels} channels split by torch.chunk into {chunks} chunks, not {len(lams)}: "
        "give one balance per chunk (or one per channel)",
    )


#: Balance, channel, radius and algorithm combinations already accepted by :func:`check_terms`.
_ACCEPTED_TERMS: set = set()


def check_terms(channels: Optional[int], lams, radius: float, algorithm: str, what: str) -> None:
    """All checks of an op's non-tensor arguments: radius, balances (chunking ``channels``), algorithm.

    An accepted combination is remembered, so repeated calls cost one set lookup
    (symbolic channel counts, while tracing, are checked every time).
    """
    traced = isinstance(channels, torch.SymInt)
    key = None if traced else (tuple(lams), channels, radius, algorithm)
    if key is not None and key in _ACCEPTED_TERMS:
        return
    check_radius(radius)
    check_chunked_lams(channels, check_lams(lams), what)
    check_algorithm(algorithm)
    if key is not None and len(_ACCEPTED_TERMS) < 4096:
        _ACCEPTED_TERMS.add(key)


def chunk_sizes(channels: int, chunks: int = 3) -> list:
    """Channel counts of ``torch.chunk(x, chunks, dim=1)`` for ``channels`` channels (e.g. 64 -> 22, 22, 20)."""
    if channels <= 0:
        return []
    size = -(-channels // chunks)
    return [min(size, channels - start) for start in range(0, channels, size)]
