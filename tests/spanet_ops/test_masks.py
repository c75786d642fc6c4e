"""The published circular mask: boundary rule, layouts, any size."""
import pytest
import torch

import spanet_ops
from spanet_ops import reference
from spanet_ops.masks import BOUNDARY_VALUE, signed_frequencies, to_natural

SIZES = [(56, 56), (28, 28), (14, 14), (7, 7), (9, 12), (13, 8), (1, 1), (2, 2), (3, 5), (4, 4)]


@pytest.mark.parametrize("radius", [0, 1, 2, 2.5, 3])
@pytest.mark.parametrize("size", SIZES)
def test_matches_the_bin_by_bin_reference(size, radius):
    for lam in (0.7, 0.8, 0.9):
        torch.testing.assert_close(
            spanet_ops.circular_mask(*size, radius, lam), reference.circular_mask(*size, radius, lam), atol=0, rtol=0
        )


def test_published_values_are_float32():
    lam = torch.arange(0.7, 0.9, 0.1)  # the published balances, float32
    assert lam.dtype == torch.float32 and lam.numel() == 3
    mask = spanet_ops.circular_mask(56, 56, 2, lam)
    for c in range(3):
        assert mask[c, 28, 28] == lam[c]  # zero frequency: inside the disc
        assert mask[c, 28, 30] == torch.tensor(BOUNDARY_VALUE)  # d == 2 exactly
        assert mask[c, 0, 0] == (1 - lam[c])  # float32 subtraction
    assert BOUNDARY_VALUE == torch.tensor(1 / 3, dtype=torch.float32).item()


@pytest.mark.parametrize("radius,inside,boundary", [(2, 9, 4), (1, 1, 4)])
def test_bin_counts_at_stage_sizes(radius, inside, boundary):
    mask = spanet_ops.circular_mask(56, 56, radius, 0.7)
    assert int((mask == torch.tensor(0.7)).sum()) == inside
    assert int((mask == torch.tensor(BOUNDARY_VALUE)).sum()) == boundary


@pytest.mark.parametrize("size", SIZES)
def test_natural_layout_is_ifftshift_of_centred(size):
    centred = spanet_ops.circular_mask(*size, 2, 0.8)
    natural = spanet_ops.circular_mask(*size, 2, 0.8, centered=False)
    assert torch.equal(natural, to_natural(centred))
    assert natural[0, 0] == torch.tensor(0.8)  # zero frequency at the origin


def test_small_maps_count_each_existing_bin_once():
    """A 3x5 map holds the disc's bins that exist, each once: row offsets -1..1, columns -2..2."""
    mask = spanet_ops.circular_mask(3, 5, 2, 0.7)
    inside = mask == torch.tensor(0.7)
    assert int(inside.sum()) == 9  # |u| <= 1, |v| <= 1
    assert int((mask == torch.tensor(BOUNDARY_VALUE)).sum()) == 2  # (0, +-2)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_signed_frequencies(n):
    expected = torch.fft.fftfreq(n) * n
    assert torch.equal(signed_frequencies(n).double(), expected.double())


def test_per_channel_and_dtype_device():
    mask = spanet_ops.circular_mask(7, 7, 1, [0.6, 0.9], dtype=torch.float64)
    assert mask.shape == (2, 7, 7) and mask.dtype == torch.float64
    assert mask[0, 3, 3] == torch.tensor(0.6, dtype=torch.float32).double()
    assert mask[1, 0, 0] == (1 - torch.tensor(0.9, dtype=torch.float32)).double()
