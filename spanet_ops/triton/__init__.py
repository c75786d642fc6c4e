"""Triton kernels of the spanet ops for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

* :func:`basis_filter` (:mod:`spanet_ops.triton.kernel`) — the low-rank spectral filter in a real basis
  (``spanet::basis_filter_kernel``'s CUDA implementation): two skinny GEMMs per
  block of planes, one read and one write of ``x``.
* :mod:`spanet_ops.triton.tuning` — arithmetic per dtype, configurations, cost model.
* :mod:`spanet_ops.triton.roofline` — ahead-of-time compilation for a GPU target
  (no GPU needed): registers, spills, instruction counts, predicted bandwidth.
"""
from .kernel import basis_filter, basis_filter_with_config

__all__ = ["basis_filter", "basis_filter_with_config"]
