"""Registration of the ``spanet`` custom ops with ``torch.library``.

Two layers:

* **Public ops** — ``spanet::spectral_mask_filter``, ``spanet::spectral_mask_grad``,
  ``spanet::spectral_pooling_filter`` and ``spanet::spg_aggregate`` (with its
  gradients ``spanet::spg_aggregate_input_grad`` and
  ``spanet::spg_aggregate_weight_grad``). Each has a
  fake kernel (validating with ``torch._check``), a Python implementation that
  validates, fetches the plan and picks the algorithm, and a registered
  autograd whose backward is itself written with these ops (so it traces and
  differentiates again).
* **Kernel ops** — ``spanet::lowrank_filter_kernel`` and
  ``spanet::circular_fft_filter_kernel``: plan tensors in, result out, no autograd.
  Their PyTorch implementation is registered as the ``CompositeExplicitAutograd``
  default; the native extension (``csrc/``) registers ``CPU``/``CUDA`` kernels
  for the same ops with ``TORCH_LIBRARY_IMPL``, which the dispatcher prefers.
  The Triton kernels are chosen by :mod:`spanet_ops.backends` on CUDA tensors.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

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
_lib.impl("lowrank_filter_kernel", algorithms.lowrank_filter, "CompositeExplicitAutograd")
# The fft algorithm of the published circular mask (x in the compute dtype, lam float32 0-d or
# (C,)): the native CUDA kernel computes the mask per bin on the fly inside cuFFT's half
# spectrum; this default builds the half mask from the cached plan.
_lib.define("circular_fft_filter_kernel(Tensor x, Tensor lam, float radius) -> Tensor")


def _circular_fft_filter_default(x: Tensor, lam: Tensor, radius: float) -> Tensor:
    plan = circular_plan(x.shape[-2], x.shape[-1], radius, x.dtype, x.device)
    half = plan.half_mask(lam)
    return algorithms.fft_filter(x, half if lam.numel() > 1 else half[0])


_lib.impl("circular_fft_filter_kernel", _circular_fft_filter_default, "CompositeExplicitAutograd")


# The exact GELU and its derivative in one pass (native CPU kernel: csrc/cpu/gelu_cpu.cpp).
_lib.define("gelu_slope_kernel(Tensor x) -> (Tensor, Tensor)")
_lib.impl("gelu_slope_kernel", algorithms.gelu_with_slope, "CompositeExplicitAutograd")


@torch.library.register_fake("spanet::gelu_slope_kernel")
def _gelu_slope_kernel_fake(x):
    torch._check(x.is_floating_point(), lambda: f"gelu_slope_kernel: x must be floating point, got {x.dtype}")
    return torch.empty_like(x), torch.empty_like(x)


# Weight and bias gradients of a depthwise (1, k) conv (native CPU kernel: csrc/cpu/depthwise_cpu.cpp).
_lib.define("depthwise_row_weight_grad_kernel(Tensor grad, Tensor x, Tensor weight, int padding) -> (Tensor, Tensor)")


def _aten_depthwise_row_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int, output_mask):
    """PyTorch's ``convolution_backward`` of a depthwise ``(1, k)`` conv: ``(grad_x, grad_weight, grad_bias)``."""
    channels = x.shape[1]
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [channels], [1, 1], [0, padding], [1, 1], False, [0, 0], channels, output_mask
    )


def _depthwise_row_weight_grad_default(grad: Tensor, x: Tensor, weight: Tensor, padding: int):
    _, grad_weight, grad_bias = _aten_depthwise_row_backward(grad, x, weight, padding, [False, True, True])
    return grad_weight, grad_bias


_lib.impl("depthwise_row_weight_grad_kernel", _depthwise_row_weight_grad_default, "CompositeExplicitAutograd")


@torch.library.register_fake("spanet::depthwise_row_weight_grad_kernel")
def _depthwise_row_weight_grad_kernel_fake(grad, x, weight, padding):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(weight.shape[0])


