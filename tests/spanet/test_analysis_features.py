"""spanet.analysis.features: the token mixer hooks of every family, and their outputs laid out as maps.

Small random configurations, 64x64 inputs. Each family's hooked names are compared with the literal list
for its configuration, and each hooked map with the hooked module's own output rearranged independently
in the test (tokens indexed as ``prefix + row * grid_w + col``, Swin windows merged by the block's own
``_attn``). float32; equalities are exact except channels_last runs (1e-5: other kernels).
"""
import pytest
import torch
import torch.nn as nn
import timm
from timm.models.focalnet import FocalNet
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

import spanet  # noqa: F401  (registers spanet_*)
from spanet.analysis import collect_features, default_modules, token_grid

IMAGE = 64


def small_spanet():
    return timm.create_model("spanet_small", depths=(1, 2, 1, 1), dims=(16, 32, 48, 64), num_classes=5)


def small_swin(name="swin_tiny_patch4_window7_224"):
    return timm.create_model(name, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), img_size=IMAGE,
                             window_size=4, num_classes=5)


# (factory, the hooked names, the (C, H, W) of each map)
FAMILIES = {
    "spanet": (
        small_spanet,
        ["network.0.0.token_mixer", "network.2.0.token_mixer", "network.2.1.token_mixer",
         "network.4.0.token_mixer", "network.6.0.token_mixer"],
        [(16, 16, 16), (32, 8, 8), (32, 8, 8), (48, 4, 4), (64, 2, 2)],
    ),
    "poolformer": (
        lambda: MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5),
        [f"stages.{i}.blocks.0.token_mixer" for i in range(4)],
        [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)],
    ),
    "convformer": (
        lambda: MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), token_mixers=SepConv,
                           norm_layers=LayerNorm2dNoBias, num_classes=5),
        [f"stages.{i}.blocks.0.token_mixer" for i in range(4)],
        [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)],
    ),
    "caformer": (  # attention stages see (B, N, C) tokens without a class token
        lambda: MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 96),
                           token_mixers=[SepConv, SepConv, Attention, Attention],
                           norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=5),
        [f"stages.{i}.blocks.0.token_mixer" for i in range(4)],
        [(16, 16, 16), (32, 8, 8), (64, 4, 4), (96, 2, 2)],
    ),
    "convnext": (
        lambda: timm.create_model("test_convnext", num_classes=5),
        ["stages.0.blocks.0.conv_dw", "stages.1.blocks.0.conv_dw", "stages.1.blocks.1.conv_dw"]
        + [f"stages.2.blocks.{j}.conv_dw" for j in range(4)]
        + ["stages.3.blocks.0.conv_dw", "stages.3.blocks.1.conv_dw"],
        [(24, 16, 16)] + [(32, 8, 8)] * 2 + [(48, 4, 4)] * 4 + [(64, 2, 2)] * 2,
    ),
    "swin": (
        small_swin,
        [f"layers.{i}.blocks.{j}.attn" for i in range(4) for j in range(2)],
        [(16, 16, 16)] * 2 + [(32, 8, 8)] * 2 + [(64, 4, 4)] * 2 + [(128, 2, 2)] * 2,
    ),
    "swinv2": (
        lambda: small_swin("swinv2_tiny_window8_256"),
        [f"layers.{i}.blocks.{j}.attn" for i in range(4) for j in range(2)],
        [(16, 16, 16)] * 2 + [(32, 8, 8)] * 2 + [(64, 4, 4)] * 2 + [(128, 2, 2)] * 2,
    ),
    "vit": (  # one class token
        lambda: timm.create_model("test_vit", num_classes=5),
        [f"blocks.{i}.attn" for i in range(6)],
        [(64, 4, 4)] * 6,
    ),
    "vit_register_token": (  # no class token, one register token
        lambda: timm.create_model("test_vit2", num_classes=5),
        [f"blocks.{i}.attn" for i in range(8)],
        [(64, 4, 4)] * 8,
    ),
    "focalnet": (
        lambda: FocalNet(embed_dim=16, depths=(1, 1, 1, 1), num_classes=5),
        [f"layers.{i}.blocks.0.modulation" for i in range(4)],
        [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)],
    ),
    "resnet (no token mixer: the blocks)": (
        lambda: timm.create_model("test_resnet", num_classes=5),
        ["act1", "layer1.0", "layer2.0", "layer3.0", "layer4.0"],
        [(32, 32, 32), (32, 16, 16), (48, 8, 8), (192, 4, 4), (96, 2, 2)],
    ),
}


