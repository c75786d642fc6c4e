"""Feature maps of named modules through forward hooks, as ``(B, C, H, W)`` tensors, for any timm backbone.

:func:`default_modules` finds the token mixer of every block (the layers the
paper's Figs. 1 and 2 analyse):

| family | module hooked in each block |
| --- | --- |
| SPANet | the ``SPAM`` token mixer (:class:`spanet.models.SPAM`) |
| PoolFormer, ConvFormer, CAFormer (timm's MetaFormer) | ``token_mixer`` |
| ConvNeXt | the depthwise conv ``conv_dw`` |
| Swin (v1, v2) | the window attention ``attn``, windows merged back into the map |
| ViT (DeiT, ...) | the attention ``attn``, class/register tokens dropped |
| FocalNet | the focal modulation ``modulation`` |

Any other model falls back to its blocks (the blocks of each stage that timm's
``feature_info`` names, or a ``blocks`` sequence).

Outputs become ``(B, C, H, W)``: NHWC maps (models whose ``output_fmt`` is
``'NHWC'``, e.g. Swin) are permuted; token sequences ``(B, N, C)`` are laid out
on the patch grid (``patch_embed.dynamic_feat_size`` of the input, after the
model's ``num_prefix_tokens`` class/register tokens), or, for models without
a patch grid (CAFormer's attention stages), on the factorisation of ``N``
closest to the input's aspect ratio.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["collect_features", "default_modules", "stage_module_names", "to_feature_map", "token_grid"]

#: ``(module path, class name, attribute)``: the token mixer of each recognised block class.
_BLOCK_TOKEN_MIXERS: Tuple[Tuple[str, str, str], ...] = (
    ("timm.models.metaformer", "MetaFormerBlock", "token_mixer"),
    ("timm.models.convnext", "ConvNeXtBlock", "conv_dw"),
    ("timm.models.focalnet", "FocalNetBlock", "modulation"),
    ("timm.models.swin_transformer", "SwinTransformerBlock", "attn"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block", "attn"),
)
#: Block classes whose ``attn`` works on windows (merged back into the map by :func:`_merge_windows`).
_WINDOWED_BLOCKS = ("SwinTransformerBlock", "SwinTransformerV2Block")


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    window_block: Optional[nn.Module] = None  # the Swin block around a window attention


def _block_classes() -> List[Tuple[type, str]]:
    classes = []
    for module_path, class_name, attribute in _BLOCK_TOKEN_MIXERS:
        try:
            cls = getattr(importlib.import_module(module_path), class_name)
        except (ImportError, AttributeError):  # another timm version: that family is not recognised
            continue
        classes.append((cls, attribute))
    return classes


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "num_prefix_tokens") and isinstance(getattr(model, "blocks", None), nn.Sequential)


def _token_mixers(model: nn.Module) -> List[_Target]:
    from spanet.models import SPAM

    block_classes = _block_classes()
    vit_blocks = set(map(id, model.blocks)) if _is_vit(model) else set()
    targets: List[_Target] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SPAM):
            targets.append(_Target(name, module))
            continue
        for cls, attribute in block_classes:
            if isinstance(module, cls) and isinstance(getattr(module, attribute, None), nn.Module):
                windowed = type(module).__name__ in _WINDOWED_BLOCKS
                targets.append(_Target(prefix + attribute, getattr(module, attribute), module if windowed else None))
                break
        else:
            if id(module) in vit_blocks and isinstance(getattr(module, "attn", None), nn.Module):
                targets.append(_Target(prefix + "attn", module.attn))
    return targets


def stage_module_names(model: nn.Module) -> List[str]:
    """Names of the stage modules in ``model.feature_info`` (timm models), in order; empty without one."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name"):  # timm's FeatureInfo (features_only models)
        return [info.module_name(i) for i in range(len(info))]
    return [entry["module"] for entry in info if isinstance(entry, dict) and entry.get("module")]


def _blocks(model: nn.Module) -> List[_Target]:
    names: List[str] = []
    stage_names = stage_module_names(model) or (["blocks"] if hasattr(model, "blocks") else [])
    for stage_name in stage_names:
        stage = model.get_submodule(stage_name)
        container, prefix = stage, stage_name
        if isinstance(getattr(stage, "blocks", None), (nn.Sequential, nn.ModuleList)):
            container, prefix = stage.blocks, f"{stage_name}.blocks"
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            names += [f"{prefix}.{index}" for index in range(len(container))]
        else:
            names.append(stage_name)
    return [_Target(name, model.get_submodule(name)) for name in names]


def _default_targets(model: nn.Module) -> List[_Target]:
    targets = _token_mixers(model) or _blocks(model)
    if not targets:
        raise ValueError(
            f"no token mixers or blocks recognised in {type(model).__name__}; pass modules=[names] to choose layers"
        )
    return targets


def default_modules(model: nn.Module) -> List[str]:
    """Names of the modules :func:`collect_features` hooks by default: every block's token mixer, else the blocks.

    Raises ``ValueError`` for a model with neither (pass ``modules=`` to :func:`collect_features`).
    """
    return [t.name for t in _default_targets(model)]