@torch.library.register_fake("spanet::lowrank_filter_kernel")
def _lowrank_filter_kernel_fake(x, basis_h, basis_w, weight, constant):
    torch._check(x.dim() == 3, lambda: "lowrank_filter_kernel takes planes (N, H, W)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


def _spg_algorithm(x: Tensor, radius: float, algorithm: str, dtype: torch.dtype):
    """``(algorithm actually run, circular plan or None)`` for the spg ops on maps like ``x``."""
    if algorithm not in ("auto", "lowrank"):
        return algorithm, None
    plan = circular_plan(x.shape[-2], x.shape[-1], radius, dtype, x.device)
    return (plan.algorithm if algorithm == "auto" else "lowrank"), plan


def _spg_output_format(x: Tensor) -> torch.memory_format:
    # A channels_last map keeps its layout (the low-rank path computes in it without copies).
    return torch.channels_last if algorithms.is_channels_last(x) else torch.contiguous_format


def _empty_map(like: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    shape = (like.shape[0], channels, like.shape[2], like.shape[3])
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=_spg_output_format(like))


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
    chosen, plan = _spg_algorithm(x, radius, algorithm, dtype)
    if chosen == "lowrank":
        scale, constant = plan.coefficient_scales(lam)
        out = algorithms.spg_lowrank(x.to(dtype), w, b, plan.real_basis, scale, constant)
    else:
        out = algorithms.conv1x1(spectral_pooling_filter_op(x.to(dtype), lam, radius, chosen), w, b)
    return out.to(x.dtype).contiguous(memory_format=_spg_output_format(x))


@spg_aggregate_op.register_fake
def _spg_aggregate_fake(x, weight, bias, lam, radius, algorithm):
    _check_spg_inputs(x, weight, bias, lam, algorithm)
    return _empty_map(x, weight.shape[0], x.dtype)


def _spg_setup(ctx, inputs, output):
    x, weight, bias, lam, radius, algorithm = inputs
    ctx.radius, ctx.algorithm = radius, algorithm
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, lam)


@_outside_autocast
def _spg_backward(ctx, grad):
    # ctx = W SPF(x) + b: both gradients are ops of their own (they trace, and differentiate again).
    x, weight, lam = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = spg_input_grad_op(grad, weight, lam, ctx.radius, ctx.algorithm).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = spg_weight_grad_op(grad, x, lam, ctx.radius, ctx.algorithm).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad.to(compute_dtype(grad.dtype)).sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


spg_aggregate_op.register_autograd(_spg_backward, setup_context=_spg_setup)


def _check_spg_grad_inputs(grad: Tensor, other: Tensor, other_name: str, lam: Tensor, algorithm: str) -> None:
    check_real_floating(grad, "grad")
    torch._check_value(grad.dim() == 4, lambda: f"grad must be (B, C_out, H, W), got shape {tuple(grad.shape)}")
    check_real_floating(other, other_name)
    check_algorithm(algorithm)
    if other_name == "weight":
        torch._check_value(
            other.dim() == 2 and other.shape[0] == grad.shape[1],
            lambda: f"weight must be (C_out, C) with C_out = {grad.shape[1]}, got shape {tuple(other.shape)}",
        )
        channels = other.shape[1]
    else:
        torch._check_value(
            other.dim() == 4 and (other.shape[0], *other.shape[2:]) == (grad.shape[0], *grad.shape[2:]),
            lambda: f"x must be (B, C, H, W) like grad {tuple(grad.shape)}, got shape {tuple(other.shape)}",
        )
        channels = other.shape[1]
    torch._check_value(
        lam.dim() == 1 and lam.shape[0] == channels,
        lambda: f"channel lam must be ({channels},), got shape {tuple(lam.shape)}",
    )


@torch.library.custom_op("spanet::spg_aggregate_input_grad", mutates_args=())
@_outside_autocast
def spg_input_grad_op(grad: Tensor, weight: Tensor, lam: Tensor, radius: float, algorithm: str) -> Tensor:
    """``SPF(W^T grad)`` ``(B, C, H, W)``, the input gradient of ``spg_aggregate``, in ``grad``'s dtype."""
    _check_spg_grad_inputs(grad, weight, "weight", lam, algorithm)
    check_lam_values(lam, cpu_only=True)
    dtype = compute_dtype(grad.dtype)
    g, w, lam = grad.to(dtype), weight.to(dtype), lam.to(grad.device)
    chosen, plan = _spg_algorithm(grad, radius, algorithm, dtype)
    if chosen == "lowrank":
        scale, constant = plan.coefficient_scales(lam)
        out = algorithms.spg_lowrank_input_grad(g, w, plan.real_basis, scale, constant)
    else:
        out = spectral_pooling_filter_op(algorithms.conv1x1(g, w.transpose(0, 1)), lam, radius, chosen)
    return out.to(grad.dtype).contiguous(memory_format=_spg_output_format(grad))


