"""The split-SPG family: SPAM's fused aggregation ``sum_i pw_i(SPF_{r, lam_i}(chunk_i(x)))`` and its gradients.

``spanet::spg_aggregate(x, weight, bias, lams, radius, algorithm)`` computes the three
published 1x1 convs as one (weights concatenated along input channels, biases
summed) with the low-rank spectral correction in coefficient space: the dense
GEMM with each input channel's weight scaled by ``1 - lam_c``, plus a projection
of ``x`` on the disc's ``J`` real basis images, a per-channel scale, a
``J x C x O`` channel mix and a synthesis. The balances are a ``float[]``, one per
chunk of ``torch.chunk(x, len(lams), dim=1)``. Its gradients
``spanet::spg_aggregate_input_grad`` and ``spanet::spg_aggregate_weight_grad`` are
ops of their own (bilinear, so they trace and differentiate again). The circular
plan holds the basis and coefficients; :func:`spanet_ops.plans.spg_algorithm`
decides ``auto``; the GEMMs run in ``spanet::spg_lowrank*_kernel``.
"""

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils import flop_counter

from .. import algorithms, reference
from ..masks import lam_values
from ..plans import CircularPlan, circular_plan
from ..validation import (
    check_algorithm,
    check_radius,
    check_real_floating,
    check_same_device,
    check_spatial,
    check_terms,
    chunk_sizes,
    compute_dtype,
    plainly_valid,
    require,
)
from .kernels import own_arithmetic
from .spf import spectral_pooling_filter_op

_spg_lowrank_kernel = torch.ops.spanet.spg_lowrank_kernel.default
_spg_lowrank_input_grad_kernel = torch.ops.spanet.spg_lowrank_input_grad_kernel.default
_spg_lowrank_weight_grad_kernel = torch.ops.spanet.spg_lowrank_weight_grad_kernel.default

#: The published balances, ``torch.arange(0.7, 0.9, 0.1)`` in float32 (exact as Python floats).
PUBLISHED_LAMS = tuple(float(v) for v in torch.arange(0.7, 0.9, 0.1))


def spg_aggregate(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lams: Union[Sequence[float], Tensor] = PUBLISHED_LAMS,
    radius: float = 2.0,
    *,
    algorithm: str = "auto",
) -> Tensor:
    """SPAM's fused split-SPG aggregation, exact to the published composition.

    Equal to ``sum_i conv1x1_i(SPF_{radius, lams[i]}(chunk_i(x)))`` with
    ``torch.chunk(x, len(lams), dim=1)``, computed as one 1x1 conv with the
    concatenated weights plus a low-rank spectral correction in coefficient space.

    Args:
        x: ``(B, C, H, W)``, NCHW or channels_last (the result keeps the layout).
        weight: the concatenated 1x1 weights ``(C_out, C)`` or ``(C_out, C, 1, 1)``.
        bias: the summed biases ``(C_out,)``, or None.
        lams: one balance per chunk (published: float32 0.7, 0.8, 0.9); ``C`` of them
            for one per channel. Fixed (not differentiable); a tensor is read on the host.
        radius: the stage's SPF radius.
        algorithm: ``"auto"``, ``"lowrank"`` (fused), ``"fft"`` (filter then conv) or
            ``"reference"`` (the published composition).

    Returns:
        ``ctx`` ``(B, C_out, H, W)`` in ``x``'s dtype. Differentiable in ``x``,
        ``weight`` and ``bias``.
    """
    check_algorithm(algorithm)
    radius = check_radius(radius)
    if isinstance(lams, Tensor) and lams.requires_grad:
        raise ValueError("spg_aggregate's balances are fixed (not differentiable); pass floats")
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"weight must be a 1x1 conv weight, got shape {tuple(weight.shape)}")
        weight = weight.flatten(1)
    return spg_aggregate_op(x, weight, bias, list(lam_values(lams)), radius, algorithm)


def _check_spg(x: Tensor, weight: Tensor, bias: Optional[Tensor], lams, radius: float, algorithm: str) -> None:
    if (
        plainly_valid(x, weight, bias)
        and x.dim() == 4
        and x.shape[2] != 0
        and x.shape[3] != 0
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
    ):
        check_terms(x.shape[1], lams, radius, algorithm, "spg_aggregate")
        return
    check_real_floating(x, "x")
    require(x.dim() == 4, lambda: f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    check_spatial(x)
    check_real_floating(weight, "weight")
    check_same_device(x, weight, "x", "weight")
    require(
        weight.dim() == 2 and weight.shape[1] == x.shape[1],
        lambda: f"weight must be (C_out, C) with C = {x.shape[1]}, got shape {tuple(weight.shape)}",
    )
    if bias is not None:
        check_real_floating(bias, "bias")
        check_same_device(x, bias, "x", "bias")
        require(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}",
        )
    check_terms(x.shape[1], lams, radius, algorithm, "spg_aggregate")


def _layout_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if algorithms.is_channels_last(x) else torch.contiguous_format


