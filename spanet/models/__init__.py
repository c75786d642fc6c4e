"""SPANet models, registered in timm's model registry on import."""
from .export import export_decompositions, export_onnx, export_program
from .spanet import (
    MODEL_CONFIGS,
    SPECTRAL_IMPLS,
    SPAM,
    SPANet,
    SPANetBlock,
    checkpoint_filter_fn,
    set_spectral_impl,
    spanet_base,
    spanet_baseX,
    spanet_medium,
    spanet_mediumX,
    spanet_small,
)

__all__ = [
    "MODEL_CONFIGS",
    "SPECTRAL_IMPLS",
    "SPAM",
    "SPANet",
    "SPANetBlock",
    "checkpoint_filter_fn",
    "export_decompositions",
    "export_onnx",
    "export_program",
    "set_spectral_impl",
    "spanet_base",
    "spanet_baseX",
    "spanet_medium",
    "spanet_mediumX",
    "spanet_small",
]
