"""spanet-analyze end to end (a spanet-train-format checkpoint of a small spanet_small and a random test_convnext
on the embedded digits at 32 px), its numbers against the API's, and its one-line errors."""
import json
import os

import numpy as np
import pytest
import torch
import timm
from PIL import Image

import spanet  # noqa: F401  (registers spanet_*)
from spanet import checkpoint as ckpt_lib
from spanet import data as data_lib
from spanet.analysis import collect_features, relative_log_amplitude
from spanet.analysis.cli import OUTPUT_FILES, main

DIGITS_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "center"}
#: A spanet_small with one block per stage and narrow stages, as ``spanet-train --model-kwargs`` records it.
SMALL = {"depths": [1, 2, 1, 1], "dims": [16, 32, 48, 64]}


def write_training_checkpoint(path, model_name="spanet_small", model=None):
    """A checkpoint in spanet-train's format (the keys spanet-analyze reads), holding ``model``'s weights."""
    state = model.state_dict() if model is not None else {}
    ckpt_lib.save_checkpoint({
        "format": ckpt_lib.FORMAT, "format_version": ckpt_lib.FORMAT_VERSION, "model_name": model_name,
        "num_classes": 10, "data_config": DIGITS_CONFIG, "args": {"data_dir": None, "model_kwargs": SMALL},
        "model": state,
        "model_ema": None,
    }, str(path))
    return str(path)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("spanet_small", num_classes=10, **SMALL).eval()
    path = write_training_checkpoint(tmp_path_factory.mktemp("run") / "best.pth", model=model)
    return path, model


