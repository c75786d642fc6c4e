"""The public operators of :mod:`spanet_ops`."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .masks import LamLike, lam_tensor
from .validation import check_algorithm, check_lam_values, check_radius


def spectral_mask_filter(x: Tensor, mask: Tensor, *, centered: bool = True, algorithm: str = "auto") -> Tensor:
    """Filter ``x`` in the frequency domain with a real mask, exactly and differentiably.

    Computes ``Re(ifft2(ifftshift(mask * fftshift(fft2(x, norm="ortho"))), norm="ortho"))``
    (with ``centered=False`` the shifts are dropped and ``mask`` is in the
    natural DFT layout).

    Args:
        x: real ``(..., H, W)`` tensor, float64/32/16 or bfloat16, any strides.
            Half precision is computed in float32.
        mask: real tensor broadcastable to ``x`` with spatial size ``(H, W)``,
            e.g. ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``; any real values.
            Its dtype need not match ``x``'s. Differentiable.
        centered: whether ``mask`` is in the centred (fftshifted) layout.
        algorithm: ``"auto"`` (default: ``"lowrank"`` when the mask is a
            constant plus a few bins, else ``"fft"``), ``"fft"``, ``"lowrank"``
            or ``"reference"``. Every choice is exact.

    Returns:
        A contiguous tensor of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` or ``mask`` not real floating.
        ValueError: fewer than 2 dims, a mask of the wrong spatial size or not
            broadcastable to ``x``, or an unknown ``algorithm``.
    """
    # Validation happens in the op (eagerly) and in its fake kernel (while tracing).
    return ops.spectral_mask_filter_op(x, mask, bool(centered), algorithm)


def spectral_pooling_filter(x: Tensor, radius: float, lam: LamLike, *, algorithm: str = "auto") -> Tensor:
    """The published spectral pooling filter (SPF) of ``x`` ``(..., C, H, W)`` at any ``H, W``.

    Equivalent to ``spectral_mask_filter(x, circular_mask(H, W, radius, lam))``
    without building a mask.

    Args:
        x: real ``(..., H, W)`` tensor (in the models ``(B, C, H, W)``).
        radius: non-negative disc radius in bins.
        lam: balance in ``[0, 1]``: a float, or per channel a sequence or
            tensor ``(C,)`` with ``C = x.shape[-3]``. A tensor ``lam`` that
            requires grad receives a gradient.
        algorithm: as in :func:`spectral_mask_filter`.
    """
    check_radius(radius)
    check_algorithm(algorithm)
    lam_t = lam if isinstance(lam, Tensor) and lam.requires_grad else lam_tensor(lam, device=x.device)
    if isinstance(lam, Tensor) and not torch.compiler.is_compiling():
        check_lam_values(lam_t)
    return ops.spectral_pooling_filter_op(x, lam_t, float(radius), algorithm)


def chunk_sizes(channels: int, chunks: int = 3) -> list:
    """Channel counts of ``torch.chunk(x, chunks, dim=1)`` for ``channels`` channels (e.g. 64 -> 22, 22, 20)."""
    size = -(-channels // chunks)
    return [min(size, channels - start) for start in range(0, channels, size)]


def channel_lams(lams: Union[Sequence[float], Tensor], channels: int) -> Tensor:
    """Per-channel float32 balances ``(C,)`` from per-chunk ones, chunked as ``torch.chunk`` does.

    As in the published ``zip(chunks, filters)``, chunks beyond the number of
    balances do not exist (``torch.chunk`` may return fewer chunks than asked).
    """
    lam_t = lam_tensor(lams).reshape(-1)
    sizes = chunk_sizes(channels, lam_t.numel())
    if len(sizes) != lam_t.numel():
        raise ValueError(
            f"{channels} channels split by torch.chunk into {len(sizes)} chunks, not {lam_t.numel()}: "
            "choose a channel count that gives one chunk per balance"
        )
    return torch.repeat_interleave(lam_t, torch.tensor(sizes, device=lam_t.device))


def spg_aggregate(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lams: Union[Sequence[float], Tensor] = (0.7, 0.8, 0.9),
    radius: float = 2.0,
    *,
    algorithm: str = "auto",
) -> Tensor:
    """The fused split-SPG aggregation of SPAM (SPEC §2), exact to the published composition.

    Equal to ``sum_i conv1x1_i(SPF_{radius, lams[i]}(chunk_i(x)))`` with
    ``torch.chunk(x, len(lams), dim=1)``, computed as one 1x1 conv with the
    concatenated weights plus a low-rank spectral correction in coefficient
    space.

    Args:
        x: ``(B, C, H, W)``.
        weight: the concatenated 1x1 weights ``(C_out, C)`` or ``(C_out, C, 1, 1)``.
        bias: the summed biases ``(C_out,)``, or None.
        lams: one balance per chunk (published: 0.7, 0.8, 0.9), or a
            per-channel tensor ``(C,)``.
        radius: the stage's SPF radius.
        algorithm: ``"auto"``, ``"lowrank"`` (fused), ``"fft"`` (filter then
            conv) or ``"reference"``.

    Returns:
        ``ctx`` ``(B, C_out, H, W)`` in ``x``'s dtype. Differentiable in ``x``,
        ``weight`` and ``bias``.
    """
    check_radius(radius)
    check_algorithm(algorithm)
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"weight must be a 1x1 conv weight, got shape {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(lams, Tensor) and lams.dim() == 1 and lams.numel() == x.shape[1]:
        lam_c = lam_tensor(lams)  # already per channel (for C == 3 both readings agree)
    else:
        lam_c = channel_lams(lams, x.shape[1])
    lam_c = lam_c.to(device=x.device)
    if isinstance(lams, Tensor) and not torch.compiler.is_compiling():
        check_lam_values(lam_c)
    if lam_c.requires_grad:
        raise ValueError("spg_aggregate's balances are fixed (not differentiable); pass a tensor without grad")
    return ops.spg_aggregate_op(x, weight, bias, lam_c, float(radius), algorithm)
