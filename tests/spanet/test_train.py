"""Tests for spanet-train: the CLI end to end, exact resume after SIGKILL, DDP with gloo, bad arguments.

Mechanics tests use timm's tiny ``test_resnet`` on a few digits images (they are about the trainer, not the
model); the end-to-end test trains ``spanet_small``. Exactness checks compare with ``torch.equal`` (bitwise).
"""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from spanet import checkpoint as ck
from spanet import train as train_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A run that exercises every RNG consumer: RandAugment (python random), random erasing and drop path (torch),
# MixUp/CutMix (numpy), plus EMA, gradient accumulation and the per-update schedule.
MECHANICS = [
    "--model", "test_resnet", "--train-samples", "64", "--val-samples", "32", "--batch-size", "16",
    "--epochs", "2", "--grad-accum-steps", "2", "--aa", "rand-m5-n2", "--reprob", "0.5", "--mixup", "0.4",
    "--cutmix", "0.4", "--drop-path", "0.1", "--model-ema", "--model-ema-warmup", "--no-progress",
]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Same intra-op thread count as this process: bitwise comparisons with in-process runs stay meaningful.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(extra)
    return env


def _run(args, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "spanet.train", *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_gives_the_uninterrupted_weights(tmp_path):
    out = str(tmp_path)
    # Uninterrupted reference run (in this process).
    assert train_mod.main(MECHANICS + ["--output", out, "--name", "straight"]) == 0
    straight = ck.load_training_checkpoint(os.path.join(out, "straight", "last.pth"))

    # Same run, SIGKILLed after its 3rd optimizer step: epoch 1 (2 steps) is checkpointed, epoch 2 is not.
    killed = _run(MECHANICS + ["--output", out, "--name", "killed"], SPANET_TRAIN_KILL_AFTER_STEPS="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = ck.load_training_checkpoint(os.path.join(out, "killed", "last.pth"))
    assert partial["epoch"] == 1 and partial["global_step"] == 2
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.join(out, "killed")))

    # Resuming needs only the run folder: the recipe comes from the checkpoint's recorded arguments.
    assert train_mod.main(["--resume", os.path.join(out, "killed"), "--no-progress"]) == 0
    resumed = ck.load_training_checkpoint(os.path.join(out, "killed", "last.pth"))
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["global_step"] == straight["global_step"] == 4
    _assert_same_state(resumed["model"], straight["model"])
    _assert_same_state(resumed["model_ema"], straight["model_ema"])
    for sa, sb in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        _assert_same_state(sa, sb)
    for ra, rb in zip(resumed["history"], straight["history"]):
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "lr"):
            assert ra[key] == rb[key], key
    with open(os.path.join(out, "killed", "metrics.csv")) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]  # no duplicated rows after resume


