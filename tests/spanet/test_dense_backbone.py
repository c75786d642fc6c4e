"""spanet.dense.backbone: stage maps, the published per-stage norms, weight loading, freezing, the FPN.

Reference values: the maps of the timm model's own ``forward_intermediates`` (with the same weights) and
``F.group_norm`` with one group; the published dense layout is built from
``tests/spanet/data/official_state_dict_layout.json`` plus the ``norm{0,2,4,6}`` names of the published
``fork_feat`` backbone. Tolerances: fp32, 1e-6 absolute where the same kernels run (NCHW on both sides),
1e-4 where the backbone runs channels_last and the reference NCHW.
"""
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import spanet  # noqa: F401  (registers the variants)
from spanet.checkpoint import CheckpointError
from spanet.dense import backbone, backbone_with_fpn, fasterrcnn, load_backbone_weights, retinanet

LAYOUT = os.path.join(os.path.dirname(__file__), "data", "official_state_dict_layout.json")
DIMS = (64, 128, 320, 512)


def _small_backbone(**kwargs):
    torch.manual_seed(0)
    net = backbone("spanet_small", **kwargs).eval()
    # Non-trivial norm parameters, so that a missing or misplaced norm shows.
    with torch.no_grad():
        for name in net.norm_names:
            getattr(net, name).weight.uniform_(0.5, 1.5)
            getattr(net, name).bias.uniform_(-0.5, 0.5)
    return net


def _reference_maps(net, x, stages=(0, 1, 2, 3)):
    reference = timm.create_model("spanet_small", num_classes=0).eval()
    trunk_sd = {k[len("trunk."):]: v for k, v in net.state_dict().items() if k.startswith("trunk.")}
    missing, unexpected = reference.load_state_dict(trunk_sd, strict=False)
    assert not unexpected and all(k.startswith("norm.") for k in missing)
    maps = reference.forward_intermediates(x, indices=list(stages), intermediates_only=True)
    return [F.group_norm(m, 1, getattr(net, f"norm{2 * s}").weight, getattr(net, f"norm{2 * s}").bias)
            for m, s in zip(maps, stages)]


