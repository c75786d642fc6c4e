"""spanet-bench: throughput and memory benchmarks of spanet_ops and the SPANet models.

Three levels, plus a scaling sweep, on CPU and on CUDA when present:

* operators — :func:`spanet_ops.spectral_mask_filter` and
  :func:`spanet_ops.spg_aggregate` against the paper-literal ``torch.fft``
  reference and against the ``fft`` algorithm, at the four SPANet stage
  shapes, forward and forward+backward, fp32 and bf16;
* module — SPAM, the token mixer, fast against reference;
* model — training and inference images/s and peak memory of spanet_small
  (fast and reference) and the timm models of its size;
* sweep — lowrank vs fft over spatial size, channels and mask rank, checked
  against ``auto``'s cost model.

Run ``spanet-bench --help`` (or ``python -m spanet.bench``). From Python:
:func:`bench` (full control, returns the results), :func:`quick_summary`
(the ``--quick`` subset, for the main job). The measurement method is
documented in :mod:`spanet.bench.measure`.
"""
from .cli import bench, build_parser, main, quick_summary

__all__ = ["bench", "build_parser", "main", "quick_summary"]