def _empty_map(like: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    shape = (like.shape[0], channels, like.shape[2], like.shape[3])
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=_layout_of(like))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _plan(like: Tensor, channels: int, lams, radius: float, dtype: torch.dtype) -> CircularPlan:
    return circular_plan(like.shape[-2], like.shape[-1], radius, tuple(lams), channels, dtype, like.device)


def _reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], lams, radius: float) -> Tensor:
    """The published composition: per-chunk SPF (paper-literal) and 1x1 conv, summed; the bias rides on chunk 0."""
    sizes = chunk_sizes(x.shape[1], len(lams))
    weights = torch.split(weight, sizes, dim=1)
    biases = [bias] + [None] * (len(lams) - 1)
    return reference.spg_aggregate(x, weights, biases, lams, radius)


@torch.library.custom_op("spanet::spg_aggregate", mutates_args=())
def spg_aggregate_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lams: List[float], radius: float, algorithm: str
) -> Tensor:
    """Op form of :func:`spg_aggregate` with a 2-D weight and the balances as floats."""
    _check_spg(x, weight, bias, lams, radius, algorithm)
    with own_arithmetic(x):
        dtype = compute_dtype(x.dtype)
        xc, w, b = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
        if x.numel() == 0:  # what the 1x1 conv gives: nothing for an empty batch, the bias for no channels
            out = _empty_map(x, weight.shape[0], dtype)
            out.copy_((b if b is not None else w.new_zeros(w.shape[0]))[:, None, None].expand(out.shape))
        elif algorithm == "reference":
            out = _reference(xc, w, b, lams, radius)
        else:
            plan = _plan(x, x.shape[1], lams, radius, dtype)
            chosen = plan.spg_algorithm(weight.shape[0]) if algorithm == "auto" else algorithm
            if chosen == "lowrank":
                out = _spg_lowrank_kernel(xc, w, b, *plan.spg_terms)
            else:
                out = algorithms.conv1x1(spectral_pooling_filter_op(xc, lams, radius, chosen), w, b)
        out = _cast(out, x.dtype)
        layout = _layout_of(x)
        return out if out.is_contiguous(memory_format=layout) else out.contiguous(memory_format=layout)


@spg_aggregate_op.register_fake
def _spg_aggregate_fake(x, weight, bias, lams, radius, algorithm):
    _check_spg(x, weight, bias, lams, radius, algorithm)
    return _empty_map(x, weight.shape[0], x.dtype)


def _spg_setup(ctx, inputs, output):
    x, weight, bias, ctx.lams, ctx.radius, ctx.algorithm = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight)


