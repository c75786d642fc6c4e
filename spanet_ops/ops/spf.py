"""The spectral pooling filter family: the published circular mask, no mask tensor to build.

``spanet::spectral_pooling_filter(x, lams, radius, algorithm)`` takes its balances as
a ``float[]``: one per chunk of ``x``'s channel dim (``torch.chunk(x, len(lams),
dim=-3)``; one balance for all channels, ``C`` balances for one per channel). The
circular plan (:func:`spanet_ops.plans.circular_plan`) holds every coefficient and
decides ``auto``. A *tensor* of balances that requires grad (or lives on an
accelerator, where reading it would synchronise) takes the linear form of the
mask instead: ``(1 - lam) x + (lam - (1 - lam)) P_in(x) + (1/3 - (1 - lam)) P_edge(x)``
with ``P_in``/``P_edge`` the fixed projections on the disc and its circle.
"""

import weakref
from typing import List

import torch
from torch import Tensor

from .. import reference
from ..masks import BOUNDARY_VALUE, LamLike, circular_mask, lam_values
from ..plans import circular_plan, disc_geometry, lowrank_form
from ..validation import (
    check_algorithm,
    check_radius,
    check_real_floating,
    check_spatial,
    check_terms,
    compute_dtype,
    plainly_valid,
)
from .filter import spectral_mask_filter_op
from .kernels import own_arithmetic

_lowrank_filter_kernel = torch.ops.spanet.lowrank_filter_kernel.default
_basis_filter_kernel = torch.ops.spanet.basis_filter_kernel.default
_circular_fft_filter_kernel = torch.ops.spanet.circular_fft_filter_kernel.default


def spectral_pooling_filter(x: Tensor, radius: float, lam: LamLike, *, algorithm: str = "auto") -> Tensor:
    """The published spectral pooling filter (SPF) of ``x`` ``(..., C, H, W)`` at any ``H, W``.

    Equivalent to ``spectral_mask_filter(x, circular_mask(H, W, radius, lam))``
    without building a mask.

    Args:
        x: real ``(..., H, W)`` tensor (in the models ``(B, C, H, W)``).
        radius: non-negative disc radius in bins.
        lam: balance(s) in ``[0, 1]``: a float; a sequence of floats, one per chunk of
            the channel dim (``torch.chunk``; ``C`` of them for one per channel); or a
            0-d/``(C,)`` tensor. A tensor that requires grad receives a gradient; a CPU
            tensor that does not is read as floats.
        algorithm: as in :func:`spanet_ops.spectral_mask_filter`.
    """
    check_algorithm(algorithm)  # the op's schema would reject a non-string with a RuntimeError
    radius = check_radius(radius)  # ... and take True for 1.0
    if type(lam) is float:  # the common case; the op checks the value
        return spectral_pooling_filter_op(x, [lam], radius, algorithm)
    if isinstance(lam, Tensor) and (lam.requires_grad or lam.device.type != "cpu"):
        return _tensor_lam_filter(x, radius, lam, algorithm)
    return spectral_pooling_filter_op(x, list(lam_values(lam)), radius, algorithm)


def _check_spf(x: Tensor, lams: List[float], radius: float, algorithm: str) -> None:
    if not (plainly_valid(x) and x.dim() >= 2 and x.shape[-1] != 0 and x.shape[-2] != 0):
        check_real_floating(x, "x")
        check_spatial(x)
    check_terms(x.shape[-3] if x.dim() >= 3 else None, lams, radius, algorithm, "spectral_pooling_filter")


