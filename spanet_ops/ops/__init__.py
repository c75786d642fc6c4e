"""The ``spanet`` custom ops, one module per family.

* :mod:`.kernels` — the kernel-op tier: plan tensors in, result out (PyTorch
  defaults; native and Triton kernels register per device).
* :mod:`.filter` — ``spectral_mask_filter`` and ``spectral_mask_grad``.
* :mod:`.spf` — ``spectral_pooling_filter`` (the published circular mask).
* :mod:`.spg` — ``spg_aggregate`` and its two gradient ops.

Each family validates in its real and fake kernels, handles its compute dtype
once (:func:`.kernels.own_arithmetic`), and makes one algorithm choice from its
plan's cost model. The training-only CPU ops live in :mod:`spanet_ops.training`.
"""
from . import kernels
from .filter import spectral_mask_filter, spectral_mask_filter_op, spectral_mask_grad_op
from .spf import spectral_pooling_filter, spectral_pooling_filter_op
from .spg import PUBLISHED_LAMS, spg_aggregate, spg_aggregate_op, spg_input_grad_op, spg_weight_grad_op

__all__ = [
    "PUBLISHED_LAMS",
    "kernels",
    "spectral_mask_filter",
    "spectral_mask_filter_op",
    "spectral_mask_grad_op",
    "spectral_pooling_filter",
    "spectral_pooling_filter_op",
    "spg_aggregate",
    "spg_aggregate_op",
    "spg_input_grad_op",
    "spg_weight_grad_op",
]
