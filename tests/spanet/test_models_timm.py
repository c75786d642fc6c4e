"""timm conventions for the SPANet variants: the applicable checks of timm's tests/test_models.py, in our words.

Checked: forward, backward (every parameter gets a gradient), pretrained_cfg and
its first_conv / classifier names, forward_features / forward_head /
reset_classifier / get_classifier, features_only with feature_info,
forward_intermediates (and its agreement with forward_features and
features_only), set_grad_checkpointing, TorchScript, pretrained loading from a
local file, published-checkpoint filtering, and clear errors for a missing file
or no network. spanet_small runs by default, all five variants with SPANET_SLOW=1.

Tolerances ``(dtype, atol, rtol)``: (float32, 1e-5, 1e-5) between two paths that
compute the same thing in a different order (scripted vs eager, checkpointed vs
not, intermediates vs forward_features); exact equality where the same ops run.
"""
import urllib.error

import pytest
import torch

import spanet  # noqa: F401
import timm
import timm.optim
from spanet.models import SPANet, checkpoint_filter_fn
from tests.spanet.reference_model import randomize_

VARIANTS = ["spanet_small", "spanet_medium", "spanet_mediumX", "spanet_base", "spanet_baseX"]
NAMES = [v if v == "spanet_small" else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]
DIMS = {"spanet_small": 512, "spanet_medium": 512, "spanet_mediumX": 512, "spanet_base": 768, "spanet_baseX": 768}
TOL = dict(atol=1e-5, rtol=1e-5)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small():
    return randomize_(timm.create_model("spanet_small"), seed=7).eval()


# ------------------------------------------------------------------------------------ forward / backward


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward(name):
    # timm: forward at the default size (capped at 384), backward at 128 with 42 classes, batch 2.
    model = timm.create_model(name, num_classes=42)
    model.train()
    out = model(_x(2, 3, 128, 128))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


def test_pretrained_cfg():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7)
        assert cfg["crop_pct"] == (0.95 if "base" in name else 0.9)
        assert cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
        assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
        assert cfg["license"] == "mit" and cfg["paper_ids"] == "arXiv:2308.11568"
        assert cfg["url"] == (
            "https://github.com/DoranLyong/SPANet-official/releases/download/ImageNet-pretrained/"
            + name.replace("_", "-") + ".pth"
        )
    model = timm.create_model("spanet_small")
    state = model.state_dict()
    assert model.pretrained_cfg["first_conv"] + ".weight" in state
    assert model.pretrained_cfg["classifier"] + ".weight" in state
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 0.9


@pytest.mark.parametrize("name", NAMES)
def test_features_head_and_classifier(name):
    model = randomize_(timm.create_model(name), seed=3).eval()
    x = _x(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, DIMS[name], 7, 7)  # == pool_size
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.get_classifier()(pre), logits, rtol=0, atol=0)
        # The published head: GroupNorm on the map, then the mean over it.
        torch.testing.assert_close(pre, model.norm(feats).mean((-2, -1)), rtol=0, atol=0)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre) and model.num_classes == 0
        model.reset_classifier(0, "")
        assert torch.equal(model(x), model.norm(feats))
        model.reset_classifier(5, "avg")
        assert model(x).shape == (1, 5) and model.get_classifier().out_features == 5
    unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert unpooled(x).shape == (1, DIMS[name], 7, 7)


# ------------------------------------------------------------------------------------ features


def test_feature_info():
    model = timm.create_model("spanet_base")
    assert [f["num_chs"] for f in model.feature_info] == [96, 192, 384, 768]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == ["network.0", "network.2", "network.4", "network.6"]


def test_features_only_and_intermediates(small):
    x = _x(1, 3, 96, 80)
    feature_model = timm.create_model("spanet_small", features_only=True).eval()
    # The feature wrapper holds the pruned model (no norm, no head).
    feature_model.model.load_state_dict(
        {k: v for k, v in small.state_dict().items() if not k.startswith(("norm.", "head."))}, strict=True
    )
    assert feature_model.feature_info.channels() == [64, 128, 320, 512]
    assert feature_model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = feature_model(x)
        final, inter = small.forward_intermediates(x)
        only = small.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        early = small.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        normed = small.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        expected_final = small.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 24, 20), (1, 128, 12, 10), (1, 320, 6, 5), (1, 512, 3, 3)]
    for a, b in zip(feats, inter):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=0)
    torch.testing.assert_close(only[0], inter[1], rtol=0, atol=0)
    torch.testing.assert_close(only[1], inter[3], rtol=0, atol=0)
    torch.testing.assert_close(early[1], inter[1], rtol=0, atol=0)
    torch.testing.assert_close(normed[0], small.norm(inter[3]), rtol=0, atol=0)