def test_cli_end_to_end_spanet_small_and_validate(tmp_path):
    out = str(tmp_path)
    proc = _run(["--train-samples", "64", "--val-samples", "48", "--epochs", "2", "--batch-size", "32",
                 "--output", out, "--name", "e2e"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = os.path.join(out, "e2e")
    for name in ("last.pth", "best.pth", "metrics.csv", "metrics.json", "summary.json", "loss.png",
                 "accuracy.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    assert "checkpoint: " in proc.stdout and "plots: " in proc.stdout and "top-1 %" in proc.stdout
    history = json.load(open(os.path.join(run, "metrics.json")))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    assert summary["model"] == "spanet_small" and summary["final_val_top1"] == history[-1]["val_top1"]
    best_epoch = max(range(2), key=lambda i: (history[i]["val_top1"], -i))
    assert summary["best_epoch"] == best_epoch + 1
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_top1"]) for r in rows] == [h["val_top1"] for h in history]
    ckpt = ck.load_training_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["model_name"] == "spanet_small" and ckpt["data_config"]["input_size"] == [3, 32, 32]
    assert ckpt["args"]["channels_last"] is True  # the CPU default

    # spanet-validate on the last checkpoint reproduces the logged final-epoch metrics exactly.
    from spanet import validate as validate_mod

    res = validate_mod.validate(validate_mod.build_parser().parse_args(
        ["--checkpoint", os.path.join(run, "last.pth"), "--samples", "48", "--batch-size", "64"]))
    assert res["samples"] == 48 and res["model"] == "spanet_small"
    assert res["top1"] == pytest.approx(history[-1]["val_top1"], abs=1e-9)
    assert res["top5"] == pytest.approx(history[-1]["val_top5"], abs=1e-9)
    assert res["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)


def test_ddp_gloo_two_processes(tmp_path):
    out = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "spanet.train", "--device", "cpu", "--model", "test_resnet", "--train-samples", "128",
           "--val-samples", "64", "--batch-size", "16", "--epochs", "3", "--lr", "0.01", "--smoothing", "0",
           "--warmup-epochs", "0", "--no-progress", "--output", out, "--name", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = os.path.join(out, "ddp")
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["world_size"] == 2 and len(summary["rank_weights_sha256"]) == 2
    saved = ck.load_training_checkpoint(os.path.join(run, "last.pth"))
    # Both ranks ended with exactly the weights rank 0 saved.
    assert summary["rank_weights_sha256"] == [ck.state_dict_sha256(saved["model"])] * 2
    assert len(saved["rng"]) == 2 and saved["world_size"] == 2
    losses = [h["train_loss"] for h in summary_history(run)]
    assert losses[-1] < losses[0], losses
    # 128 images, 2 ranks x 16 per step: 4 steps per epoch.
    assert saved["global_step"] == 12
    assert proc.stdout.count("spanet-train:") == 1  # only rank 0 reports


def summary_history(run):
    return json.load(open(os.path.join(run, "metrics.json")))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "/nonexistent/imagenet"], "--data-dir '/nonexistent/imagenet' does not exist"),
        (["--model", "spanet_smal"], "unknown model 'spanet_smal'; did you mean spanet_small"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--mixup", "0.8", "--batch-size", "15"], "even --batch-size"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert train_mod.main(argv + ["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spanet-train: error: ") and message in err
    assert os.listdir(tmp_path) == []


def test_bad_arguments_exit_code_of_the_process(tmp_path):
    proc = _run(["--batch-size", "0", "--output", str(tmp_path)], timeout=300)
    assert proc.returncode == 2 and "--batch-size must be >= 1" in proc.stderr


def test_data_dir_without_val_split(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    assert train_mod.main(["--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "runs")]) == 2


def test_corrupt_resume_and_existing_run_never_overwrite(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pth").write_bytes(b"\x00garbage")
    assert train_mod.main(["--model", "test_resnet", "--resume", str(run)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == b"\x00garbage"
    # Starting a new run into a folder that holds a checkpoint is refused.
    assert train_mod.main(["--model", "test_resnet", "--output", str(tmp_path), "--name", "r"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == b"\x00garbage"
    # A plain state dict is not resumable, and a checkpoint of another model is refused.
    torch.save({"w": torch.ones(1)}, str(run / "plain.pth"))
    assert train_mod.main(["--model", "test_resnet", "--resume", str(run / "plain.pth")]) == 2
    assert "not a spanet-train checkpoint" in capsys.readouterr().err
    ck.save_checkpoint({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "model_name": "resnet18",
                        "num_classes": 10}, str(run / "other.pth"))
    assert train_mod.main(["--model", "test_resnet", "--resume", str(run / "other.pth")]) == 2
    assert "trained with --model resnet18" in capsys.readouterr().err


def test_presets_and_overrides():
    args = train_mod.parse_args([])
    assert (args.preset, args.model, args.img_size, args.hflip, args.mixup) == ("digits", "spanet_small", 32, 0.0, 0.0)
    args = train_mod.parse_args(["--data-dir", "/x", "--model", "spanet_base"])
    assert args.preset == "imagenet"
    assert (args.epochs, args.lr_base, args.lr_base_size, args.weight_decay, args.warmup_epochs) == (
        300, 1e-3, 1024, 0.05, 5)
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (
        0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")
    assert args.drop_path == 0.3  # spanet_base's published rate
    args = train_mod.parse_args(["--preset", "imagenet", "--epochs", "7", "--drop-path", "0.05", "--aa", "none"])
    assert (args.epochs, args.drop_path, args.aa, args.mixup) == (7, 0.05, None, 0.8)


def test_imagefolder_training_and_validation(tmp_path):
    """Train on an ImageFolder tree (the digits exported as PNGs) and re-validate the checkpoint."""
    from spanet import data as data_lib
    from spanet import validate as validate_mod

    for split in ("train", "val"):
        ds = data_lib.DigitsDataset(split, image_size=16)
        for i in range(40 if split == "train" else 20):
            folder = tmp_path / "tree" / split / f"digit{ds.targets[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.images[i].save(folder / f"{i}.png")
    tree = str(tmp_path / "tree")
    argv = ["--data-dir", tree, "--preset", "digits", "--model", "test_resnet", "--img-size", "16", "--epochs", "1",
            "--batch-size", "8", "--no-progress", "--output", str(tmp_path / "runs"), "--name", "folder"]
    assert train_mod.main(argv) == 0
    run = tmp_path / "runs" / "folder"
    saved = ck.load_training_checkpoint(str(run / "last.pth"))
    class_to_idx = saved["class_to_idx"]
    assert class_to_idx == {name: i for i, name in enumerate(sorted(class_to_idx))}
    assert saved["num_classes"] == len(class_to_idx) and saved["args"]["data_dir"] == tree
    logged = json.load(open(run / "metrics.json"))[-1]
    res = validate_mod.validate(validate_mod.build_parser().parse_args(["--checkpoint", str(run)]))
    assert res["samples"] == 20 and res["data"] == tree
    assert res["top1"] == logged["val_top1"] and res["top5"] == logged["val_top5"]
