"""Registration of the ``spanet`` custom ops with ``torch.library``.

Two layers:

* **Public ops** — ``spanet::spectral_mask_filter``, ``spanet::spectral_mask_grad``,
  ``spanet::spectral_pooling_filter`` and ``spanet::spg_aggregate``. Each has a
  fake kernel (validating with ``torch._check``), a Python implementation that
  validates, fetches the plan and picks the algorithm, and a registered
  autograd whose backward is itself written with these ops (so it traces and
  differentiates again).
* **Kernel ops** — ``spanet::lowrank_filter_kernel`` and
  ``spanet::spg_spectral_kernel``: plan tensors in, result out, no autograd.
  Their PyTorch implementation is registered as the ``CompositeExplicitAutograd``
  default; the native extension (``csrc/``) registers ``CPU``/``CUDA`` kernels
  for the same ops with ``TORCH_LIBRARY_IMPL``, which the dispatcher prefers.
  The Triton kernels are chosen by :mod:`spanet_ops.backends` on CUDA tensors.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils import flop_counter

from . import algorithms, backends, reference
from .masks import circular_mask, circular_regions, to_centred
from .plans import broadcast_planes, circular_plan, mask_plan
from .validation import (
    check_channel_lam,
    check_filter_inputs,
    check_lam_values,
    check_real_floating,
    check_algorithm,
    check_spatial,
    compute_dtype,
)

_lib = torch.library.Library("spanet", "FRAGMENT")

# --------------------------------------------------------------------------- kernel ops

_lib.define(
    "lowrank_filter_kernel(Tensor x, Tensor basis_h, Tensor basis_w, Tensor weight, Tensor constant) -> Tensor"
)
_lib.define(
    "spg_spectral_kernel(Tensor x, Tensor base, Tensor weight, Tensor basis_h, Tensor basis_w, "
    "Tensor coeff_weight) -> Tensor"
)
_lib.impl("lowrank_filter_kernel", algorithms.lowrank_filter, "CompositeExplicitAutograd")
_lib.impl("spg_spectral_kernel", algorithms.spg_spectral, "CompositeExplicitAutograd")
# The fft algorithm of the published circular mask (x in the compute dtype, lam float32 0-d or
# (C,)): the native CUDA kernel computes the mask per bin on the fly inside cuFFT's half
# spectrum; this default builds the half mask from the cached plan.
_lib.define("circular_fft_filter_kernel(Tensor x, Tensor lam, float radius) -> Tensor")


def _circular_fft_filter_default(x: Tensor, lam: Tensor, radius: float) -> Tensor:
    plan = circular_plan(x.shape[-2], x.shape[-1], radius, x.dtype, x.device)
    half = plan.half_mask(lam)
    return algorithms.fft_filter(x, half if lam.numel() > 1 else half[0])


_lib.impl("circular_fft_filter_kernel", _circular_fft_filter_default, "CompositeExplicitAutograd")


@torch.library.register_fake("spanet::lowrank_filter_kernel")
def _lowrank_filter_kernel_fake(x, basis_h, basis_w, weight, constant):
    torch._check(x.dim() == 3, lambda: "lowrank_filter_kernel takes planes (N, H, W)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("spanet::spg_spectral_kernel")
def _spg_spectral_kernel_fake(x, base, weight, basis_h, basis_w, coeff_weight):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.register_fake("spanet::circular_fft_filter_kernel")
def _circular_fft_filter_kernel_fake(x, lam, radius):
    torch._check(x.dim() >= 2, lambda: "circular_fft_filter_kernel takes x (..., H, W)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _outside_autocast(fn):
    """Run ``fn`` with autocast off on its tensors' device.

    The ops choose their own arithmetic (float32, float64 for float64 input)
    and return their input's dtype; autocast reaching inside would turn their
    internal convolutions and products to half precision and mix dtypes in
    the native kernels.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next(a.device.type for a in args if isinstance(a, Tensor))
        if not torch.amp.is_autocast_available(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _lowrank(x: Tensor, basis, weight: Tensor, constant: Tensor, lead_shape) -> Tensor:
    """Run the low-rank kernel on ``x`` ``(..., H, W)``, mapping its planes onto the mask's."""
    planes, x_lead = algorithms.planes_of(x)
    period = broadcast_planes(lead_shape, x_lead)
    if period is None:  # a mask broadcast over inner dims: give every plane its own terms
        k, l = weight.shape[-2:]
        n = planes.shape[0]
        weight = weight.reshape(*lead_shape, k, l).expand(*x_lead, k, l).reshape(n, k, l)
        constant = constant.reshape(lead_shape).expand(x_lead).reshape(n)
    out = backends.lowrank_filter(planes, basis.basis_h, basis.basis_w, weight.contiguous(), constant.contiguous())
    return out.reshape(x.shape)


# --------------------------------------------------------------------------- spectral_mask_filter


@torch.library.custom_op("spanet::spectral_mask_filter", mutates_args=())
@_outside_autocast
def spectral_mask_filter_op(x: Tensor, mask: Tensor, centered: bool, algorithm: str) -> Tensor:
    """Op form of :func:`spanet_ops.spectral_mask_filter` (all arguments positional)."""
    check_filter_inputs(x, mask, algorithm)
    dtype = compute_dtype(x.dtype)
    if algorithm == "reference":
        return reference.spectral_mask_filter(x.to(dtype), mask.to(dtype), centered).to(x.dtype).contiguous()
    plan = mask_plan(mask, centered, dtype)
    chosen = plan.algorithm if algorithm == "auto" else algorithm
    if chosen == "fft":
        return algorithms.fft_filter(x.to(dtype), plan.half_mask).to(x.dtype).contiguous()
    return _lowrank(x, plan.basis, plan.weight, plan.constant, plan.lead_shape)


@spectral_mask_filter_op.register_fake
def _spectral_mask_filter_fake(x, mask, centered, algorithm):
    check_filter_inputs(x, mask, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _filter_setup(ctx, inputs, output):
    x, mask, centered, algorithm = inputs
    ctx.centered, ctx.algorithm = centered, algorithm
    # Self-adjointness: the gradient in x needs only the mask; x is kept for the mask's gradient alone.
    ctx.save_for_backward(mask, x if mask.requires_grad else None)


@_outside_autocast
def _filter_backward(ctx, grad):
    mask, x = ctx.saved_tensors
    grad_x = grad_mask = None
    if ctx.needs_input_grad[0]:
        grad_x = spectral_mask_filter_op(grad, mask, ctx.centered, ctx.algorithm)
    if ctx.needs_input_grad[1]:
        grad_mask = spectral_mask_grad_op(x, grad, mask, ctx.centered)
    return grad_x, grad_mask, None, None


spectral_mask_filter_op.register_autograd(_filter_backward, setup_context=_filter_setup)


# --------------------------------------------------------------------------- spectral_mask_grad


@torch.library.custom_op("spanet::spectral_mask_grad", mutates_args=())
@_outside_autocast
def spectral_mask_grad_op(x: Tensor, grad_output: Tensor, mask: Tensor, centered: bool) -> Tensor:
    """Gradient of ``spectral_mask_filter`` in its mask: ``Re(conj(X) G)`` summed to ``mask``'s shape."""
    check_real_floating(x, "x")
    check_real_floating(grad_output, "grad_output")
    check_spatial(x)
    dtype = compute_dtype(torch.promote_types(x.dtype, mask.dtype))
    full = algorithms.mask_gradient(x.to(dtype), grad_output.to(dtype))
    if centered:
        full = to_centred(full)
    return full.sum_to_size(mask.shape).to(mask.dtype).contiguous()


@spectral_mask_grad_op.register_fake
def _spectral_mask_grad_fake(x, grad_output, mask, centered):
    return torch.empty_like(mask, memory_format=torch.contiguous_format)


def _mask_grad_setup(ctx, inputs, output):
    x, grad_output, mask, centered = inputs
    ctx.centered = centered
    ctx.save_for_backward(x, grad_output)


@_outside_autocast
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


# --------------------------------------------------------------------------- spectral_pooling_filter


def _check_spf_inputs(x: Tensor, lam: Tensor, algorithm: str) -> None:
    check_real_floating(x, "x")
    check_spatial(x)
    check_channel_lam(x, lam)
    check_algorithm(algorithm)


@torch.library.custom_op("spanet::spectral_pooling_filter", mutates_args=())
@_outside_autocast
def spectral_pooling_filter_op(x: Tensor, lam: Tensor, radius: float, algorithm: str) -> Tensor:
    """Op form of :func:`spanet_ops.spectral_pooling_filter`; ``lam`` float32, 0-d or ``(C,)``."""
    _check_spf_inputs(x, lam, algorithm)
    check_lam_values(lam, cpu_only=True)
    height, width = x.shape[-2:]
    dtype = compute_dtype(x.dtype)
    lam = lam.to(device=x.device)
    if algorithm == "reference":
        mask = circular_mask(height, width, radius, lam.reshape(-1) if lam.numel() > 1 else lam.reshape(()))
        return reference.spectral_mask_filter(x.to(dtype), mask.to(dtype)).to(x.dtype).contiguous()
    plan = circular_plan(height, width, radius, dtype, x.device)
    chosen = plan.algorithm if algorithm == "auto" else algorithm
    if chosen == "fft":
        return backends.circular_fft_filter(x.to(dtype), lam, radius).to(x.dtype).contiguous()
    weight, constant = plan.lowrank_terms(lam)
    lead = (weight.shape[0],) if lam.numel() > 1 else ()
    return _lowrank(x, plan.basis, weight, constant, lead)


@spectral_pooling_filter_op.register_fake
def _spectral_pooling_filter_fake(x, lam, radius, algorithm):
    _check_spf_inputs(x, lam, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lam_derivative_mask(height: int, width: int, radius: float, dtype, device) -> Tensor:
    """``d mask / d lam`` in the natural layout: 1 inside the disc, 0 on its boundary, -1 outside."""
    inside, boundary = circular_regions(height, width, radius, centered=False, device=device)
    return torch.where(inside, 1.0, torch.where(boundary, 0.0, -1.0)).to(dtype)


def _spf_setup(ctx, inputs, output):
    x, lam, radius, algorithm = inputs
    ctx.radius, ctx.algorithm = radius, algorithm
    ctx.save_for_backward(lam, x if lam.requires_grad else None)


@_outside_autocast
def _spf_backward(ctx, grad):
    lam, x = ctx.saved_tensors
    grad_x = grad_lam = None
    if ctx.needs_input_grad[0]:
        grad_x = spectral_pooling_filter_op(grad, lam, ctx.radius, ctx.algorithm)
    if ctx.needs_input_grad[1]:
        height, width = x.shape[-2:]
        dmask = _lam_derivative_mask(height, width, ctx.radius, torch.float32, x.device)
        dy = spectral_mask_filter_op(x, dmask, False, ctx.algorithm)
        per_element = (grad * dy).to(lam.dtype)
        if lam.dim() == 1 and lam.shape[0] > 1:
            grad_lam = per_element.transpose(-3, 0).reshape(lam.shape[0], -1).sum(-1)
        else:
            grad_lam = per_element.sum().reshape(lam.shape)
    return grad_x, grad_lam, None, None


spectral_pooling_filter_op.register_autograd(_spf_backward, setup_context=_spf_setup)


# --------------------------------------------------------------------------- spg_aggregate


def _check_spg_inputs(x, weight, bias, lam, algorithm):
    check_real_floating(x, "x")
    torch._check_value(x.dim() == 4, lambda: f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    check_real_floating(weight, "weight")
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == x.shape[1],
        lambda: f"weight must be (C_out, C) with C = {x.shape[1]}, got shape {tuple(weight.shape)}",
    )
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}",
        )
    torch._check_value(
        lam.dim() == 1 and lam.shape[0] == x.shape[1],
        lambda: f"channel lam must be ({x.shape[1]},), got shape {tuple(lam.shape)}",
    )
    check_algorithm(algorithm)


@torch.library.custom_op("spanet::spg_aggregate", mutates_args=())
@_outside_autocast
def spg_aggregate_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lam: Tensor, radius: float, algorithm: str
) -> Tensor:
    """Op form of :func:`spanet_ops.spg_aggregate` with per-channel ``lam`` ``(C,)`` and 2-D weight."""
    _check_spg_inputs(x, weight, bias, lam, algorithm)
    check_lam_values(lam, cpu_only=True)
    dtype = compute_dtype(x.dtype)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    lam = lam.to(x.device)
    chosen = algorithm
    if algorithm in ("auto", "lowrank"):
        plan = circular_plan(x.shape[-2], x.shape[-1], radius, dtype, x.device)
        chosen = plan.algorithm if algorithm == "auto" else "lowrank"
    if chosen == "lowrank":
        coeff_weight, constant = plan.lowrank_terms(lam)
        base = algorithms.conv1x1(x.to(dtype), w * constant[None, :], b)
        out = backends.spg_spectral(x, base, w, plan.basis.basis_h, plan.basis.basis_w, coeff_weight)
        return out.to(x.dtype).contiguous()
    filtered = spectral_pooling_filter_op(x.to(dtype), lam, radius, chosen)
    return algorithms.conv1x1(filtered, w, b).to(x.dtype).contiguous()