def test_features_only_out_indices():
    model = timm.create_model("spanet_small", features_only=True, out_indices=(1, 2)).eval()
    assert model.feature_info.channels() == [128, 320]
    with torch.no_grad():
        outs = model(_x(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 320]
    # The stages after the last index taken are pruned.
    assert len(model.model.network) == 5


def test_prune_intermediate_layers(small):
    import copy

    model = copy.deepcopy(small)
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        expected = small.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        kept = model.prune_intermediate_layers([1])
        got = model.forward_intermediates(x, indices=kept, intermediates_only=True)[0]
        pooled = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert pooled.shape == (1, 128, 8, 8) and model.num_features == 128


# ------------------------------------------------------------------------------------ grad checkpointing, script


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize_(timm.create_model("spanet_small", num_classes=7), seed=4).train()
    x = _x(2, 3, 64, 64)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out, **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
    # forward_intermediates runs through the checkpointed stages too.
    torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[-1], model.forward_features(x))


def test_torchscript(small):
    with timm.set_scriptable(True):
        scripted = torch.jit.script(small)
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), small(x), **TOL)


# ------------------------------------------------------------------------------------ pretrained weights


def test_pretrained_from_local_file(tmp_path, small):
    path = tmp_path / "spanet-small.pth"
    torch.save(small.state_dict(), path)
    loaded = timm.create_model("spanet_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A new classifier: timm drops the checkpoint's head, the rest loads.
    ten = timm.create_model(
        "spanet_small", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert ten.head.out_features == 10
    assert torch.equal(ten.network[6][3].mlp.fc2.weight, small.network[6][3].mlp.fc2.weight)
    # One input channel: timm folds the stem's weights.
    gray = timm.create_model("spanet_small", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.patch_embed.proj.weight, small.patch_embed.proj.weight.sum(1, keepdim=True))


def test_checkpoint_filter_fn_maps_published_containers(small):
    state = small.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 300}
    filtered = checkpoint_filter_fn(wrapped, small)
    assert list(filtered) == list(state)
    # A checkpoint without the fixed filter tensors still loads strictly.
    no_filters = {k: v for k, v in state.items() if not k.endswith(".filter")}
    model = timm.create_model("spanet_small")
    model.load_state_dict(checkpoint_filter_fn(no_filters, model), strict=True)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "spanet-small.pth"
    with pytest.raises(FileNotFoundError, match="spanet_small: pretrained weight file not found: .*nowhere"):
        timm.create_model("spanet_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_no_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not download .*pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("spanet_small", pretrained=True)


def test_model_class_is_exported():
    assert isinstance(timm.create_model("spanet_small"), SPANet)


def test_layer_decay_groups_cover_every_parameter():
    # timm's layer-wise lr decay uses group_matcher; every parameter must land in a group.
    model = timm.create_model("spanet_small")
    groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len(list(model.parameters()))
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) > 20 and scales[-1] == 1.0  # one scale per block, the head at full rate


@pytest.mark.parametrize("foreign", ["resnet18", "spanet_medium", "spanet_base"])
def test_foreign_weights_are_refused_through_the_pretrained_path(tmp_path, foreign):
    """Another architecture's or another variant's file must not load partially (timm only warns with a new head)."""
    path = tmp_path / f"{foreign}.pth"
    torch.save(timm.create_model(foreign).state_dict(), path)
    with pytest.raises(ValueError, match="not a SPANet of this configuration"):
        timm.create_model("spanet_small", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_a_missing_block_is_refused(small):
    state = {k: v for k, v in small.state_dict().items() if not k.startswith("network.4.11.")}
    with pytest.raises(ValueError, match=r"keys missing \(e\.g\. \['network\.4\.11\."):
        checkpoint_filter_fn(state, timm.create_model("spanet_small"))