@spg_input_grad_op.register_fake
def _spg_input_grad_fake(grad, weight, lam, radius, algorithm):
    _check_spg_grad_inputs(grad, weight, "weight", lam, algorithm)
    return _empty_map(grad, weight.shape[1], grad.dtype)


def _spg_grad_setup(ctx, inputs, output):
    # Both gradient ops take (grad, weight or x, lam, radius, algorithm) and are bilinear in their
    # first two inputs: their own gradients need those two and lam.
    first, second, lam, radius, algorithm = inputs
    ctx.radius, ctx.algorithm = radius, algorithm
    ctx.save_for_backward(first, second, lam)


@_outside_autocast
def _spg_input_grad_backward(ctx, upstream):
    # out = SPF(W^T g) is linear in g and in W: <u, SPF(W^T g)> = <W SPF(u), g> = <W, g SPF(u)^T>.
    grad, weight, lam = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = spg_aggregate_op(upstream, weight, None, lam, ctx.radius, ctx.algorithm).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        d_weight = spg_weight_grad_op(grad, upstream, lam, ctx.radius, ctx.algorithm).to(weight.dtype)
    return d_grad, d_weight, None, None, None


spg_input_grad_op.register_autograd(_spg_input_grad_backward, setup_context=_spg_grad_setup)


@torch.library.custom_op("spanet::spg_aggregate_weight_grad", mutates_args=())
@_outside_autocast
def spg_weight_grad_op(grad: Tensor, x: Tensor, lam: Tensor, radius: float, algorithm: str) -> Tensor:
    """``sum of grad SPF(x)^T`` ``(C_out, C)``, the weight gradient of ``spg_aggregate``, in the compute dtype."""
    _check_spg_grad_inputs(grad, x, "x", lam, algorithm)
    check_lam_values(lam, cpu_only=True)
    dtype = compute_dtype(torch.promote_types(grad.dtype, x.dtype))
    g, xc, lam = grad.to(dtype), x.to(dtype), lam.to(x.device)
    chosen, plan = _spg_algorithm(x, radius, algorithm, dtype)
    if chosen == "lowrank":
        scale, constant = plan.coefficient_scales(lam)
        return algorithms.spg_lowrank_weight_grad(g, xc, plan.real_basis, scale, constant)
    filtered = spectral_pooling_filter_op(xc, lam, radius, chosen)
    return algorithms.dense_1x1_weight_grad(g.contiguous().flatten(2), filtered.flatten(2), channels_last=False)


@spg_weight_grad_op.register_fake
def _spg_weight_grad_fake(grad, x, lam, radius, algorithm):
    _check_spg_grad_inputs(grad, x, "x", lam, algorithm)
    dtype = compute_dtype(torch.promote_types(grad.dtype, x.dtype))
    return grad.new_empty((grad.shape[1], x.shape[1]), dtype=dtype)


@_outside_autocast
def _spg_weight_grad_backward(ctx, upstream):
    # out = sum g SPF(x)^T is linear in g and in x: <U, g SPF(x)^T> = <U SPF(x), g> = <SPF(U^T g), x>.
    grad, x, lam = ctx.saved_tensors
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad = spg_aggregate_op(x, upstream, None, lam, ctx.radius, ctx.algorithm).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        d_x = spg_input_grad_op(grad, upstream, lam, ctx.radius, ctx.algorithm).to(x.dtype)
    return d_grad, d_x, None, None, None


spg_weight_grad_op.register_autograd(_spg_weight_grad_backward, setup_context=_spg_grad_setup)


