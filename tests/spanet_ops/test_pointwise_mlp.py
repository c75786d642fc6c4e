"""spanet::pointwise_mlp (fc1, exact GELU, fc2 with a saved-slope backward) and its GELU kernel.

The kernel's value is compared with ``torch.nn.functional.gelu`` and its slope
with ``aten.gelu_backward`` (the derivative PyTorch's own autograd uses), both in
float64 on the same (rounded) input; the native CPU kernel (csrc/cpu/gelu_cpu.cpp)
and the PyTorch default (:func:`spanet_ops.algorithms.gelu_with_slope`) are each
checked. The op is compared with the layers it fuses, forward and backward.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import spanet_ops
from spanet.models.spanet import ConvMlp
from spanet_ops import algorithms

NATIVE = importlib.import_module("spanet_ops.backends").native_module()

# (dtype, atol, rtol) against float64 on the same input. float32: the kernel's erf is
# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as in PyTorch's vectorised GELU; half
# types are computed in float32 and rounded once.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float16: (2e-3, 1e-3),
}
# Element counts around the 8-float vector and the parallel grain, in several layouts.
SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 8, 9, 11), (33000,), (70001,)]


def _kernels():
    kernels = {"pytorch": algorithms.gelu_with_slope}
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
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_value_and_slope_match_pytorch(kernel, dtype, shape):
    x = _input(shape, dtype)
    value, slope = _kernels()[kernel](x)
    expected_value, expected_slope = _expected(x)
    atol, rtol = TOLERANCES[dtype]
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
    atol, rtol = TOLERANCES[dtype]
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


# --------------------------------------------------------------------------- the models' MLP


def _graph_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _uses_fused_mlp(tensor):
    return any("pointwise_mlp" in name for name in _graph_names(tensor))


def test_conv_mlp_takes_the_op_only_while_training_on_channels_last():
    mlp = ConvMlp(6, 20)
    x = torch.randn(2, 6, 5, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert _uses_fused_mlp(mlp(x_cl)) == (NATIVE is not None)
    assert not _uses_fused_mlp(mlp(x))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x_cl), mlp(x), atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the layers, in bfloat16
        assert not _uses_fused_mlp(mlp(x_cl))
    mlp.drop1.p = 0.1  # active dropout: the separate layers
    assert not _uses_fused_mlp(mlp(x_cl))
