"""Triton kernels of the spanet ops for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

* :func:`lowrank_filter` — the fused low-rank spectral filter (forward and, by
  self-adjointness, backward).

:mod:`spanet_ops.backends` calls these for CUDA tensors when Triton imports;
problems a kernel does not take go to the dispatcher's kernel ops. The fused
split-SPG aggregation needs no kernel of its own: its spectral part is a pair
of skinny GEMMs against the plan's real basis (cuBLAS on CUDA), see
:func:`spanet_ops.algorithms.spg_lowrank`.
"""
from .lowrank import lowrank_filter

__all__ = ["lowrank_filter"]
