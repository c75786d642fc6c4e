"""The general filter family: ``spectral_mask_filter`` and the gradient in its mask.

``spanet::spectral_mask_filter(x, mask, centered, algorithm)`` filters ``x`` with any
real mask; ``spanet::spectral_mask_grad`` is its gradient in the mask. Checks live
in the real and fake kernels alike; the mask's plan (:func:`spanet_ops.plans.mask_plan`)
decides ``auto``; the low-rank form follows the device (separable kernel on the CPU,
real-basis kernel elsewhere).
"""

import math

import torch
from torch import Tensor

from .. import algorithms, reference
from ..masks import to_centred
from ..plans import broadcast_planes, fft_half_mask, lowrank_form, mask_plan
from ..validation import (
    ALGORITHMS,
    check_algorithm,
    check_mask,
    check_real_floating,
    check_same_device,
    check_spatial,
    compute_dtype,
    plainly_valid,
    require,
)
from .kernels import own_arithmetic

_lowrank_filter_kernel = torch.ops.spanet.lowrank_filter_kernel.default
_basis_filter_kernel = torch.ops.spanet.basis_filter_kernel.default


def spectral_mask_filter(x: Tensor, mask: Tensor, *, centered: bool = True, algorithm: str = "auto") -> Tensor:
    """Filter ``x`` in the frequency domain with a real mask, exactly and differentiably.

    Computes ``Re(ifft2(ifftshift(mask * fftshift(fft2(x, norm="ortho"))), norm="ortho"))``
    (with ``centered=False`` the shifts are dropped and ``mask`` is in the
    natural DFT layout).

    Args:
        x: real ``(..., H, W)`` tensor, float64/32/16 or bfloat16, any strides.
            Half precision is computed in float32.
        mask: real tensor on ``x``'s device, broadcastable to ``x`` with spatial size
            ``(H, W)``, e.g. ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``; any real
            values; its dtype need not match ``x``'s. Differentiable. Its plan is
            cached per tensor (and version): pass the same tensor again for speed.
        centered: whether ``mask`` is in the centred (fftshifted) layout.
        algorithm: ``"auto"`` (default: ``"lowrank"`` when the mask is a
            constant plus a few bins, else ``"fft"``; ``"fft"`` for a mask that
            requires grad), ``"fft"``, ``"lowrank"`` or ``"reference"``. Every
            choice is exact.

    Returns:
        A contiguous tensor of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` or ``mask`` not real floating, ``centered`` not a bool.
        ValueError: fewer than 2 dims or an empty plane, a mask on another device,
            of the wrong spatial size or not broadcastable to ``x``, or an unknown
            ``algorithm``.
    """
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be a bool, got {type(centered).__name__}")
    check_algorithm(algorithm)  # the op's schema would reject a non-string with a RuntimeError
    return spectral_mask_filter_op(x, mask, centered, algorithm)


def _check_filter(x: Tensor, mask: Tensor, algorithm: str) -> None:
    if (
        plainly_valid(x, mask)
        and 2 <= mask.dim() <= x.dim()
        and x.shape[-2:] == mask.shape[-2:]
        and x.shape[-1] != 0
        and x.shape[-2] != 0
        and (mask.dim() == 2 or mask.shape[:-2] == x.shape[x.dim() - mask.dim():-2])  # else: broadcast, in full
        and algorithm in ALGORITHMS
    ):
        return
    check_real_floating(x, "x")
    check_spatial(x)
    check_mask(x, mask)
    check_algorithm(algorithm)


@torch.library.custom_op("spanet::spectral_mask_filter", mutates_args=())
def spectral_mask_filter_op(x: Tensor, mask: Tensor, centered: bool, algorithm: str) -> Tensor:
    """Op form of :func:`spectral_mask_filter` (all arguments positional)."""
    _check_filter(x, mask, algorithm)
    with own_arithmetic(x):
        if x.numel() == 0:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        dtype = compute_dtype(x.dtype)
        if algorithm == "reference":
            return reference.spectral_mask_filter(x.to(dtype), mask.to(dtype), centered).to(x.dtype).contiguous()
        if mask.requires_grad and algorithm != "lowrank":
            # A learned mask takes new values every step: the fft path needs no plan (and no host read).
            return algorithms.fft_filter(x.to(dtype), fft_half_mask(mask, centered, dtype)).to(x.dtype).contiguous()
        plan = mask_plan(mask, centered, dtype)
        chosen = plan.algorithm if algorithm == "auto" else algorithm
        if chosen == "fft":
            return algorithms.fft_filter(x.to(dtype), plan.half_mask).to(x.dtype).contiguous()
        x_lead = tuple(x.shape[:-2])
        period = broadcast_planes(plan.lead_shape, x_lead)
        if lowrank_form(x.device.type) == "separable":
            terms = plan.separable
            weight, constant = _per_plane(terms.weight, terms.constant, plan.lead_shape, x_lead, period)
            r, c = terms.rows, terms.cols
            return _lowrank_filter_kernel(x, r.unique, r.index, r.sign, r.even, c.unique, c.index, c.sign, weight,
                                          constant)
        basis, scale, constant = plan.basis_terms
        scale, constant = _per_plane(scale, constant, plan.lead_shape, x_lead, period)
        return _basis_filter_kernel(x, basis, scale, constant)


