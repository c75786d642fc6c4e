"""The paper's spectral analysis as a tool, for SPANet and any timm backbone.

* :func:`collect_features` — feature maps of every block's token mixer (forward hooks).
* :func:`spectrum_map` — centred log amplitude of a layer's maps (the paper's Fig. 1).
* :func:`relative_log_amplitude` — Park & Kim's relative log amplitude curve and its
  Delta at pi (Fig. 2).
* :func:`context_map` — SPAM's context over the image (Fig. 4).
* :func:`class_activation_map` — Grad-CAM / Score-CAM through ``pytorch-grad-cam``.

``spanet-analyze`` (``python -m spanet.analysis``) draws all of them for one or
more models; see :mod:`spanet.analysis.cli`.
"""
from .cam import CAM_METHODS, ClassActivationMap, class_activation_map, default_cam_layer
from .context import ContextMap, context_map, spam_blocks
from .features import collect_features, default_modules, stage_module_names, to_feature_map, token_grid
from .spectra import (
    LOG_EPS,
    RelativeLogAmplitude,
    SpectrumAccumulator,
    diagonal_profile,
    normalized_frequencies,
    relative_log_amplitude,
    spectrum_map,
)

__all__ = [
    "CAM_METHODS",
    "ClassActivationMap",
    "ContextMap",
    "LOG_EPS",
    "RelativeLogAmplitude",
    "SpectrumAccumulator",
    "class_activation_map",
    "collect_features",
    "context_map",
    "default_cam_layer",
    "default_modules",
    "diagonal_profile",
    "normalized_frequencies",
    "relative_log_amplitude",
    "spam_blocks",
    "spectrum_map",
    "stage_module_names",
    "to_feature_map",
    "token_grid",
]