def _spg_aggregate_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``spg_aggregate`` as the flop counter counts the published code: its 1x1 convs.

    The published ``pws`` convs cost ``2 B C_out C H W`` together; the spectral
    part (FFTs there, the low-rank correction here) is not counted, as SPEC §3's
    MACs column says. Without a formula the counter would see the op as free.
    """
    batch, channels, height, width = x_shape
    return 2 * batch * weight_shape[0] * channels * height * width


flop_counter.register_flop_formula(torch.ops.spanet.spg_aggregate)(_spg_aggregate_flops)


# --------------------------------------------------------------------------- pointwise_mlp


def _check_pointwise_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor):
    check_real_floating(x, "x")
    torch._check_value(x.dim() == 2, lambda: f"x must be pixels (N, C), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    torch._check_value(
        fc1_weight.dim() == 2 and fc1_weight.shape[1] == channels,
        lambda: f"fc1_weight must be (hidden, {channels}), got shape {tuple(fc1_weight.shape)}",
    )
    hidden = fc1_weight.shape[0]
    torch._check_value(
        tuple(fc1_bias.shape) == (hidden,), lambda: f"fc1_bias must be ({hidden},), got shape {tuple(fc1_bias.shape)}"
    )
    torch._check_value(
        fc2_weight.dim() == 2 and fc2_weight.shape[1] == hidden,
        lambda: f"fc2_weight must be (out, {hidden}), got shape {tuple(fc2_weight.shape)}",
    )
    torch._check_value(
        tuple(fc2_bias.shape) == (fc2_weight.shape[0],),
        lambda: f"fc2_bias must be ({fc2_weight.shape[0]},), got shape {tuple(fc2_bias.shape)}",
    )
    torch._check_value(
        all(t.dtype == x.dtype for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)),
        lambda: "x and the MLP's weights and biases must share a dtype",
    )


@torch.library.custom_op("spanet::pointwise_mlp", mutates_args=())
def pointwise_mlp_op(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """``fc2(gelu(fc1(x)))`` on pixels ``x`` ``(N, C)`` (exact GELU), with the activation and its slope.

    Returns ``(out, gelu(h), gelu'(h))`` for ``h = fc1(x)``; only ``out`` is
    differentiable, the other two are what the backward keeps (in place of
    ``h``). The forward writes the activation and its slope in one pass
    (``spanet::gelu_slope_kernel``); the backward scales the activation's
    gradient by the slope in place instead of re-evaluating erf and exp in
    ``gelu_backward``. With ``create_graph=True`` the backward recomputes ``h``
    and differentiates the plain layers instead, so higher derivatives are exact.
    """
    _check_pointwise_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    activation, slope = torch.ops.spanet.gelu_slope_kernel(torch.addmm(fc1_bias, x, fc1_weight.t()))
    return torch.addmm(fc2_bias, activation, fc2_weight.t()), activation, slope


@pointwise_mlp_op.register_fake
def _pointwise_mlp_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    _check_pointwise_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    hidden = x.new_empty((x.shape[0], fc1_weight.shape[0]))
    return x.new_empty((x.shape[0], fc2_weight.shape[0])), hidden, torch.empty_like(hidden)


def _pointwise_mlp_setup(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, _ = inputs
    _, activation, slope = output
    ctx.mark_non_differentiable(activation, slope)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the two saved outputs
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, activation, slope)


def _pointwise_mlp_backward(ctx, grad, grad_activation, grad_slope):
    x, fc1_weight, fc1_bias, fc2_weight, activation, slope = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():
        # create_graph: gelu'' needs h, which is not kept, so recompute h and differentiate the plain layers.
        hidden = torch.addmm(fc1_bias, x, fc1_weight.t())
        grad_hidden = torch.ops.aten.gelu_backward(torch.mm(grad, fc2_weight), hidden)
        grads = _pointwise_mlp_grads(grad, x, fc1_weight, grad_hidden, torch.nn.functional.gelu(hidden))
    else:
        grads = pointwise_mlp_backward_op(grad, x, fc1_weight, fc2_weight, activation, slope)
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


@torch.library.custom_op("spanet::pointwise_mlp_backward", mutates_args=())
def pointwise_mlp_backward_op(
    grad: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, activation: Tensor, slope: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of ``spanet::pointwise_mlp``."""
    grad_hidden = torch.mm(grad, fc2_weight).mul_(slope)  # a fresh product: scaled in place
    return _pointwise_mlp_grads(grad, x, fc1_weight, grad_hidden, activation)


def _pointwise_mlp_grads(grad: Tensor, x: Tensor, fc1_weight: Tensor, grad_hidden: Tensor, activation: Tensor):
    """The five gradients of the MLP from its output's and its hidden layer's gradients."""
    return (
        torch.mm(grad_hidden, fc1_weight),
        torch.mm(grad_hidden.t(), x),
        grad_hidden.sum(0),
        torch.mm(grad.t(), activation),
        grad.sum(0),
    )


@pointwise_mlp_backward_op.register_fake
def _pointwise_mlp_backward_fake(grad, x, fc1_weight, fc2_weight, activation, slope):
    return (
        torch.empty_like(x),
        torch.empty_like(fc1_weight),
        fc1_weight.new_empty(fc1_weight.shape[0]),
        torch.empty_like(fc2_weight),
        fc2_weight.new_empty(fc2_weight.shape[0]),
    )


def _pointwise_mlp_backward_backward(ctx, *upstream):
    # This op keeps gelu'(h), not h, so gelu''(h) is out of reach here; spanet::pointwise_mlp's own
    # backward takes a differentiable path when a graph of the gradient is being built.
    raise RuntimeError(
        "spanet::pointwise_mlp_backward is not differentiable (it has gelu'(h), not h); differentiate "
        "spanet::pointwise_mlp with create_graph=True instead"
    )


pointwise_mlp_backward_op.register_autograd(_pointwise_mlp_backward_backward)
pointwise_mlp_op.register_autograd(_pointwise_mlp_backward, setup_context=_pointwise_mlp_setup)


# --------------------------------------------------------------------------- depthwise_row_conv


def _check_depthwise_row(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> None:
    check_real_floating(x, "x")
    torch._check_value(x.dim() == 4, lambda: f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    torch._check_value(
        weight.dim() == 4 and weight.shape[0] == channels and weight.shape[1] == 1 and weight.shape[2] == 1,
        lambda: f"weight must be (C, 1, 1, k) with C = {channels}, got shape {tuple(weight.shape)}",
    )
    torch._check_value(
        bias is None or tuple(bias.shape) == (channels,),
        lambda: f"bias must be ({channels},), got shape {None if bias is None else tuple(bias.shape)}",
    )
    torch._check_value(0 <= padding < weight.shape[3], lambda: f"padding must be in [0, k), got {padding}")
    torch._check_value(
        x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype),
        lambda: f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
        f"{None if bias is None else bias.dtype}",
    )


def _depthwise_row_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    return torch.nn.functional.conv2d(x, weight, bias, 1, (0, padding), 1, x.shape[1])


@torch.library.custom_op("spanet::depthwise_row_conv", mutates_args=())
def depthwise_row_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """A depthwise ``(1, k)`` convolution (stride 1, padding ``(0, padding)``) with a fast weight gradient.

    The forward and the input gradient are PyTorch's convolution; the weight
    and bias gradients are ``spanet::depthwise_row_weight_grad_kernel``.
    """
    _check_depthwise_row(x, weight, bias, padding)
    return _depthwise_row_forward(x, weight, bias, padding)


@depthwise_row_conv_op.register_fake
def _depthwise_row_conv_fake(x, weight, bias, padding):
    _check_depthwise_row(x, weight, bias, padding)
    return _depthwise_row_forward(x, weight, bias, padding)


def _depthwise_row_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.padding, ctx.has_bias = padding, bias is not None
    ctx.save_for_backward(x, weight)


def _depthwise_row_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _aten_depthwise_row_backward(grad, x, weight, ctx.padding, [True, False, False])[0]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # create_graph: PyTorch's convolution_backward, which is differentiable; else the one-pass kernel.
        weight_grad = (
            _depthwise_row_weight_grad_default
            if torch.is_grad_enabled()
            else torch.ops.spanet.depthwise_row_weight_grad_kernel
        )
        grad_weight, grad_bias = weight_grad(grad, x, weight, ctx.padding)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None


depthwise_row_conv_op.register_autograd(_depthwise_row_backward, setup_context=_depthwise_row_setup)
