"""Training-only CPU fast paths: their ops and the layers that use them, in one place.

SPANet's training step on the CPU spends much of its time in two places PyTorch
serves poorly at its shapes: the MLP's backward (``gelu_backward`` re-evaluates erf
and exp) and the weight gradient of a depthwise ``(1, k)`` conv on channels_last
maps (oneDNN's is several times slower than for its ``(k, 1)`` twin; see
``benchmarks/RESULTS.md``). Two ops fix them:

* ``spanet::pointwise_mlp`` — fc1, exact GELU, fc2 on pixels ``(N, C)``; its
  backward keeps GELU's slope (``spanet::gelu_slope_kernel``) instead of its input;
* ``spanet::depthwise_row_conv`` — the conv with a one-pass weight gradient
  (``spanet::depthwise_row_weight_grad_kernel``).

The layers :class:`PointwiseConv`, :class:`RowDepthwiseConv` and :class:`PointwiseMlp`
have ``nn.Conv2d``'s parameters and state dicts. They take a fast path only in
training mode (``module.training``, never grad mode), in eager mode, on channels_last
CPU maps with the native kernels built; evaluation always runs the plain layers.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backends import native_module
from .validation import check_real_floating, compute_dtype, require

_lib = torch.library.Library("spanet", "FRAGMENT")


def gelu_with_slope(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The exact (erf) GELU of ``x`` and its derivative: ``(x Phi(x), Phi(x) + x phi(x))``.

    ``Phi``/``phi`` are the standard normal CDF/density; computed in the
    compute dtype (float32 for half types), returned in ``x``'s dtype. The PyTorch
    default of ``spanet::gelu_slope_kernel`` (native CPU kernel: csrc/cpu/gelu_cpu.cpp).
    """
    xc = x.to(compute_dtype(x.dtype))
    cdf = 0.5 * (1.0 + torch.erf(xc * math.sqrt(0.5)))
    slope = cdf + xc * torch.exp(-0.5 * xc * xc) * (1.0 / math.sqrt(2.0 * math.pi))
    return (xc * cdf).to(x.dtype), slope.to(x.dtype)


_lib.define("gelu_slope_kernel(Tensor x) -> (Tensor, Tensor)")
_lib.impl("gelu_slope_kernel", gelu_with_slope, "CompositeExplicitAutograd")


@torch.library.register_fake("spanet::gelu_slope_kernel", lib=_lib)
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


@torch.library.register_fake("spanet::depthwise_row_weight_grad_kernel", lib=_lib)
def _depthwise_row_weight_grad_kernel_fake(grad, x, weight, padding):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(weight.shape[0])


# --------------------------------------------------------------------------- pointwise_mlp