def _spg_backward(ctx, grad):
    # ctx = W SPF(x) + b: both gradients are ops of their own (they trace, and differentiate again).
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _cast(spg_input_grad_op(grad, weight, ctx.lams, ctx.radius, ctx.algorithm), x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = _cast(spg_weight_grad_op(grad, x, ctx.lams, ctx.radius, ctx.algorithm), weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = _cast(grad, compute_dtype(grad.dtype)).sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


spg_aggregate_op.register_autograd(_spg_backward, setup_context=_spg_setup)


def _check_spg_grad(grad: Tensor, other: Tensor, other_name: str, lams, radius: float, algorithm: str) -> None:
    if plainly_valid(grad, other) and grad.dim() == 4 and grad.shape[2] != 0 and grad.shape[3] != 0 and (
        (other.dim() == 2 and other.shape[0] == grad.shape[1])
        if other_name == "weight"
        else (other.dim() == 4 and other.shape[0] == grad.shape[0] and other.shape[2:] == grad.shape[2:])
    ):
        check_terms(other.shape[1], lams, radius, algorithm, "spg_aggregate")
        return
    check_real_floating(grad, "grad")
    require(grad.dim() == 4, lambda: f"grad must be (B, C_out, H, W), got shape {tuple(grad.shape)}")
    check_spatial(grad, "grad")
    check_real_floating(other, other_name)
    check_same_device(grad, other, "grad", other_name)
    if other_name == "weight":
        require(
            other.dim() == 2 and other.shape[0] == grad.shape[1],
            lambda: f"weight must be (C_out, C) with C_out = {grad.shape[1]}, got shape {tuple(other.shape)}",
        )
    else:
        require(
            other.dim() == 4 and (other.shape[0], *other.shape[2:]) == (grad.shape[0], *grad.shape[2:]),
            lambda: f"x must be (B, C, H, W) like grad {tuple(grad.shape)}, got shape {tuple(other.shape)}",
        )
    check_terms(other.shape[1], lams, radius, algorithm, "spg_aggregate")


@torch.library.custom_op("spanet::spg_aggregate_input_grad", mutates_args=())
def spg_input_grad_op(grad: Tensor, weight: Tensor, lams: List[float], radius: float, algorithm: str) -> Tensor:
    """``SPF(W^T grad)`` ``(B, C, H, W)``, the input gradient of ``spg_aggregate``, in ``grad``'s dtype."""
    _check_spg_grad(grad, weight, "weight", lams, radius, algorithm)
    with own_arithmetic(grad):
        channels = weight.shape[1]
        dtype = compute_dtype(grad.dtype)
        g, w = _cast(grad, dtype), _cast(weight, dtype)
        if grad.numel() == 0:
            out = _empty_map(grad, channels, dtype).zero_()
        elif algorithm == "reference":
            transposed = algorithms.conv1x1(g, w.transpose(0, 1))
            out = spectral_pooling_filter_op(transposed, lams, radius, "reference")
        else:
            plan = _plan(grad, channels, lams, radius, dtype)
            chosen = plan.spg_algorithm(weight.shape[0]) if algorithm == "auto" else algorithm
            if chosen == "lowrank":
                out = _spg_lowrank_input_grad_kernel(g, w, *plan.spg_terms)
            else:
                out = spectral_pooling_filter_op(algorithms.conv1x1(g, w.transpose(0, 1)), lams, radius, chosen)
        out = _cast(out, grad.dtype)
        layout = _layout_of(grad)
        return out if out.is_contiguous(memory_format=layout) else out.contiguous(memory_format=layout)


@spg_input_grad_op.register_fake
def _spg_input_grad_fake(grad, weight, lams, radius, algorithm):
    _check_spg_grad(grad, weight, "weight", lams, radius, algorithm)
    return _empty_map(grad, weight.shape[1], grad.dtype)


def _spg_grad_setup(ctx, inputs, output):
    # Both gradient ops take (grad, weight or x, lams, radius, algorithm) and are bilinear in their
    # first two inputs: their own gradients need those two.
    first, second, ctx.lams, ctx.radius, ctx.algorithm = inputs
    ctx.save_for_backward(first, second)


def _spg_input_grad_backward(ctx, upstream):
    # out = SPF(W^T g) is linear in g and in W: <u, SPF(W^T g)> = <W SPF(u), g> = <W, g SPF(u)^T>.
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = _cast(spg_aggregate_op(upstream, weight, None, ctx.lams, ctx.radius, ctx.algorithm), grad.dtype)
    if ctx.needs_input_grad[1]:
        d_weight = _cast(spg_weight_grad_op(grad, upstream, ctx.lams, ctx.radius, ctx.algorithm), weight.dtype)
    return d_grad, d_weight, None, None, None


spg_input_grad_op.register_autograd(_spg_input_grad_backward, setup_context=_spg_grad_setup)


@torch.library.custom_op("spanet::spg_aggregate_weight_grad", mutates_args=())
def spg_weight_grad_op(grad: Tensor, x: Tensor, lams: List[float], radius: float, algorithm: str) -> Tensor:
    """``sum of grad SPF(x)^T`` ``(C_out, C)``, the weight gradient of ``spg_aggregate``, in the compute dtype."""
    _check_spg_grad(grad, x, "x", lams, radius, algorithm)
    with own_arithmetic(grad):
        dtype = compute_dtype(torch.promote_types(grad.dtype, x.dtype))
        g, xc = _cast(grad, dtype), _cast(x, dtype)
        if grad.numel() == 0 or x.numel() == 0:
            return g.new_zeros((grad.shape[1], x.shape[1]))
        if algorithm != "reference":
            plan = _plan(x, x.shape[1], lams, radius, dtype)
            chosen = plan.spg_algorithm(grad.shape[1]) if algorithm == "auto" else algorithm
            if chosen == "lowrank":
                return _spg_lowrank_weight_grad_kernel(g, xc, *plan.spg_terms)
        else:
            chosen = "reference"
        filtered = spectral_pooling_filter_op(xc, lams, radius, chosen)
        return algorithms.dense_1x1_weight_grad(g.contiguous().flatten(2), filtered.flatten(2), channels_last=False)


@spg_weight_grad_op.register_fake
def _spg_weight_grad_fake(grad, x, lams, radius, algorithm):
    _check_spg_grad(grad, x, "x", lams, radius, algorithm)
    dtype = compute_dtype(torch.promote_types(grad.dtype, x.dtype))
    return grad.new_empty((grad.shape[1], x.shape[1]), dtype=dtype)


def _spg_weight_grad_backward(ctx, upstream):
    # out = sum g SPF(x)^T is linear in g and in x: <U, g SPF(x)^T> = <U SPF(x), g> = <SPF(U^T g), x>.
    grad, x = ctx.saved_tensors
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad = _cast(spg_aggregate_op(x, upstream, None, ctx.lams, ctx.radius, ctx.algorithm), grad.dtype)
    if ctx.needs_input_grad[1]:
        d_x = _cast(spg_input_grad_op(grad, upstream, ctx.lams, ctx.radius, ctx.algorithm), x.dtype)
    return d_grad, d_x, None, None, None


spg_weight_grad_op.register_autograd(_spg_weight_grad_backward, setup_context=_spg_grad_setup)


def _spg_aggregate_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``spg_aggregate`` as the flop counter counts the published code: its 1x1 convs.

    The published ``pws`` convs cost ``2 B C_out C H W`` together; the spectral
    part (FFTs there, the low-rank correction here) is not counted, as the published
    MACs are not. Without a formula the counter would see the op as free.
    """
    batch, channels, height, width = x_shape
    return 2 * batch * weight_shape[0] * channels * height * width


flop_counter.register_flop_formula(torch.ops.spanet.spg_aggregate)(_spg_aggregate_flops)
