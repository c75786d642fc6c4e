"""SPANet as a backbone for dense prediction: the four stage maps with the published per-stage norms.

:class:`SPANetBackbone` wraps a timm SPANet (``timm.create_model``), takes its
stage outputs with ``forward_intermediates`` and puts a one-group GroupNorm on
each, as the published dense-prediction backbone does (``fork_feat``). The
norms are named as there, after the index of the stage in ``network``:
``norm0``, ``norm2``, ``norm4``, ``norm6`` (strides 4, 8, 16, 32). A backbone
that skips the first stage (RetinaNet's, published with ``FORK_LAST3``) has no
``norm0``.

:class:`SPANetFPN` puts torchvision's ``FeaturePyramidNetwork`` on it, with the
structure torchvision's detectors expect of a backbone (``body``, ``fpn``, an
integer ``out_channels``; maps named ``"0"``, ``"1"``, ... as
``IntermediateLayerGetter`` names them).

State dict of a backbone: ``trunk.patch_embed.*`` and ``trunk.network.*`` (the
classification layout under ``trunk.``) plus ``norm{0,2,4,6}.*``.
:func:`load_backbone_weights` reads an ImageNet classification checkpoint (ours
or the published file; ``head.*`` and ``norm.*`` are ignored, every other key
must be there and fit), the backbone of a published mmdetection/mmsegmentation
checkpoint (keys ``backbone.patch_embed.*``, ``backbone.network.*``,
``backbone.norm{i}.*``; the neck and heads are ignored) or a spanet-dense
checkpoint.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "SPANetBackbone",
    "SPANetFPN",
    "backbone",
    "backbone_with_fpn",
    "load_backbone_weights",
    "published_norm_name",
]

#: Units of :meth:`SPANetBackbone.set_trainable_layers`, from the input up (the stem, then the four stages).
NUM_TRAINABLE_UNITS = 5


def published_norm_name(stage: int) -> str:
    """Name of the output norm of stage ``stage`` (0-3) in the published dense backbone: ``norm{2 * stage}``."""
    return f"norm{2 * stage}"


class SPANetBackbone(nn.Module):
    """Stage maps of a SPANet, each through a one-group GroupNorm (published ``fork_feat`` backbone).

    Args:
        trunk: a timm SPANet (``timm.create_model("spanet_*")``); its classifier
            and head norm are removed (``prune_intermediate_layers``).
        out_indices: stages to return (0-3; strides 4, 8, 16, 32).
        out_norms: put the published GroupNorm on each returned map.
        channels_last: run the trunk on channels_last maps (faster on the CPU).

    ``forward(images)`` returns an ``OrderedDict`` ``{"0": map, "1": map, ...}``
    in the order of ``out_indices``; ``out_channels_list`` and ``strides`` give
    their channels and strides.
    """

    def __init__(
        self,
        trunk: nn.Module,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        out_norms: bool = True,
        channels_last: bool = False,
    ):
        super().__init__()
        if not hasattr(trunk, "forward_intermediates") or not hasattr(trunk, "feature_info"):
            raise TypeError(f"trunk must be a timm SPANet with forward_intermediates, got {type(trunk).__name__}")
        num_stages = len(trunk.feature_info)
        out_indices = [int(i) for i in out_indices]
        in_range = all(0 <= i < num_stages for i in out_indices)
        if not out_indices or sorted(set(out_indices)) != out_indices or not in_range:
            raise ValueError(f"out_indices must be increasing stage indices in 0..{num_stages - 1}, got {out_indices}")
        info = [dict(trunk.feature_info[i]) for i in out_indices]
        trunk.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        self.trunk = trunk
        self.out_indices = out_indices
        self.out_norms = bool(out_norms)
        self.channels_last = bool(channels_last)
        self.out_channels_list: List[int] = [int(f["num_chs"]) for f in info]
        self.strides: List[int] = [int(f["reduction"]) for f in info]
        self.norm_names: List[str] = []
        if self.out_norms:
            for stage, channels in zip(out_indices, self.out_channels_list):
                name = published_norm_name(stage)
                self.add_module(name, nn.GroupNorm(1, channels))
                self.norm_names.append(name)
        self.trainable_layers = NUM_TRAINABLE_UNITS

    def trainable_units(self) -> List[List[nn.Module]]:
        """The stem and the four stages (each with the downsampling conv before it), from the input up."""
        network = self.trunk.network
        units: List[List[nn.Module]] = [[self.trunk.patch_embed]]
        for stage in range(len(network) // 2 + 1):
            units.append([network[2 * stage - 1], network[2 * stage]] if stage > 0 else [network[0]])
        return units

    def set_trainable_layers(self, trainable_layers: int) -> "SPANetBackbone":
        """Train only the last ``trainable_layers`` of the stem and the four stages (torchvision's convention).

        5 trains everything, 3 freezes the stem and the first stage, 0 freezes
        the whole trunk. The output norms are new layers and always train.
        Returns the backbone.
        """
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
            raise TypeError(f"trainable_layers must be an int, got {type(trainable_layers).__name__}")
        units = self.trainable_units()
        if not 0 <= trainable_layers <= len(units):
            raise ValueError(f"trainable_layers must be in 0..{len(units)}, got {trainable_layers}")
        for index, unit in enumerate(units):
            train = index >= len(units) - trainable_layers
            for module in unit:
                module.requires_grad_(train)
        self.trainable_layers = trainable_layers
        return self

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.trunk.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        for position, feature in enumerate(maps):
            if self.out_norms:
                feature = getattr(self, self.norm_names[position])(feature)
            out[str(position)] = feature
        return out


class SPANetFPN(nn.Module):
    """A :class:`SPANetBackbone` (``body``) and torchvision's ``FeaturePyramidNetwork`` (``fpn``).

    The backbone structure torchvision's detectors take: ``out_channels`` is the
    FPN width; ``forward`` returns the FPN maps ``"0"``, ``"1"``, ... and those
    of ``extra_blocks`` (``"pool"`` for ``LastLevelMaxPool``, ``"p6"``/``"p7"``
    for ``LastLevelP6P7``).
    """

    def __init__(self, body: SPANetBackbone, out_channels: int = 256, extra_blocks: Optional[nn.Module] = None):
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        if not isinstance(body, SPANetBackbone):
            raise TypeError(f"body must be a SPANetBackbone, got {type(body).__name__}")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def backbone(
    name: str = "spanet_small",
    *,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    out_norms: bool = True,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    trainable_layers: Optional[int] = None,
    channels_last: bool = False,
    **model_kwargs: Any,
) -> SPANetBackbone:
    """A SPANet dense-prediction backbone: stage maps (strides 4/8/16/32) with the published norms.

    Args:
        name: a registered SPANet variant (``spanet_small``, ..., ``spanet_baseX``).
        out_indices: stages to return.
        out_norms: the published per-stage GroupNorm on each map.
        pretrained: start from timm's pretrained (ImageNet) weights; a local
            file is given with ``pretrained_cfg_overlay=dict(file=...)``.
        checkpoint: a weights file read by :func:`load_backbone_weights`
            (classification, published dense or spanet-dense checkpoint).
        trainable_layers: how many of the stem and four stages train (0-5;
            torchvision's ``trainable_backbone_layers``). Default: 3 when
            weights are loaded (torchvision's default), else 5 (all).
        channels_last: run the trunk on channels_last maps (faster on the CPU).
        model_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``spectral_impl``, ...).
    """
    import timm

    from .. import models  # noqa: F401  (registers the spanet_* variants)

    if not isinstance(name, str) or not name.startswith("spanet") or not timm.is_model(name):
        raise ValueError(f"unknown SPANet variant {name!r}; expected one of {', '.join(models.spanet.MODEL_CONFIGS)}")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    model_kwargs.pop("num_classes", None)
    trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    net = SPANetBackbone(trunk, out_indices=out_indices, out_norms=out_norms, channels_last=channels_last)
    if checkpoint is not None:
        load_backbone_weights(net, checkpoint)
    if trainable_layers is None:
        trainable_layers = 3 if (pretrained or checkpoint is not None) else NUM_TRAINABLE_UNITS
    return net.set_trainable_layers(trainable_layers)


def backbone_with_fpn(
    name: str = "spanet_small",
    *,
    fpn_channels: int = 256,
    extra_blocks: Optional[nn.Module] = None,
    **backbone_kwargs: Any,
) -> SPANetFPN:
    """:func:`backbone` with torchvision's FPN on it (``fpn_channels`` wide), as torchvision's detectors take."""
    return SPANetFPN(backbone(name, **backbone_kwargs), fpn_channels, extra_blocks)


# ------------------------------------------------------------------------------------------- weights
_TRUNK_PREFIXES = ("patch_embed.", "network.")
_CLASSIFIER_PREFIXES = ("head.", "norm.")


def _read_state_dict(path: str) -> Dict[str, Tensor]:
    """The weights of a checkpoint file, with a spanet-dense checkpoint's backbone put in the published layout."""
    from ..checkpoint import CheckpointError, extract_state_dict, load_checkpoint, read_safetensors
    from .engine import FORMAT as DENSE_FORMAT

    if path.endswith(".safetensors"):
        return read_safetensors(path)[0]
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == DENSE_FORMAT:  # our models: backbone.body.{trunk.*, norm*}
        prefix = "backbone.body."
        own = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        if not own:
            raise CheckpointError(f"checkpoint {path!r} holds no SPANet backbone")
        return {"backbone." + (k[len("trunk."):] if k.startswith("trunk.") else k): v for k, v in own.items()}
    # spanet-train, timm, DeiT/MetaFormer and mmdetection/mmsegmentation ("state_dict") containers.
    return extract_state_dict(obj, path)


def _to_backbone_keys(sd: Mapping[str, Tensor], net: SPANetBackbone, path: str) -> "tuple[Dict[str, Tensor], str]":
    """Map a checkpoint's keys onto ``net``'s; returns them and the kind of checkpoint."""
    from ..checkpoint import CheckpointError

    if any(k.startswith("backbone.") for k in sd):
        kind = "dense"
        source = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        kind = "classification"
        source = {k: v for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    mapped: Dict[str, Tensor] = {}
    unexpected = []
    for key, value in source.items():
        if key.startswith(_TRUNK_PREFIXES):
            mapped["trunk." + key] = value
        elif kind == "dense" and key.split(".")[0] in net.norm_names:
            mapped[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the {kind} layout of a SPANet backbone: {len(unexpected)} "
            f"unexpected keys, e.g. {unexpected[:3]}"
        )
    return mapped, kind


def load_backbone_weights(net: SPANetBackbone, path: str) -> Dict[str, Any]:
    """Load a checkpoint file into the backbone ``net``; strict on every backbone key.

    * classification (a timm/spanet-train/published ImageNet checkpoint): the
      trunk's keys must all be there and fit; ``head.*`` and ``norm.*`` are
      ignored and the output norms keep their initial values;
    * published dense (keys ``backbone.*``, from mmdetection/mmsegmentation):
      the trunk's and the output norms' keys must all be there; the other keys
      (neck, heads) are ignored;
    * a spanet-dense checkpoint: its backbone, all keys.

    ``.pth`` files (any container :func:`spanet.checkpoint.extract_state_dict`
    unwraps) and ``.safetensors`` files are read.

    The published ``sps.{i}.filter`` tensors hold no learned value and may be
    absent (the dense checkpoints have none). Returns ``{"kind": ...,
    "initialised": [backbone keys the file did not hold]}``; raises
    :class:`spanet.checkpoint.CheckpointError` naming the file otherwise, with
    ``net`` untouched.
    """
    from ..checkpoint import CheckpointError, check_finite

    if not isinstance(net, SPANetBackbone):
        raise TypeError(f"net must be a SPANetBackbone, got {type(net).__name__}")
    sd = _read_state_dict(path)
    check_finite(sd, path)
    mapped, kind = _to_backbone_keys(sd, net, path)
    from_file = set(mapped)
    # The published dense checkpoints hold no `sps.{i}.filter` tensors (fixed masks, no learned value): take the
    # backbone's own; every other key is checked below, with this loader's messages.
    own = net.state_dict()
    mapped.update({k: v for k, v in own.items() if k.startswith("trunk.") and k.endswith(".filter") and k not in mapped})
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs backbone {tuple(own[k].shape)}"
                  for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the backbone ({len(mismatched)} shape mismatches, e.g. "
            f"{mismatched[0]}); check the variant name"
        )
    optional = set(net.norm_names) if kind == "classification" else set()
    missing = [k for k in own if k not in mapped and k.split(".")[0] not in optional]
    if missing:
        raise CheckpointError(
            f"checkpoint {path!r} lacks {len(missing)} keys of the backbone, e.g. {missing[:3]}; check the variant "
            "name (and out_indices/out_norms for a dense checkpoint)"
        )
    net.load_state_dict(mapped, strict=False)
    return {"kind": kind, "initialised": sorted(k for k in own if k not in from_file)}