def _check_pointwise_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor):
    check_real_floating(x, "x")
    require(x.dim() == 2, lambda: f"x must be pixels (N, C), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    require(
        fc1_weight.dim() == 2 and fc1_weight.shape[1] == channels,
        lambda: f"fc1_weight must be (hidden, {channels}), got shape {tuple(fc1_weight.shape)}",
    )
    hidden = fc1_weight.shape[0]
    require(
        tuple(fc1_bias.shape) == (hidden,), lambda: f"fc1_bias must be ({hidden},), got shape {tuple(fc1_bias.shape)}"
    )
    require(
        fc2_weight.dim() == 2 and fc2_weight.shape[1] == hidden,
        lambda: f"fc2_weight must be (out, {hidden}), got shape {tuple(fc2_weight.shape)}",
    )
    require(
        tuple(fc2_bias.shape) == (fc2_weight.shape[0],),
        lambda: f"fc2_bias must be ({fc2_weight.shape[0]},), got shape {tuple(fc2_bias.shape)}",
    )
    require(
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
    require(x.dim() == 4, lambda: f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    require(
        weight.dim() == 4 and weight.shape[0] == channels and weight.shape[1] == 1 and weight.shape[2] == 1,
        lambda: f"weight must be (C, 1, 1, k) with C = {channels}, got shape {tuple(weight.shape)}",
    )
    require(
        bias is None or tuple(bias.shape) == (channels,),
        lambda: f"bias must be ({channels},), got shape {None if bias is None else tuple(bias.shape)}",
    )
    require(0 <= padding < weight.shape[3], lambda: f"padding must be in [0, k), got {padding}")
    require(
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


# --------------------------------------------------------------------------- layers


def _cpu_training_kernels(x: Tensor) -> bool:
    """Whether the native CPU training kernels serve ``x``: a float32/float64 channels_last CPU map, eager mode.

    Not under CPU autocast, whose casts the plain layers follow.
    """
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and native_module() is not None
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and _is_channels_last(x)
    )


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


#: Maps with fewer pixels than this take :class:`PointwiseConv`'s pixel-major GEMM on the CPU.
TINY_MAP_PIXELS = 16


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv with ``nn.Conv2d``'s parameters and state dict that runs as one pixel-major GEMM where that is faster.

    * In training mode on a channels_last input the map is already ``(B, H, W, C)``
      in memory, so the conv is ``F.linear`` on that view: one GEMM forward and two
      backward, faster on the CPU than oneDNN's 1x1 convolution backward at
      SPANet's shapes (see ``benchmarks/RESULTS.md``).
    * On an NCHW CPU map of fewer than :data:`TINY_MAP_PIXELS` pixels (stage 4 at
      small inputs: 2x2 at 64x64), in any mode, the conv is ``F.linear`` on the
      ``(B, HW, C)`` transpose: PyTorch's CPU convolution runs such maps through a GEMM
      whose inner dimension is the pixel count, 3-4x slower at 2x2.

    Everything else takes the ordinary convolution, whose forward is as fast.
    """

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True):
        super().__init__(in_chs, out_chs, kernel_size=1, bias=bias)
        self.tiny_map_pixels: int = TINY_MAP_PIXELS

    def forward(self, x: Tensor) -> Tensor:
        if self.training and _is_channels_last(x):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        batch, channels, height, width = x.shape
        if x.device.type == "cpu" and height * width < self.tiny_map_pixels and x.is_contiguous():
            pixels = x.reshape(batch, channels, height * width).transpose(1, 2)
            out = F.linear(pixels, self.weight.flatten(1), self.bias)  # (B, HW, O)
            return out.transpose(1, 2).reshape(batch, self.out_channels, height, width)  # NCHW again (a tiny copy)
        return self._conv_forward(x, self.weight, self.bias)


class RowDepthwiseConv(nn.Conv2d):
    """A depthwise ``(1, k)`` conv (SPAM's first), with ``nn.Conv2d``'s parameters and state dict.

    In training mode on a channels_last CPU map in eager mode (native kernels
    built) it runs as ``spanet::depthwise_row_conv``: the same forward and input
    gradient, and a one-pass weight gradient in place of oneDNN's. Everywhere else
    it is the ordinary convolution.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, (1, kernel_size), padding=(0, kernel_size // 2), groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not torch.jit.is_scripting() and self._fast_weight_grad(x):
            return torch.ops.spanet.depthwise_row_conv(x, self.weight, self.bias, self.padding[1])
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _fast_weight_grad(self, x: Tensor) -> bool:
        return _cpu_training_kernels(x)


#: Hidden-map size above which :class:`PointwiseMlp` runs in batch slices.
MLP_SLICE_BYTES = 32 * 1024 * 1024


class PointwiseMlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` with 1x1 convs (``fc1``, ``fc2``: the MetaFormer MLP's layout).

    The MLP is pointwise per sample, so a batch whose hidden map would exceed
    ``max_hidden_bytes`` (:data:`MLP_SLICE_BYTES`) runs in batch slices (exactly the
    same result): glibc maps every allocation above 32 MiB afresh, and the page
    faults of SPANet's stage-1 hidden maps (51 MB at batch 16) cost more than the
    layers' arithmetic on the CPU.

    In training mode on a channels_last CPU map in eager mode (native kernels built,
    exact GELU, no dropout), the three layers run as one ``spanet::pointwise_mlp`` on
    the ``(B, H, W, C)`` view: the backward keeps GELU's slope instead of its input
    and scales by it in place (see ``benchmarks/RESULTS.md``).
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        #: Largest hidden map computed in one piece (glibc's ceiling for reusing freed memory).
        self.max_hidden_bytes: int = MLP_SLICE_BYTES
        self.fc1 = PointwiseConv(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = PointwiseConv(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def _mlp(self, x: Tensor) -> Tensor:
        if self.training and not torch.jit.is_scripting() and self._fused_training(x):
            return self._fused_mlp(x)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    @torch.jit.unused
    def _fused_training(self, x: Tensor) -> bool:
        return (
            self.drop1.p == 0.0
            and self.drop2.p == 0.0
            and type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and _cpu_training_kernels(x)
        )

    @torch.jit.unused
    def _fused_mlp(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)
        out, _, _ = torch.ops.spanet.pointwise_mlp(
            pixels, self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1), self.fc2.bias
        )
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or x.numel() == 0:  # slicing is an eager-CPU allocation matter
            return self._mlp(x)
        hidden_bytes = x.numel() // x.shape[1] * self.fc1.out_channels * x.element_size()
        slices = min(x.shape[0], -(-hidden_bytes // self.max_hidden_bytes))
        if slices <= 1:
            return self._mlp(x)
        return torch.cat([self._mlp(part) for part in x.chunk(slices)], dim=0)