@torch.library.custom_op("spanet::spectral_pooling_filter", mutates_args=())
def spectral_pooling_filter_op(x: Tensor, lams: List[float], radius: float, algorithm: str) -> Tensor:
    """Op form of :func:`spectral_pooling_filter` with the balances as floats (one per channel chunk)."""
    _check_spf(x, lams, radius, algorithm)
    with own_arithmetic(x):
        if x.numel() == 0:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        height, width = x.shape[-2:]
        dtype = compute_dtype(x.dtype)
        lams = tuple(lams)
        channels = x.shape[-3] if x.dim() >= 3 else None
        if algorithm == "reference":
            plan_lams = circular_plan(height, width, radius, lams, channels, dtype, x.device).channel_lams
            mask = circular_mask(height, width, radius, plan_lams if len(plan_lams) > 1 else plan_lams[0], device=x.device)
            return reference.spectral_mask_filter(x.to(dtype), mask.to(dtype)).to(x.dtype).contiguous()
        plan = circular_plan(height, width, radius, lams, channels, dtype, x.device)
        chosen = plan.filter_algorithm if algorithm == "auto" else algorithm
        xc = x if x.dtype == dtype else x.to(dtype)
        if chosen == "fft":
            limits = plan.geometry.limits
            out = _circular_fft_filter_kernel(xc, plan.lam_tensor, limits.inside_limit, limits.edge)
            return out if out.dtype == x.dtype else out.to(x.dtype)
        if lowrank_form(x.device.type) == "separable":
            terms = plan.separable
            r, c = terms.rows, terms.cols
            return _lowrank_filter_kernel(x, r.unique, r.index, r.sign, r.even, c.unique, c.index, c.sign,
                                          terms.weight, terms.constant)
        return _basis_filter_kernel(x, *plan.basis_terms)


@spectral_pooling_filter_op.register_fake
def _spectral_pooling_filter_fake(x, lams, radius, algorithm):
    _check_spf(x, lams, radius, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spf_setup(ctx, inputs, output):
    _, ctx.lams, ctx.radius, ctx.algorithm = inputs


def _spf_backward(ctx, grad):
    # The filter is linear and self-adjoint; the balances are constants.
    return spectral_pooling_filter_op(grad, ctx.lams, ctx.radius, ctx.algorithm), None, None, None


spectral_pooling_filter_op.register_autograd(_spf_backward, setup_context=_spf_setup)


#: Device balance tensors already range-checked: (id, version) -> weak reference (one host read per version).
_checked_lams: dict = {}


def _check_lam_range(lam: Tensor) -> None:
    """Require every balance in ``[0, 1]``; a device tensor is read once per version (a read synchronises)."""
    key = (id(lam), lam._version)
    seen = _checked_lams.get(key)
    if seen is not None and seen() is lam:
        return
    values = lam.detach()
    if values.numel() and not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(f"lam must lie in [0, 1], got {values.cpu().tolist()}")
    if lam.device.type != "cpu":
        if len(_checked_lams) > 256:
            _checked_lams.clear()
        _checked_lams[key] = weakref.ref(lam)


def _tensor_lam_filter(x: Tensor, radius: float, lam: Tensor, algorithm: str) -> Tensor:
    """SPF with balances in a tensor, through the mask's linear form (differentiable in ``lam``, no host read)."""
    if lam.is_complex() or not lam.is_floating_point():
        raise TypeError(f"lam must be a real floating tensor, got dtype {lam.dtype}")
    if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] not in (1, x.shape[-3] if x.dim() >= 3 else 1)):
        raise ValueError(
            f"lam must be 0-d or (C,) with C = x.shape[-3], got shape {tuple(lam.shape)} for x of shape {tuple(x.shape)}"
        )
    if lam.device != x.device:
        raise ValueError(f"lam is on {lam.device} but x is on {x.device}; move both to one device")
    check_real_floating(x, "x")
    check_spatial(x)
    _check_lam_range(lam)
    dtype = compute_dtype(x.dtype)
    inside, edge = disc_geometry(x.shape[-2], x.shape[-1], radius, dtype, x.device).indicator_masks
    # The published mask values are float32 (a float64 lam keeps float64), then every difference is taken
    # in the compute dtype, as the plans do.
    lam_dtype = torch.float64 if lam.dtype == torch.float64 else torch.float32
    lam_c = lam.to(lam_dtype).reshape(-1, 1, 1) if lam.dim() == 1 else lam.to(lam_dtype)
    inside_value, outside_value = lam_c.to(dtype), (1.0 - lam_c).to(dtype)
    projected_in = spectral_mask_filter_op(x, inside, False, algorithm).to(dtype)
    projected_edge = spectral_mask_filter_op(x, edge, False, algorithm).to(dtype)
    y = outside_value * x.to(dtype) + (inside_value - outside_value) * projected_in
    return (y + (BOUNDARY_VALUE - outside_value) * projected_edge).to(x.dtype)
