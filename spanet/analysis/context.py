"""SPAM's context map over the input image (the paper's Fig. 4)."""
from __future__ import annotations

from typing import List, NamedTuple, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .features import forward_with_hooks

__all__ = ["ContextMap", "context_map", "spam_blocks"]


class ContextMap(NamedTuple):
    """``context``: mean ``|ctx|`` over channels, upsampled to the image (``(H, W)`` or ``(B, H, W)``); ``image``."""

    context: Tensor
    image: Tensor


def spam_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, SPAM)`` of every SPAM token mixer of ``model``, in forward order; empty for other models."""
    from spanet.models import SPAM

    return [(name, module) for name, module in model.named_modules() if isinstance(module, SPAM)]


def context_map(model: nn.Module, image: Tensor, block: Union[int, str] = -1) -> ContextMap:
    """The split-SPG context of one SPAM block of a SPANet ``model`` over ``image``.

    Args:
        model: a SPANet (any model holding :class:`spanet.models.SPAM` token mixers);
            it runs in eval mode without gradients, its training flag is restored.
        image: a preprocessed image ``(3, H, W)`` or batch ``(B, 3, H, W)``.
        block: index into :func:`spam_blocks` (default ``-1``, the last block) or a SPAM's module name.

    ``ctx = SPAM.context(SPAM.conv(SPAM.proj_in(x)))`` for the block's input ``x``
    (captured by a forward hook), reduced to the mean of ``|ctx|`` over channels and
    upsampled (bilinear) to ``H x W``. Returns :class:`ContextMap`, whose ``context``
    has no batch dimension when ``image`` has none.
    """
    blocks = spam_blocks(model)
    if not blocks:
        raise ValueError(f"context_map needs a SPANet: {type(model).__name__} has no SPAM token mixer")
    if not isinstance(image, Tensor) or image.dim() not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be (3, H, W) or (B, 3, H, W), got {shape}")
    names = [name for name, _ in blocks]
    if isinstance(block, str):
        if block not in names:
            raise ValueError(f"{block!r} is not a SPAM block; SPAM blocks: {names[0]} ... {names[-1]}")
        spam = blocks[names.index(block)][1]
    elif isinstance(block, int) and not isinstance(block, bool):
        if not -len(blocks) <= block < len(blocks):
            raise ValueError(f"block {block} is out of range: the model has {len(blocks)} SPAM blocks")
        spam = blocks[block][1]
    else:
        raise TypeError(f"block must be an int index or a module name, got {type(block).__name__}")

    batch = image if image.dim() == 4 else image.unsqueeze(0)
    captured = {}

    def hook(module, args, output):
        x = args[0]
        captured["context"] = module.context(module.conv(module.proj_in(x)))

    forward_with_hooks(model, batch, [spam.register_forward_hook(hook)])
    reduced = captured["context"].float().abs().mean(dim=1, keepdim=True)
    context = F.interpolate(reduced, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return ContextMap(context if image.dim() == 4 else context[0], image)
