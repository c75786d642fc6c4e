"""Fourier analysis of feature maps: spectrum maps (the paper's Fig. 1) and relative log amplitude (Fig. 2).

Both follow the published analysis code of Park & Kim, *How do vision
transformers work?* (ICLR 2022), which the SPANet paper uses for its Fig. 2:

* per map, the log amplitude ``log(|FFT2(f)| + 1e-6)``;
* shifted so that the zero frequency sits at ``(H // 2, W // 2)`` (``fftshift``);
* averaged over images and channels: the **spectrum map** ``(H, W)``;
* read along the diagonal through the centre, outward, from the zero
  frequency to the highest frequency on both axes, minus its first value: the
  **relative log amplitude**, plotted against a normalised frequency from 0 to pi.
  Its last value is the "Delta log amplitude" at pi that the paper plots against depth.

A log amplitude is a sum of per-map logs, so the spectrum of a large image set
can be built from batches: :func:`spectrum_map` of each batch, weighted by its
size (:class:`SpectrumAccumulator`), then :func:`diagonal_profile`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LOG_EPS",
    "RelativeLogAmplitude",
    "SpectrumAccumulator",
    "diagonal_profile",
    "normalized_frequencies",
    "relative_log_amplitude",
    "spectrum_map",
]

#: Added to the amplitude before the log, as in Park & Kim's code (keeps exact zeros finite).
LOG_EPS = 1e-6


def _check_maps(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor (B, C, H, W), got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    if features.is_complex() or not features.is_floating_point():
        raise TypeError(f"features must be a real floating tensor, got dtype {features.dtype}")
    if features.numel() == 0:
        raise ValueError(f"features are empty, shape {tuple(features.shape)}")
    # torch.fft has no half-precision CPU kernels; the log amplitude of fp16/bf16 maps is taken in fp32.
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def spectrum_map(features: Tensor) -> Tensor:
    """The centred log amplitude ``log(|FFT2(f)| + 1e-6)`` of ``features`` ``(B, C, H, W)``, averaged over B and C.

    Returns an ``(H, W)`` tensor (float32, or float64 for float64 input) with the
    zero frequency at ``(H // 2, W // 2)``: the paper's Fig. 1 for one layer.
    """
    maps = _check_maps(features)
    amplitude = torch.fft.fft2(maps).abs()
    log_amplitude = torch.log(amplitude + LOG_EPS).mean(dim=(0, 1))
    return torch.fft.fftshift(log_amplitude, dim=(-2, -1))


class RelativeLogAmplitude(NamedTuple):
    """The relative log amplitude curve ``(n,)`` (first value 0) and its last value, Delta log amplitude at pi."""

    curve: Tensor
    delta_at_pi: float


def diagonal_profile(spectrum: Tensor) -> RelativeLogAmplitude:
    """The relative log amplitude read from a spectrum map ``(H, W)`` (from :func:`spectrum_map`).

    ``amp[H//2 + i, W//2 + i]`` for ``i`` in ``range(min(H - H//2, W - W//2))``,
    minus its first value (the zero frequency). A 1x1 or 2x2 map has only the
    zero frequency on that diagonal: the curve is ``[0.]``.
    """
    if not isinstance(spectrum, Tensor) or spectrum.dim() != 2:
        shape = tuple(spectrum.shape) if isinstance(spectrum, Tensor) else type(spectrum).__name__
        raise ValueError(f"spectrum must be an (H, W) tensor, got {shape}")
    height, width = spectrum.shape
    steps = torch.arange(min(height - height // 2, width - width // 2), device=spectrum.device)
    diagonal = spectrum[height // 2 + steps, width // 2 + steps]
    curve = diagonal - diagonal[0]
    return RelativeLogAmplitude(curve, float(curve[-1]))


def relative_log_amplitude(features: Tensor) -> RelativeLogAmplitude:
    """Park & Kim's relative log amplitude of ``features`` ``(B, C, H, W)``: the curve ``(n,)`` and Delta at pi.

    ``diagonal_profile(spectrum_map(features))``; plot ``curve`` against
    :func:`normalized_frequencies` ``(n)``.
    """
    return diagonal_profile(spectrum_map(features))


def normalized_frequencies(n: int) -> Tensor:
    """The normalised frequencies, 0 to pi in ``n`` even steps, at which a relative log amplitude curve is plotted.

    As in the published plots: the diagonal's last bin is labelled pi. ``n = 1`` gives ``[0.]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.linspace(0.0, math.pi, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)


class SpectrumAccumulator:
    """The spectrum map of many images, built batch by batch (each batch's :func:`spectrum_map` weighted by its size).

    ``acc.add(features)`` per batch of maps ``(B, C, H, W)`` of one layer; ``acc.mean()`` is
    :func:`spectrum_map` of all of them, ``acc.images`` their count.
    """

    def __init__(self):
        self._sum = None
        self.images = 0

    def add(self, features: Tensor) -> None:
        """Add a batch of maps ``(B, C, H, W)``; every batch must have the same ``C, H, W``."""
        spectrum = spectrum_map(features).double() * features.shape[0]
        if self._sum is not None and self._sum.shape != spectrum.shape:
            raise ValueError(
                f"maps of size {tuple(features.shape[-2:])} do not match the earlier {tuple(self._sum.shape)}"
            )
        self._sum = spectrum if self._sum is None else self._sum + spectrum
        self.images += features.shape[0]

    def mean(self) -> Tensor:
        """The spectrum map ``(H, W)`` (float64) of every map added."""
        if self._sum is None:
            raise ValueError("no maps were added")
        return self._sum / self.images