@pytest.mark.parametrize("channels_last, atol", [(False, 1e-6), (True, 1e-4)])
def test_maps_equal_forward_intermediates_plus_group_norm(channels_last, atol):
    net = _small_backbone(channels_last=channels_last)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
        expected = _reference_maps(net, x)
    assert list(out) == ["0", "1", "2", "3"]
    for got, want, channels, stride in zip(out.values(), expected, DIMS, (4, 8, 16, 32)):
        assert got.shape == (2, channels, 64 // stride, 96 // stride)
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert net.out_channels_list == list(DIMS) and net.strides == [4, 8, 16, 32]
    assert net.norm_names == ["norm0", "norm2", "norm4", "norm6"]


def test_without_norms_and_last_three_stages():
    net = _small_backbone(out_indices=(1, 2, 3))
    assert net.norm_names == ["norm2", "norm4", "norm6"]  # RetinaNet's: no norm0, as published (FORK_LAST3)
    assert not any(k.startswith("norm0.") for k in net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = list(net(x).values())
        expected = _reference_maps(net, x, stages=(1, 2, 3))
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    bare = backbone("spanet_small", out_norms=False).eval()
    assert bare.norm_names == [] and not any(k.startswith("norm") for k in bare.state_dict())
    with torch.no_grad():
        raw = bare.trunk.forward_intermediates(x, intermediates_only=True)
        for got, want in zip(bare(x).values(), raw):
            assert torch.equal(got, want)


def _published_layout():
    with open(LAYOUT) as f:
        return json.load(f)["spanet_small"]["state_dict"]


def test_loads_our_classification_state_dict_strictly(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("spanet_small", num_classes=1000)
    path = str(tmp_path / "spanet-small.pth")
    torch.save(classifier.state_dict(), path)
    net = _small_backbone()
    norms_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("norm")}
    info = load_backbone_weights(net, path)
    assert info["kind"] == "classification"
    assert info["initialised"] == sorted(norms_before)  # the output norms are new layers
    own = net.state_dict()
    source = classifier.state_dict()
    for key, value in source.items():
        if key.startswith(("head.", "norm.")):
            continue
        assert torch.equal(own["trunk." + key], value), key
    for key, value in norms_before.items():
        assert torch.equal(own[key], value)
    # The published release files hold the 224-size filters; the prepared detection inits drop them.
    no_filters = {k: v for k, v in source.items() if not k.endswith(".filter")}
    torch.save({"state_dict": no_filters}, path)
    assert load_backbone_weights(_small_backbone(), path)["kind"] == "classification"
    # The model.safetensors that spanet-train writes beside best.pth.
    from spanet.checkpoint import save_safetensors

    weights = str(tmp_path / "model.safetensors")
    save_safetensors(source, weights, {"format": "test"})
    net = _small_backbone()
    load_backbone_weights(net, weights)
    assert torch.equal(net.state_dict()["trunk.network.4.11.token_mixer.pws.2.weight"],
                       source["network.4.11.token_mixer.pws.2.weight"])


def test_classification_checkpoint_with_a_missing_or_foreign_key_is_refused(tmp_path):
    sd = timm.create_model("spanet_small").state_dict()
    net = _small_backbone()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path = str(tmp_path / "bad.pth")
    missing = dict(sd)
    del missing["network.4.3.mlp.fc1.weight"]
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"lacks 1 keys.*network\.4\.3\.mlp\.fc1\.weight"):
        load_backbone_weights(net, path)
    torch.save(dict(sd, **{"layer1.0.conv1.weight": torch.zeros(1)}), path)
    with pytest.raises(CheckpointError, match="unexpected keys.*layer1.0.conv1.weight"):
        load_backbone_weights(net, path)
    torch.save(timm.create_model("spanet_base").state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone_weights(net, path)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a refused file changes nothing


def _published_dense_checkpoint(stages=(0, 1, 2, 3)):
    # The backbone of a published mmdetection checkpoint: the classification layout without the head, the
    # head norm and the filter tensors (plain attributes there, not buffers), the stage norms, prefixed
    # "backbone.", next to the neck and heads.
    torch.manual_seed(2)
    state = {}
    for key, shape in _published_layout():
        if key.startswith(("head.", "norm.")) or key.endswith(".filter"):
            continue
        state["backbone." + key] = torch.randn(shape)
    for stage in stages:
        for param in ("weight", "bias"):
            state[f"backbone.norm{2 * stage}.{param}"] = torch.randn(DIMS[stage])
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 64, 1, 1)
    state["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3)
    return {"meta": {"epoch": 12}, "state_dict": state}


@pytest.mark.parametrize("stages", [(0, 1, 2, 3), (1, 2, 3)])
def test_loads_the_backbone_of_a_published_dense_checkpoint_strictly(tmp_path, stages):
    ckpt = _published_dense_checkpoint(stages)
    path = str(tmp_path / "mask_rcnn_spanet_s.pth")
    torch.save(ckpt, path)
    net = _small_backbone(out_indices=stages)
    info = load_backbone_weights(net, path)
    assert info["kind"] == "dense"
    own = net.state_dict()
    expected_keys = set()
    for key, value in ckpt["state_dict"].items():
        if not key.startswith("backbone."):
            continue
        name = key[len("backbone."):]
        name = name if name.startswith("norm") else "trunk." + name
        expected_keys.add(name)
        assert torch.equal(own[name], value), name
    # Every backbone key came from the file but the filter buffers, which hold no learned value.
    assert info["initialised"] == sorted(k for k in own if k.endswith(".filter"))
    assert set(own) - expected_keys == set(info["initialised"])


def test_published_dense_checkpoint_missing_a_norm_is_refused(tmp_path):
    ckpt = _published_dense_checkpoint()
    del ckpt["state_dict"]["backbone.norm4.weight"]
    path = str(tmp_path / "dense.pth")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="norm4.weight"):
        load_backbone_weights(_small_backbone(), path)
    # A RetinaNet checkpoint (no norm0) does not fit a backbone that has one, nor the reverse.
    torch.save(_published_dense_checkpoint((1, 2, 3)), path)
    with pytest.raises(CheckpointError, match="norm0"):
        load_backbone_weights(_small_backbone(), path)
    torch.save(_published_dense_checkpoint(), path)
    with pytest.raises(CheckpointError, match="unexpected keys.*norm0"):
        load_backbone_weights(_small_backbone(out_indices=(1, 2, 3)), path)


def test_checkpoint_argument_loads_and_defaults_to_three_trainable_layers(tmp_path):
    path = str(tmp_path / "cls.pth")
    torch.save(timm.create_model("spanet_small").state_dict(), path)
    net = backbone("spanet_small", checkpoint=path)
    assert net.trainable_layers == 3  # torchvision's default with loaded weights
    assert backbone("spanet_small").trainable_layers == 5  # from scratch everything trains


@pytest.mark.parametrize("layers, frozen", [
    (5, []),
    (3, ["trunk.patch_embed", "trunk.network.0."]),
    (1, ["trunk.patch_embed", "trunk.network.0.", "trunk.network.1.", "trunk.network.2.", "trunk.network.3.",
         "trunk.network.4."]),
    (0, ["trunk."]),
])
def test_trainable_layers_freeze_from_the_input_up(layers, frozen):
    net = backbone("spanet_small", trainable_layers=layers)
    for name, param in net.named_parameters():
        expect_frozen = any(name.startswith(prefix) for prefix in frozen)
        assert param.requires_grad != expect_frozen, name
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith("norm"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown SPANet variant 'resnet50'"):
        backbone("resnet50")
    with pytest.raises(ValueError, match="out_indices"):
        backbone("spanet_small", out_indices=(2, 1))
    with pytest.raises(ValueError, match="trainable_layers must be in 0..5"):
        backbone("spanet_small", trainable_layers=6)
    with pytest.raises(ValueError, match="pretrained=True or checkpoint"):
        backbone("spanet_small", pretrained=True, checkpoint="x.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        backbone("spanet_small", checkpoint="/nonexistent/spanet.pth")


def test_fpn_channels_and_levels():
    torch.manual_seed(0)
    net = backbone_with_fpn("spanet_small", fpn_channels=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = net.body(x)
        out = net(x)
        # P5 is the 1x1 lateral then the 3x3 output conv of C5 (no top-down term above it).
        p5 = net.fpn.layer_blocks[3](net.fpn.inner_blocks[3](body["3"]))
    assert net.out_channels == 64
    assert [(k, v.shape[1], 64 // v.shape[-1]) for k, v in out.items()] == [
        ("0", 64, 4), ("1", 64, 8), ("2", 64, 16), ("3", 64, 32)]
    torch.testing.assert_close(out["3"], p5, atol=1e-6, rtol=0)
    assert fasterrcnn(3, fpn_channels=64).backbone.out_channels == 64
    # RetinaNet: P3-P5 from the last three maps, P6 convolved from C5 (published add_extra_convs='on_input').
    det = retinanet(3, fpn_channels=32).eval()
    with torch.no_grad():
        maps = det.backbone(x)
        c5 = det.backbone.body(x)["2"]
        p6 = det.backbone.fpn.extra_blocks.p6(c5)
    assert list(maps) == ["0", "1", "2", "p6", "p7"]
    assert det.backbone.body.out_channels_list == [128, 320, 512]
    torch.testing.assert_close(maps["p6"], p6, atol=1e-6, rtol=0)


def test_loads_spanet_train_and_spanet_dense_checkpoints(tmp_path):
    from spanet import checkpoint as ck
    from spanet.dense.engine import FORMAT, FORMAT_VERSION

    torch.manual_seed(3)
    classifier = timm.create_model("spanet_small", num_classes=10)
    path = str(tmp_path / "train.pth")
    ck.save_checkpoint({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "model": classifier.state_dict(),
                        "model_ema": None}, path)
    net = _small_backbone()
    assert load_backbone_weights(net, path)["kind"] == "classification"
    assert torch.equal(net.state_dict()["trunk.network.6.3.mlp.fc2.weight"],
                       classifier.state_dict()["network.6.3.mlp.fc2.weight"])
    # A spanet-dense checkpoint hands over its whole backbone, output norms included.
    detector = fasterrcnn(3, fpn_channels=32)
    with torch.no_grad():
        detector.backbone.body.norm4.weight.fill_(0.25)
    ck.save_checkpoint({"format": FORMAT, "format_version": FORMAT_VERSION, "model": detector.state_dict()},
                       path)
    fresh = _small_backbone()
    assert load_backbone_weights(fresh, path)["initialised"] == []
    source = detector.backbone.body.state_dict()
    assert all(torch.equal(value, source[key]) for key, value in fresh.state_dict().items())
