"""spanet_ops: exact, fast, differentiable spectral mask filters for SPANet.

Public API:

* :func:`spectral_mask_filter` — drop-in for the published
  ``fft2 -> fftshift -> mask -> ifftshift -> ifft2 -> real``.
* :func:`circular_mask` — the published circular mask at any size.
* :func:`spectral_pooling_filter` — the published SPF, no mask to build.
* :func:`spg_aggregate` — SPAM's fused split-SPG aggregation.
* :mod:`spanet_ops.training` — the training-only CPU fast paths and their layers.
* :mod:`spanet_ops.reference` — paper-literal implementations.
* :func:`backends` — which kernels are present, and why any is absent.

The operators are ``torch.library`` custom ops in the ``spanet`` namespace
(``torch.ops.spanet.*``), with fake kernels and registered autograd, so they
work under ``torch.compile`` and ``torch.export``.
"""
from . import reference, training
from .backends import backends
from .masks import circular_mask
from .ops import PUBLISHED_LAMS, spectral_mask_filter, spectral_pooling_filter, spg_aggregate
from .plans import clear_plan_caches
from .validation import ALGORITHMS, chunk_sizes

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "PUBLISHED_LAMS",
    "backends",
    "chunk_sizes",
    "circular_mask",
    "clear_plan_caches",
    "reference",
    "spectral_mask_filter",
    "spectral_pooling_filter",
    "spg_aggregate",
    "training",
]
