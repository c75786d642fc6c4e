"""spanet.analysis.spectra: known answers for spectrum maps and Park & Kim's relative log amplitude.

Tolerances: float64 inputs, compared at 1e-9 with literal computations (only rounding differs); filters
at 1e-4: float32 FFT rounding (SPANet's SPF runs in float32), and the 1e-6 that the published formula adds
to every amplitude, which moves the log of a bin damped to ``a |X|`` by about ``1e-6 / (a |X|)``.
"""
import cmath
import math

import pytest
import torch
import torch.nn.functional as F

import spanet_ops
from spanet.analysis import (
    LOG_EPS,
    SpectrumAccumulator,
    diagonal_profile,
    normalized_frequencies,
    relative_log_amplitude,
    spectrum_map,
)


def literal_dft(plane):
    """The 2-D DFT of a list-of-lists map by its definition, F[u][v] = sum f[y][x] exp(-2 pi i (u y / H + v x / W))."""
    height, width = len(plane), len(plane[0])
    return [
        [
            sum(
                plane[y][x] * cmath.exp(-2j * math.pi * (u * y / height + v * x / width))
                for y in range(height) for x in range(width)
            )
            for v in range(width)
        ]
        for u in range(height)
    ]


@pytest.mark.parametrize("height,width", [(6, 6), (5, 7), (6, 8), (7, 4)])
def test_relative_log_amplitude_equals_a_literal_hand_computation(height, width):
    torch.manual_seed(0)
    features = torch.randn(2, 3, height, width, dtype=torch.float64)
    maps = [features[b, c].tolist() for b in range(2) for c in range(3)]
    spectra = [literal_dft(plane) for plane in maps]
    # Mean over the six maps of log(|F| + 1e-6), at every bin of the natural layout.
    mean_log = [[sum(math.log(abs(s[u][v]) + 1e-6) for s in spectra) / len(spectra) for v in range(width)]
                for u in range(height)]
    # fftshift puts natural bin (u, v) at ((u + H//2) % H, (v + W//2) % W).
    shifted = [[0.0] * width for _ in range(height)]
    for u in range(height):
        for v in range(width):
            shifted[(u + height // 2) % height][(v + width // 2) % width] = mean_log[u][v]
    steps = min(height - height // 2, width - width // 2)
    diagonal = [shifted[height // 2 + i][width // 2 + i] for i in range(steps)]
    expected = [value - diagonal[0] for value in diagonal]

    assert torch.allclose(spectrum_map(features), torch.tensor(shifted, dtype=torch.float64), atol=1e-9, rtol=0)
    curve, delta = relative_log_amplitude(features)
    assert curve.tolist() == pytest.approx(expected, abs=1e-9)
    assert delta == pytest.approx(expected[-1], abs=1e-9)


def test_square_maps_read_the_published_half_diagonal():
    """For square maps the curve is ``amp.diag()[H//2:] - amp.diag()[H//2]``, as the published code reads it."""
    features = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    amp = spectrum_map(features)
    half = amp.diag()[9 // 2:]
    assert torch.allclose(relative_log_amplitude(features).curve, half - half[0], atol=0, rtol=0)


@pytest.mark.parametrize("height,width,ky,kx", [(16, 16, 3, 5), (12, 16, 2, -5), (15, 9, -4, 1)])
def test_a_pure_sinusoid_peaks_at_its_bin(height, width, ky, kx):
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    wave = torch.cos(2 * math.pi * (ky * y / height + kx * x / width)).expand(2, 3, height, width)
    amp = spectrum_map(wave)
    peaks = {(height // 2 + ky, width // 2 + kx), (height // 2 - ky, width // 2 - kx)}
    top = divmod(int(amp.argmax()), width)
    assert top in peaks
    # |F| = H W / 2 at the two bins of the cosine, and numerically zero elsewhere.
    for row, col in peaks:
        assert amp[row, col].item() == pytest.approx(math.log(height * width / 2 + LOG_EPS), abs=1e-9)
    others = torch.ones_like(amp, dtype=torch.bool)
    for row, col in peaks:
        others[row, col] = False
    assert amp[others].max().item() < math.log(1e-6) + 1.0


def test_a_low_pass_filter_lowers_delta_at_pi_by_its_frequency_response():
    """A circular 3x3 box blur multiplies every bin by (1 + 2 cos w_y)(1 + 2 cos w_x) / 9: the log adds."""
    torch.manual_seed(1)
    size = 32
    noise = torch.randn(4, 8, size, size, dtype=torch.float64)
    box = torch.full((8, 1, 3, 3), 1 / 9, dtype=torch.float64)
    blurred = F.conv2d(F.pad(noise, (1, 1, 1, 1), mode="circular"), box, groups=8)
    plain_curve, plain_delta = relative_log_amplitude(noise)
    blurred_curve, blurred_delta = relative_log_amplitude(blurred)
    assert blurred_delta < plain_delta
    # Diagonal step i is the frequency 2 pi i / 32 on both axes.
    omega = 2 * math.pi * torch.arange(len(plain_curve), dtype=torch.float64) / size
    response = 2 * torch.log(((1 + 2 * torch.cos(omega)) / 3).abs())
    # Exact but for the 1e-6 added to amplitudes: a bin damped to a |X| moves by about 1e-6 / (a |X|),
    # up to ~5e-5 next to the response's zero at 2 pi / 3 (a ~ 1e-3 there).
    assert torch.allclose(blurred_curve - plain_curve, response, atol=1e-4, rtol=0)


@pytest.mark.parametrize("lam", [0.6, 0.8, 0.9])
@pytest.mark.parametrize("height,width", [(32, 32), (28, 35)])
def test_spanet_spf_lowers_delta_at_pi_by_the_amount_its_mask_implies(lam, height, width):
    """SPF multiplies bin (u, v) by its mask value M: Delta log amplitude moves by log M(diagonal) - log M(centre).

    At the far diagonal (outside the disc) M = 1 - lam and at the zero frequency M = lam, so for lam > 0.5
    Delta at pi drops by log((1 - lam) / lam); the amount is read from spanet_ops.circular_mask itself.
    """
    torch.manual_seed(2)
    noise = torch.randn(4, 6, height, width)
    filtered = spanet_ops.spectral_pooling_filter(noise, radius=2, lam=lam)
    mask = spanet_ops.circular_mask(height, width, 2, lam).double()
    steps = torch.arange(min(height - height // 2, width - width // 2))
    mask_diagonal = torch.log(mask[height // 2 + steps, width // 2 + steps])
    implied = mask_diagonal - mask_diagonal[0]

    plain_curve, plain_delta = relative_log_amplitude(noise)
    filtered_curve, filtered_delta = relative_log_amplitude(filtered)
    assert filtered_delta - plain_delta == pytest.approx(implied[-1].item(), abs=1e-4)
    assert implied[-1].item() == pytest.approx(math.log((1 - lam) / lam), abs=1e-6)  # float32 lam
    assert filtered_delta < plain_delta
    assert torch.allclose((filtered_curve - plain_curve).double(), implied, atol=1e-4, rtol=0)


def test_the_accumulated_spectrum_of_batches_equals_that_of_all_images():
    features = torch.randn(7, 5, 10, 12, dtype=torch.float64)
    acc = SpectrumAccumulator()
    for part in features.split(3):
        acc.add(part)
    assert acc.images == 7
    assert torch.allclose(acc.mean(), spectrum_map(features), atol=1e-12, rtol=0)
    assert diagonal_profile(acc.mean()).delta_at_pi == pytest.approx(relative_log_amplitude(features).delta_at_pi)
    with pytest.raises(ValueError, match="do not match"):
        acc.add(torch.randn(1, 5, 8, 8))


def test_low_precision_maps_are_analysed_in_float32():
    features = torch.randn(2, 3, 8, 8)
    assert torch.allclose(spectrum_map(features.bfloat16()), spectrum_map(features.bfloat16().float()))


def test_normalized_frequencies_run_from_zero_to_pi():
    assert normalized_frequencies(4).tolist() == pytest.approx([0, math.pi / 3, 2 * math.pi / 3, math.pi])
    assert normalized_frequencies(1).tolist() == [0.0]
    with pytest.raises(ValueError):
        normalized_frequencies(0)


def test_a_map_with_only_the_zero_frequency_on_its_diagonal_gives_a_single_zero():
    curve, delta = relative_log_amplitude(torch.randn(2, 3, 2, 2))
    assert curve.tolist() == [0.0] and delta == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        spectrum_map(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="real floating"):
        spectrum_map(torch.ones(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor"):
        spectrum_map([[1.0]])
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        diagonal_profile(torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="no maps"):
        SpectrumAccumulator().mean()
