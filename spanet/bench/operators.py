"""Operator level: the spectral operators against the paper-literal reference and against ``fft``.

The reference is ``torch.fft`` done the published way:
``spanet_ops.reference.spectral_mask_filter`` with a centred mask built once
before timing, and ``spanet_ops.reference.spg_aggregate`` (chunk, SPF per
chunk, 1x1 conv per chunk, sum). ``torch.fft`` has no bfloat16 kernels on the
CPU (nor in cuFFT), so bf16 rows compare the bf16 operators against the fp32
reference; every row records the dtype its baseline ran in.

The candidate builders here are shared with the pytest-benchmark suite
``benchmarks/bench_ops.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence

import torch

import spanet_ops
from spanet_ops import reference

from .measure import paired_ratio, time_interleaved, timing_summary

#: The SPF radius and balances of the published models.
SPANET_LAMS = (0.7, 0.8, 0.9)


@dataclass(frozen=True)
class StageShape:
    """One SPANet stage's token-mixer input: channels, square size, SPF radius."""

    channels: int
    size: int
    radius: float

    def label(self, batch: int) -> str:
        """``"(B,C,H,W) r=R"`` for progress lines."""
        return f"({batch},{self.channels},{self.size},{self.size}) r={self.radius:g}"


#: The four SPANet stages at 224x224 input.
STAGES = (StageShape(64, 56, 2.0), StageShape(128, 28, 2.0), StageShape(320, 14, 1.0), StageShape(512, 7, 1.0))
OPS = ("spectral_mask_filter", "spg_aggregate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
#: Candidates timed against the reference; ``auto`` is what users get by default.
CANDIDATES = ("fft", "lowrank", "auto")


def parse_shapes(text: str) -> List[StageShape]:
    """Parse ``"C:H:r,C:H:r"`` (e.g. ``"64:56:2,320:14:1"``) into stage shapes."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"shape {item!r} must be CHANNELS:SIZE:RADIUS, e.g. 64:56:2")
        try:
            channels, size, radius = int(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"shape {item!r} must be CHANNELS:SIZE:RADIUS with integers C, SIZE") from None
        if channels < 3 or size < 1 or radius < 0:
            raise ValueError(f"shape {item!r}: need CHANNELS >= 3 (three SPF chunks), SIZE >= 1, RADIUS >= 0")
        shapes.append(StageShape(channels, size, radius))
    return shapes


def _runner(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], mode: str) -> Callable[[], object]:
    """A zero-argument callable running ``forward`` (and its backward with a fixed gradient)."""
    if mode == "fwd":

        def run_forward():
            with torch.no_grad():
                return forward()

        return run_forward
    grad_holder: List[torch.Tensor] = []

    def run_backward():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        if not grad_holder:  # a fixed upstream gradient, drawn once
            grad_holder.append(torch.randn_like(out))
        out.backward(grad_holder[0])

    return run_backward


def operator_candidates(
    op: str,
    stage: StageShape,
    batch: int,
    dtype: torch.dtype,
    mode: str,
    device: torch.device,
    algorithms: Iterable[str] = CANDIDATES,
    seed: int = 0,
) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables for ``"reference"`` and each of ``algorithms`` on one case.

    The reference runs in float32 whatever ``dtype`` is (see module doc); the
    candidates run in ``dtype``. Inputs are drawn once; for ``"fwd+bwd"`` the
    leaves (input, and the 1x1 weights for ``spg_aggregate``) require grad.
    """
    if op not in OPS:
        raise ValueError(f"unknown operator {op!r}; expected one of {', '.join(OPS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    gen = torch.Generator().manual_seed(seed)
    c, h = stage.channels, stage.size
    grad = mode == "fwd+bwd"
    x32 = torch.randn(batch, c, h, h, generator=gen).to(device)
    x_ref = x32.clone().requires_grad_(grad)
    x_fast = x32.to(dtype).requires_grad_(grad)
    candidates: Dict[str, Callable[[], object]] = {}
    if op == "spectral_mask_filter":
        mask = spanet_ops.circular_mask(h, h, stage.radius, SPANET_LAMS[1], device=device)
        candidates["reference"] = _runner(lambda: reference.spectral_mask_filter(x_ref, mask), [x_ref], mode)
        for algorithm in algorithms:
            candidates[algorithm] = _runner(
                lambda a=algorithm: spanet_ops.spectral_mask_filter(x_fast, mask, algorithm=a), [x_fast], mode
            )
        return candidates
    sizes = spanet_ops.chunk_sizes(c, len(SPANET_LAMS))
    weights32 = [torch.randn(c, n, generator=gen).mul_(n**-0.5).to(device) for n in sizes]
    biases32 = [torch.randn(c, generator=gen).mul_(0.02).to(device) for _ in sizes]
    w_ref = [w.clone().requires_grad_(grad) for w in weights32]
    b_ref = [b.clone().requires_grad_(grad) for b in biases32]
    w_fast = torch.cat(weights32, dim=1).to(dtype).requires_grad_(grad)
    b_fast = torch.stack(biases32).sum(0).to(dtype).requires_grad_(grad)
    candidates["reference"] = _runner(
        lambda: reference.spg_aggregate(x_ref, w_ref, b_ref, SPANET_LAMS, stage.radius), [x_ref, *w_ref, *b_ref], mode
    )
    for algorithm in algorithms:
        candidates[algorithm] = _runner(
            lambda a=algorithm: spanet_ops.spg_aggregate(x_fast, w_fast, b_fast, SPANET_LAMS, stage.radius, algorithm=a),
            [x_fast, w_fast, b_fast],
            mode,
        )
    return candidates


def auto_choice(stage: StageShape, device: torch.device) -> str:
    """The algorithm ``auto`` runs for the circular mask of ``stage`` on ``device``."""
    from spanet_ops.plans import circular_plan

    return circular_plan(stage.size, stage.size, stage.radius, (0.7,), None, torch.float32, device).filter_algorithm


def run_operators(
    *,
    stages: Sequence[StageShape],
    batch: int,
    ops: Sequence[str],
    dtypes: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    progress: Callable[[str], None] = lambda line: None,
) -> List[dict]:
    """Time every (op, stage, dtype, mode) case; one JSON-ready row per case."""
    rows = []
    for op in ops:
        for stage in stages:
            for dtype_name in dtypes:
                for mode in modes:
                    dtype = DTYPES[dtype_name]
                    candidates = operator_candidates(op, stage, batch, dtype, mode, device)
                    samples = time_interleaved(
                        candidates, device=device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s
                    )
                    row = {
                        "op": op,
                        "shape": [batch, stage.channels, stage.size, stage.size],
                        "radius": stage.radius,
                        "dtype": dtype_name,
                        "mode": mode,
                        "baseline": "reference",
                        "baseline_dtype": "fp32",
                        "auto_algorithm": auto_choice(stage, device),
                        **timing_summary(samples),
                        "speedup_vs_fft": {
                            name: paired_ratio(samples["fft"], s)
                            for name, s in samples.items()
                            if name not in ("reference", "fft") and "fft" in samples
                        },
                    }
                    rows.append(row)
                    best = max(row["speedup"].items(), key=lambda kv: kv[1]["median"])
                    progress(
                        f"{op:>20} {stage.label(batch):>24} {dtype_name:>4} {mode:>7}  "
                        f"ref {row['time_ms']['reference']['median']:8.2f} ms  best {best[0]} x{best[1]['median']:.2f}"
                    )
    return rows
