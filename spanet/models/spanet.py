"""SPANet: the five published variants (ICCV 2023), native to timm, fast through :mod:`spanet_ops`.

Paper: *SPANet: Frequency-balancing Token Mixer using Spectral Pooling
Aggregation Modulation* (Yun et al., ICCV 2023, arXiv:2308.11568).
Official code and weights: https://github.com/DoranLyong/SPANet-official

Layout. The modules are named exactly as in the published code, so published
checkpoints load with ``strict=True`` and state dicts saved here load into the
published code: ``patch_embed.proj``, ``network.{0..6}`` (stages at the even
indices, downsampling convs at the odd ones), ``norm`` and ``head``. Each SPAM
keeps the published ``token_mixer.sps.{i}.filter`` tensors ``(1, H0, W0)``
(the centred circular masks at 224) as non-trainable buffers: they exist only
so checkpoints load; the filter at any input size follows SPEC §1 and is
computed by :mod:`spanet_ops` from the stage's radius and balances.

Speed. SPAM's context ``sum_i pw_i(SPF_{r, lam_i}(chunk_i(x)))`` is one call of
:func:`spanet_ops.spg_aggregate` (concatenated ``pws`` weights, summed biases,
per-channel balances: one 1x1 conv plus a low-rank spectral correction). The
``spectral_impl`` switch selects the published per-chunk
``fft2 -> fftshift -> mask -> ifftshift -> ifft2`` path instead, for
comparison (see :func:`set_spectral_impl`).
"""

import re
import urllib.error
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import spanet_ops
from spanet_ops import reference as spanet_reference
from spanet_ops.backends import native_module
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, GroupNorm1, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ["SPANet", "SPAM", "SPANetBlock", "PointwiseConv", "RowDepthwiseConv", "ConvMlp", "SPECTRAL_IMPLS", "set_spectral_impl", "checkpoint_filter_fn"]

#: ``torch.arange(0.7, 0.9, 0.1)`` of the published code: float32 0.7, 0.8, 0.9 (exact as Python floats).
PUBLISHED_LAMS: Tuple[float, ...] = tuple(float(v) for v in torch.arange(0.7, 0.9, 0.1))
#: Input size the published filter tensors were built for.
PUBLISHED_IMG_SIZE = 224

#: ``spectral_impl`` values: ``fused`` (default) and ``lowrank``/``fft`` run :func:`spanet_ops.spg_aggregate`
#: (``fused`` lets it choose the algorithm); ``reference`` is the published per-chunk FFT path.
SPECTRAL_IMPLS = ("fused", "lowrank", "fft", "reference")

_RELEASE_URL = "https://github.com/DoranLyong/SPANet-official/releases/download/ImageNet-pretrained/"


def _check_spectral_impl(impl: str) -> str:
    if impl not in SPECTRAL_IMPLS:
        raise ValueError(f"unknown spectral_impl {impl!r}; expected one of {', '.join(SPECTRAL_IMPLS)}")
    return impl


