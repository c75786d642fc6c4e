"""spanet-dense: end-to-end runs on the synthetic set and on tiny COCO/ADE20K folders, exact resume after
SIGKILL, evaluation of a checkpoint, bad arguments, and the pinned metric of a shortened default run.

Exactness checks compare with ``torch.equal`` (bitwise). The in-process runs use this process's thread count
(1, set by conftest); the subprocesses get the same through OMP_NUM_THREADS.
"""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spanet import checkpoint as ck
from spanet.dense import cli
from spanet.dense.engine import load_dense_checkpoint

from tests.spanet.cli_support import REPO, run_module
from tests.spanet.cli_support import assert_same_state as _assert_same_state, subprocess_env as _env

# A tiny Mask R-CNN run that draws from every RNG the trainer replays: flips (per sample), multi-scale
# (torchvision's transform, global torch RNG), the RPN/RoI samplers and drop path.
TINY = ["--task", "instance", "--img-size", "64", "--train-images", "8", "--val-images", "4", "--epochs", "2",
        "-b", "2", "--fpn-channels", "32", "--multi-scale", "56", "64", "--drop-path", "0.1",
        "--head-kwargs", "representation_size=64", "mask_layers=(32,)",
        "--no-progress"]


def _run(args, timeout=600, **env):
    return run_module("spanet.dense", args, timeout, **env)


def test_resume_after_sigkill_gives_the_uninterrupted_weights(tmp_path):
    out = str(tmp_path)
    assert cli.main(TINY + ["--output", out, "--name", "straight"]) == 0
    straight = load_dense_checkpoint(os.path.join(out, "straight", "last.pth"))
    # 8 images, batch 2: 4 steps per epoch. Killed after step 6: epoch 1 is saved, epoch 2 half done.
    killed = _run(TINY + ["--output", out, "--name", "killed"], SPANET_DENSE_KILL_AFTER_STEPS="6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = load_dense_checkpoint(os.path.join(out, "killed", "last.pth"))
    assert partial["epoch"] == 1 and partial["global_step"] == 4
    # The run folder alone resumes: the recipe comes from the recorded arguments.
    assert cli.main(["--resume", os.path.join(out, "killed"), "--no-progress"]) == 0
    resumed = load_dense_checkpoint(os.path.join(out, "killed", "last.pth"))
    assert resumed["epoch"] == straight["epoch"] == 2 and resumed["global_step"] == straight["global_step"] == 8
    _assert_same_state(resumed["model"], straight["model"])
    for sa, sb in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        _assert_same_state(sa, sb)
    for ra, rb in zip(resumed["history"], straight["history"]):
        for key in ("train_loss", "train_loss_mask", "val_box_AP", "val_mask_AP", "lr"):
            assert ra[key] == rb[key], key
    with open(os.path.join(out, "killed", "metrics.csv")) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]  # no duplicated rows after resume


