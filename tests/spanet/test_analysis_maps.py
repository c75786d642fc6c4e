"""spanet.analysis: SPAM context maps (Fig. 4) and class activation maps, against literal computations.

float32; tolerances 1e-5 (same arithmetic in another order) unless stated.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

import spanet  # noqa: F401  (registers spanet_*)
import spanet_ops
from spanet.analysis import class_activation_map, context_map, default_cam_layer, spam_blocks

IMAGE = 64


def small_spanet():
    torch.manual_seed(0)
    return timm.create_model("spanet_small", depths=(1, 2, 1, 1), dims=(16, 32, 48, 64), num_classes=5).eval()


# ------------------------------------------------------------------------------------------ context maps
@pytest.mark.parametrize("block", [0, 2, "network.2.1.token_mixer", -1])
def test_context_map_is_the_published_split_spg_context_over_the_image(block):
    model = small_spanet()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    name, spam = spam_blocks(model)[block] if isinstance(block, int) else (block, model.get_submodule(block))
    inputs = {}
    handle = spam.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    with torch.no_grad():
        # The published composition, chunk by chunk, with the paper-literal FFT filter.
        q = spam.conv(spam.proj_in(inputs["x"]))
        ctx = sum(pw(spanet_ops.reference.spectral_pooling_filter(chunk, spam.radius, lam))
                  for chunk, lam, pw in zip(torch.chunk(q, len(spam.lams), dim=1), spam.lams, spam.pws))
        # The SPAM output is proj_out(q * ctx): the hook saw the block's real input.
        assert torch.allclose(spam(inputs["x"]), spam.proj_out(q * ctx), atol=1e-5)
    expected = F.interpolate(ctx.abs().mean(1, keepdim=True), size=(IMAGE, IMAGE), mode="bilinear",
                             align_corners=False)[:, 0]

    result = context_map(model, images, block=block)
    assert result.image is images
    assert torch.allclose(result.context, expected, atol=1e-5, rtol=1e-5)
    single = context_map(model, images[1], block=block)
    assert single.context.shape == (IMAGE, IMAGE)
    assert torch.allclose(single.context, expected[1], atol=1e-5, rtol=1e-5)


def test_context_map_refuses_other_models_and_unknown_blocks():
    model = small_spanet()
    image = torch.randn(3, IMAGE, IMAGE)
    assert [name for name, _ in spam_blocks(model)] == [
        "network.0.0.token_mixer", "network.2.0.token_mixer", "network.2.1.token_mixer",
        "network.4.0.token_mixer", "network.6.0.token_mixer"]
    with pytest.raises(ValueError, match="out of range: the model has 5 SPAM blocks"):
        context_map(model, image, block=5)
    with pytest.raises(ValueError, match="not a SPAM block"):
        context_map(model, image, block="network.0.0")
    with pytest.raises(TypeError, match="int index or a module name"):
        context_map(model, image, block=1.0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        context_map(model, image[0])
    with pytest.raises(ValueError, match="needs a SPANet"):
        context_map(timm.create_model("test_convnext"), image)


# ------------------------------------------------------------------------------ class activation maps
class GapClassifier(nn.Module):
    """conv 3x3 (stride 1) + ReLU, global average pool, linear: Grad-CAM's weights are fc.weight[k] / (H W)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _min_max(cam):
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (1e-7 + cam.amax(dim=(1, 2), keepdim=True))


def test_grad_cam_of_a_pooled_linear_classifier_is_its_class_weighted_activation():
    torch.manual_seed(3)
    model = GapClassifier()
    images = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        activation = model.features(images)
        top = model(images).argmax(1)
    weights = model.fc.weight[top] / (12 * 12)  # d logit_k / d A_c(y, x) for every pixel
    expected = _min_max(_min_max(torch.relu((weights[:, :, None, None] * activation).sum(1))))

    result = class_activation_map(model, images, target_layer="features")
    assert result.classes == top.tolist()
    assert result.layer == "features"
    assert torch.allclose(result.maps, expected, atol=1e-5)

    chosen = class_activation_map(model, images, target_layer=model.features, targets=[0, 1, 2])
    weights = model.fc.weight[:3] / (12 * 12)
    expected = _min_max(_min_max(torch.relu((weights[:, :, None, None] * activation).sum(1))))
    assert chosen.classes == [0, 1, 2]
    assert torch.allclose(chosen.maps, expected, atol=1e-5)


def test_grad_cam_of_a_vit_reads_its_tokens_on_the_patch_grid():
    """The CAM of a ViT block equals Grad-CAM computed by hand on the block's tokens, class token dropped."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.manual_seed(4)
    model = timm.create_model("test_vit", num_classes=5).eval()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    saved = {}

    def keep(module, args, out):
        out.retain_grad()
        saved["tokens"] = out

    handle = model.blocks[5].register_forward_hook(keep)
    logits = model(images)
    handle.remove()
    top = logits.argmax(1)
    logits.gather(1, top[:, None]).sum().backward()
    tokens, grads = saved["tokens"][:, 1:].detach(), saved["tokens"].grad[:, 1:]
    cam = torch.relu((grads.mean(1, keepdim=True) * tokens).sum(-1)).reshape(2, 4, 4)  # row-major 16-px patches
    expected = torch.from_numpy(scale_cam_image(scale_cam_image(cam.numpy(), (IMAGE, IMAGE))))
    model.zero_grad(set_to_none=True)

    result = class_activation_map(model, images)
    assert result.layer == "blocks.5"
    assert result.classes == top.tolist()
    assert torch.allclose(result.maps, expected, atol=1e-5)


def test_default_cam_layer_is_the_last_stage():
    assert default_cam_layer(small_spanet()) == "network.6"  # the official Score-CAM demo's network[-1]
    assert default_cam_layer(timm.create_model("test_convnext")) == "stages.3"
    assert default_cam_layer(timm.create_model("test_vit")) == "blocks.5"
    with pytest.raises(ValueError, match="no feature_info"):
        default_cam_layer(GapClassifier())


def test_cam_on_nhwc_and_channels_last_models_and_score_cam():
    torch.manual_seed(5)
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 2, 2),
                             num_heads=(1, 1, 2, 2), img_size=IMAGE, window_size=4, num_classes=5)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    result = class_activation_map(swin, images)  # layers.3 is NHWC (B, 2, 2, C)
    assert result.layer == "layers.3" and result.maps.shape == (2, IMAGE, IMAGE)
    assert result.maps.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # min-max scaled maps

    model = small_spanet()
    reference = class_activation_map(model, images)
    model = model.to(memory_format=torch.channels_last)
    channels_last = class_activation_map(model, images.contiguous(memory_format=torch.channels_last))
    assert channels_last.classes == reference.classes
    assert torch.allclose(channels_last.maps, reference.maps, atol=1e-4)
    score = class_activation_map(model, images, method="scorecam", batch_size=64)
    assert score.classes == reference.classes and score.maps.shape == reference.maps.shape


def test_cam_restores_the_training_flag_and_gradients_and_refuses_bad_input():
    model = GapClassifier().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    class_activation_map(model, torch.randn(1, 3, 8, 8), target_layer="features")
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown CAM method"):
        class_activation_map(model, images, target_layer="features", method="cam")
    with pytest.raises(ValueError, match="2 images"):
        class_activation_map(model, images, target_layer="features", targets=[1])
    with pytest.raises(ValueError, match="no module named"):
        class_activation_map(model, images, target_layer="backbone")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        class_activation_map(model, images, target_layer="features")