class PatchEmbed(nn.Module):
    """A strided conv: the stem (7x7, stride 4) and the downsampling between stages (3x3, stride 2). No norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv with ``nn.Conv2d``'s parameters and state dict that runs as one GEMM on channels_last maps.

    On a channels_last input the map is already ``(B, H, W, C)`` in memory, so
    when autograd records, the conv is ``F.linear`` on that view: one GEMM
    forward and two backward, faster on the CPU than oneDNN's 1x1 convolution
    backward at SPANet's shapes (see ``benchmarks/RESULTS.md``). Inference, and
    any other input, take the ordinary convolution, whose forward is as fast.
    """

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True):
        super().__init__(in_chs, out_chs, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        records = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if records and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return self._conv_forward(x, self.weight, self.bias)


def _eager_cpu_training(x: Tensor, records: bool) -> bool:
    """Whether autograd ``records`` on ``x``, a float32/float64 CPU tensor, in eager mode with the native kernels.

    Not under CPU autocast, whose casts the layers' own path follows.
    """
    return (
        records
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and native_module() is not None
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
    )


class RowDepthwiseConv(nn.Conv2d):
    """SPAM's depthwise ``(1, k)`` conv, with ``nn.Conv2d``'s parameters and state dict.

    While autograd records on a channels_last CPU map in eager mode (native
    kernels built), it runs as ``spanet::depthwise_row_conv``: the same forward
    and input gradient, and a one-pass weight gradient in place of oneDNN's,
    which is several times slower for ``(1, k)`` than for ``(k, 1)`` kernels
    (see ``benchmarks/RESULTS.md``). Everywhere else it is the ordinary convolution.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, (1, kernel_size), padding=(0, kernel_size // 2), groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._fast_weight_grad(x):
            return torch.ops.spanet.depthwise_row_conv(x, self.weight, self.bias, self.padding[1])
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _fast_weight_grad(self, x: Tensor) -> bool:
        return (
            _eager_cpu_training(x, self.weight.requires_grad)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )


#: Hidden-map size above which :class:`ConvMlp` runs in batch slices.
MLP_SLICE_BYTES = 32 * 1024 * 1024


class ConvMlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` with 1x1 convs (SPEC §3), in the published layout (``fc1``, ``fc2``).

    The MLP is pointwise per sample, so a batch whose hidden map would exceed
    ``max_hidden_bytes`` (:data:`MLP_SLICE_BYTES`) runs in batch slices (exactly the same result):
    glibc maps every allocation above 32 MiB afresh, and the page faults of
    SPANet's stage-1 hidden maps (51 MB at batch 16) cost more than the
    layers' arithmetic on the CPU.

    While autograd records on a channels_last CPU map in eager mode (native
    kernels built, exact GELU, no active dropout), the three layers run as one
    ``spanet::pointwise_mlp`` on the ``(B, H, W, C)`` view: the backward keeps
    GELU's slope instead of its input and scales by it in place (see
    ``benchmarks/RESULTS.md``).
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        #: Largest hidden map computed in one piece (glibc's ceiling for reusing freed memory).
        self.max_hidden_bytes: int = MLP_SLICE_BYTES
        self.fc1 = PointwiseConv(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = PointwiseConv(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def _mlp(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._fused_training(x):
            return self._fused_mlp(x)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    @torch.jit.unused
    def _fused_training(self, x: Tensor) -> bool:
        # spanet::pointwise_mlp: fc1, exact GELU and fc2 on the (B, H, W, C) view of a channels_last map,
        # keeping GELU's slope for the backward; only where the dropouts are identities.
        no_dropout = not self.training or (self.drop1.p == 0.0 and self.drop2.p == 0.0)
        return (
            no_dropout
            and type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and _eager_cpu_training(x, x.requires_grad or self.fc1.weight.requires_grad)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )

    @torch.jit.unused
    def _fused_mlp(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)
        out, _, _ = torch.ops.spanet.pointwise_mlp(
            pixels, self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1), self.fc2.bias
        )
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden_bytes = x.numel() // x.shape[1] * self.fc1.out_channels * x.element_size()
        slices = min(x.shape[0], -(-hidden_bytes // self.max_hidden_bytes))
        if slices <= 1:
            return self._mlp(x)
        return torch.cat([self._mlp(part) for part in x.chunk(slices)], dim=0)


class Scale(nn.Module):
    """Per-channel scale of an NCHW map (ResScale); the parameter is ``(C,)`` as in the published layout."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class SPF(nn.Module):
    """Holder of one published spectral pooling filter tensor ``filter`` ``(1, H0, W0)``.

    The tensor is the centred circular mask of radius ``radius`` and balance
    ``lam`` at the published map size ``H0 x W0``; it is a non-trainable buffer
    kept only so that published checkpoints load and saved ones match their
    layout. Computation never reads it: :class:`SPAM` derives the filter at the
    actual map size from ``radius`` and ``lam`` (SPEC §1, "Any input size").
    """

    def __init__(self, size: int, radius: float, lam: float):
        super().__init__()
        self.radius = float(radius)
        self.lam = float(lam)
        self.register_buffer("filter", spanet_ops.circular_mask(size, size, radius, lam).unsqueeze(0))

    def extra_repr(self) -> str:
        return f"radius={self.radius}, lam={self.lam:.4f}, stored_size={tuple(self.filter.shape[-2:])}"


class SPAM(nn.Module):
    """Spectral Pooling Aggregation Modulation, SPANet's token mixer (SPEC §2).

    ``proj_in`` (1x1), depthwise ``(1,k)`` then ``(k,1)`` convs, the split-SPG
    context ``ctx = sum_i pws[i](SPF_{radius, lams[i]}(chunk_i(x)))``, and
    ``proj_out(x * ctx)``.

    Args:
        dim: channels.
        kernel_size: depthwise kernel length ``k``.
        radius: SPF disc radius of the stage.
        filter_size: map size of the published filter tensors (``224 // stride``).
        lams: balance per chunk (published: float32 0.7, 0.8, 0.9).
        spectral_impl: one of :data:`SPECTRAL_IMPLS`.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        radius: float = 2.0,
        filter_size: int = 56,
        lams: Sequence[float] = PUBLISHED_LAMS,
        spectral_impl: str = "fused",
    ):
        super().__init__()
        self.radius = float(radius)
        self.lams = tuple(float(v) for v in lams)
        self.spectral_impl = _check_spectral_impl(spectral_impl)
        chunk_dims = spanet_ops.chunk_sizes(dim, len(self.lams))
        if len(chunk_dims) != len(self.lams):
            raise ValueError(f"dim {dim} does not split into {len(self.lams)} chunks with torch.chunk")

        self.proj_in = PointwiseConv(dim, dim)
        self.conv = nn.Sequential(
            RowDepthwiseConv(dim, kernel_size),
            nn.Conv2d(dim, dim, (kernel_size, 1), padding=(kernel_size // 2, 0), groups=dim),
        )
        self.proj_out = PointwiseConv(dim, dim)
        self.sps = nn.ModuleList([SPF(filter_size, radius, lam) for lam in self.lams])
        self.pws = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in chunk_dims])
        # Per-channel balances, validated once here; not in the state dict (the published layout has none).
        self.register_buffer("lam_c", spanet_ops.channel_lams(self.lams, dim), persistent=False)

    def _apply(self, fn, recurse=True):
        # The balances are float32 values of the published code: keep them exact when the module is cast
        # (``.half()``, ``.to(dtype)``), following only its device.
        super()._apply(fn, recurse)
        self.lam_c = spanet_ops.channel_lams(self.lams, self.lam_c.numel()).to(self.lam_c.device)
        return self

    @torch.jit.unused
    def _context_reference(self, x: Tensor) -> Tensor:
        # The published composition, chunk by chunk, with the paper-literal filter (not scriptable).
        ctx = None
        for chunk, lam, pw in zip(torch.chunk(x, len(self.lams), dim=1), self.lams, self.pws):
            out = pw(spanet_reference.spectral_pooling_filter(chunk, self.radius, lam))
            ctx = out if ctx is None else ctx + out
        return ctx

    def context(self, x: Tensor) -> Tensor:
        """The split-SPG context ``ctx`` of the depthwise-conv output ``x`` ``(B, C, H, W)``."""
        if self.spectral_impl == "reference":
            return self._context_reference(x)
        # One 1x1 conv with the concatenated weights and summed biases, plus the low-rank spectral part.
        # The op form of spanet_ops.spg_aggregate: the arguments were validated at construction, and the
        # public function's value checks on lam would be data-dependent under torch.export.
        weight = torch.cat([pw.weight for pw in self.pws], dim=1).flatten(1)
        biases: List[Tensor] = []
        for pw in self.pws:
            b = pw.bias
            if b is not None:  # always, but TorchScript sees Optional[Tensor]
                biases.append(b)
        bias = torch.stack(biases).sum(0)
        algorithm = "auto" if self.spectral_impl == "fused" else self.spectral_impl
        if torch.jit.is_scripting():
            return torch.ops.spanet.spg_aggregate(x, weight, bias, self.lam_c, self.radius, algorithm)
        return torch.ops.spanet.spg_aggregate(x, weight, bias, self.lam_c, self.radius, algorithm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        x = self.conv(x)
        return self.proj_out(x * self.context(x))

    def extra_repr(self) -> str:
        return f"radius={self.radius}, spectral_impl={self.spectral_impl!r}"


class SPANetBlock(nn.Module):
    """``x = s1 * x + drop_path(SPAM(GN(x)))``; ``x = s2 * x + drop_path(MLP(GN(x)))`` (SPEC §3)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        radius: float = 2.0,
        filter_size: int = 56,
        mlp_ratio: float = 4.0,
        act_layer=nn.GELU,
        norm_layer=GroupNorm1,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        res_scale_init_value: Optional[float] = None,
        spectral_impl: str = "fused",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = SPAM(
            dim, kernel_size=kernel_size, radius=radius, filter_size=filter_size, spectral_impl=spectral_impl
        )
        self.norm2 = norm_layer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale_init_value) if res_scale_init_value is not None else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale_init_value) if res_scale_init_value is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale1(x) + self.drop_path(self.token_mixer(self.norm1(x)))
        x = self.res_scale2(x) + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SPANet(nn.Module):
    """SPANet (MetaFormer layout with the SPAM token mixer), in the published module layout.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        radius: SPF radius per stage (published: 2, 2, 1, 1).
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``'avg'`` (published), another timm pool type, or ``''`` for none.
        mlp_ratios: MLP expansion per stage.
        kernel_size: SPAM depthwise kernel length.
        res_scale_init_values: ResScale init per stage, ``None`` for none (published: None, None, 1, 1).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the MLPs.
        drop_path_rate: stochastic depth, growing linearly over all blocks.
        spectral_impl: SPAM's context path, one of :data:`SPECTRAL_IMPLS` (default ``'fused'``).
    """

    def __init__(
        self,
        depths: Sequence[int] = (4, 4, 12, 4),
        dims: Sequence[int] = (64, 128, 320, 512),
        radius: Sequence[float] = (2, 2, 1, 1),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        mlp_ratios: Union[float, Sequence[float]] = 4.0,
        kernel_size: int = 7,
        res_scale_init_values: Sequence[Optional[float]] = (None, None, 1.0, 1.0),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        spectral_impl: str = "fused",
    ):
        super().__init__()
        num_stages = len(depths)
        if not (len(dims) == len(radius) == len(res_scale_init_values) == num_stages):
            raise ValueError("depths, dims, radius and res_scale_init_values need one entry per stage")
        if not isinstance(mlp_ratios, (list, tuple)):
            mlp_ratios = (mlp_ratios,) * num_stages
        _check_spectral_impl(spectral_impl)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, dims[0], kernel_size=7, stride=4, padding=2)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        network: List[nn.Module] = []
        self.feature_info = []
        block_idx = 0
        for i in range(num_stages):
            if i > 0:
                network.append(PatchEmbed(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1))
            reduction = 4 * 2**i
            network.append(nn.Sequential(*[
                SPANetBlock(
                    dims[i],
                    kernel_size=kernel_size,
                    radius=radius[i],
                    filter_size=PUBLISHED_IMG_SIZE // reduction,
                    mlp_ratio=mlp_ratios[i],
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[block_idx + j],
                    res_scale_init_value=res_scale_init_values[i],
                    spectral_impl=spectral_impl,
                )
                for j in range(depths[i])
            ]))
            block_idx += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"network.{2 * i}"))
        self.network = nn.ModuleList(network)

        # Published head: GroupNorm on the last map, global average pool, linear.
        self.norm = GroupNorm1(dims[-1])
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # As published: truncated normal (std 0.02) and zero bias for the classifier and the MLP convs;
        # the other convs keep PyTorch's default init.
        if isinstance(m, (nn.Linear, ConvMlp)):
            for layer in (m,) if isinstance(m, nn.Linear) else (m.fc1, m.fc2):
                trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ timm API

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^network\.(\d+)" if coarse else [
                (r"^network\.(\d+)\.(\d+)", None),  # blocks of a stage
                (r"^network\.(\d+)\.proj", (0,)),  # downsampling convs
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0``: none) and optionally the pooling (``''``: none)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        device = self.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def set_spectral_impl(self, impl: str) -> "SPANet":
        """Switch every SPAM to ``impl`` (one of :data:`SPECTRAL_IMPLS`); returns the model."""
        return set_spectral_impl(self, impl)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(B, C, H/32, W/32)``, before the head's norm."""
        x = self.patch_embed(x)
        for index, layer in enumerate(self.network):
            if index % 2 == 0 and self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(layer, x)
            else:
                x = layer(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Norm, pool, dropout and (unless ``pre_logits``) the classifier."""
        x = self.norm(x)
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (timm convention).

        Args:
            x: input images.
            indices: the last ``n`` stages if an int, these stages if a list, all if None.
            norm: apply the head's norm to the last stage's output when it is taken.
            stop_early: stop after the last stage taken.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.feature_info)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early and not torch.jit.is_scripting() else len(self.network) // 2
        intermediates = []
        x = self.patch_embed(x)
        for index, layer in enumerate(self.network):
            stage_idx = index // 2
            if stage_idx > last:
                break
            if index % 2 == 0 and self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(layer, x)
            else:
                x = layer(x)
            if index % 2 == 0 and stage_idx in take_indices:
                intermediates.append(self.norm(x) if norm and stage_idx == num_stages - 1 else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the norm/head); returns the taken indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.network = self.network[: 2 * max_index + 1]
        if max_index < len(self.feature_info) - 1:
            # The head is sized for the last stage: without it, the norm and classifier go too.
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def set_spectral_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set ``spectral_impl`` on every :class:`SPAM` inside ``model`` (one of :data:`SPECTRAL_IMPLS`).

    ``'fused'`` (the default) computes the context with :func:`spanet_ops.spg_aggregate`;
    ``'reference'`` runs the published per-chunk FFT path. Returns ``model``.
    """
    _check_spectral_impl(impl)
    for module in model.modules():
        if isinstance(module, SPAM):
            module.spectral_impl = impl
    return model


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: SPANet) -> Dict[str, Tensor]:
    """Map a published SPANet checkpoint (or one saved here) onto ``model``'s state dict.

    Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` containers and strips a
    ``module.`` prefix (DDP). Published keys already match this layout; a missing
    ``sps.{i}.filter`` entry (it holds no learned value) is taken from ``model``.
    """
    for key in ("state_dict_ema", "model_ema", "model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
    for key, value in model.state_dict().items():
        if key.endswith(".filter") and key not in out:
            out[key] = value
    return out


def _create_spanet(variant: str, pretrained: bool = False, **kwargs) -> SPANet:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    try:
        return build_model_with_cfg(
            SPANet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **kwargs,
        )
    except FileNotFoundError as exc:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        raise FileNotFoundError(
            f"{variant}: pretrained weight file not found: {overlay.get('file', exc.filename or exc)!s}"
        ) from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise RuntimeError(
            f"{variant}: could not download the pretrained weights ({exc}). Without network access, pass a "
            f"local copy with pretrained_cfg_overlay=dict(file='/path/to/{variant.replace('_', '-')}.pth')"
        ) from exc


def _cfg(file_name: str = "", **kwargs) -> Dict[str, object]:
    return {
        "url": _RELEASE_URL + file_name if file_name else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 32, 32),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2308.11568",
        "paper_name": "SPANet: Frequency-balancing Token Mixer using Spectral Pooling Aggregation Modulation",
        "origin_url": "https://github.com/DoranLyong/SPANet-official",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "spanet_small.in1k": _cfg("spanet-small.pth", crop_pct=0.9),
    "spanet_medium.in1k": _cfg("spanet-medium.pth", crop_pct=0.9),
    "spanet_mediumX.in1k": _cfg("spanet-mediumX.pth", crop_pct=0.9),
    "spanet_base.in1k": _cfg("spanet-base.pth", crop_pct=0.95),
    "spanet_baseX.in1k": _cfg("spanet-baseX.pth", crop_pct=0.95),
})