def test_end_to_end_two_models_side_by_side(trained_like, tmp_path, capsys):
    path, model = trained_like
    out = tmp_path / "out"
    code = main(["--checkpoint", f"{os.path.dirname(path)},", "--model", "spanet_small,test_convnext",
                 "--num-images", "6", "--show-images", "2", "--batch-size", "4", "--out-dir", str(out),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "test_convnext is randomly initialised" in captured.err
    assert "spanet_small is randomly" not in captured.err
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)
    for name in OUTPUT_FILES[:-1]:
        assert Image.open(out / name).format == "PNG"

    analysis = json.loads((out / "analysis.json").read_text())
    indices = data_lib.subset_indices(len(data_lib.digits_split_indices("val")), 6)
    assert analysis["images"]["ids"] == [f"digits/val/{i}" for i in indices]
    spanet_record, convnext_record = analysis["models"]
    assert spanet_record["weights"]["checkpoint"] == os.path.abspath(path)
    assert spanet_record["weights"]["kind"] == "spanet-train checkpoint"
    assert spanet_record["weights"]["state_dict_sha256"] == ckpt_lib.state_dict_sha256(model.state_dict())
    assert convnext_record["weights"]["kind"] == "random initialisation"
    assert spanet_record["data_config"]["input_size"] == [3, 32, 32]

    # The curves are those of the API on the same preprocessed images.
    digits = data_lib.DigitsDataset("val", image_size=32)
    transform = data_lib.build_transform(DIGITS_CONFIG, is_training=False)
    batch = torch.stack([transform(digits.images[i]) for i in indices])
    features = collect_features(model, batch)
    layers = spanet_record["layers"]
    assert [layer["name"] for layer in layers] == list(features)
    assert len(layers) == 5
    for layer in layers:
        curve, delta = relative_log_amplitude(features[layer["name"]])
        assert layer["relative_log_amplitude"] == pytest.approx(curve.tolist(), abs=1e-5)
        assert layer["delta_at_pi"] == (pytest.approx(delta, abs=1e-5) if len(curve) > 1 else None)
        assert layer["shape"] == list(features[layer["name"]].shape[1:])
    # 32 px: stage 1 maps are 8x8 (4 diagonal steps), stage 4 maps 1x1 (no frequency axis).
    assert len(layers[0]["relative_log_amplitude"]) == 4 and layers[-1]["delta_at_pi"] is None
    assert spanet_record["cam"]["layer"] == "network.2"  # the last stage with maps of at least 4x4 at 32 px
    assert spanet_record["cam"]["labels"] == [digits.targets[i] for i in indices[:2]]
    assert spanet_record["model_kwargs"] == dict(SMALL, num_classes=10)
    assert spanet_record["context_blocks"] == ["network.0.0.token_mixer", "network.2.1.token_mixer",
                                               "network.4.0.token_mixer"]
    assert convnext_record["context_blocks"] == []
    assert "wrote spectrum_maps.png" in captured.out

    # Nothing is overwritten without --overwrite; with it, no file of the earlier run is left behind.
    assert main(["--model", "test_convnext", "--out-dir", str(out), "--no-progress"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["--model", "test_convnext", "--num-images", "2", "--out-dir", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == sorted(set(OUTPUT_FILES) - {"context_maps.png"})
    assert [m["model"] for m in json.loads((out / "analysis.json").read_text())["models"]] == ["test_convnext"]


def test_model_kwargs_build_the_models_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", "spanet_small", "--model-kwargs", "depths=(1,1,1,1)", "dims=(16,32,48,64)",
            "--num-images", "2", "--out-dir", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "analysis.json").read_text())["models"][0]
    assert [layer["name"] for layer in record["layers"]] == [f"network.{2 * i}.0.token_mixer" for i in range(4)]
    assert record["layers"][0]["shape"] == [16, 8, 8]
    assert main(["--model", "test_convnext", "--model-kwargs", "depth=3", "--out-dir", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "cannot create test_convnext with {'depth': 3}" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["flat", "imagefolder"])
def test_a_folder_of_images(layout, tmp_path, capsys, monkeypatch):
    """A flat folder, or an ImageFolder tree whose val split is used, given as a relative path."""
    root = tmp_path / "data"
    folders = [root] * 3 if layout == "flat" else [root / "val" / "cat"] * 2 + [root / "val" / "dog"]
    if layout == "imagefolder":
        (root / "train" / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "unused.png")
    rng = np.random.default_rng(0)
    files = []
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(files[-1])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["--model", "test_convnext", "--data-dir", "data", "--img-size", "32", "--out-dir", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["images"]["ids"] == [str(f) for f in files]
    assert analysis["images"]["labels"] == (["", "", ""] if layout == "flat" else ["cat", "cat", "dog"])
    assert analysis["models"][0]["data_config"]["input_size"] == [3, 32, 32]
    assert not (out / "context_maps.png").exists()  # no SPANet


@pytest.mark.parametrize("argv,message", [
    (["--model", "spanet_smal"], "unknown model 'spanet_smal'; did you mean spanet_small"),
    (["--checkpoint", "/nonexistent/best.pth"], "--checkpoint '/nonexistent/best.pth' does not exist"),
    (["--data-dir", "/nonexistent-data"], "--data-dir '/nonexistent-data' does not exist"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--model", "spanet_small,test_convnext", "--checkpoint", "a.pth"], "give one per model"),
])
def test_bad_arguments_get_a_one_line_error(argv, message, tmp_path, capsys):
    assert main(argv + ["--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spanet-analyze: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_checkpoint_problems_get_a_one_line_error(tmp_path, capsys):
    own = write_training_checkpoint(tmp_path / "own.pth")
    plain = tmp_path / "plain.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (["--checkpoint", own, "--model", "spanet_base"], "holds a spanet_small, not a spanet_base"),
        (["--checkpoint", str(plain)], "is a plain state dict; pass --model"),
        (["--checkpoint", str(empty)], "is a folder without best.pth or last.pth"),
        (["--data-dir", str(empty), "--model", "test_convnext"], "holds no"),
        (["--out-dir", str(blocker / "out")], "is not a writable folder"),
    ]
    for argv, message in cases:
        if "--out-dir" not in argv:
            argv = argv + ["--out-dir", str(tmp_path / "out")]
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("spanet-analyze: error: ") and message in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "out" / "analysis.json").exists()
