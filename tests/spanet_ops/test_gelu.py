"""spanet_ops.gelu: the exact GELU with a saved-slope backward, its kernels and its ops.

The value is compared with ``torch.nn.functional.gelu`` and the slope with
``aten.gelu_backward`` (the derivative PyTorch's own autograd uses), both in
float64 on the same (rounded) input. The native CPU kernel (csrc/cpu/gelu_cpu.cpp)
and the PyTorch default (:func:`spanet_ops.algorithms.gelu_with_slope`) are
each checked.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import spanet_ops
from spanet.models.spanet import GELU
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradient_matches_functional_gelu(dtype):
    x = _input((2, 5, 7, 9), dtype).requires_grad_()
    grad = torch.randn(x.shape, dtype=dtype)
    (got,) = torch.autograd.grad(spanet_ops.gelu(x), x, grad)
    (expected,) = torch.autograd.grad(F.gelu(x), x, grad)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


def test_gradcheck_and_double_backward_refused():
    x = _input((3, 4, 5), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(spanet_ops.gelu, (x,))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.gradgradcheck(spanet_ops.gelu, (x,))


def test_slope_output_is_not_differentiable():
    x = torch.randn(4, 5, requires_grad=True)
    value, slope = torch.ops.spanet.gelu(x)
    assert value.requires_grad and not slope.requires_grad


def test_opcheck():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    opcheck(torch.ops.spanet.gelu.default, (x,))
    opcheck(torch.ops.spanet.gelu.default, (x.detach().contiguous(memory_format=torch.channels_last),))
    opcheck(torch.ops.spanet.gelu_slope_kernel.default, (x.detach(),))
    grad, slope = torch.randn(2, 3, 5, 7), torch.rand(2, 3, 5, 7)
    opcheck(torch.ops.spanet.gelu_grad.default, (grad, slope), test_utils=("test_schema", "test_faketensor"))


def test_compile_matches_eager():
    x = torch.randn(3, 17, requires_grad=True)
    compiled = torch.compile(spanet_ops.gelu, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), spanet_ops.gelu(x))
    (got,) = torch.autograd.grad(compiled(x).sum(), x)
    (expected,) = torch.autograd.grad(F.gelu(x).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_rejects_non_floating_input():
    with pytest.raises(TypeError, match="real floating"):
        spanet_ops.gelu(torch.arange(6))


# --------------------------------------------------------------------------- the models' GELU module


def test_module_takes_the_saved_slope_path_only_while_recording():
    module = GELU()
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    y = module(x)
    expected_op = "spanet_gelu" if NATIVE is not None else "GeluBackward"
    assert expected_op in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.gelu(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(module(x), F.gelu(x))
    assert "GeluBackward" in type(GELU(approximate="tanh")(x).grad_fn).__name__


def test_module_is_scriptable():
    scripted = torch.jit.script(GELU())
    x = torch.randn(3, 5)
    torch.testing.assert_close(scripted(x), F.gelu(x))
