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
so checkpoints load; the filter at any input size follows docs/spec.md §1 and is
computed by :mod:`spanet_ops` from the stage's radius and balances.

Speed. SPAM's context ``sum_i pw_i(SPF_{r, lam_i}(chunk_i(x)))`` is one call of
:func:`spanet_ops.spg_aggregate` (concatenated ``pws`` weights, summed biases,
per-channel balances: one 1x1 conv plus a low-rank spectral correction). The
``spectral_impl`` switch selects the published per-chunk
``fft2 -> fftshift -> mask -> ifftshift -> ifft2`` path instead, for
comparison (see :func:`set_spectral_impl`).
"""

import urllib.error
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

import spanet_ops
from spanet_ops.reference import spectral_pooling_filter as reference_spectral_pooling_filter
from spanet_ops.training import PointwiseConv, PointwiseMlp, RowDepthwiseConv
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, GroupNorm1, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, clean_state_dict, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module

__all__ = ["SPANet", "SPAM", "SPANetBlock", "PointwiseMlp", "SPECTRAL_IMPLS", "set_spectral_impl", "checkpoint_filter_fn"]

#: ``torch.arange(0.7, 0.9, 0.1)`` of the published code: float32 0.7, 0.8, 0.9 (exact as Python floats).
PUBLISHED_LAMS: Tuple[float, ...] = spanet_ops.PUBLISHED_LAMS
#: Input size the published filter tensors were built for.
PUBLISHED_IMG_SIZE = 224

#: ``spectral_impl`` values: ``fused`` (default) and ``lowrank``/``fft`` run :func:`spanet_ops.spg_aggregate`
#: (``fused`` lets it choose the algorithm); ``reference`` is the published per-chunk FFT path.
SPECTRAL_IMPLS = ("fused", "lowrank", "fft", "reference")

_RELEASE_URL = "https://github.com/DoranLyong/SPANet-official/releases/download/ImageNet-pretrained/"

# torch.fx (timm's FX feature extraction, torchvision's create_feature_extractor) keeps these as leaves:
# the layers decide their fast path from the input's layout, which a symbolic tracer cannot see, and the
# paper-literal filter builds its mask from the input's size.
for _leaf in (PointwiseConv, RowDepthwiseConv, PointwiseMlp):
    register_notrace_module(_leaf)
register_notrace_function(reference_spectral_pooling_filter)


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
    actual map size from ``radius`` and ``lam`` (docs/spec.md §1, "Any input size").
    """

    def __init__(self, size: int, radius: float, lam: float):
        super().__init__()
        self.radius = float(radius)
        self.lam = float(lam)
        self.register_buffer("filter", spanet_ops.circular_mask(size, size, radius, lam).unsqueeze(0))

    def extra_repr(self) -> str:
        return f"radius={self.radius}, lam={self.lam:.4f}, stored_size={tuple(self.filter.shape[-2:])}"


class SPAM(nn.Module):
    """Spectral Pooling Aggregation Modulation, SPANet's token mixer (docs/spec.md §2).

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
        self.lams: List[float] = [float(v) for v in lams]
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

    def context(self, x: Tensor) -> Tensor:
        """The split-SPG context ``ctx`` of the depthwise-conv output ``x`` ``(B, C, H, W)``."""
        if self.spectral_impl == "reference" and not torch.jit.is_scripting():
            return self._context_reference(x)  # (scripted, the op's "reference" algorithm: the same composition)
        # One 1x1 conv with the concatenated weights and summed biases, plus the low-rank spectral part:
        # spanet::spg_aggregate, which validates its arguments and chooses its kernels.
        weight = torch.cat([pw.weight for pw in self.pws], dim=1).flatten(1)
        biases: List[Tensor] = []
        for pw in self.pws:
            b = pw.bias
            if b is not None:  # always, but TorchScript sees Optional[Tensor]
                biases.append(b)
        bias = torch.stack(biases).sum(0)
        algorithm = "auto" if self.spectral_impl == "fused" else self.spectral_impl
        return torch.ops.spanet.spg_aggregate(x, weight, bias, self.lams, self.radius, algorithm)

    @torch.jit.unused
    def _context_reference(self, x: Tensor) -> Tensor:
        # The published composition, chunk by chunk, with the paper-literal filter (not scriptable).
        chunks = torch.chunk(x, len(self.lams), dim=1)
        ctx = None
        for i, pw in enumerate(self.pws):
            out = pw(reference_spectral_pooling_filter(chunks[i], self.radius, self.lams[i]))
            ctx = out if ctx is None else ctx + out
        return ctx

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        x = self.conv(x)
        return self.proj_out(x * self.context(x))

    def extra_repr(self) -> str:
        return f"radius={self.radius}, spectral_impl={self.spectral_impl!r}"


class SPANetBlock(nn.Module):
    """``x = s1 * x + drop_path(SPAM(GN(x)))``; ``x = s2 * x + drop_path(MLP(GN(x)))`` (docs/spec.md §3)."""

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
        self.mlp = PointwiseMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
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
        self.depths, self.dims = tuple(depths), tuple(dims)
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
        if isinstance(m, (nn.Linear, PointwiseMlp)):
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
    """Map a published SPANet checkpoint (or one saved here) onto ``model``'s state dict, refusing foreign ones.

    Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` containers and strips a
    ``module.`` prefix (DDP). Published keys already match this layout; a missing
    ``sps.{i}.filter`` entry (it holds no learned value) is taken from ``model``.
    Every key outside the classifier must be ``model``'s, with its shape (the stem's
    input channels excepted: timm adapts them), so another variant's or another
    architecture's weights are refused instead of loading partially.

    Raises:
        ValueError: naming the missing and unexpected keys, or the first shape mismatch.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = clean_state_dict(state_dict)
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith(".filter") and key not in out:
            out[key] = value
    classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    body = {k for k in expected if not k.startswith(classifier + ".")}
    given = {k for k in out if not k.startswith(classifier + ".")}
    missing, unexpected = sorted(body - given), sorted(given - body)
    if missing or unexpected:
        raise ValueError(
            f"these weights are not a {type(model).__name__} of this configuration "
            f"(depths {model.depths}, dims {model.dims}): {len(missing)} keys missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key in sorted(body - {"patch_embed.proj.weight"}):
        if tuple(out[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"these weights are not a {type(model).__name__} of this configuration: {key} has shape "
                f"{tuple(out[key].shape)}, the model {tuple(expected[key].shape)}"
            )
    return out


def _create_spanet(variant: str, pretrained: bool = False, **kwargs) -> SPANet:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    feature_cfg = {"out_indices": out_indices, "feature_cls": "getter", **(kwargs.pop("feature_cfg", None) or {})}
    try:
        return build_model_with_cfg(
            SPANet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
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

#: The published configurations (docs/spec.md §3): depths, dims; every variant uses radius 2-2-1-1.
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
