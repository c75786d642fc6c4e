"""Class activation maps of any timm classifier, through ``pytorch-grad-cam`` (pip ``grad-cam``).

The official SPANet repository ships a Score-CAM demo on ``network[-1]``; here
Grad-CAM (default), Grad-CAM++ or Score-CAM on any layer, by default the last
stage (the last module of the model's ``feature_info``: ``network.6`` for
SPANet, ``stages.3`` for ConvNeXt, ``layers.3`` for Swin, the last block for
ViT). NHWC and token outputs are laid out as maps with
:func:`spanet.analysis.features.to_feature_map`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .features import stage_module_names, to_feature_map

__all__ = ["CAM_METHODS", "ClassActivationMap", "class_activation_map", "default_cam_layer"]

#: ``method`` names and the ``pytorch_grad_cam`` classes they select.
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}


class ClassActivationMap(NamedTuple):
    """``maps`` ``(B, H, W)`` in [0, 1] at the input size, the explained ``classes`` and the ``layer`` name."""

    maps: Tensor
    classes: List[int]
    layer: str


def default_cam_layer(model: nn.Module) -> str:
    """The name of the last stage of ``model`` (the last module of its ``feature_info``)."""
    names = stage_module_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no feature_info to find its last stage; pass target_layer")
    return names[-1]


def class_activation_map(
    model: nn.Module,
    images: Tensor,
    *,
    target_layer: Optional[Union[str, nn.Module]] = None,
    targets: Optional[Sequence[int]] = None,
    method: str = "gradcam",
    batch_size: int = 32,
) -> ClassActivationMap:
    """CAMs of ``images`` ``(B, 3, H, W)`` for the classes ``targets`` (default: each image's top class).

    Args:
        model: a classifier; it runs in eval mode with gradients enabled. Its
            training flag and its parameters' ``.grad`` are restored afterwards.
        images: preprocessed batch (NCHW or channels_last).
        target_layer: a module name or module (default :func:`default_cam_layer`).
        targets: one class index per image.
        method: a key of :data:`CAM_METHODS`.
        batch_size: masked images per forward pass (Score-CAM only).

    Cannot run under ``torch.inference_mode()`` (the gradients are needed).
    """
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise ImportError("class activation maps need pytorch-grad-cam: pip install grad-cam") from exc
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(CAM_METHODS)}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) batch, got {shape}")
    if targets is not None and len(targets) != images.shape[0]:
        raise ValueError(f"targets has {len(targets)} classes for {images.shape[0]} images")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("class_activation_map needs gradients: call it outside torch.inference_mode()")
    if target_layer is None:
        target_layer = default_cam_layer(model)
    if isinstance(target_layer, str):
        layer_name = target_layer
        try:
            layer = model.get_submodule(target_layer)
        except AttributeError:
            raise ValueError(f"the model has no module named {target_layer!r}") from None
    else:
        layer = target_layer
        layer_name = next((n for n, m in model.named_modules() if m is layer), None)
        if layer_name is None:
            raise ValueError(f"the {type(layer).__name__} passed as target_layer is not part of the model")

    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    try:
        with torch.enable_grad(), cam_class(
            model=model, target_layers=[layer], reshape_transform=lambda t: to_feature_map(model, t, image_size)
        ) as cam:
            cam.batch_size = batch_size
            wanted = None if targets is None else [ClassifierOutputTarget(int(c)) for c in targets]
            maps = cam(input_tensor=images, targets=wanted)
            classes = [int(c) for c in targets] if targets is not None else cam.outputs.argmax(-1).tolist()
    finally:
        model.train(was_training)
        for param, grad in grads.items():
            param.grad = grad
    return ClassActivationMap(torch.from_numpy(maps).float(), classes, layer_name)