#: The published configurations (SPEC §3): depths, dims; every variant uses radius 2-2-1-1.
MODEL_CONFIGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "spanet_small": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512)),
    "spanet_medium": dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512)),
    "spanet_mediumX": dict(depths=(8, 8, 24, 8), dims=(64, 128, 320, 512)),
    "spanet_base": dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768)),
    "spanet_baseX": dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768)),
}


def _variant(name: str, pretrained: bool, kwargs) -> SPANet:
    model_args = dict(MODEL_CONFIGS[name], radius=(2, 2, 1, 1))
    return _create_spanet(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spanet_small(pretrained: bool = False, **kwargs) -> SPANet:
    """SPANet-S: dims 64-128-320-512, depths 4-4-12-4 (28.6 M parameters, 4.6 GMACs at 224)."""
    return _variant("spanet_small", pretrained, kwargs)


@register_model
def spanet_medium(pretrained: bool = False, **kwargs) -> SPANet:
    """SPANet-M: dims 64-128-320-512, depths 6-6-18-6 (41.7 M parameters, 6.8 GMACs at 224)."""
    return _variant("spanet_medium", pretrained, kwargs)


@register_model
def spanet_mediumX(pretrained: bool = False, **kwargs) -> SPANet:
    """SPANet-MX: dims 64-128-320-512, depths 8-8-24-8 (54.8 M parameters, 9.0 GMACs at 224)."""
    return _variant("spanet_mediumX", pretrained, kwargs)


@register_model
def spanet_base(pretrained: bool = False, **kwargs) -> SPANet:
    """SPANet-B: dims 96-192-384-768, depths 6-6-18-6 (75.9 M parameters, 11.9 GMACs at 224)."""
    return _variant("spanet_base", pretrained, kwargs)


@register_model
def spanet_baseX(pretrained: bool = False, **kwargs) -> SPANet:
    """SPANet-BX: dims 96-192-384-768, depths 8-8-24-8 (99.7 M parameters, 15.8 GMACs at 224)."""
    return _variant("spanet_baseX", pretrained, kwargs)
