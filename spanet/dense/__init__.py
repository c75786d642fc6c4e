"""spanet.dense: SPANet backbones for torchvision detection and segmentation models.

* :func:`backbone`: the four stage maps (strides 4/8/16/32) with the published
  per-stage GroupNorms, loading ImageNet classification checkpoints and the
  backbone of published dense-prediction checkpoints;
* :func:`fasterrcnn`, :func:`maskrcnn`, :func:`retinanet` (torchvision's
  detectors with an FPN on SPANet) and :func:`semantic_fpn` (FPN plus Panoptic
  FPN's semantic head);
* ``spanet-dense`` / ``python -m spanet.dense`` (:mod:`spanet.dense.cli`):
  training and evaluation on COCO-format, ADE20K-style or the embedded
  synthetic shapes data.
"""
from .backbone import SPANetBackbone, SPANetFPN, backbone, backbone_with_fpn, load_backbone_weights
from .builders import SemanticFPN, fasterrcnn, maskrcnn, retinanet, semantic_fpn

__all__ = [
    "SPANetBackbone",
    "SPANetFPN",
    "SemanticFPN",
    "backbone",
    "backbone_with_fpn",
    "load_backbone_weights",
    "fasterrcnn",
    "maskrcnn",
    "retinanet",
    "semantic_fpn",
]