def test_end_to_end_files_and_evaluate_reproduces_the_logged_metrics(tmp_path, capsys):
    out = str(tmp_path)
    assert cli.main(TINY + ["--output", out, "--name", "e2e"]) == 0
    printed = capsys.readouterr().out
    assert "final validation: box_AP" in printed and "checkpoint: " in printed and "plots: " in printed
    run = os.path.join(out, "e2e")
    for name in ("last.pth", "best.pth", "metrics.csv", "metrics.json", "summary.json", "loss.png",
                 "metrics.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    history = json.load(open(os.path.join(run, "metrics.json")))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["train_loss"] > history[1]["train_loss"]
    assert summary["final"]["box_AP"] == history[-1]["val_box_AP"] and summary["metric"] == "box_AP"
    assert summary["steps"] == 8 and summary["ranks_identical"]
    ckpt = load_dense_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["arch"] == "maskrcnn" and ckpt["num_classes"] == 4 and ckpt["args"]["channels_last"] is True
    assert ck.state_dict_sha256(ckpt["model"]) == summary["rank_weights_sha256"][0]
    # --evaluate rebuilds the model and data from the checkpoint and finds the last epoch's numbers.
    results = str(tmp_path / "eval.json")
    assert cli.main(["--evaluate", os.path.join(run, "last.pth"), "--results-file", results,
                     "--no-progress"]) == 0
    evaluated = json.load(open(results))
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert evaluated[key] == pytest.approx(history[-1][f"val_{key}"], abs=1e-9), key


def test_semantic_and_retinanet_runs(tmp_path):
    out = str(tmp_path)
    common = ["--img-size", "64", "--train-images", "4", "--val-images", "4", "--epochs", "1", "-b", "2",
              "--fpn-channels", "32", "--no-progress", "--output", out]
    assert cli.main(["--task", "semantic", "--head-kwargs", "head_channels=32", "--name", "sem"] + common) == 0
    row = json.load(open(os.path.join(out, "sem", "metrics.json")))[-1]
    assert 0 < row["val_mIoU"] <= 100 and row["val_aAcc"] >= row["val_mIoU"] * 0  # reported in percent
    assert json.load(open(os.path.join(out, "sem", "summary.json")))["metric"] == "mIoU"
    assert cli.main(["--task", "detection", "--arch", "retinanet", "--name", "ret"] + common) == 0
    ckpt = load_dense_checkpoint(os.path.join(out, "ret", "last.pth"))
    assert not any(k.startswith("backbone.body.norm0.") for k in ckpt["model"])  # published RetinaNet backbone


def _write_coco(root):
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for split in ("train2017", "val2017"):
        os.makedirs(root / split)
    for i in range(4):
        split = "train2017" if i < 3 else "val2017"
        pixels = (rng.uniform(0, 1, (48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "height": 48, "width": 64})
        annotations.append({"id": i + 1, "image_id": 10 + i, "category_id": 18 if i % 2 else 1,
                            "bbox": [8, 8, 20, 16], "area": 320, "iscrowd": 0,
                            "segmentation": [[8, 8, 28, 8, 28, 24, 8, 24]]})
    os.makedirs(root / "annotations")
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    for split, keep in (("train2017", lambda a: a["image_id"] < 13), ("val2017", lambda a: a["image_id"] == 13)):
        doc = {"images": [im for im in images if keep({"image_id": im["id"]})],
               "annotations": [a for a in annotations if keep(a)], "categories": cats}
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(doc, f)


def test_coco_folder_run(tmp_path):
    data = tmp_path / "coco"
    _write_coco(data)
    out = str(tmp_path / "runs")
    assert cli.main(["--task", "instance", "--data-dir", str(data), "--epochs", "1", "-b", "1",
                     "--min-size", "64", "--max-size", "64", "--fpn-channels", "32", "--warmup-iters", "1",
                     "--head-kwargs", "representation_size=32", "mask_layers=(16,)", "--no-progress",
                     "--output", out, "--name", "coco"]) == 0
    ckpt = load_dense_checkpoint(os.path.join(out, "coco", "last.pth"))
    assert ckpt["category_ids"] == [1, 18] and ckpt["num_classes"] == 3 and ckpt["global_step"] == 3
    args = ckpt["args"]
    assert args["preset"] == "coco" and args["lr"] == 1e-4 and args["lr_steps"] == [8, 11]
    assert args["trainable_layers"] == 5


def test_ade20k_folder_run(tmp_path):
    data = tmp_path / "ade"
    rng = np.random.default_rng(0)
    for split, count in (("training", 2), ("validation", 1)):
        os.makedirs(data / "images" / split)
        os.makedirs(data / "annotations" / split)
        for i in range(count):
            Image.fromarray((rng.uniform(0, 1, (40, 56, 3)) * 255).astype(np.uint8)).save(
                data / "images" / split / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 6, (40, 56)).astype(np.uint8)).save(
                data / "annotations" / split / f"{i}.png")
    out = str(tmp_path / "runs")
    assert cli.main(["--task", "semantic", "--data-dir", str(data), "--num-classes", "5", "--iters", "2",
                     "-b", "2", "--img-size", "32", "--seg-scale", "64", "48", "--fpn-channels", "32",
                     "--head-kwargs", "head_channels=32", "--no-progress", "--output", out, "--name", "ade"]) == 0
    ckpt = load_dense_checkpoint(os.path.join(out, "ade", "last.pth"))
    assert ckpt["args"]["schedule"] == "poly" and ckpt["global_step"] == 2 and ckpt["num_classes"] == 5
    assert "val_mIoU" in ckpt["history"][-1]


@pytest.mark.parametrize("argv, message", [
    (["--task", "instance", "--arch", "retinanet"], "--arch retinanet does not do --task instance"),
    (["--model", "resnet50"], "--model must be a SPANet variant"),
    (["--data-dir", "/nonexistent/coco"], "--data-dir '/nonexistent/coco' does not exist"),
    (["-b", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "inf"], "--lr must be finite, got inf"),
    (["--trainable-layers", "7"], "--trainable-layers must be in 0..5"),
    (["--task", "semantic", "--multi-scale", "64"], "--multi-scale takes positive sizes and is for the detectors"),
    (["--backbone-checkpoint", "/nonexistent.pth"], "--backbone-checkpoint '/nonexistent.pth' does not exist"),
    (["--results-file", "r.json"], "--results-file goes with --evaluate"),
    (["--train-images", "1"], "fewer than one global batch"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["--output", str(tmp_path), "--img-size", "32", "--val-images", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spanet-dense: error: ") and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []  # nothing is left behind


def test_foreign_checkpoints_and_existing_runs_are_refused(tmp_path, capsys):
    plain = str(tmp_path / "plain.pth")
    torch.save({"w": torch.ones(1)}, plain)
    assert cli.main(["--evaluate", plain]) == 2
    assert "not a spanet-dense checkpoint" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli.main(["--output", str(tmp_path), "--name", "taken"]) == 2
    assert "already exists" in capsys.readouterr().err
    proc = _run(["-b", "0"], timeout=300)
    assert proc.returncode == 2 and "--batch-size must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_ddp_gloo_two_processes(tmp_path):
    out = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "spanet.dense", "--device", "cpu", "--task", "detection", "--img-size", "64", "--train-images", "8",
           "--val-images", "4", "--epochs", "2", "-b", "2", "--fpn-channels", "32",
           "--head-kwargs", "representation_size=32", "--no-progress", "--output", out, "--name", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "ddp", "summary.json")))
    saved = load_dense_checkpoint(os.path.join(out, "ddp", "last.pth"))
    # Both ranks end with exactly the weights rank 0 saved; 8 images, 2 ranks x 2 per step: 2 steps per epoch.
    assert summary["world_size"] == 2 and summary["rank_weights_sha256"] == [ck.state_dict_sha256(saved["model"])] * 2
    assert saved["global_step"] == 4 and len(saved["rng"]) == 2
    assert proc.stdout.count("spanet-dense:") == 1  # only rank 0 reports


# Shortened default runs (the synthetic preset with fewer images and epochs; seed 42, one thread). Measured:
# Mask R-CNN box AP 8.47 (AP50 30.8, mask AP 17.4) after 64 steps, from about 0 untrained; pinned at half.
def test_shortened_default_instance_run_reaches_the_pinned_box_map(tmp_path):
    assert cli.main(["--task", "instance", "--train-images", "128", "--val-images", "32", "--epochs", "2",
                     "--no-progress", "--output", str(tmp_path), "--name", "short"]) == 0
    final = json.load(open(os.path.join(tmp_path, "short", "summary.json")))["final"]
    assert final["box_AP"] >= 4.0, final
    assert final["box_AP50"] >= 15.0 and final["mask_AP"] >= 8.0, final


# Semantic FPN, one epoch of 128 images (32 steps): measured mIoU 61.9; predicting background everywhere gives
# 21.8 on these 32 images (background IoU 87.4, the three shape classes 0), so 45 shows shapes are segmented.
def test_shortened_default_semantic_run_reaches_the_pinned_miou(tmp_path):
    assert cli.main(["--task", "semantic", "--train-images", "128", "--val-images", "32", "--epochs", "1",
                     "--no-progress", "--output", str(tmp_path), "--name", "short"]) == 0
    final = json.load(open(os.path.join(tmp_path, "short", "summary.json")))["final"]
    assert final["mIoU"] >= 45.0, final


# The full default (spanet-dense --task instance: 384 steps): measured box AP 59.2 (AP50 92.0), mask AP 58.4.
@pytest.mark.slow
def test_default_instance_run_reaches_the_pinned_box_map(tmp_path):
    assert cli.main(["--no-progress", "--output", str(tmp_path), "--name", "default"]) == 0
    final = json.load(open(os.path.join(tmp_path, "default", "summary.json")))["final"]
    assert final["box_AP"] >= 45.0 and final["mask_AP"] >= 45.0, final
