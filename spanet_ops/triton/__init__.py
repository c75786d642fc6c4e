"""Triton kernels of the spanet ops for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

* :func:`lowrank_filter` — the fused low-rank spectral filter (forward and, by
  self-adjointness, backward).
* :func:`spg_spectral` — the spectral part of the fused split-SPG aggregation,
  added onto the 1x1 conv's output.

:mod:`spanet_ops.backends` calls these for CUDA tensors when Triton imports;
problems a kernel does not take go to the dispatcher's kernel ops.
"""
from .lowrank import lowrank_filter
from .spg import spg_spectral

__all__ = ["lowrank_filter", "spg_spectral"]
