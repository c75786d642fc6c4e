"""gradcheck and gradgradcheck in float64, in x and in the mask, for every algorithm."""
import dataclasses

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import spanet_ops

from .samples import SMALL_SAMPLES, make


def _shrunk(sample):
    """gradcheck's cost grows with the input: keep one batch (two where the mask varies by batch), two channels."""
    if len(sample.x_shape) == 2:
        return sample
    batch = 2 if sample.mask_kind == "broadcast_batch" else 1
    return dataclasses.replace(sample, x_shape=(batch, min(sample.x_shape[-3], 2), *sample.x_shape[-2:]))


GRAD_SAMPLES = [_shrunk(s) for s in SMALL_SAMPLES if s.x_shape[-1] * s.x_shape[-2] <= 100]


@pytest.mark.parametrize("algorithm", ["fft", "lowrank", "reference"])
@pytest.mark.parametrize("sample", GRAD_SAMPLES, ids=str)
def test_gradcheck_x_and_mask(sample, algorithm):
    x, mask = make(sample, torch.float64, requires_grad=True)

    def fn(x, mask):
        return spanet_ops.spectral_mask_filter(x, mask, centered=sample.centered, algorithm=algorithm)

    assert gradcheck(fn, (x, mask), fast_mode=True)
    assert gradgradcheck(fn, (x, mask), fast_mode=True)


@pytest.mark.parametrize("algorithm", ["fft", "lowrank"])
@pytest.mark.parametrize("grad_mix", ["x_only", "mask_only"])
def test_gradient_mixes(algorithm, grad_mix):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=grad_mix == "x_only")
    mask = torch.rand(3, 5, 6, dtype=torch.float64, requires_grad=grad_mix == "mask_only")
    assert gradcheck(lambda x, m: spanet_ops.spectral_mask_filter(x, m, algorithm=algorithm), (x, mask))


def test_x_gradient_is_the_filter_of_the_output_gradient():
    """Self-adjointness (docs/spec.md §1 fact 4): grad_x = filter(grad_y), in closed form, no activations saved."""
    x = torch.randn(2, 4, 14, 14, dtype=torch.float64, requires_grad=True)
    mask = spanet_ops.circular_mask(14, 14, 1, 0.8)
    grad_y = torch.randn_like(x)
    spanet_ops.spectral_mask_filter(x, mask).backward(grad_y)
    torch.testing.assert_close(x.grad, spanet_ops.reference.spectral_mask_filter(grad_y, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("algorithm", ["fft", "lowrank", "reference"])
def test_spf_gradcheck_x_and_lam(algorithm):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.6, 0.7, 0.9], dtype=torch.float64, requires_grad=True)

    def fn(x, lam):
        return spanet_ops.spectral_pooling_filter(x, 2, lam, algorithm=algorithm)

    # lam is float32 inside (as published), so its numerical derivative needs a float32-sized step.
    assert gradcheck(fn, (x, lam), eps=1e-3, atol=1e-4, rtol=1e-3)
    assert gradgradcheck(lambda x: fn(x, lam.detach()), (x,), fast_mode=True)


@pytest.mark.parametrize("algorithm", ["lowrank", "fft", "reference"])
def test_spg_aggregate_gradcheck(algorithm):
    x = torch.randn(2, 7, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return spanet_ops.spg_aggregate(x, w, b, (0.7, 0.8, 0.9), 2.0, algorithm=algorithm)

    assert gradcheck(fn, (x, weight, bias), fast_mode=True)
    assert gradgradcheck(fn, (x, weight, bias), fast_mode=True)
