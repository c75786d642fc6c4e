"""spanet_ops.training: the training-only CPU ops, their kernels and the layers that use them.

* ``spanet::pointwise_mlp`` (fc1, exact GELU, fc2 with a saved-slope backward) and its GELU
  kernel: the value is compared with ``torch.nn.functional.gelu`` and the slope with
  ``aten.gelu_backward`` (the derivative PyTorch's own autograd uses), both in float64 on the
  same (rounded) input; the native CPU kernel (csrc/cpu/gelu_cpu.cpp) and the PyTorch default
  (:func:`spanet_ops.training.gelu_with_slope`) are each checked; the op against the layers it fuses.
* ``spanet::depthwise_row_conv`` and its weight-gradient kernel against ``aten.convolution_backward``
  in float64 on the same (rounded) inputs (csrc/cpu/depthwise_cpu.cpp serves channels_last
  float32/float64 maps and hands every other case to PyTorch; both routes are checked).
* The layers take the fast paths in training mode only (``module.training``), never in eval mode,
  whatever the grad mode.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from torch.profiler import ProfilerActivity, profile

from spanet_ops.training import PointwiseConv, PointwiseMlp, RowDepthwiseConv, gelu_with_slope

NATIVE = importlib.import_module("spanet_ops.backends").native_module()

# (dtype, atol, rtol) of the GELU kernel against float64 on the same input. float32: the kernel's erf is
# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as in PyTorch's vectorised GELU; half
# types are computed in float32 and rounded once.
GELU_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float16: (2e-3, 1e-3),
}
# Element counts around the 8-float vector and the parallel grain, in several layouts.
SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 8, 9, 11), (33000,), (70001,)]


def _kernels():
    kernels = {"pytorch": gelu_with_slope}
    if NATIVE is not None:
        kernels["native"] = torch.ops.spanet.gelu_slope_kernel
    return kernels


def _input(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    flat = x.view(-1)
    # Zeros of both signs, the far tails (erf saturates, exp underflows) and tiny values.
    specials = torch.tensor([0.0, -0.0, 40.0, -40.0, 9.5, -9.5, 1e-30, -1e-30], dtype=torch.float64)
    count = min(flat.numel(), specials.numel())
    flat[:count] = specials[:count]
    return x.to(dtype)


def _expected(x):
    x64 = x.double()
    return F.gelu(x64), torch.ops.aten.gelu_backward(torch.ones_like(x64), x64)


@pytest.mark.parametrize("kernel", list(_kernels()))
@pytest.mark.parametrize("dtype", list(GELU_TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_value_and_slope_match_pytorch(kernel, dtype, shape):
    x = _input(shape, dtype)
    value, slope = _kernels()[kernel](x)
    expected_value, expected_slope = _expected(x)
    atol, rtol = GELU_TOLERANCES[dtype]
    assert value.dtype == dtype and slope.dtype == dtype
    torch.testing.assert_close(value.double(), expected_value, atol=atol, rtol=rtol)
    torch.testing.assert_close(slope.double(), expected_slope, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kernel", list(_kernels()))
@pytest.mark.parametrize(
    "make, dense",
    [
        (lambda x: x.contiguous(memory_format=torch.channels_last), True),
        (lambda x: x.transpose(1, 3), True),
        (lambda x: x[:, ::2], False),
        (lambda x: x.expand(3, -1, -1, -1)[1:], False),
    ],
    ids=["channels_last", "transposed", "strided", "expanded"],
)
def test_layouts(kernel, make, dense):
    x = make(_input((1, 6, 9, 11), torch.float32))
    value, slope = _kernels()[kernel](x)
    expected_value, expected_slope = _expected(x)
    torch.testing.assert_close(value.double(), expected_value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(slope.double(), expected_slope, atol=1e-6, rtol=1e-6)
    if dense:  # a dense layout is kept
        assert value.stride() == x.stride() and slope.stride() == x.stride()


@pytest.mark.skipif(NATIVE is None, reason="spanet_ops native extension not built")
def test_native_kernel_is_registered_for_cpu():
    x = _input((5, 13), torch.float32)
    native = torch.ops.spanet.gelu_slope_kernel(x)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spanet::gelu_slope_kernel", "CPU")
    # The native kernel is PyTorch's float32 GELU to rounding, not bit-for-bit.
    torch.testing.assert_close(native[0], F.gelu(x), atol=1e-6, rtol=1e-6)


def _mlp_inputs(dtype, pixels=37, channels=12, hidden=40, out=11, seed=5):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return make(pixels, channels), make(hidden, channels), make(hidden), make(out, hidden), make(out)


def _mlp_layers(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pointwise_mlp_matches_its_layers(dtype):
    inputs = _mlp_inputs(dtype)
    out, activation, slope = torch.ops.spanet.pointwise_mlp(*inputs)
    expected = _mlp_layers(*inputs)
    atol, rtol = GELU_TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, atol=10 * atol, rtol=10 * rtol)
    hidden = F.linear(inputs[0], inputs[1], inputs[2]).detach()
    torch.testing.assert_close(activation, F.gelu(hidden), atol=atol, rtol=rtol)
    assert out.requires_grad and not activation.requires_grad and not slope.requires_grad
    grad = torch.randn(out.shape, dtype=dtype)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=10 * atol * float(w.abs().max()), rtol=10 * rtol)


def test_pointwise_mlp_input_without_grad():
    x, *params = _mlp_inputs(torch.float64)
    x = x.detach()
    out = torch.ops.spanet.pointwise_mlp(x, *params)[0]
    got = torch.autograd.grad(out.sum(), params)
    want = torch.autograd.grad(_mlp_layers(x, *params).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_pointwise_mlp_gradcheck_and_gradgradcheck():
    # The second order runs through the create_graph branch (h recomputed, the plain layers differentiated).
    inputs = _mlp_inputs(torch.float64, pixels=6, channels=3, hidden=5, out=4)

    def mlp(*args):
        return torch.ops.spanet.pointwise_mlp(*args)[0]

    assert torch.autograd.gradcheck(mlp, inputs)
    assert torch.autograd.gradgradcheck(mlp, inputs)


def test_pointwise_mlp_backward_op_refuses_differentiation():
    grad = torch.randn(4, 3, requires_grad=True)
    x, fc1_weight, fc2_weight = torch.randn(4, 2), torch.randn(5, 2), torch.randn(3, 5)
    grads = torch.ops.spanet.pointwise_mlp_backward(grad, x, fc1_weight, fc2_weight, torch.rand(4, 5), torch.rand(4, 5))
    with pytest.raises(RuntimeError, match="not differentiable"):
        grads[0].sum().backward()


def test_pointwise_mlp_opcheck():
    inputs = _mlp_inputs(torch.float32, pixels=9, channels=4, hidden=8, out=5)
    opcheck(torch.ops.spanet.pointwise_mlp.default, inputs)
    grad = torch.randn(9, 5)
    x, fc1_weight, _, fc2_weight, _ = (t.detach() for t in inputs)
    activation, slope = torch.rand(9, 8), torch.rand(9, 8)
    opcheck(
        torch.ops.spanet.pointwise_mlp_backward.default,
        (grad, x, fc1_weight, fc2_weight, activation, slope),
        test_utils=("test_schema", "test_faketensor"),
    )
    opcheck(torch.ops.spanet.gelu_slope_kernel.default, (torch.randn(3, 7),))


@pytest.mark.parametrize(
    "index, shape, match",
    [(0, (37, 12, 1), "x must be"), (1, (40, 13), "fc1_weight must be"), (2, (41,), "fc1_bias must be"),
     (3, (11, 39), "fc2_weight must be"), (4, (12,), "fc2_bias must be")],
)
def test_pointwise_mlp_names_bad_arguments(index, shape, match):
    inputs = [t.detach() for t in _mlp_inputs(torch.float32)]
    inputs[index] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        torch.ops.spanet.pointwise_mlp(*inputs)


def test_gelu_kernel_rejects_non_floating_input():
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.spanet.gelu_slope_kernel(torch.arange(6))



# --------------------------------------------------------------------------- depthwise_row_conv

# (dtype, atol, rtol) of each gradient relative to its largest magnitude (sums over B*H*W terms).
DEPTHWISE_TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 2e-2)}
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


def _conv_inputs(case, dtype, layout, seed=0):
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


def _expected_conv_grads(grad, x, weight, padding):
    channels = x.shape[1]
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), [channels], [1, 1], [0, padding], [1, 1], False, [0, 0],
        channels, [False, True, True],
    )
    return grad_weight, grad_bias


def _assert_scaled_close(got, expected, dtype):
    atol, rtol = DEPTHWISE_TOLERANCES[dtype]
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), expected, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DEPTHWISE_TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_grad_kernel_matches_convolution_backward(case, dtype, layout):
    grad, x, weight, padding = _conv_inputs(case, dtype, layout)
    grad_weight, grad_bias = torch.ops.spanet.depthwise_row_weight_grad_kernel(grad, x, weight, padding)
    expected_weight, expected_bias = _expected_conv_grads(grad, x, weight, padding)
    assert grad_weight.shape == weight.shape and grad_bias.shape == (weight.shape[0],)
    assert grad_weight.dtype == dtype and grad_bias.dtype == dtype
    _assert_scaled_close(grad_weight, expected_weight, dtype)
    _assert_scaled_close(grad_bias, expected_bias, dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_depthwise_op_gradients_match_conv2d(layout):
    grad, x, weight, padding = _conv_inputs((2, 24, 7, 11, 7, 3), torch.float32, layout, seed=1)
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


def test_depthwise_gradcheck_and_gradgradcheck():
    # The second order runs through PyTorch's differentiable convolution_backward (create_graph branch).
    grad, x, weight, padding = _conv_inputs((2, 18, 4, 6, 3, 1), torch.float64, "channels_last", seed=2)
    bias = torch.randn(18, dtype=torch.float64, requires_grad=True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.spanet.depthwise_row_conv(*a, padding), args)
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.spanet.depthwise_row_conv(*a, padding), args)


def test_depthwise_opcheck():
    _, x, weight, padding = _conv_inputs((2, 18, 5, 7, 7, 3), torch.float32, "channels_last", seed=3)
    bias = torch.randn(18, requires_grad=True)
    opcheck(torch.ops.spanet.depthwise_row_conv.default, (x.requires_grad_(), weight.requires_grad_(), bias, padding))
    opcheck(torch.ops.spanet.depthwise_row_conv.default, (x.detach(), weight.detach(), None, 0))
    grad, x, weight, padding = _conv_inputs((2, 18, 5, 7, 7, 3), torch.float32, "channels_last", seed=4)
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
def test_depthwise_bad_arguments_are_named(shapes, padding, match):
    x_shape, w_shape, b_shape = shapes
    bias = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(ValueError, match=match):
        torch.ops.spanet.depthwise_row_conv(torch.randn(x_shape), torch.randn(w_shape), bias, padding)


# --------------------------------------------------------------------------- the layers


def _ops_run(fn, *names):
    """How often each of the spanet ops ``names`` ran during ``fn()`` (torch.profiler's op events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {name: sum(1 for e in prof.events() if e.name == f"spanet::{name}") for name in names}


#: (training mode, grad mode): the layers route by ``module.training`` alone.
MODES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("training, grad", MODES)
def test_mlp_takes_the_op_in_training_mode_only(training, grad):
    mlp = PointwiseMlp(6, 20).train(training)
    x = torch.randn(2, 6, 5, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.set_grad_enabled(grad):
            return mlp(x_cl)

    fused = training and NATIVE is not None
    assert _ops_run(run, "pointwise_mlp") == {"pointwise_mlp": int(fused)}
    assert _ops_run(lambda: mlp(x), "pointwise_mlp") == {"pointwise_mlp": 0}  # NCHW: the layers
    with torch.no_grad():
        torch.testing.assert_close(run(), mlp.eval()(x), atol=1e-6, rtol=1e-6)


def test_mlp_keeps_the_layers_for_autocast_and_dropout():
    mlp = PointwiseMlp(6, 20).train()
    x_cl = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the layers, in bfloat16
        assert _ops_run(lambda: mlp(x_cl), "pointwise_mlp") == {"pointwise_mlp": 0}
    mlp.drop1.p = 0.1  # active dropout: the separate layers
    assert _ops_run(lambda: mlp(x_cl), "pointwise_mlp") == {"pointwise_mlp": 0}


@pytest.mark.parametrize("training, grad", MODES)
def test_row_conv_takes_the_op_in_training_mode_only(training, grad):
    module = RowDepthwiseConv(8, 7).train(training)
    x = torch.randn(2, 8, 5, 9)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.set_grad_enabled(grad):
            return module(x_cl)

    assert _ops_run(run, "depthwise_row_conv") == {"depthwise_row_conv": int(training and NATIVE is not None)}
    assert _ops_run(lambda: module(x), "depthwise_row_conv") == {"depthwise_row_conv": 0}
    with torch.no_grad():
        torch.testing.assert_close(run(), module(x))
    assert set(module.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("training", [True, False])
def test_pointwise_conv_matches_conv2d_in_both_modes(training):
    conv = PointwiseConv(6, 5).train(training)
    x_cl = torch.randn(2, 6, 4, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x_cl, conv.weight.double(), conv.bias.double())
    torch.testing.assert_close(conv.double()(x_cl), expected)
    assert set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_mlp_in_batch_slices_is_exact(memory_format):
    """A hidden map above max_hidden_bytes runs in batch slices: same output and gradients as in one piece."""
    torch.manual_seed(0)
    whole = PointwiseMlp(6, 24).double().to(memory_format=memory_format)
    sliced = PointwiseMlp(6, 24).double().to(memory_format=memory_format)
    sliced.load_state_dict(whole.state_dict())
    sliced.max_hidden_bytes = 24 * 5 * 7 * 8 * 2  # two samples' hidden maps: 5 slices of a batch of 9
    x = torch.randn(9, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = []
    run_slice = sliced._mlp
    sliced._mlp = lambda part: calls.append(part.shape[0]) or run_slice(part)
    expected, got = whole(x1), sliced(x2)
    assert calls == [2, 2, 2, 2, 1]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x1, *whole.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x2, *sliced.parameters()], grad)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
