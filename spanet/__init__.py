"""spanet: the five published SPANet variants, timm-native, fast through spanet_ops."""
__version__ = "0.1.0"
