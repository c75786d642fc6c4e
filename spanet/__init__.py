"""spanet: the five published SPANet variants, timm-native, fast through spanet_ops.

``import spanet`` registers spanet_small, spanet_medium, spanet_mediumX,
spanet_base and spanet_baseX in timm's registry, so
``timm.create_model("spanet_small", num_classes=10)`` works.
"""
from . import models
from .models import SPANet, set_spectral_impl

__version__ = "0.1.0"

__all__ = ["SPANet", "models", "set_spectral_impl", "__version__"]
