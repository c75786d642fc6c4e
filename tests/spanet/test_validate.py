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
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_smal"]) == 2
    assert "unknown model 'spanet_smal'; did you mean spanet_small" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--use-ema", "--samples", "8"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--data-dir",
                              str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A checkpoint with a 10-class head does not fit a 1000-class model: a clear error, not a crash.
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--num-classes", "1000"]) == 2
    assert "shape mismatches" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    (["--std", "0", "0", "0"], "--std must be finite and > 0"),
    (["--num-classes", "3"], "--num-classes 3 is fewer than the 10 classes of the data"),
    (["--results-file", "/nonexistent-folder/r.json"], "--results-file '/nonexistent-folder/r.json': the folder"),
])
def test_validate_bad_flags_exit_2_naming_the_flag(published_like, argv, message, capsys):
    _, path = published_like
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spanet-validate: error: ") and message in err and err.count("\n") == 1


def test_unwritable_results_file_is_found_before_the_evaluation(published_like, tmp_path, capsys, monkeypatch):
    _, path = published_like
    monkeypatch.setattr(validate_mod, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    assert validate_mod.main(["--checkpoint", path, "--model", "spanet_small", "--results-file",
                              str(tmp_path)]) == 2
    assert "--results-file '" + str(tmp_path) + "' is a directory" in capsys.readouterr().err


def test_validate_threads_and_results_file(published_like, tmp_path):
    _, path = published_like
    before = torch.get_num_threads()
    out = tmp_path / "r.json"
    try:
        res = validate_mod.validate(validate_mod.build_parser().parse_args(
            ["--model", "spanet_small", "--checkpoint", path, "--img-size", "32", "--samples", "8",
             "--num-classes", "10", "--threads", "2", "--results-file", str(out)]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    import json

    assert json.loads(out.read_text())["top1"] == res["top1"] and res["samples"] == 8


def test_validation_pass_records_no_graph_and_runs_no_training_kernel():
    """evaluate() runs in eval mode under inference_mode: no output requires grad, and the training-only CPU
    kernels (spanet::pointwise_mlp, spanet::depthwise_row_conv) never run, on channels_last CPU input (the
    default), even for a model left in training mode with trainable weights."""
    from spanet_ops.backends import native_module
    from torch.profiler import ProfilerActivity, profile

    if native_module() is None:
        pytest.skip("the training kernels need the native CPU extension")
    torch.manual_seed(0)
    model = timm.create_model("spanet_small", num_classes=10).to(memory_format=torch.channels_last).train()
    ds = data_lib.DigitsDataset("val", image_size=32)
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    ds.transform = data_lib.build_transform(cfg, is_training=False)
    loader = data_lib.build_eval_loader(ds, batch_size=4, num_workers=0, limit=8)
    outputs = []
    hook = model.register_forward_hook(lambda module, args, out: outputs.append(out))
    training_ops = ("spanet::pointwise_mlp", "spanet::depthwise_row_conv")
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            res = validate_mod.evaluate(model, loader, torch.device("cpu"), channels_last=True)
        names = {e.name for e in prof.events()}
        assert len(outputs) == 2 and res["samples"] == 8
        assert not any(o.requires_grad for o in outputs)
        assert not [n for n in names if any(op in n for op in training_ops)]
        assert model.training  # the caller's mode is restored
        # The same profiling sees those kernels in a training step, so the check above can fail.
        x = next(iter(loader))[0].contiguous(memory_format=torch.channels_last)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x).sum().backward()
        names = {e.name for e in prof.events()}
        assert all(any(op in n for n in names) for op in training_ops)
    finally:
        hook.remove()
