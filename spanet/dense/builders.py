"""Detectors and a segmenter on SPANet backbones, built from torchvision's models.

* :func:`fasterrcnn`, :func:`maskrcnn`: torchvision's ``FasterRCNN``/``MaskRCNN``
  on the four SPANet maps plus an FPN with the extra max-pooled level
  (``LastLevelMaxPool``, P2-P6), as the published Mask R-CNN config
  (``num_outs=5``) and torchvision's ``*_resnet50_fpn`` do.
* :func:`retinanet`: torchvision's ``RetinaNet`` on the last three maps, with
  P6/P7 convolved from the last backbone map (``LastLevelP6P7``; the published
  config's ``start_level=1``, ``add_extra_convs='on_input'``), hence a backbone
  without ``norm0`` (the published ``FORK_LAST3``).
* :func:`semantic_fpn`: :class:`SemanticFPN`, an FPN on the four maps and the
  semantic head of Panoptic FPN, the setup of the paper's ADE20K results.

Each builder takes ``num_classes``, the backbone's arguments
(:func:`spanet.dense.backbone.backbone`: ``name``, ``pretrained``,
``checkpoint``, ``trainable_layers``, ``channels_last``, timm kwargs) and the
keyword arguments of the torchvision model (``min_size``, ``max_size``,
``box_batch_size_per_image``, ...). The detectors train and evaluate exactly as
torchvision's: ``model(images, targets)`` returns the loss dict in training,
``model(images)`` the detections in eval mode; images are float tensors in
[0, 1], normalised inside with the ImageNet mean/std.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backbone import SPANetBackbone, SPANetFPN, backbone

__all__ = ["fasterrcnn", "maskrcnn", "retinanet", "semantic_fpn", "SemanticFPN", "SemanticFPNHead", "ARCHS"]

_BACKBONE_ARGS = ("pretrained", "checkpoint", "trainable_layers", "channels_last", "out_norms")


def _split_kwargs(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    # timm kwargs of the trunk travel in model_kwargs; backbone switches by name; the rest go to torchvision.
    backbone_kwargs = {k: kwargs.pop(k) for k in _BACKBONE_ARGS if k in kwargs}
    backbone_kwargs.update(kwargs.pop("model_kwargs", None) or {})
    return backbone_kwargs, kwargs


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (the classes plus background), got {num_classes!r}")
    return num_classes


def _image_stats(body: SPANetBackbone) -> Dict[str, Any]:
    cfg = getattr(body.trunk, "pretrained_cfg", {}) or {}
    return {"image_mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
            "image_std": list(cfg.get("std", (0.229, 0.224, 0.225)))}


def _anchor_generator(anchor_sizes: Optional[Sequence[float]], octaves: int, levels: int):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if anchor_sizes is None:
        return None
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one base size per pyramid level ({levels}), got {list(anchor_sizes)}")
    sizes = tuple(tuple(int(s * 2 ** (k / octaves)) for k in range(octaves)) for s in anchor_sizes)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def _rcnn(num_classes: int, name: str, fpn_channels: int, anchor_sizes, representation_size: int,
          mask_layers: Optional[Sequence[int]], kwargs: Dict[str, Any]):
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    num_classes = _check_num_classes(num_classes)
    backbone_kwargs, detector_kwargs = _split_kwargs(dict(kwargs))
    net = SPANetFPN(backbone(name, **backbone_kwargs), fpn_channels, LastLevelMaxPool())
    for key, value in _image_stats(net.body).items():
        detector_kwargs.setdefault(key, value)
    generator = _anchor_generator(anchor_sizes, 1, 5)
    if generator is not None:
        detector_kwargs.setdefault("rpn_anchor_generator", generator)
    # torchvision's own heads (box RoIs pooled to 7x7, mask RoIs to 14x14), with their widths as arguments.
    if "box_head" not in detector_kwargs and "box_predictor" not in detector_kwargs:
        detector_kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
    if mask_layers is not None and "mask_head" not in detector_kwargs and "mask_predictor" not in detector_kwargs:
        detector_kwargs["mask_head"] = MaskRCNNHeads(fpn_channels, list(mask_layers), 1)
        detector_kwargs["mask_predictor"] = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes)
    # torchvision takes num_classes only when it builds the predictors itself.
    has_predictor = any(k in detector_kwargs for k in ("box_predictor", "mask_predictor"))
    cls = FasterRCNN if mask_layers is None else MaskRCNN
    return cls(net, num_classes=None if has_predictor else num_classes, **detector_kwargs)


def fasterrcnn(num_classes: int, name: str = "spanet_small", *, fpn_channels: int = 256,
               anchor_sizes: Optional[Sequence[float]] = None, representation_size: int = 1024, **kwargs: Any):
    """torchvision ``FasterRCNN`` on a SPANet + FPN (P2-P6).

    Args:
        num_classes: classes including the background (COCO: 81).
        name: SPANet variant.
        fpn_channels: FPN width (published and torchvision: 256).
        anchor_sizes: one anchor size per level P2-P6 (torchvision: 32, 64, 128, 256, 512).
        representation_size: width of the box head's two fully connected layers (torchvision: 1024).
        kwargs: :func:`~spanet.dense.backbone.backbone` arguments (``pretrained``,
            ``checkpoint``, ``trainable_layers``, ``channels_last``, ``out_norms``,
            ``model_kwargs`` for timm) and ``FasterRCNN`` keyword arguments.
    """
    return _rcnn(num_classes, name, fpn_channels, anchor_sizes, representation_size, None, kwargs)


def maskrcnn(num_classes: int, name: str = "spanet_small", *, fpn_channels: int = 256,
             anchor_sizes: Optional[Sequence[float]] = None, representation_size: int = 1024,
             mask_layers: Sequence[int] = (256, 256, 256, 256), **kwargs: Any):
    """torchvision ``MaskRCNN`` on a SPANet + FPN (P2-P6).

    ``mask_layers``: widths of the mask head's 3x3 convs (torchvision: four of
    256); the mask predictor's deconvolution is as wide as the last. Other
    arguments as :func:`fasterrcnn`.
    """
    if not mask_layers or not all(isinstance(c, int) and c > 0 for c in mask_layers):
        raise ValueError(f"mask_layers must be positive ints, got {mask_layers!r}")
    return _rcnn(num_classes, name, fpn_channels, anchor_sizes, representation_size, mask_layers, kwargs)


def retinanet(num_classes: int, name: str = "spanet_small", *, fpn_channels: int = 256,
              anchor_sizes: Optional[Sequence[float]] = None, **kwargs: Any):
    """torchvision ``RetinaNet`` on the last three SPANet maps + FPN with P6/P7 from the last map (P3-P7).

    The backbone has no ``norm0`` (the published RetinaNet backbone's stride-4
    norm is an identity). ``anchor_sizes``: one base size per level P3-P7,
    each with 3 octave scales (torchvision and the published config: 32-512).
    ``num_classes`` counts the background as for the other builders (COCO: 81),
    so a class index means the same in every model. Other arguments as
    :func:`fasterrcnn`.
    """
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    num_classes = _check_num_classes(num_classes)
    backbone_kwargs, detector_kwargs = _split_kwargs(dict(kwargs))
    backbone_kwargs.setdefault("out_indices", (1, 2, 3))
    body = backbone(name, **backbone_kwargs)
    net = SPANetFPN(body, fpn_channels, LastLevelP6P7(body.out_channels_list[-1], fpn_channels))
    for key, value in _image_stats(body).items():
        detector_kwargs.setdefault(key, value)
    generator = _anchor_generator(anchor_sizes, 3, 5)
    if generator is not None:
        detector_kwargs.setdefault("anchor_generator", generator)
    return RetinaNet(net, num_classes, **detector_kwargs)


class SemanticFPNHead(nn.Module):
    """The semantic head of Panoptic FPN (Kirillov et al., 2019).

    Each FPN level at stride ``4 * 2**k`` goes through ``max(1, k)`` blocks of
    3x3 conv (``channels`` wide), GroupNorm(32), ReLU and, except at stride 4,
    2x bilinear upsampling; the levels are summed at stride 4, then dropout
    and a 1x1 classifier give the logits at 1/4 of the input.
    """

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int], channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        if list(strides) != sorted(strides) or strides[0] <= 0:
            raise ValueError(f"strides must increase from the finest level, got {list(strides)}")
        self.strides = [int(s) for s in strides]
        self.scale_heads = nn.ModuleList()
        for stride in self.strides:
            steps = max(1, int(round(math.log2(stride / self.strides[0]))))
            layers = []
            for k in range(steps):
                layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
                if stride != self.strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        out = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:]):
            level = head(feature)
            if level.shape[-2:] != out.shape[-2:]:  # odd input sizes: align to the finest level
                level = F.interpolate(level, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + level
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Semantic FPN: SPANet + FPN + :class:`SemanticFPNHead`, logits upsampled to the input size.

    ``forward(images)`` takes float images ``(B, 3, H, W)`` in [0, 1] (normalised
    inside with ``image_mean``/``image_std``, as torchvision's detectors do) and
    returns ``OrderedDict(out=logits)`` with logits ``(B, num_classes, H, W)``,
    as torchvision's segmentation models do; train with cross-entropy on it.
    """

    def __init__(self, backbone: SPANetFPN, num_classes: int, head_channels: int = 128, dropout: float = 0.1,
                 image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 image_std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = SemanticFPNHead(backbone.out_channels, num_classes, backbone.body.strides, head_channels, dropout)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        if images.dim() != 4 or images.shape[1] != self.image_mean.shape[1]:
            raise ValueError(f"images must be (B, {self.image_mean.shape[1]}, H, W), got {tuple(images.shape)}")
        x = (images - self.image_mean) / self.image_std
        features = list(self.backbone(x).values())
        logits = self.head(features)
        return OrderedDict(out=F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False))


def semantic_fpn(num_classes: int, name: str = "spanet_small", *, fpn_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1, **kwargs: Any) -> SemanticFPN:
    """:class:`SemanticFPN` on a SPANet: FPN (``fpn_channels``) on the four maps, Panoptic FPN's semantic head.

    ``num_classes``: the classes predicted (ADE20K: 150; the ignored label 255
    is not a class). ``kwargs``: the backbone's arguments (see :func:`fasterrcnn`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    backbone_kwargs, rest = _split_kwargs(dict(kwargs))
    if rest:
        raise TypeError(f"semantic_fpn got unexpected arguments {sorted(rest)}")
    net = SPANetFPN(backbone(name, **backbone_kwargs), fpn_channels)
    stats = _image_stats(net.body)
    return SemanticFPN(net, num_classes, head_channels, dropout, stats["image_mean"], stats["image_std"])


#: The builder of each ``--arch``.
ARCHS = {"fasterrcnn": fasterrcnn, "maskrcnn": maskrcnn, "retinanet": retinanet, "semantic_fpn": semantic_fpn}