def _per_plane(weight: Tensor, constant: Tensor, lead_shape, x_lead, period):
    """The mask's per-plane terms, expanded to one per plane of ``x`` when a plane period does not exist."""
    if period is not None:
        return weight, constant
    # A mask broadcast over inner dims (e.g. (B, 1, H, W) on (B, C, H, W)): every plane its own terms.
    inner, planes = weight.shape[1:], math.prod(x_lead)
    weight = weight.reshape(*lead_shape, *inner).expand(*x_lead, *inner).reshape(planes, *inner)
    return weight.contiguous(), constant.reshape(lead_shape).expand(x_lead).reshape(planes).contiguous()


@spectral_mask_filter_op.register_fake
def _spectral_mask_filter_fake(x, mask, centered, algorithm):
    _check_filter(x, mask, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _filter_setup(ctx, inputs, output):
    x, mask, centered, algorithm = inputs
    ctx.centered, ctx.algorithm = centered, algorithm
    # Self-adjointness: the gradient in x needs only the mask; x is kept for the mask's gradient alone.
    ctx.save_for_backward(mask, x if ctx.needs_input_grad[1] else None)


def _filter_backward(ctx, grad):
    mask, x = ctx.saved_tensors
    grad_x = grad_mask = None
    if ctx.needs_input_grad[0]:
        grad_x = spectral_mask_filter_op(grad, mask, ctx.centered, ctx.algorithm)
    if ctx.needs_input_grad[1]:
        grad_mask = spectral_mask_grad_op(x, grad, mask, ctx.centered)
    return grad_x, grad_mask, None, None


spectral_mask_filter_op.register_autograd(_filter_backward, setup_context=_filter_setup)


def _check_mask_grad(x: Tensor, grad_output: Tensor, mask: Tensor) -> None:
    check_real_floating(x, "x")
    check_real_floating(grad_output, "grad_output")
    check_spatial(x)
    check_mask(x, mask)
    check_same_device(x, grad_output, "x", "grad_output")
    require(
        grad_output.shape == x.shape,
        lambda: f"grad_output must have x's shape {tuple(x.shape)}, got {tuple(grad_output.shape)}",
    )


@torch.library.custom_op("spanet::spectral_mask_grad", mutates_args=())
def spectral_mask_grad_op(x: Tensor, grad_output: Tensor, mask: Tensor, centered: bool) -> Tensor:
    """Gradient of ``spectral_mask_filter`` in its mask: ``Re(conj(X) G)`` summed to ``mask``'s shape."""
    _check_mask_grad(x, grad_output, mask)
    with own_arithmetic(x):
        if x.numel() == 0:
            return torch.zeros_like(mask, memory_format=torch.contiguous_format)
        dtype = compute_dtype(torch.promote_types(x.dtype, mask.dtype))
        full = algorithms.mask_gradient(x.to(dtype), grad_output.to(dtype))
        if centered:
            full = to_centred(full)
        return full.sum_to_size(mask.shape).to(mask.dtype).contiguous()


@spectral_mask_grad_op.register_fake
def _spectral_mask_grad_fake(x, grad_output, mask, centered):
    _check_mask_grad(x, grad_output, mask)
    return torch.empty_like(mask, memory_format=torch.contiguous_format)


def _mask_grad_setup(ctx, inputs, output):
    x, grad_output, mask, centered = inputs
    ctx.centered = centered
    ctx.save_for_backward(x, grad_output)


def _mask_grad_backward(ctx, grad):
    # <h, Re(conj(X) G)> = <x, filter_h(g)> = <g, filter_h(x)>: both gradients are filters with mask h.
    x, grad_output = ctx.saved_tensors
    grad_x = grad_g = None
    if ctx.needs_input_grad[0]:
        grad_x = spectral_mask_filter_op(grad_output, grad, ctx.centered, "auto")
    if ctx.needs_input_grad[1]:
        grad_g = spectral_mask_filter_op(x, grad, ctx.centered, "auto")
    return grad_x, grad_g, None, None


spectral_mask_grad_op.register_autograd(_mask_grad_backward, setup_context=_mask_grad_setup)
