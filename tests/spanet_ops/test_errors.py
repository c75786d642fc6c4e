"""Every bad input raises the documented error, naming the problem."""
import pytest
import torch

import spanet_ops


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.ones(2, 4, 4, dtype=torch.int64), TypeError, "real floating"),
        (torch.ones(2, 4, 4, dtype=torch.complex64), TypeError, "real floating"),
        (torch.ones(4), ValueError, "at least 2 dims"),
    ],
)
def test_bad_x(x, exc, match):
    mask = torch.ones(4, 4) if x.dim() >= 2 else torch.ones(4)
    with pytest.raises(exc, match=match):
        spanet_ops.spectral_mask_filter(x, mask)


@pytest.mark.parametrize(
    "mask,exc,match",
    [
        (torch.ones(5, 4), ValueError, "spatial size"),
        (torch.ones(3, 4, 4), ValueError, "not broadcastable"),
        (torch.ones(7, 2, 4, 4), ValueError, "not broadcastable"),
        (torch.ones(4, 4, dtype=torch.complex64), TypeError, "mask must be a real floating"),
        (torch.ones(4, dtype=torch.float32), ValueError, "at least 2 dims"),
    ],
)
def test_bad_mask(mask, exc, match):
    with pytest.raises(exc, match=match):
        spanet_ops.spectral_mask_filter(torch.ones(2, 2, 4, 4), mask)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        spanet_ops.spectral_mask_filter(torch.ones(4, 4), torch.ones(4, 4), algorithm="fast")
    with pytest.raises(ValueError, match="unknown algorithm"):
        spanet_ops.spectral_pooling_filter(torch.ones(4, 4), 2, 0.7, algorithm="cufft")


@pytest.mark.parametrize("radius", [-1, -0.5, float("nan"), float("inf")])
def test_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        spanet_ops.circular_mask(8, 8, radius, 0.7)
    with pytest.raises(ValueError, match="radius"):
        spanet_ops.spectral_pooling_filter(torch.ones(8, 8), radius, 0.7)


@pytest.mark.parametrize("lam", [-0.1, 1.5, [0.5, 1.2], torch.tensor([0.5, -0.2])])
def test_lam_outside_unit_interval(lam):
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        spanet_ops.circular_mask(8, 8, 2, lam)
    channels = 2 if not isinstance(lam, float) else 1
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        spanet_ops.spectral_pooling_filter(torch.ones(1, channels, 8, 8), 2, lam)


def test_balances_that_do_not_chunk_the_channels():
    # torch.chunk splits 4 channels into 2 chunks of 2, not 3: one balance per chunk cannot be given.
    with pytest.raises(ValueError, match="4 channels split by torch.chunk into 2 chunks, not 3"):
        spanet_ops.spectral_pooling_filter(torch.ones(1, 4, 8, 8), 2, [0.7, 0.8, 0.9])
    with pytest.raises(ValueError, match="need a channel dim"):
        spanet_ops.spectral_pooling_filter(torch.ones(8, 8), 2, [0.7, 0.8])


def test_spg_aggregate_bad_inputs():
    x = torch.randn(1, 6, 8, 8)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, C\)"):
        spanet_ops.spg_aggregate(x, torch.randn(4, 5), None)
    with pytest.raises(ValueError, match="bias"):
        spanet_ops.spg_aggregate(x, torch.randn(4, 6), torch.randn(3))
    with pytest.raises(ValueError, match="x must be"):
        spanet_ops.spg_aggregate(torch.randn(6, 8, 8), torch.randn(4, 6), None)
    with pytest.raises(ValueError, match="chunks"):
        spanet_ops.spg_aggregate(torch.randn(1, 4, 8, 8), torch.randn(4, 4), None)  # torch.chunk: 2, 2


def test_mask_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        spanet_ops.circular_mask(0, 8, 2, 0.7)