@spg_aggregate_op.register_fake
def _spg_aggregate_fake(x, weight, bias, lam, radius, algorithm):
    _check_spg_inputs(x, weight, bias, lam, algorithm)
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _spg_setup(ctx, inputs, output):
    x, weight, bias, lam, radius, algorithm = inputs
    ctx.radius, ctx.algorithm = radius, algorithm
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, lam)


@_outside_autocast
def _spg_backward(ctx, grad):
    # ctx = W SPF(x) + b, and SPF is self-adjoint per channel: grad_x = SPF(W^T g).
    x, weight, lam = ctx.saved_tensors
    dtype = compute_dtype(x.dtype)
    g = grad.to(dtype)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        back = algorithms.conv1x1(g, weight.to(dtype).transpose(0, 1))
        grad_x = spectral_pooling_filter_op(back, lam, ctx.radius, ctx.algorithm).to(x.dtype)
    if ctx.needs_input_grad[1]:
        filtered = spectral_pooling_filter_op(x.to(dtype), lam, ctx.radius, ctx.algorithm)
        # Batched over B, so neither map is permuted into a (C, B*H*W) copy.
        grad_w = torch.bmm(g.flatten(2), filtered.flatten(2).transpose(1, 2)).sum(0).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = g.sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


spg_aggregate_op.register_autograd(_spg_backward, setup_context=_spg_setup)


def _spg_aggregate_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``spg_aggregate`` as the flop counter counts the published code: its 1x1 convs.

    The published ``pws`` convs cost ``2 B C_out C H W`` together; the spectral
    part (FFTs there, the low-rank correction here) is not counted, as SPEC §3's
    MACs column says. Without a formula the counter would see the op as free.
    """
    batch, channels, height, width = x_shape
    return 2 * batch * weight_shape[0] * channels * height * width


flop_counter.register_flop_formula(torch.ops.spanet.spg_aggregate)(_spg_aggregate_flops)