def _resolve_targets(model: nn.Module, modules) -> List[_Target]:
    if modules is None:
        return _default_targets(model)
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    windowed = {id(t.module): t for t in _token_mixers(model) if t.window_block is not None}
    names_of = {id(m): n for n, m in model.named_modules()}
    targets: List[_Target] = []
    for entry in modules:
        if isinstance(entry, nn.Module):
            if id(entry) not in names_of:
                raise ValueError(f"a {type(entry).__name__} passed in modules is not part of the model")
            name = names_of[id(entry)]
        elif isinstance(entry, str):
            name = entry
        else:
            raise TypeError(f"modules must hold module names or modules, got a {type(entry).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module named {name!r}") from None
        window_block = windowed[id(module)].window_block if id(module) in windowed else None
        targets.append(_Target(name, module, window_block))
    if not targets:
        raise ValueError("modules is empty")
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("modules names a module twice")
    return targets


def token_grid(model: nn.Module, num_tokens: int, image_size: Tuple[int, int]) -> Tuple[int, int, int]:
    """``(prefix_tokens, grid_h, grid_w)`` of a token sequence of ``num_tokens`` from an input of ``image_size``.

    The model's patch grid for that input (``patch_embed.dynamic_feat_size``)
    after its ``num_prefix_tokens`` when they add up; otherwise no prefix and
    the factor pair of ``num_tokens`` whose ratio is closest to the input's.
    """
    patch_embed = getattr(model, "patch_embed", None)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid_h, grid_w = (int(v) for v in patch_embed.dynamic_feat_size(tuple(image_size)))
        if prefix + grid_h * grid_w == num_tokens:
            return prefix, grid_h, grid_w
    target = math.log(image_size[0] / image_size[1])
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    grid_h, grid_w = min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))
    return 0, grid_h, grid_w


def _merge_windows(windows: Tensor, block: nn.Module, height: int, width: int) -> Tensor:
    # The inverse of the block's own partition: windows (B*nW, wh*ww, C) -> padded map, crop, undo the shift.
    window_h, window_w = block.window_size
    channels = windows.shape[-1]
    padded_h, padded_w = -(-height // window_h) * window_h, -(-width // window_w) * window_w
    x = windows.reshape(-1, padded_h // window_h, padded_w // window_w, window_h, window_w, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, padded_h, padded_w, channels)[:, :height, :width]
    if any(block.shift_size):
        x = torch.roll(x, shifts=tuple(block.shift_size), dims=(1, 2))
    return x.permute(0, 3, 1, 2)


def to_feature_map(model: nn.Module, output: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """A module's output as a ``(B, C, H, W)`` map: NHWC permuted (``model.output_fmt == 'NHWC'``), tokens gridded."""
    if output.dim() == 4:
        return output.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else output
    if output.dim() == 3:
        batch, num_tokens, channels = output.shape
        prefix, grid_h, grid_w = token_grid(model, num_tokens, image_size)
        return output[:, prefix:].transpose(1, 2).reshape(batch, channels, grid_h, grid_w)
    raise ValueError(f"cannot read an output of shape {tuple(output.shape)} as a feature map")


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"a hooked module returned a {type(output).__name__}, not a tensor")


def forward_with_hooks(model: nn.Module, inputs: Tensor, handles: Sequence) -> None:
    """``model(inputs)`` in eval mode without grad for the hooks behind ``handles``, which are removed after;
    the model's training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def collect_features(
    model: nn.Module,
    images: Tensor,
    modules: Optional[Union[str, nn.Module, Iterable[Union[str, nn.Module]]]] = None,
) -> Dict[str, Tensor]:
    """Run ``model`` on ``images`` ``(B, 3, H, W)``; return ``{module name: (B, C, h, w) map}`` in the order they ran.

    Args:
        model: any timm (or other) model; it runs in eval mode, without gradients,
            and its training flag is restored afterwards.
        images: the preprocessed input batch (NCHW or channels_last).
        modules: names (or the modules) to hook; default :func:`default_modules`.

    The maps are detached and contiguous in NCHW, in the model's dtype. Works
    under ``torch.inference_mode()``. Raises ``ValueError`` if a module did not
    run, or ran more than once in the forward pass.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) batch, got {shape}")
    targets = _resolve_targets(model, modules)
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    features: Dict[str, Tensor] = {}
    window_sizes: Dict[int, Tuple[int, int]] = {}
    handles = []

    def record_window_size(block, args):
        window_sizes[id(block)] = (int(args[0].shape[1]), int(args[0].shape[2]))  # Swin blocks take (B, H, W, C)

    def make_hook(target: _Target):
        def hook(module, args, output):
            if target.name in features:
                raise ValueError(f"module {target.name!r} ran more than once in one forward pass; hook another one")
            out = _first_tensor(output).detach()
            if target.window_block is not None:
                height, width = window_sizes[id(target.window_block)]
                fmap = _merge_windows(out, target.window_block, height, width)
            else:
                fmap = to_feature_map(model, out, image_size)
            features[target.name] = fmap.contiguous()

        return hook

    for target in targets:
        if target.window_block is not None:
            handles.append(target.window_block.register_forward_pre_hook(record_window_size))
        handles.append(target.module.register_forward_hook(make_hook(target)))
    forward_with_hooks(model, images, handles)
    missing = [t.name for t in targets if t.name not in features]
    if missing:
        raise ValueError(f"modules {missing[:3]} did not run in the forward pass ({len(missing)} in all)")
    return features

