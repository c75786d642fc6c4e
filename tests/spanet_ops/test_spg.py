"""The fused split-SPG aggregation against the published composition (chunk, SPF, 1x1 convs, sum)."""
import pytest
import torch

import spanet_ops
from spanet_ops import reference

LAMS = (0.7, 0.8, 0.9)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5)}


def _published_parts(weight, bias, channels):
    sizes = spanet_ops.chunk_sizes(channels)
    weights = [w[:, :, None, None] for w in torch.split(weight, sizes, dim=1)]
    # The published biases are three vectors; any split summing to `bias` is the same model.
    biases = [bias * 0.5, bias * 0.25, bias * 0.25]
    return weights, biases


@pytest.mark.parametrize("channels,out_channels,size,radius", [(64, 64, 14, 2.0), (20, 12, 9, 2.0), (9, 5, 7, 1.0), (6, 4, 5, 1.0)])
@pytest.mark.parametrize("algorithm", ["auto", "lowrank", "fft", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_published_composition(channels, out_channels, size, radius, algorithm, dtype):
    x = torch.randn(2, channels, size, size + 1, dtype=dtype)
    weight = torch.randn(out_channels, channels, dtype=dtype) / channels**0.5
    bias = torch.randn(out_channels, dtype=dtype)
    weights, biases = _published_parts(weight, bias, channels)
    expected = reference.spg_aggregate(x.double(), [w.double() for w in weights], [b.double() for b in biases], LAMS, radius)
    out = spanet_ops.spg_aggregate(x, weight, bias, LAMS, radius, algorithm=algorithm)
    assert out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def test_conv_weight_layout_and_no_bias():
    x = torch.randn(1, 9, 8, 8, dtype=torch.float64)
    weight = torch.randn(4, 9, 1, 1, dtype=torch.float64)
    expected = reference.spg_aggregate(x, list(torch.split(weight, [3, 3, 3], dim=1)), [None] * 3, LAMS, 2.0)
    torch.testing.assert_close(spanet_ops.spg_aggregate(x, weight, None), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels,sizes", [(64, [22, 22, 20]), (320, [107, 107, 106]), (96, [32, 32, 32]), (7, [3, 3, 1])])
def test_chunk_sizes_follow_torch_chunk(channels, sizes):
    assert spanet_ops.chunk_sizes(channels) == sizes
    assert [c.shape[1] for c in torch.chunk(torch.empty(1, channels), 3, dim=1)] == sizes


def test_bf16_keeps_dtype_within_tolerance():
    x = torch.randn(2, 12, 10, 10)
    weight = torch.randn(6, 12) / 12**0.5
    expected = spanet_ops.spg_aggregate(x.double(), weight.double(), None)
    out = spanet_ops.spg_aggregate(x.bfloat16(), weight, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=5e-2, rtol=2e-2)