def _build(family):
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def _raw_outputs(model, names):
    """The hooked modules' own outputs (and, for Swin, the block's merged ``_attn`` output), captured independently."""
    raw, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: raw.__setitem__(name, out)))
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if parent is not None and hasattr(parent, "_attn") and name.endswith(".attn"):
            # Swin: the block's own window merge, on the input its attention saw.
            def merged(block, args, name=name):
                x = args[0] if block.__class__.__name__ == "SwinTransformerV2Block" else block.norm1(args[0])
                raw[name + ":merged"] = block._attn(x)

            handles.append(parent.register_forward_pre_hook(merged))
    return raw, handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_hooks_find_the_token_mixer_of_every_block(family):
    model = _build(family)
    _, names, shapes = FAMILIES[family]
    assert default_modules(model) == names

    torch.manual_seed(1)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    raw, handles = _raw_outputs(model, names)
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    features = collect_features(model, images)

    assert list(features) == names
    for (name, fmap), shape in zip(features.items(), shapes):
        assert tuple(fmap.shape) == (2,) + shape, name
        assert fmap.is_contiguous()
        out = raw[name]
        if name + ":merged" in raw:  # Swin: windows merged back = the block's _attn output, NHWC
            expected = raw[name + ":merged"].permute(0, 3, 1, 2)
        elif out.dim() == 3:  # tokens: [class/register tokens, row 0, row 1, ...]
            prefix = getattr(model, "num_prefix_tokens", 0)
            channels, height, width = shape
            expected = torch.empty(2, channels, height, width)
            for row in range(height):
                for col in range(width):
                    expected[:, :, row, col] = out[:, prefix + row * width + col, :]
        else:
            expected = out
        assert torch.equal(fmap, expected), name


@pytest.mark.parametrize("family", ["spanet", "convnext", "swin", "vit"])
def test_channels_last_and_inference_mode_give_the_same_maps(family):
    model = _build(family)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    reference = collect_features(model, images)
    with torch.inference_mode():
        inference = collect_features(model, images)
    model = model.to(memory_format=torch.channels_last)
    channels_last = collect_features(model, images.contiguous(memory_format=torch.channels_last))
    assert list(inference) == list(channels_last) == list(reference)
    for name, fmap in reference.items():
        assert torch.equal(inference[name], fmap), name
        assert channels_last[name].is_contiguous()
        assert torch.allclose(channels_last[name], fmap, atol=1e-5, rtol=1e-5), name
    spectrum_input = next(iter(inference.values()))  # inference tensors feed the spectra outside the mode
    from spanet.analysis import spectrum_map

    assert torch.isfinite(spectrum_map(spectrum_input)).all()


def test_the_model_runs_in_eval_mode_and_keeps_its_training_flag():
    model = timm.create_model("spanet_small", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5,
                              drop_path_rate=0.5, drop_rate=0.5)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    expected = collect_features(model.eval(), images)
    model.train()
    got = collect_features(model, images)  # drop path would change these if it ran in training mode
    assert model.training
    for name in expected:
        assert torch.equal(got[name], expected[name])


def test_chosen_modules_by_name_or_module():
    model = _build("spanet")
    images = torch.randn(1, 3, IMAGE, IMAGE)
    by_name = collect_features(model, images, modules=["network.2", "network.0.0.token_mixer"])
    assert list(by_name) == ["network.0.0.token_mixer", "network.2"]  # forward order
    by_module = collect_features(model, images, modules=model.network[2])
    assert torch.equal(by_module["network.2"], by_name["network.2"])
    with pytest.raises(ValueError, match="no module named 'network.9'"):
        collect_features(model, images, modules=["network.9"])
    with pytest.raises(ValueError, match="not part of the model"):
        collect_features(model, images, modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        collect_features(model, images[0])


def test_a_module_that_runs_twice_or_never_is_refused():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    twice = nn.Sequential(shared, shared)
    with pytest.raises(ValueError, match="ran more than once"):
        collect_features(twice, torch.randn(1, 3, 8, 8), modules=["0"])

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Identity(), nn.Identity()

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="did not run"):
        collect_features(Skips(), torch.randn(1, 3, 8, 8), modules=["unused"])
    with pytest.raises(ValueError, match="no token mixers or blocks"):
        default_modules(Skips())


def test_token_grid_uses_the_patch_grid_then_the_input_aspect_ratio():
    vit = timm.create_model("test_vit", num_classes=5)
    assert token_grid(vit, 1 + 4 * 6, (64, 96)) == (1, 4, 6)  # class token + the 16-px patch grid
    plain = nn.Identity()  # no patch grid: the factorisation closest to the input's shape
    assert token_grid(plain, 12, (96, 128)) == (0, 3, 4)
    assert token_grid(plain, 12, (128, 96)) == (0, 4, 3)
    assert token_grid(plain, 16, (64, 64)) == (0, 4, 4)
