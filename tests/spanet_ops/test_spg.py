"""The fused split-SPG aggregation against the published composition (chunk, SPF, 1x1 convs, sum).

Forward and all three gradients (x, weight, bias) are compared with autograd
through the paper-literal ``torch.fft`` reference in float64, for every
algorithm, in NCHW, channels_last and strided layouts, at odd, non-square and
tiny sizes; plus gradcheck/gradgradcheck in float64 and the plan's real basis.
"""
import math

import pytest
import torch

import spanet_ops
from spanet_ops import reference
from spanet_ops.masks import circular_regions
from spanet_ops.plans import disc_geometry

LAMS = (0.7, 0.8, 0.9)
# (dtype, atol, rtol) against the float64 reference of the same (rounded) values.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (5e-2, 2e-2),
}
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# (channels, out_channels, height, width, radius): the model's stage-3 radius at 14x14, odd and
# non-square sizes, maps smaller than the r = 2 disc (3x3, 2x5) and a single pixel.
PROBLEMS = [(64, 64, 14, 15, 2.0), (20, 12, 9, 10, 2.0), (9, 5, 7, 8, 1.0), (6, 4, 5, 6, 1.0), (6, 4, 3, 3, 2.0),
            (7, 3, 2, 5, 2.0), (3, 2, 1, 1, 1.0)]


def _published_parts(weight, bias, channels):
    sizes = spanet_ops.chunk_sizes(channels)
    weights = list(torch.split(weight, sizes, dim=1))
    # The published biases are three vectors; any split summing to `bias` is the same model.
    biases = None if bias is None else [bias * 0.5, bias * 0.25, bias * 0.25]
    return weights, biases or [None] * 3


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # the same values in a strided (row stride 2W) view
        return torch.cat([x, x], dim=-1)[..., : x.shape[-1]]
    return x


def _problem(channels, out_channels, height, width, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, height, width, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(out_channels, channels, generator=gen, dtype=torch.float64) / channels**0.5).to(dtype)
    bias = torch.randn(out_channels, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(2, out_channels, height, width, generator=gen, dtype=torch.float64).to(dtype)
    return _layout(x, layout), weight, bias, grad


def _expected(x, weight, bias, grad, radius):
    """Output and gradients of the published composition, by autograd through torch.fft, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    weights, biases = _published_parts(leaves[1], leaves[2], x.shape[1])
    out = reference.spg_aggregate(leaves[0], weights, biases, LAMS, radius)
    out.backward(grad.double())
    return out.detach(), [leaf.grad for leaf in leaves]


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("channels,out_channels,height,width,radius", PROBLEMS)
@pytest.mark.parametrize("algorithm", ["auto", "lowrank", "fft", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_gradients_match_published_composition(channels, out_channels, height, width, radius,
                                                           algorithm, layout, dtype):
    x, weight, bias, grad = _problem(channels, out_channels, height, width, dtype, layout)
    expected, expected_grads = _expected(x, weight, bias, grad, radius)
    leaves = [_layout(x.detach().clone(), layout).requires_grad_()]
    leaves += [t.detach().clone().requires_grad_() for t in (weight, bias)]
    out = spanet_ops.spg_aggregate(*leaves, LAMS, radius, algorithm=algorithm)
    assert out.dtype == dtype
    _assert_close(out, expected, dtype)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), expected_grads):
        assert got.dtype == dtype
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_within_bound_of_float32(dtype, layout):
    """Half storage, float32 arithmetic: the error is the rounding of the inputs and of the output."""
    x, weight, bias, grad = _problem(12, 6, 10, 11, dtype, layout, seed=3)
    expected, expected_grads = _expected(x, weight, bias, grad, 2.0)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = spanet_ops.spg_aggregate(*leaves, LAMS, 2.0)
    assert out.dtype == dtype
    _assert_close(out, expected, dtype)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), expected_grads):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_keeps_the_input_layout(layout):
    x, weight, bias, _ = _problem(6, 4, 8, 9, torch.float32, layout)
    out = spanet_ops.spg_aggregate(x, weight, bias, LAMS, 2.0, algorithm="lowrank")
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    # And the values do not depend on the layout.
    nchw = spanet_ops.spg_aggregate(x.contiguous(), weight, bias, LAMS, 2.0, algorithm="lowrank")
    torch.testing.assert_close(out, nchw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("algorithm", ["lowrank", "fft"])
def test_gradcheck_and_gradgradcheck(layout, algorithm):
    x, weight, bias, _ = _problem(6, 4, 7, 8, torch.float64, layout, seed=6)
    leaves = [x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]

    def fn(x, weight, bias):
        return spanet_ops.spg_aggregate(x, weight, bias, LAMS, 2.0, algorithm=algorithm)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_conv_weight_layout_and_no_bias():
    x = torch.randn(1, 9, 8, 8, dtype=torch.float64)
    weight = torch.randn(4, 9, 1, 1, dtype=torch.float64)
    expected = reference.spg_aggregate(x, list(torch.split(weight, [3, 3, 3], dim=1)), [None] * 3, LAMS, 2.0)
    torch.testing.assert_close(spanet_ops.spg_aggregate(x, weight, None), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels,sizes", [(64, [22, 22, 20]), (320, [107, 107, 106]), (96, [32, 32, 32]), (7, [3, 3, 1])])
def test_chunk_sizes_follow_torch_chunk(channels, sizes):
    assert spanet_ops.chunk_sizes(channels) == sizes
    assert [c.shape[1] for c in torch.chunk(torch.empty(1, channels), 3, dim=1)] == sizes


@pytest.mark.parametrize("height,width,radius,size", [(56, 56, 2.0, 13), (14, 14, 1.0, 5), (7, 7, 1.0, 5),
                                                      (3, 3, 2.0, 9), (2, 5, 2.0, 8), (1, 1, 2.0, 1),
                                                      (8, 8, 0.0, 1)])
def test_real_basis_spans_exactly_the_disc(height, width, radius, size):
    """The plan's real basis is orthonormal, starts with the constant image and projects onto the disc's bins."""
    basis = disc_geometry(height, width, radius, torch.float64, "cpu").real_basis
    assert basis.shape == (size, height * width)
    torch.testing.assert_close(basis @ basis.T, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(basis[0], torch.full((height * width,), 1 / math.sqrt(height * width),
                                                    dtype=torch.float64))
    # Projection onto span(basis) == keeping exactly the disc's bins of the DFT.
    x = torch.randn(3, height, width, dtype=torch.float64)
    projected = ((x.reshape(3, -1) @ basis.T) @ basis).reshape(x.shape)
    inside, boundary = circular_regions(height, width, radius, centered=False)
    disc = (inside | boundary).to(torch.float64)
    expected = torch.fft.ifft2(torch.fft.fft2(x) * disc).real
    torch.testing.assert_close(projected, expected, atol=1e-12, rtol=0)
