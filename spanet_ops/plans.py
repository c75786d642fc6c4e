"""Plans: everything about a filter that depends on the mask and the shape, not on the data.

A plan is computed once and kept in one LRU cache bounded by bytes
(:data:`PLAN_CACHE_BYTES`). Every backend consumes the same plan tensors, so
masks, frequency sets, factorisations and per-channel coefficients are
computed here alone; kernels receive them ready-made.

**Low-rank forms.** A real mask ``M`` (natural layout) equal to a constant ``c``
except on a small set ``S`` of bins gives ``y = c x + Re(IDFT(D X))`` with
``D = M - c`` zero outside ``S``. Two exact ways to apply the correction:

* *separable* (the CPU kernel): with ``K``/``L`` the row/column frequencies of
  ``S``, ``A = [cos; sin](2 pi k n / H)`` ``(2K, H)`` and ``B`` likewise ``(2L, W)``,
  the coefficient grid ``G = A x B^T = [[Pac, Pad], [Pbc, Pbd]]`` is scaled to
  ``Z = [[R, Q], [Q, -R]]`` with ``R = w (Pac - Pbd)``, ``Q = w (Pbc + Pad)``,
  ``w = D / (H W)``, and ``y = c x + A^T Z B``. Rows of ``A`` repeat up to sign
  (``cos(-k) = cos k``, ``sin(-k) = -sin k``, ``sin 0 = 0``): the plan factors
  ``A = S_A U_A`` symbolically (:class:`Factors`), so kernels run on the distinct
  rows ``U_A`` only, and knows which rows are even (cos) or odd (sin) under
  ``n -> N - n``.
* *basis* (GEMMs; the spg path everywhere and the filter on accelerators): the
  bins of ``S`` pair with their conjugates into ``J = |S|`` orthonormal real
  images ``e_j`` ``(J, H W)``, and ``y = c x + sum_j d_j <e_j, x> e_j`` with
  ``d_j`` the (Hermitian-symmetrised) deviation at ``e_j``'s bin.

**Choice.** :func:`filter_algorithm` and :func:`spg_algorithm` are the cost
models behind ``algorithm="auto"``; :func:`lowrank_form` maps a device to the
low-rank form its kernels implement.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .masks import (
    BOUNDARY_VALUE,
    DiscThresholds,
    disc_thresholds,
    max_squared_distance,
    squared_distance,
    to_natural,
)
from .validation import chunk_sizes

# --------------------------------------------------------------------------- the cache

#: Bytes of plan tensors kept cached (``SPANET_PLAN_CACHE_MB`` overrides); least recently used go first.
PLAN_CACHE_BYTES = int(float(os.environ.get("SPANET_PLAN_CACHE_MB", "256")) * 2**20)


def tensor_bytes(value, _top: bool = True) -> int:
    """Bytes held by the tensors of a plan (its attributes, lazily built ones included).

    A cached object inside another (a plan's geometry) is charged to its own entry only.
    """
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, False) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, False) for v in value.values())
    if hasattr(value, "__dict__"):
        if not _top and hasattr(value, "cache_key"):
            return 0
        return sum(tensor_bytes(v, False) for v in vars(value).values())
    return 0


class PlanCache:
    """A thread-safe LRU cache whose bound is the bytes of the tensors it holds."""

    def __init__(self, max_bytes: int = PLAN_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[Hashable, Tuple[object, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def lookup(self, key: Hashable):
        """The value stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def get(self, key: Hashable, build: Callable[[], object]):
        """Return the value for ``key``, building and storing it with ``build()`` on a miss."""
        value = self.lookup(key)
        if value is None:
            value = build()
            self.put(key, value)
        return value

    def put(self, key: Hashable, value) -> None:
        """Store ``value`` under ``key``, then drop least recently used entries beyond the byte bound."""
        self._store(key, value, tensor_bytes(value))

    def grow(self, key: Hashable, value) -> None:
        """Re-account ``value`` (stored under ``key``) after it built a lazy tensor."""
        with self._lock:
            if self._entries.get(key, (None,))[0] is not value:
                return
        self._store(key, value, tensor_bytes(value))

    def _store(self, key, value, nbytes: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    @property
    def nbytes(self) -> int:
        """Bytes of tensors now cached."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


_cache = PlanCache()


def plan_cache() -> PlanCache:
    """The one cache of every plan (for inspection and tests)."""
    return _cache


def clear_plan_caches() -> None:
    """Drop every cached plan (e.g. to free device memory)."""
    _cache.clear()


class _Lazy:
    """Per-plan lazily built tensors: each built once, then charged to the plan's cache entry."""

    def _lazy(self, name: str, build: Callable[[], object]):
        built = self.__dict__.get(name)
        if built is None:
            built = build()
            self.__dict__[name] = built
            _cache.grow(self.cache_key, self)
        return built


# --------------------------------------------------------------------------- cost models

#: Multiply-add equivalents per element per ``log2(H W)`` of an rfft2/irfft2 pair.
#: CPU: fitted by ``spanet-bench --levels sweep`` (sizes 14-224, C 32/128, radii 1-16 and a
#: general mask, one thread, native C++ lowrank kernel): every factor in 19.4-22.7 agrees with
#: the faster measured algorithm in 56 of 60 cases (98.8% cost-weighted); with the PyTorch
#: lowrank fallback (SPANET_DISABLE_NATIVE=1) the best fit is 11.7-14.1. CUDA: not yet measured
#: (benchmarks/RESULTS.md, "GPU kernels").
FFT_COST_FACTOR = {"cpu": 20.0, "cuda": 5.0}

#: Largest dense real basis ``(J, H W)`` a plan builds; beyond it the basis form is not offered.
BASIS_BYTES_LIMIT = 64 * 2**20


def lowrank_form(device_type: str) -> str:
    """The low-rank form the kernels of a device implement: ``"separable"`` (CPU) or ``"basis"``."""
    return "separable" if device_type == "cpu" else "basis"


def _fft_cost(height: int, width: int, device_type: str) -> float:
    return FFT_COST_FACTOR.get(device_type, FFT_COST_FACTOR["cuda"]) * math.log2(max(height * width, 2))


def basis_fits(height: int, width: int, n_images: int, dtype: torch.dtype) -> bool:
    """Whether the dense real basis ``(J, H W)`` stays within :data:`BASIS_BYTES_LIMIT`."""
    return n_images * height * width * dtype.itemsize <= BASIS_BYTES_LIMIT


def preferred_algorithm(height: int, width: int, n_rows: int, n_cols: int, device_type: str = "cpu",
                        n_images: Optional[int] = None, dtype: torch.dtype = torch.float32) -> str:
    """The filter's cost model behind ``algorithm="auto"``: ``"lowrank"`` or ``"fft"``.

    Separable low rank costs about ``4 (K + L)`` multiply-adds per element (analysis and
    synthesis along both axes), the basis form ``2 J``; an FFT pair a multiple of ``log2(H W)``.
    """
    if lowrank_form(device_type) == "separable":
        lowrank_cost = 4.0 * (n_rows + n_cols)
    else:
        images = n_images if n_images is not None else n_rows * n_cols
        if not basis_fits(height, width, images, dtype):
            return "fft"
        lowrank_cost = 2.0 * images
    return "lowrank" if lowrank_cost <= _fft_cost(height, width, device_type) else "fft"


def spg_algorithm(height: int, width: int, n_images: int, channels: int, out_channels: int, device_type: str,
                  dtype: torch.dtype) -> str:
    """spg's cost model: the basis correction against filtering every input channel by FFT.

    Both paths share the dense 1x1 GEMM. Per input element the correction costs a
    projection (``J`` multiply-adds) and a synthesis per output channel (``J O / C``);
    the fft path an FFT pair. The channel mix (``J C O`` per image) is left out: it is
    a GEMM no larger than the dense one while ``J <= H W``, and the fft path's 1x1
    conv costs as much again.
    """
    if not basis_fits(height, width, n_images, dtype):
        return "fft"
    lowrank_cost = n_images * (1.0 + out_channels / max(channels, 1))
    return "lowrank" if lowrank_cost <= _fft_cost(height, width, device_type) else "fft"


# --------------------------------------------------------------------------- separable factors


@dataclass(frozen=True, eq=False)
class Factors:
    """``A = S U`` for the ``(2K, N)`` cos/sin basis of natural-layout frequencies ``freqs``.

    ``unique`` ``(R, N)`` holds the distinct non-zero rows: the cosines of each distinct
    ``|k|`` (the first ``even`` rows, even under ``n -> N - n``), then the sines of those
    with ``k != 0`` and ``2 |k| != N`` (odd). Row ``p`` of ``A`` (cosines, then sines, in
    ``freqs`` order) is ``sign[p] * unique[index[p]]``, or zero where ``index[p] == -1``.
    """

    freqs: Tuple[int, ...]
    unique: Tensor  # (R, N) compute dtype
    index: Tensor  # (2K,) int64
    sign: Tensor  # (2K,) compute dtype
    even: int


def _trig_rows(freqs: Sequence[int], n: int, sine: bool) -> Tensor:
    # (k * m) mod n in integers keeps the angle exact before the float64 cos/sin.
    phase = (torch.tensor(list(freqs), dtype=torch.int64)[:, None] * torch.arange(n)[None, :]) % n
    angle = phase.to(torch.float64) * (2.0 * math.pi / n)
    return (torch.sin(angle) if sine else torch.cos(angle)).reshape(len(freqs), n)


def factors(freqs: Sequence[int], n: int, dtype: torch.dtype, device) -> Factors:
    """The symbolic factorisation :class:`Factors` of the ``n``-point basis of ``freqs`` (natural indices)."""
    signed = [k if k < (n + 1) // 2 else k - n for k in freqs]
    magnitudes = sorted({abs(s) for s in signed})
    sines = [a for a in magnitudes if a != 0 and 2 * a != n]
    unique = torch.cat([_trig_rows(magnitudes, n, False), _trig_rows(sines, n, True)])
    index = [magnitudes.index(abs(s)) for s in signed]
    sign = [1.0] * len(signed)
    for s in signed:
        if abs(s) in sines:
            index.append(len(magnitudes) + sines.index(abs(s)))
            sign.append(1.0 if s > 0 else -1.0)
        else:
            index.append(-1)
            sign.append(0.0)
    return Factors(
        tuple(int(k) for k in freqs),
        unique.to(device=device, dtype=dtype).contiguous(),
        torch.tensor(index, dtype=torch.int64, device=device),
        torch.tensor(sign, dtype=dtype, device=device),
        len(magnitudes),
    )


@dataclass(frozen=True, eq=False)
class Separable:
    """The separable low-rank terms: row and column :class:`Factors`, per-plane weights and constants."""

    rows: Factors
    cols: Factors
    weight: Tensor  # (P, K, L) = (M - c) / (H W) on the frequency grid
    constant: Tensor  # (P,)

    def kernel_args(self) -> tuple:
        """The arguments of ``spanet::lowrank_filter_kernel`` after ``x``."""
        r, c = self.rows, self.cols
        return (r.unique, r.index, r.sign, r.even, c.unique, c.index, c.sign, self.weight, self.constant)


# --------------------------------------------------------------------------- real basis images


def real_basis_images(height: int, width: int, bins: Sequence[Tuple[int, int]]) -> Tuple[Tensor, List[int]]:
    """Orthonormal real images ``(J, H*W)`` (float64) spanning ``bins`` (natural layout) and their conjugates.

    A bin pairs with its conjugate ``(-k, -l)``: the pair spans ``sqrt(2/HW) cos`` and
    ``sqrt(2/HW) sin`` of its phase, a self-conjugate bin (zero or Nyquist
    frequencies) ``cos / sqrt(HW)``. Returns the images and, for each, the index in
    ``bins`` of the bin it came from (the first of its pair listed).
    """
    rows = torch.arange(height, dtype=torch.int64)[:, None]
    cols = torch.arange(width, dtype=torch.int64)[None, :]
    images, origin, seen = [], [], set()
    for i, (k, l) in enumerate(bins):
        if (k, l) in seen:
            continue
        conjugate = ((-k) % height, (-l) % width)
        seen.update({(k, l), conjugate})
        # (k h W + l w H) mod HW in integers keeps the phase exact before the float64 cos/sin.
        phase = ((k * rows * width + l * cols * height) % (height * width)).to(torch.float64)
        angle = (phase * (2.0 * math.pi / (height * width))).reshape(-1)
        if conjugate == (k, l):
            images.append(torch.cos(angle) / math.sqrt(height * width))
            origin.append(i)
        else:
            norm = math.sqrt(2.0 / (height * width))
            images += [torch.cos(angle) * norm, torch.sin(angle) * norm]
            origin += [i, i]
    if not images:
        return torch.zeros(0, height * width, dtype=torch.float64), []
    return torch.stack(images), origin


# --------------------------------------------------------------------------- circular (SPF) geometry


@dataclass(eq=False)
class DiscGeometry(_Lazy):
    """The published circular mask's geometry at one size: its bins, factors and bases (no balances).

    Shared by every balance and channel count; keyed by the exact disc thresholds,
    so radii that select the same bins share it.
    """

    cache_key: Hashable
    height: int
    width: int
    limits: DiscThresholds
    bins: Tuple[Tuple[int, int], ...]  # natural layout; (0, 0) first
    bin_regions: Tuple[int, ...]  # 0 where d < r, 1 where d == r
    rows: Factors
    cols: Factors
    inside_grid: Tensor  # (K, L) compute dtype: 1 where d < r
    boundary_grid: Tensor  # (K, L): 1 where d == r
    dtype: torch.dtype
    device: torch.device

    @property
    def n_images(self) -> int:
        """``J``: one real image per bin of the disc."""
        return len(self.bins)

    @property
    def real_basis(self) -> Tensor:
        """``(J, H*W)`` orthonormal real images of the disc's bins; row 0 is the constant image."""
        return self._lazy("_real_basis", lambda: self._images()[0])

    @property
    def image_regions(self) -> Tensor:
        """``(J,)`` int64: each image's region (0 inside, 1 on the circle), on the plan's device."""
        return self._lazy("_image_regions", lambda: self._images()[1])

    def _images(self):
        images, origin = real_basis_images(self.height, self.width, self.bins)
        regions = torch.tensor([self.bin_regions[i] for i in origin], dtype=torch.int64, device=self.device)
        return images.to(device=self.device, dtype=self.dtype).contiguous(), regions

    @property
    def half_regions(self) -> Tuple[Tensor, Tensor]:
        """Boolean ``(inside, boundary)`` maps of the half spectrum ``(H, W//2+1)``, natural layout."""

        def build():
            d2 = squared_distance(self.height, self.width, centered=False, device=self.device)[:, : self.width // 2 + 1]
            return d2 < self.limits.inside_limit, d2 == self.limits.edge

        return self._lazy("_half_regions", build)

    @property
    def indicator_masks(self) -> Tuple[Tensor, Tensor]:
        """Natural-layout float masks ``(inside, boundary)`` ``(H, W)`` for the differentiable-lam path."""

        def build():
            d2 = squared_distance(self.height, self.width, centered=False, device=self.device)
            inside = (d2 < self.limits.inside_limit).to(self.dtype)
            return inside, (d2 == self.limits.edge).to(self.dtype)

        return self._lazy("_indicators", build)


def disc_geometry(height: int, width: int, radius: float, dtype: torch.dtype, device) -> DiscGeometry:
    """The cached :class:`DiscGeometry` of a size, radius, compute dtype and device."""
    limits = disc_thresholds(radius, max_squared_distance(height, width))
    device = torch.device(device)
    key = ("disc", height, width, limits, dtype, device)
    found = _cache.lookup(key)
    if found is not None:
        return found

    d2 = squared_distance(height, width, centered=False)
    inside, boundary = d2 < limits.inside_limit, d2 == limits.edge
    disc = inside | boundary
    bins = [(0, 0)] + [(k, l) for k, l in torch.nonzero(disc).tolist() if (k, l) != (0, 0)]
    regions = tuple(0 if bool(inside[k, l]) else 1 for k, l in bins)
    rows = torch.nonzero(disc.any(dim=1)).flatten().tolist()
    cols = torch.nonzero(disc.any(dim=0)).flatten().tolist()

    def grid(region):
        return region[rows][:, cols].to(device=device, dtype=dtype).contiguous()

    geometry = DiscGeometry(
        key, height, width, limits, tuple(bins), regions,
        factors(rows, height, dtype, device), factors(cols, width, dtype, device),
        grid(inside), grid(boundary), dtype, device,
    )
    _cache.put(key, geometry)
    return geometry


@dataclass(eq=False)
class CircularPlan(_Lazy):
    """The published SPF at one size with its balances: geometry plus per-channel coefficients.

    ``lams`` are per chunk of the channel dim (``torch.chunk``); ``channel_lams`` repeats
    them per channel (one entry for a single balance). All coefficients come from the
    published float32 mask values ``lam``, ``1/3`` and ``1 - lam``.
    """

    cache_key: Hashable
    geometry: DiscGeometry
    lams: Tuple[float, ...]
    channel_lams: Tuple[float, ...]
    filter_algorithm: str
    spg_choices: Dict[int, str] = field(default_factory=dict)  # out_channels -> spg's auto choice

    @property
    def planes(self) -> int:
        """``P``: the number of distinct mask planes (channels, or 1 for one balance)."""
        return len(self.channel_lams)

    def _values(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-plane ``(inside, boundary, outside)`` mask values in the compute dtype (from float32)."""
        lam = torch.tensor(self.channel_lams, dtype=torch.float32)
        values = (lam, torch.full_like(lam, BOUNDARY_VALUE), 1.0 - lam)
        g = self.geometry
        return tuple(v.to(device=g.device, dtype=g.dtype) for v in values)

    @property
    def lam_tensor(self) -> Tensor:
        """``(P,)`` float32 balances on the plan's device (the CUDA cuFFT kernel computes the mask from them)."""
        return self._lazy(
            "_lam", lambda: torch.tensor(self.channel_lams, dtype=torch.float32, device=self.geometry.device)
        )

    @property
    def separable(self) -> Separable:
        """The terms of ``spanet::lowrank_filter_kernel``."""

        def build():
            g = self.geometry
            v_in, v_edge, v_out = self._values()
            scale = 1.0 / (g.height * g.width)
            weight = ((v_in - v_out)[:, None, None] * g.inside_grid + (v_edge - v_out)[:, None, None] * g.boundary_grid)
            return Separable(g.rows, g.cols, (weight * scale).contiguous(), v_out.contiguous())

        return self._lazy("_separable", build)

    @property
    def basis_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(basis (J, HW), scale (P, J), constant (P,))``: the filter in the real basis."""

        def build():
            basis, scale, constant = self.spg_terms
            return basis, scale.transpose(0, 1).contiguous(), constant

        return self._lazy("_basis_terms", build)

    @property
    def spg_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(basis (J, HW), scale (J, P), constant (P,))`` of the spg kernels (channels as columns)."""

        def build():
            v_in, v_edge, v_out = self._values()
            deviation = torch.stack([v_in - v_out, v_edge - v_out])  # (2, P): inside, boundary
            return self.geometry.real_basis, deviation[self.geometry.image_regions].contiguous(), v_out.contiguous()

        return self._lazy("_spg_terms", build)

    @property
    def half_mask(self) -> Tensor:
        """Natural-layout half mask ``(P, H, W//2+1)`` of the fft algorithm, times ``1/(H W)`` (see ``fft_filter``)."""

        def build():
            inside, boundary = self.geometry.half_regions
            scale = 1.0 / (self.geometry.height * self.geometry.width)
            v_in, v_edge, v_out = (v[:, None, None] * scale for v in self._values())
            return torch.where(inside, v_in, torch.where(boundary, v_edge, v_out)).contiguous()

        return self._lazy("_half_mask", build)

    def spg_algorithm(self, out_channels: int) -> str:
        """``auto``'s choice for spg with ``out_channels`` outputs (see :func:`spg_algorithm`), made once."""
        choice = self.spg_choices.get(out_channels)
        if choice is None:
            g = self.geometry
            choice = spg_algorithm(g.height, g.width, g.n_images, self.planes, out_channels, g.device.type, g.dtype)
            self.spg_choices[out_channels] = choice
        return choice


def circular_plan(height: int, width: int, radius: float, lams: Tuple[float, ...], channels: Optional[int],
                  dtype: torch.dtype, device) -> CircularPlan:
    """The cached :class:`CircularPlan` for a size, radius, balances (per chunk of ``channels``), dtype and device.

    The arguments are trusted (the ops validate them); one balance ignores ``channels``.
    """
    key = ("circular", height, width, radius, lams, channels if len(lams) > 1 else None, dtype, device)
    found = _cache.lookup(key)
    if found is not None:
        return found
    device = torch.device(device)
    geometry = disc_geometry(height, width, radius, dtype, device)
    if len(lams) > 1:
        channel_lams = tuple(v for v, n in zip(lams, chunk_sizes(channels, len(lams))) for _ in range(n))
    else:
        channel_lams = lams
    algorithm = preferred_algorithm(
        height, width, len(geometry.rows.freqs), len(geometry.cols.freqs), device.type, geometry.n_images, dtype
    )
    plan = CircularPlan(key, geometry, lams, channel_lams, algorithm)
    _cache.put(key, plan)
    return plan


# --------------------------------------------------------------------------- plans of a given mask


@dataclass(eq=False)
class MaskPlan(_Lazy):
    """Everything ``spectral_mask_filter`` needs for one mask.

    ``lead_shape`` is the mask's shape without its two spatial dims; its planes
    are flattened: ``constant`` is ``(P,)``, the separable weight ``(P, K, L)``.
    """

    cache_key: Hashable
    source: "weakref.ref"  # the planned mask tensor: a hit is used only for that same object
    lead_shape: Tuple[int, ...]
    natural: Tensor  # (P, H, W) the mask in the natural layout and the compute dtype
    separable: Separable
    deviating_bins: Tuple[Tuple[int, int], ...]  # where the symmetrised mask differs from its constant
    algorithm: str

    @property
    def half_mask(self) -> Tensor:
        """``(*lead_shape, H, W//2+1)``: the fft algorithm's mask (see :func:`fft_half_mask`)."""
        return self._lazy("_half_mask", lambda: _half_of_natural(self.natural).reshape(
            *self.lead_shape, *self.natural.shape[-2:-1], -1).contiguous())

    @property
    def basis_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(basis (J, HW), scale (P, J), constant (P,))``: the filter in the real basis."""

        def build():
            planes, height, width = self.natural.shape
            images, origin = real_basis_images(height, width, self.deviating_bins)
            symmetric = symmetrise(self.natural)
            constant = self.separable.constant
            at = torch.tensor([self.deviating_bins[i] for i in origin], dtype=torch.int64).reshape(-1, 2)
            scale = symmetric[:, at[:, 0], at[:, 1]] - constant[:, None]
            return images.to(self.natural).contiguous(), scale.contiguous(), constant

        return self._lazy("_basis_terms", build)


def symmetrise(natural_mask: Tensor) -> Tensor:
    """``(M[k, l] + M[-k, -l]) / 2`` for a natural-layout mask: ``Re(IDFT(M X))`` only sees this part."""
    mirrored = torch.roll(torch.flip(natural_mask, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return 0.5 * (natural_mask + mirrored)


def _half_of_natural(natural: Tensor) -> Tensor:
    height, width = natural.shape[-2:]
    return symmetrise(natural)[..., : width // 2 + 1] * (1.0 / (height * width))


def fft_half_mask(mask: Tensor, centered: bool, dtype: torch.dtype) -> Tensor:
    """The fft algorithm's mask of ``mask`` without a plan: natural layout, Hermitian-symmetrised, the first
    ``W//2 + 1`` columns, times ``1/(H W)`` (see :func:`spanet_ops.algorithms.fft_filter`). Reads no values."""
    natural = mask.detach().to(dtype)
    return _half_of_natural(to_natural(natural) if centered else natural)


def mask_plan(mask: Tensor, centered: bool, dtype: torch.dtype) -> MaskPlan:
    """The cached plan of ``mask`` (any real mask) for computation in ``dtype``.

    A plan is keyed by the mask tensor itself (its identity, layout and version
    counter), never by reading its values on a hit, so in-place changes are
    seen; writes through ``.data`` bypass the version counter and are not
    (call :func:`clear_plan_caches` after them). Inference-mode masks have no
    version counter, and masks that require grad are learned (new values every
    step, and ``gradcheck`` perturbs them through ``.data``): both are planned on
    every call.
    """
    try:
        version = mask._version
    except RuntimeError:  # an inference tensor
        version = None
    key = (
        "mask", id(mask), version, tuple(mask.shape), tuple(mask.stride()), mask.storage_offset(),
        mask.dtype, mask.device, centered, dtype,
    )
    cached = version is not None and not mask.requires_grad
    if cached:
        found = _cache.lookup(key)
        if found is not None and found.source() is mask:
            return found
    plan = _build_mask_plan(key, mask, centered, dtype)
    if cached:
        _cache.put(key, plan)
    return plan


def _build_mask_plan(key, mask: Tensor, centered: bool, dtype: torch.dtype) -> MaskPlan:
    height, width = mask.shape[-2:]
    lead_shape = tuple(mask.shape[:-2])
    natural = mask.detach().to(dtype)
    if centered:
        natural = to_natural(natural)
    natural = natural.reshape(-1, height, width).contiguous()

    planes = natural.reshape(-1, height * width)
    constant = torch.mode(planes, dim=-1).values  # the most frequent value of each plane
    deviates = (planes != constant[:, None]).any(dim=0).reshape(height, width)
    rows = torch.nonzero(deviates.any(dim=1)).flatten().tolist()
    cols = torch.nonzero(deviates.any(dim=0)).flatten().tolist()
    grid = natural[:, rows][:, :, cols]
    weight = (grid - constant[:, None, None]) / (height * width)
    separable = Separable(
        factors(rows, height, dtype, mask.device), factors(cols, width, dtype, mask.device),
        weight.contiguous(), constant.contiguous(),
    )
    # The basis form sees the symmetrised mask: its deviating bins are closed under conjugation.
    sym_deviates = (symmetrise(natural) != constant[:, None, None]).any(dim=0)
    bins = tuple((k, l) for k, l in torch.nonzero(sym_deviates).tolist())
    algorithm = preferred_algorithm(height, width, len(rows), len(cols), mask.device.type, len(bins), dtype)
    return MaskPlan(key, weakref.ref(mask), lead_shape, natural, separable, bins, algorithm)


def broadcast_planes(lead_shape: Tuple[int, ...], x_lead: Tuple[int, ...]) -> Optional[int]:
    """How x's planes map onto a mask's: the period ``P`` with plane ``p`` -> mask plane ``p % P``.

    Returns None when the mask's leading dims are not a suffix of x's (after
    dropping leading ones); the caller then expands the mask's terms.
    """
    lead = list(lead_shape)
    while lead and lead[0] == 1:
        lead.pop(0)
    if not lead:
        return 1
    if tuple(lead) == tuple(x_lead[len(x_lead) - len(lead):]):
        return math.prod(lead)
    return None
