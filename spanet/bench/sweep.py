"""Scaling sweep: how ``lowrank`` and ``fft`` grow with spatial size, channels and mask rank.

For every size ``H = W`` and channel count, the sweep times the forward
filter of ``(batch, C, H, W)`` with the published circular mask at several
radii (the radius sets the rank: ``K = L`` = the number of distinct row/column
frequencies in the disc, 3 for r=1, 5 for r=2, ...) and with a *general* mask
(random, symmetric: every bin differs, so ``K = H``, ``L = W`` and lowrank
must lose). Each row records the measured faster algorithm, the choice of
``auto`` (the cost model :func:`spanet_ops.plans.preferred_algorithm`) and
whether they agree.

:func:`calibrate` fits ``FFT_COST_FACTOR`` to the measurements: the cost
model picks lowrank iff ``4 (K + L) <= f log2(H W)``, i.e. iff the case's
break-even factor ``4 (K + L) / log2(H W)`` is at most ``f``; the fit picks
the ``f`` that agrees with the most measurements, weighting each by how much
the wrong choice would cost (``|log(t_lowrank / t_fft)|``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch

import spanet_ops
from spanet_ops import plans

from .measure import Stats, paired_ratio, time_interleaved

SIZES = (14, 28, 56, 112, 224)
CHANNELS = (32, 128)
RADII = (1.0, 2.0, 4.0, 8.0, 16.0)
GENERAL = "general"


def general_mask(size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random real mask (centred layout) whose bins all differ: the full-rank worst case for lowrank."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(size, size, generator=gen, dtype=torch.float64).add_(0.5)
    return mask.to(device=device, dtype=torch.float32)


def break_even_factor(height: int, width: int, n_rows: int, n_cols: int) -> float:
    """The ``FFT_COST_FACTOR`` at which the cost model is indifferent for this case."""
    return 4.0 * (n_rows + n_cols) / math.log2(max(height * width, 2))


def run_sweep(
    *,
    sizes: Sequence[int],
    channels: Sequence[int],
    radii: Sequence[float],
    include_general: bool,
    batch: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    progress: Callable[[str], None] = lambda line: None,
) -> List[dict]:
    """Time ``lowrank`` against ``fft`` (forward, fp32) on every case; one row per case."""
    rows = []
    masks: List[object] = [float(r) for r in radii] + ([GENERAL] if include_general else [])
    for size in sizes:
        for c in channels:
            x = torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(size * 1000 + c)).to(device)
            for kind in masks:
                if kind == GENERAL:
                    mask = general_mask(size, device)
                else:
                    mask = spanet_ops.circular_mask(size, size, kind, 0.8, device=device)
                plan = plans.mask_plan(mask, True, torch.float32)
                candidates = {
                    name: (lambda a=name: spanet_ops.spectral_mask_filter(x, mask, algorithm=a))
                    for name in ("fft", "lowrank")
                }
                with torch.no_grad():
                    samples = time_interleaved(
                        candidates, device=device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s
                    )
                ratio = paired_ratio(samples["fft"], samples["lowrank"])  # > 1: lowrank faster
                faster = "lowrank" if ratio["median"] > 1.0 else "fft"
                n_rows, n_cols = len(plan.separable.rows.freqs), len(plan.separable.cols.freqs)
                row = {
                    "size": size,
                    "channels": c,
                    "batch": batch,
                    "mask": "general" if kind == GENERAL else f"circular r={kind:g}",
                    "radius": None if kind == GENERAL else kind,
                    "n_rows": n_rows,
                    "n_cols": n_cols,
                    "time_ms": {name: Stats.of(s).scaled(1e3) for name, s in samples.items()},
                    "lowrank_speedup_over_fft": ratio,
                    "faster": faster,
                    "auto": plan.algorithm,
                    "agree": plan.algorithm == faster,
                    "break_even_factor": break_even_factor(size, size, n_rows, n_cols),
                }
                rows.append(row)
                progress(
                    f"sweep {size:>4}x{size:<4} C={c:<4} {row['mask']:>15}  K=L={n_rows:<4} "
                    f"fft {row['time_ms']['fft']['median']:8.3f} ms  lowrank {row['time_ms']['lowrank']['median']:8.3f} ms  "
                    f"faster {faster:>7}  auto {plan.algorithm:>7}  {'agree' if row['agree'] else 'DISAGREE'}"
                )
    return rows


def calibrate(rows: Sequence[dict], device_type: str = "cpu") -> Dict[str, object]:
    """The ``FFT_COST_FACTOR`` that best reproduces the measured choices (see module doc).

    Returns the fitted factor, the weighted agreement it reaches, the
    agreement of the factor currently in :mod:`spanet_ops.plans`, and the
    interval of equally good factors.
    """
    if not rows:
        raise ValueError("calibrate needs at least one sweep row")
    points = []
    for row in rows:
        ratio = row["lowrank_speedup_over_fft"]["median"]
        points.append((row["break_even_factor"], row["faster"] == "lowrank", abs(math.log(ratio))))

    def score(factor: float) -> float:
        return sum(w for x, lowrank_wins, w in points if (x <= factor) == lowrank_wins)

    total = sum(w for _, _, w in points) or 1.0
    edges = sorted({x for x, _, _ in points})
    # The score only changes at the points: try one factor inside each gap between
    # neighbours (and below/above all of them), and keep the gaps' bounds.
    gaps = [(0.0, edges[0])] + list(zip(edges, edges[1:])) + [(edges[-1], math.inf)]
    trials = [(lo, hi, (lo + hi) / 2 if math.isfinite(hi) else 2 * lo) for lo, hi in gaps]
    scores = [score(mid) for _, _, mid in trials]
    best = max(scores)
    good = [t for t, s in zip(trials, scores) if s == best]
    fitted = good[len(good) // 2][2]
    current = plans.FFT_COST_FACTOR.get(device_type, plans.FFT_COST_FACTOR["cpu"])
    return {
        "device_type": device_type,
        "fitted_fft_cost_factor": round(fitted, 3),
        # Every factor strictly inside this interval scores the same (null: unbounded).
        "equally_good_interval": [round(good[0][0], 3), round(good[-1][1], 3) if math.isfinite(good[-1][1]) else None],
        "weighted_agreement_fitted": best / total,
        "current_fft_cost_factor": current,
        "weighted_agreement_current": score(current) / total,
        "cases_agreeing_current": sum(1 for r in rows if r["agree"]),
        "cases": len(rows),
    }


def crossovers(rows: Sequence[dict]) -> Dict[str, List[Dict[str, object]]]:
    """Where lowrank stops winning, both ways the sweep can show it.

    ``by_size``: per (channels, mask), the sizes where lowrank was faster and
    the smallest size from which it was faster at every larger size (fft's
    cost grows like ``log(H W)`` per element, lowrank's does not, so lowrank
    wins from some size on unless its rank grows with the size).
    ``by_radius``: per (channels, size), the largest circular radius at which
    lowrank was still faster (the rank ``K + L`` grows with the radius).
    """
    by_mask: Dict[tuple, List[dict]] = {}
    by_size: Dict[tuple, List[dict]] = {}
    for row in rows:
        by_mask.setdefault((row["channels"], row["mask"]), []).append(row)
        by_size.setdefault((row["channels"], row["size"]), []).append(row)
    sizes_out = []
    for (c, mask), group in by_mask.items():
        group = sorted(group, key=lambda r: r["size"])
        wins_from = None
        for r in reversed(group):
            if r["faster"] != "lowrank":
                break
            wins_from = r["size"]
        sizes_out.append({
            "channels": c,
            "mask": mask,
            "lowrank_faster_at": [r["size"] for r in group if r["faster"] == "lowrank"],
            "lowrank_faster_from_size": wins_from,
        })
    radii_out = []
    for (c, size), group in sorted(by_size.items()):
        won = [r["radius"] for r in group if r["radius"] is not None and r["faster"] == "lowrank"]
        radii_out.append({"channels": c, "size": size, "largest_lowrank_radius": max(won) if won else None})
    return {"by_size": sizes_out, "by_radius": radii_out}
