"""spectral_mask_filter and spectral_pooling_filter against the paper-literal reference."""
import pytest
import torch

import spanet_ops
from spanet_ops import reference as ref
from spanet_ops.plans import clear_plan_caches

from .samples import SAMPLES, TOLERANCES, make, reference

ALGORITHMS = ["auto", "fft", "lowrank", "reference"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sample", SAMPLES, ids=str)
def test_forward_matches_reference(sample, dtype, algorithm):
    x, mask = make(sample, dtype)
    y = spanet_ops.spectral_mask_filter(x, mask, centered=sample.centered, algorithm=algorithm)
    assert y.dtype == dtype and y.shape == x.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), reference(x, mask, sample.centered), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["fft", "lowrank"])
@pytest.mark.parametrize("size", [(56, 56), (7, 7), (9, 14)])
def test_half_precision_keeps_dtype_and_error_bound(size, algorithm, dtype):
    """Half inputs work at any size (torch.fft refuses them); the error is the output rounding only."""
    x = torch.randn(2, 3, *size).to(dtype)
    mask = spanet_ops.circular_mask(*size, 2, 0.8)
    y = spanet_ops.spectral_mask_filter(x, mask, algorithm=algorithm)
    assert y.dtype == dtype
    expected = reference(x, mask, True)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=rtol)
    # Relative to plain PyTorch at this precision: the fp32 result rounded to `dtype`.
    rounding = (expected.to(dtype).double() - expected).abs().max()
    assert (y.double() - expected).abs().max() <= 1.01 * rounding + 1e-6


@pytest.mark.parametrize("stage_size,radius,bins", [(56, 2, 13), (28, 2, 13), (14, 1, 5), (7, 1, 5)])
def test_spf_per_channel_lam_at_stage_sizes(stage_size, radius, bins):
    x = torch.randn(2, 3, stage_size, stage_size, dtype=torch.float64)
    lams = [0.7, 0.8, 0.9]
    expected = ref.spectral_pooling_filter(x, radius, lams)
    for algorithm in ALGORITHMS:
        y = spanet_ops.spectral_pooling_filter(x, radius, torch.tensor(lams), algorithm=algorithm)
        torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    mask = spanet_ops.circular_mask(stage_size, stage_size, radius, 0.7)
    assert int((mask != mask[0, 0]).sum()) == bins


def test_spf_scalar_lam_equals_mask_filter():
    x = torch.randn(3, 5, 12, 10, dtype=torch.float64)
    expected = ref.spectral_mask_filter(x, ref.circular_mask(12, 10, 2, 0.85))
    for algorithm in ALGORITHMS:
        y = spanet_ops.spectral_pooling_filter(x, 2, 0.85, algorithm=algorithm)
        torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)


def test_mask_dtype_may_differ_from_x():
    x = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    mask32 = spanet_ops.circular_mask(14, 14, 1, 0.9)
    y = spanet_ops.spectral_mask_filter(x, mask32)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref.spectral_mask_filter(x, mask32), atol=1e-10, rtol=1e-10)
    xb = x.to(torch.bfloat16)
    yb = spanet_ops.spectral_mask_filter(xb, mask32.double())
    assert yb.dtype == torch.bfloat16


def test_auto_picks_lowrank_for_circular_and_fft_for_random():
    from spanet_ops.plans import mask_plan

    circular = spanet_ops.circular_mask(56, 56, 2, 0.7)
    assert mask_plan(circular, True, torch.float32).algorithm == "lowrank"
    assert mask_plan(torch.rand(56, 56), True, torch.float32).algorithm == "fft"


def test_plan_cache_follows_the_mask_tensor():
    """Plans are keyed by the mask tensor and its version, never by reading its values on a hit.

    An in-place change bumps the version and is seen; a mask that requires grad is planned on
    every call (gradcheck perturbs it through ``.data``); a write through ``.data`` to any other
    mask is invisible until ``clear_plan_caches()``.
    """
    x = torch.randn(2, 9, 9, dtype=torch.float64)
    mask = spanet_ops.circular_mask(9, 9, 2, 0.7, dtype=torch.float64)

    def check(m):
        y = spanet_ops.spectral_mask_filter(x, m, algorithm="lowrank")
        torch.testing.assert_close(y, ref.spectral_mask_filter(x, m.detach()), atol=1e-10, rtol=1e-10)

    check(mask)
    mask[0, 0] += 0.25
    check(mask)
    learned = mask.clone().requires_grad_()
    check(learned)
    learned.data[0, 1] += 0.5
    check(learned)
    mask.data[1, 1] += 0.5
    clear_plan_caches()
    check(mask)
    clear_plan_caches()


def test_constant_mask_returns_new_tensor():
    x = torch.randn(2, 6, 6)
    y = spanet_ops.spectral_mask_filter(x, torch.ones(6, 6), algorithm="lowrank")
    torch.testing.assert_close(y, x)
    assert y.data_ptr() != x.data_ptr()
