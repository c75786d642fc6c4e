"""Tests for spanet-validate: a published-style plain state dict, pretrained_cfg preprocessing, errors.

The expected metrics are computed here independently: torchvision transforms built by hand from the
model's pretrained_cfg (resize to floor(size / crop_pct), centre crop, ImageNet mean/std), the model run
directly, top-k and cross-entropy computed with plain torch. (dtype float32, atol 1e-4 on the loss.)
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import spanet  # noqa: F401  (registers spanet_small)
from spanet import data as data_lib
from spanet import validate as validate_mod


@pytest.fixture(scope="module")
def published_like(tmp_path_factory):
    """A spanet_small state dict in the published container: {'model': {'module.<key>': tensor}}, no filters."""
    torch.manual_seed(0)
    model = timm.create_model("spanet_small", num_classes=10).eval()
    with torch.no_grad():
        model.head.weight.mul_(300.0)  # make the logits depend strongly on the input (preprocessing matters)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(".filter")}
    path = tmp_path_factory.mktemp("ckpt") / "spanet-small-digits.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, str(path))
    return model, str(path)


def test_validate_plain_state_dict_with_pretrained_cfg_preprocessing(published_like):
    model, path = published_like
    n = 40
    args = validate_mod.build_parser().parse_args(
        ["--model", "spanet_small", "--checkpoint", path, "--img-size", "32", "--samples", str(n),
         "--batch-size", "16", "--num-classes", "10"])
    res = validate_mod.validate(args)

    cfg = model.pretrained_cfg
    assert res["crop_pct"] == cfg["crop_pct"] == 0.9 and res["interpolation"] == cfg["interpolation"]
    ds = data_lib.DigitsDataset("val", image_size=32)
    picked = data_lib.subset_indices(len(ds), n)
    y = torch.tensor([ds.targets[i] for i in picked])

    def reference(crop_pct):
        tf = T.Compose([
            T.Resize(math.floor(32 / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ])
        with torch.no_grad():
            return model(torch.stack([tf(ds.images[i]) for i in picked]))

    logits = reference(cfg["crop_pct"])
    top5 = logits.topk(5, dim=1).indices
    assert res["samples"] == n
    assert res["top1"] == 100.0 * int((top5[:, 0] == y).sum()) / n
    assert res["top5"] == 100.0 * int((top5 == y[:, None]).any(dim=1).sum()) / n
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-4)
    assert res["images_per_sec"] > 0
    # The loss is sensitive to the preprocessing: another crop_pct moves it far beyond the tolerance.
    assert abs(F.cross_entropy(reference(1.0), y).item() - res["loss"]) > 1e-2


def test_validate_cli_errors(published_like, tmp_path, capsys):
    _, path = published_like
    assert validate_mod.main(["--checkpoint", path, "--samples", "8"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", str(tmp_path / "missing.pth"), "--model", "spanet_small"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_nope"]) == 2
    assert "unknown model 'spanet_nope'" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--use-ema", "--samples", "8"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--data-dir",
                              str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A checkpoint with a 10-class head does not fit a 1000-class model: a clear error, not a crash.
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--num-classes", "1000"]) == 2
    assert "shape mismatches" in capsys.readouterr().err
