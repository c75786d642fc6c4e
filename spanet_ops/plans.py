"""Plans: everything about a filter that depends on the mask and the shape, not on the data.

A plan is computed once per (shape, mask, device, dtype) and kept in a bounded
LRU cache. Every backend — PyTorch, C++, CUDA, Triton — consumes the same plan
tensors, so masks, frequency sets and DFT bases are computed in one place.

The low-rank form (SPEC §1 fact 3). A real mask ``M`` (natural layout) equal
to a constant ``c`` except on a set ``S`` of bins gives
``y = c * x + Re(IDFT(D * X))`` with ``D = M - c`` zero outside ``S``. Let
``K``/``L`` be the row/column frequencies that occur in ``S`` and

    A = [cos(2 pi k n / H); sin(2 pi k n / H)]   (2K, H)   k in K
    B = [cos(2 pi l m / W); sin(2 pi l m / W)]   (2L, W)   l in L

Then with the real coefficient grid ``G = A x B^T = [[Pac, Pad], [Pbc, Pbd]]``,

    R = w * (Pac - Pbd),  Q = w * (Pbc + Pad),  w = D / (H W)
    y = c * x + A^T [[R, Q], [Q, -R]] B

— analysis, a per-bin scaling, synthesis: one read and one write of ``x``.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from .masks import circular_mask_values, circular_regions, to_natural

#: Plans kept per cache; the least recently used is dropped beyond this.
PLAN_CACHE_SIZE = 128


class PlanCache:
    """A thread-safe bounded LRU cache of plans."""

    def __init__(self, maxsize: int = PLAN_CACHE_SIZE):
        self.maxsize = maxsize
        self._entries: "OrderedDict[Hashable, object]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], object]):
        """Return the plan for ``key``, building it with ``build()`` on a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = build()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value) -> None:
        """Store ``value`` under ``key``, dropping the least recently used beyond ``maxsize``."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_basis_cache = PlanCache()
_mask_plan_cache = PlanCache()
_circular_cache = PlanCache()


def clear_plan_caches() -> None:
    """Drop every cached plan (e.g. to free device memory)."""
    for cache in (_basis_cache, _mask_plan_cache, _circular_cache):
        cache.clear()


# --------------------------------------------------------------------------- bases


@dataclass(frozen=True)
class SpectralBasis:
    """Real partial-DFT bases for the row frequencies ``rows`` and column frequencies ``cols``."""

    height: int
    width: int
    rows: Tuple[int, ...]
    cols: Tuple[int, ...]
    basis_h: Tensor  # (2K, H): cos rows then sin rows
    basis_w: Tensor  # (2L, W)


def _cos_sin_basis(freqs: Tuple[int, ...], n: int) -> Tensor:
    # (k * m) mod n in integers keeps the angle exact before the float64 cos/sin.
    phase = (torch.tensor(freqs, dtype=torch.int64)[:, None] * torch.arange(n)[None, :]) % n
    angle = phase.to(torch.float64) * (2.0 * math.pi / n)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=0)


def spectral_basis(height: int, width: int, rows, cols, dtype: torch.dtype, device) -> SpectralBasis:
    """The cached :class:`SpectralBasis` for natural-layout frequency indices ``rows`` x ``cols``."""
    rows, cols = tuple(int(r) for r in rows), tuple(int(c) for c in cols)
    device = torch.device(device)
    key = (height, width, rows, cols, dtype, device)

    def build():
        return SpectralBasis(
            height,
            width,
            rows,
            cols,
            _cos_sin_basis(rows, height).to(device=device, dtype=dtype),
            _cos_sin_basis(cols, width).to(device=device, dtype=dtype),
        )

    return _basis_cache.get(key, build)


# --------------------------------------------------------------------------- algorithm choice


def preferred_algorithm(height: int, width: int, n_rows: int, n_cols: int, device_type: str = "cpu") -> str:
    """The cost model behind ``algorithm="auto"``: ``"lowrank"`` or ``"fft"``.

    ``lowrank`` costs about ``4 (K + L)`` multiply-adds per element (analysis
    and synthesis along both axes); an FFT pair costs a multiple of
    ``log2(H W)``. The constant is calibrated by ``spanet-bench --levels sweep``.
    """
    lowrank_cost = 4.0 * (n_rows + n_cols)
    fft_cost = FFT_COST_FACTOR.get(device_type, FFT_COST_FACTOR["cpu"]) * math.log2(max(height * width, 2))
    return "lowrank" if lowrank_cost <= fft_cost else "fft"


#: Multiply-add equivalents per element per ``log2(H W)`` of an rfft2/irfft2 pair.
#: CPU: fitted by ``spanet-bench --levels sweep`` (sizes 14-224, C 32/128, radii 1-16 and a
#: general mask, one thread, native C++ lowrank kernel): every factor in 19.4-22.7 agrees with
#: the faster measured algorithm in 56 of 60 cases (98.8% cost-weighted; 5.0 agreed in 36); a
#: second sweep with 20 agreed in 53 of 60 (95.9%); 5 of its 7 misses went the other way in
#: the first sweep (load on the shared 2-core machine), and both sweeps together fit 19.4-22.7.
#: With the PyTorch lowrank fallback (SPANET_DISABLE_NATIVE=1) the best fit is 11.7-14.1 (88%)
#: and 20 still beats 5 (85% vs 83%). CUDA: not yet measured.
FFT_COST_FACTOR = {"cpu": 20.0, "cuda": 5.0}


# --------------------------------------------------------------------------- plans for a given mask


@dataclass
class MaskPlan:
    """Everything ``spectral_mask_filter`` needs for one mask.

    ``lead_shape`` is the mask's shape without its two spatial dims; its planes
    are flattened: ``constant`` is ``(P,)``, ``weight`` ``(P, K, L)``.
    """

    snapshot: Tensor  # the mask's values when planned: a hit is only used if they still match
    lead_shape: Tuple[int, ...]
    half_mask: Tensor  # (*lead_shape, H, W//2+1): natural layout, Hermitian-symmetrised
    basis: SpectralBasis
    weight: Tensor
    constant: Tensor
    algorithm: str


def symmetrise(natural_mask: Tensor) -> Tensor:
    """``(M[k, l] + M[-k, -l]) / 2`` for a natural-layout mask (SPEC §1 fact 2)."""
    mirrored = torch.roll(torch.flip(natural_mask, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return 0.5 * (natural_mask + mirrored)


def _plane_constants(planes: Tensor) -> Tensor:
    """The most frequent value of each mask plane ``(P, H*W)`` (the low-rank constant)."""
    return torch.mode(planes, dim=-1).values


def mask_plan(mask: Tensor, centered: bool, dtype: torch.dtype) -> MaskPlan:
    """The cached plan of ``mask`` (any real mask) for computation in ``dtype``.

    Plans depend on the mask's values, which can change without any trace in
    the tensor's identity (writes through ``.data``, or a new tensor at a freed
    address), so a cache hit is verified against a snapshot of the values.
    """
    key = (
        mask.data_ptr(),
        mask._version,
        tuple(mask.shape),
        tuple(mask.stride()),
        mask.storage_offset(),
        mask.dtype,
        mask.device,
        centered,
        dtype,
    )
    plan = _mask_plan_cache.get(key, lambda: _build_mask_plan(mask, centered, dtype))
    if not torch.equal(plan.snapshot, mask.detach()):
        plan = _build_mask_plan(mask, centered, dtype)
        _mask_plan_cache.put(key, plan)
    return plan


def _build_mask_plan(mask: Tensor, centered: bool, dtype: torch.dtype) -> MaskPlan:
    height, width = mask.shape[-2:]
    lead_shape = tuple(mask.shape[:-2])
    natural = mask.detach().to(dtype)
    if centered:
        natural = to_natural(natural)
    half_mask = symmetrise(natural)[..., : width // 2 + 1].contiguous()

    planes = natural.reshape(-1, height * width)
    constant = _plane_constants(planes)
    deviates = (planes != constant[:, None]).any(dim=0).reshape(height, width)
    rows = torch.nonzero(deviates.any(dim=1)).flatten().tolist()
    cols = torch.nonzero(deviates.any(dim=0)).flatten().tolist()
    basis = spectral_basis(height, width, rows, cols, dtype, mask.device)
    grid = natural.reshape(-1, height, width)[:, rows][:, :, cols]
    weight = (grid - constant[:, None, None]) / (height * width)
    return MaskPlan(
        snapshot=mask.detach().clone(),
        lead_shape=lead_shape,
        half_mask=half_mask,
        basis=basis,
        weight=weight.contiguous(),
        constant=constant.contiguous(),
        algorithm=preferred_algorithm(height, width, len(rows), len(cols), mask.device.type),
    )


# --------------------------------------------------------------------------- circular (SPF) plans


@dataclass(frozen=True)
class CircularPlan:
    """Geometry of the published circular mask at one size: bins, bases and region maps."""

    height: int
    width: int
    radius: float
    basis: SpectralBasis
    inside_grid: Tensor  # (K, L) 1 where d < r, in the compute dtype
    boundary_grid: Tensor  # (K, L) 1 where d == r
    inside_half: Tensor  # (H, W//2+1) bool, natural layout
    boundary_half: Tensor
    algorithm: str
    real_basis: Tensor  # (J, H*W) orthonormal real images of the disc's bins; row 0 is the constant image
    basis_regions: Tensor  # (J,) int64: 0 where the row's bins have d < r, 1 where d == r

    def lowrank_terms(self, lam: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel ``(weight (C, K, L), constant (C,))`` for float32 ``lam`` (0-d or ``(C,)``)."""
        dtype = self.basis.basis_h.dtype
        v_in, v_edge, v_out = (v.reshape(-1).to(dtype) for v in circular_mask_values(lam))
        scale = 1.0 / (self.height * self.width)
        weight = ((v_in - v_out)[:, None, None] * self.inside_grid + (v_edge - v_out)[:, None, None] * self.boundary_grid) * scale
        return weight.contiguous(), v_out.contiguous()

    def coefficient_scales(self, lam: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel ``(scale (J, C), constant (C,))`` of the filter in the real basis.

        ``SPF(x_c) = constant_c x_c + sum_j scale[j, c] <e_j, x_c> e_j`` with ``e_j``
        the rows of :attr:`real_basis`; ``lam`` is float32, 0-d or ``(C,)``.
        """
        dtype = self.real_basis.dtype
        v_in, v_edge, v_out = (v.reshape(-1).to(dtype) for v in circular_mask_values(lam))
        deviation = torch.stack([v_in - v_out, v_edge - v_out])  # (2, C): inside, boundary
        return deviation[self.basis_regions].contiguous(), v_out.contiguous()

    def half_mask(self, lam: Tensor) -> Tensor:
        """Natural-layout half mask ``(C, H, W//2+1)`` (``C`` = 1 for a scalar ``lam``)."""
        dtype = self.basis.basis_h.dtype
        v_in, v_edge, v_out = (v.reshape(-1, 1, 1).to(dtype) for v in circular_mask_values(lam))
        return torch.where(self.inside_half, v_in, torch.where(self.boundary_half, v_edge, v_out))


def _disc_real_basis(inside: Tensor, boundary: Tensor) -> Tuple[Tensor, Tensor]:
    """Orthonormal real images ``(J, H*W)`` (float64) spanning the disc's bins, and each one's region.

    The bins of the disc (natural layout) pair up with their conjugates
    ``(-k, -l)``: a pair spans ``sqrt(2/HW) cos`` and ``sqrt(2/HW) sin`` of its
    phase, a self-conjugate bin (zero or Nyquist frequencies) ``cos / sqrt(HW)``.
    The circular mask is conjugate-symmetric, so a pair shares one region. The
    constant image comes first: it carries the bias and its gradient.
    """
    height, width = inside.shape
    disc = inside | boundary
    bins = [(0, 0)] + [(k, l) for k, l in torch.nonzero(disc).tolist() if (k, l) != (0, 0)]
    rows = torch.arange(height, dtype=torch.int64)[:, None]
    cols = torch.arange(width, dtype=torch.int64)[None, :]
    images, regions, seen = [], [], set()
    for k, l in bins:
        if (k, l) in seen:
            continue
        conjugate = ((-k) % height, (-l) % width)
        seen.update({(k, l), conjugate})
        # (k h W + l w H) mod HW in integers keeps the phase exact before the float64 cos/sin.
        phase = ((k * rows * width + l * cols * height) % (height * width)).to(torch.float64)
        angle = (phase * (2.0 * math.pi / (height * width))).reshape(-1)
        region = 0 if bool(inside[k, l]) else 1
        if conjugate == (k, l):
            images.append(torch.cos(angle) / math.sqrt(height * width))
            regions.append(region)
        else:
            norm = math.sqrt(2.0 / (height * width))
            images += [torch.cos(angle) * norm, torch.sin(angle) * norm]
            regions += [region, region]
    return torch.stack(images), torch.tensor(regions, dtype=torch.int64)


def circular_plan(height: int, width: int, radius: float, dtype: torch.dtype, device) -> CircularPlan:
    """The cached :class:`CircularPlan` for one size, radius, dtype and device."""
    device = torch.device(device)
    key = (height, width, float(radius), dtype, device)

    def build():
        inside, boundary = circular_regions(height, width, radius, centered=False)
        disc = inside | boundary
        rows = torch.nonzero(disc.any(dim=1)).flatten().tolist()
        cols = torch.nonzero(disc.any(dim=0)).flatten().tolist()
        basis = spectral_basis(height, width, rows, cols, dtype, device)

        def grid(region):
            return region[rows][:, cols].to(device=device, dtype=dtype)

        def half(region):
            return region[:, : width // 2 + 1].to(device)

        real_basis, basis_regions = _disc_real_basis(inside, boundary)
        return CircularPlan(
            height,
            width,
            float(radius),
            basis,
            grid(inside),
            grid(boundary),
            half(inside),
            half(boundary),
            preferred_algorithm(height, width, len(rows), len(cols), device.type),
            real_basis.to(device=device, dtype=dtype).contiguous(),
            basis_regions.to(device),
        )

    return _circular_cache.get(key, build)


def circular_plan_constants(height: int, width: int, radius: float, dtype: torch.dtype, device) -> CircularPlan:
    """:func:`circular_plan`, built from real tensors even while tracing.

    Under fake tensors or a proxy tracer (``torch.compile``'s backward graphs,
    ``torch.export`` decompositions) the plan is geometry only, so it is built
    outside the tracer and its tensors enter the graph as constants for the
    traced size.
    """
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        return circular_plan(int(height), int(width), float(radius), dtype, device)


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
