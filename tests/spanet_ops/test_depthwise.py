"""spanet::depthwise_row_conv and its weight-gradient kernel against PyTorch's convolution.

Reference: ``aten.convolution_backward`` in float64 on the same (rounded) inputs.
The native CPU kernel (csrc/cpu/depthwise_cpu.cpp) serves channels_last float32/float64
maps and hands every other case to PyTorch; both routes are checked.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from spanet.models.spanet import RowDepthwiseConv

NATIVE = importlib.import_module("spanet_ops.backends").native_module()

# (dtype, atol, rtol) of each gradient relative to its largest magnitude (sums over B*H*W terms).
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 2e-2)}
# (B, C, H, W, k, padding): the model's shapes, channels that are not a multiple of the
# kernel's 16-channel block, maps narrower than the kernel, and paddings other than k // 2.
CASES = [
    (2, 64, 56, 56, 7, 3),
    (2, 320, 14, 14, 7, 3),
    (3, 20, 9, 13, 7, 3),
    (1, 5, 3, 4, 3, 1),
    (2, 33, 6, 10, 5, 0),
    (1, 17, 2, 3, 7, 6),
    (1, 16, 1, 1, 7, 3),
]
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _inputs(case, dtype, layout, seed=0):
    batch, channels, height, width, taps, padding = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, channels, height, width + 2 * padding - taps + 1, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, 1, 1, taps, generator=gen, dtype=torch.float64)
    fmt = LAYOUTS[layout]
    return (
        grad.to(dtype).contiguous(memory_format=fmt),
        x.to(dtype).contiguous(memory_format=fmt),
        weight.to(dtype),
        padding,
    )


def _expected(grad, x, weight, padding):
    channels = x.shape[1]
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), [channels], [1, 1], [0, padding], [1, 1], False, [0, 0],
        channels, [False, True, True],
    )
    return grad_weight, grad_bias


def _assert_scaled_close(got, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), expected, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_grad_kernel_matches_convolution_backward(case, dtype, layout):
    grad, x, weight, padding = _inputs(case, dtype, layout)
    grad_weight, grad_bias = torch.ops.spanet.depthwise_row_weight_grad_kernel(grad, x, weight, padding)
    expected_weight, expected_bias = _expected(grad, x, weight, padding)
    assert grad_weight.shape == weight.shape and grad_bias.shape == (weight.shape[0],)
    assert grad_weight.dtype == dtype and grad_bias.dtype == dtype
    _assert_scaled_close(grad_weight, expected_weight, dtype)
    _assert_scaled_close(grad_bias, expected_bias, dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_gradients_match_conv2d(layout):
    grad, x, weight, padding = _inputs((2, 24, 7, 11, 7, 3), torch.float32, layout, seed=1)
    bias = torch.randn(24)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    got_out = torch.ops.spanet.depthwise_row_conv(x, weight, bias, padding)
    expected_out = F.conv2d(x, weight, bias, 1, (0, padding), 1, 24)
    torch.testing.assert_close(got_out, expected_out)
    assert got_out.stride() == expected_out.stride()
    got = torch.autograd.grad(got_out, (x, weight, bias), grad)
    expected = torch.autograd.grad(expected_out, (x, weight, bias), grad)
    for g, e in zip(got, expected):
        _assert_scaled_close(g, e.double(), torch.float32)


def test_gradcheck_and_gradgradcheck():
    # The second order runs through PyTorch's differentiable convolution_backward (create_graph branch).
    grad, x, weight, padding = _inputs((2, 18, 4, 6, 3, 1), torch.float64, "channels_last", seed=2)
    bias = torch.randn(18, dtype=torch.float64, requires_grad=True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.spanet.depthwise_row_conv(*a, padding), args)
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.spanet.depthwise_row_conv(*a, padding), args)


def test_opcheck():
    _, x, weight, padding = _inputs((2, 18, 5, 7, 7, 3), torch.float32, "channels_last", seed=3)
    bias = torch.randn(18, requires_grad=True)
    opcheck(torch.ops.spanet.depthwise_row_conv.default, (x.requires_grad_(), weight.requires_grad_(), bias, padding))
    opcheck(torch.ops.spanet.depthwise_row_conv.default, (x.detach(), weight.detach(), None, 0))
    grad, x, weight, padding = _inputs((2, 18, 5, 7, 7, 3), torch.float32, "channels_last", seed=4)
    opcheck(torch.ops.spanet.depthwise_row_weight_grad_kernel.default, (grad, x, weight, padding))


@pytest.mark.parametrize(
    "shapes, padding, match",
    [
        (((2, 4, 5, 6), (4, 1, 3, 1), None), 1, "weight must be"),
        (((2, 4, 5, 6), (3, 1, 1, 3), None), 1, "weight must be"),
        (((2, 4, 5, 6), (4, 1, 1, 3), (5,)), 1, "bias must be"),
        (((2, 4, 5, 6), (4, 1, 1, 3), None), 3, "padding must be"),
        (((4, 5, 6), (4, 1, 1, 3), None), 1, "x must be"),
    ],
)
def test_bad_arguments_are_named(shapes, padding, match):
    x_shape, w_shape, b_shape = shapes
    bias = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(ValueError, match=match):
        torch.ops.spanet.depthwise_row_conv(torch.randn(x_shape), torch.randn(w_shape), bias, padding)


def test_module_takes_the_op_only_while_training_on_channels_last():
    module = RowDepthwiseConv(8, 7)
    x = torch.randn(2, 8, 5, 9)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected_op = "spanet_depthwise_row_conv" if NATIVE is not None else "ConvolutionBackward"
    assert expected_op in type(module(x_cl).grad_fn).__name__
    assert "ConvolutionBackward" in type(module(x).grad_fn).__name__
    with torch.no_grad():
        torch.testing.assert_close(module(x_cl), module(x))
    assert set(module.state_dict()) == {"weight", "bias"}
