"""Tests for spanet-train: the CLI end to end, exact resume after SIGKILL whatever the worker counts, DDP with
gloo, stopping on a non-finite loss, integrity checks on resume, run-folder claims, host syncs, bad arguments.

Mechanics tests use timm's tiny ``test_resnet`` on a few digits images (they are about the trainer, not the
model); the end-to-end test trains ``spanet_small``. Exactness checks compare with ``torch.equal`` (bitwise).
"""
import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest
import torch

from spanet import checkpoint as ck
from spanet import train as train_mod

from tests.spanet.cli_support import REPO, run_module
from tests.spanet.cli_support import assert_same_state as _assert_same_state, subprocess_env as _env

# A run that exercises every RNG consumer: RandAugment (python random), random erasing and drop path (torch),
# MixUp/CutMix (numpy), plus EMA, gradient accumulation and the per-update schedule.
MECHANICS = [
    "--model", "test_resnet", "--train-samples", "64", "--val-samples", "32", "--batch-size", "16",
    "--epochs", "2", "--grad-accum-steps", "2", "--aa", "rand-m5-n2", "--reprob", "0.5", "--mixup", "0.4",
    "--cutmix", "0.4", "--drop-path", "0.1", "--model-ema", "--model-ema-warmup", "--no-progress",
]


def _run(args, timeout=600, **env):
    return run_module("spanet.train", args, timeout, **env)


def test_resume_after_sigkill_with_other_worker_counts_gives_the_uninterrupted_weights(tmp_path):
    out = str(tmp_path)
    # Uninterrupted reference run (in this process, data loaded in the main process).
    assert train_mod.main(MECHANICS + ["--output", out, "--name", "straight", "--workers", "0"]) == 0
    straight = ck.load_training_checkpoint(os.path.join(out, "straight", "last.pth"))

    # Same run with 2 loader workers, SIGKILLed after its 3rd optimizer step: epoch 1 (2 steps) is
    # checkpointed, epoch 2 is not.
    killed = _run(MECHANICS + ["--output", out, "--name", "killed", "--workers", "2"],
                  SPANET_TRAIN_KILL_AFTER_STEPS="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = os.path.join(out, "killed")
    partial = ck.load_training_checkpoint(os.path.join(run, "last.pth"))
    assert partial["epoch"] == 1 and partial["global_step"] == 2
    assert not any(n.endswith(".tmp") for n in os.listdir(run))
    # What a kill during a save leaves behind (atomic_write's temporary name): removed on resume.
    orphan = os.path.join(run, ".last.pth.0123456789abcdef.tmp")
    open(orphan, "wb").write(b"x" * 1000)

    # Resuming needs only the run folder (the recipe comes from the checkpoint's recorded arguments), here
    # with 1 worker: the stream of augmented samples does not depend on the worker count.
    assert train_mod.main(["--resume", run, "--no-progress", "--workers", "1"]) == 0
    assert not os.path.exists(orphan)
    resumed = ck.load_training_checkpoint(os.path.join(run, "last.pth"))
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["global_step"] == straight["global_step"] == 4
    _assert_same_state(resumed["model"], straight["model"])
    _assert_same_state(resumed["model_ema"], straight["model_ema"])
    for sa, sb in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        _assert_same_state(sa, sb)
    for ra, rb in zip(resumed["history"], straight["history"]):
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "lr"):
            assert ra[key] == rb[key], key
    with open(os.path.join(run, "metrics.csv")) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]  # no duplicated rows after resume


def test_cli_end_to_end_spanet_small_and_validate(tmp_path):
    out = str(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    proc = _run(["--train-samples", "64", "--val-samples", "48", "--epochs", "2", "--batch-size", "32",
                 "--log-interval", "1", "--output", out, "--name", "e2e"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = os.path.join(out, "e2e")
    for name in ("last.pth", "best.pth", "metrics.csv", "metrics.json", "summary.json", "loss.png",
                 "accuracy.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
        # Every file follows the umask (atomically written ones were 0600).
        assert stat.S_IMODE(os.stat(os.path.join(run, name)).st_mode) == 0o666 & ~umask, name
    # Off a terminal the bar is replaced by step logs at --log-interval: no carriage-return redraws.
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "epoch 1 step 1/2: loss " in proc.stdout and "epoch 2 step 1/2: loss " in proc.stdout
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
        (["--clip-grad", "-1"], "--clip-grad must be finite and > 0, got -1.0"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
        (["--crop-pct", "-1"], "--crop-pct must be in (0, 1]"),
        (["--std", "0", "0", "0"], "--std must be finite and > 0"),
        (["--weight-decay", "-1"], "--weight-decay must be finite and >= 0, got -1.0"),
        (["--scale", "2", "1"], "--scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
        (["--ratio", "1", "0"], "--ratio must be LOW HIGH with 0 < LOW <= HIGH"),
        (["--hflip", "2"], "--hflip must be a probability in [0, 1], got 2.0"),
        (["--reprob", "5"], "--reprob must be a probability in [0, 1], got 5.0"),
        (["--mixup", "-1"], "--mixup must be finite and >= 0, got -1.0"),
        (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
        (["--lr", "nan"], "--lr must be finite and > 0, got nan"),
        (["--log-interval", "0"], "--log-interval must be >= 1"),
        (["--seed", "-3"], "--seed must be >= 0"),
        (["--interpolation", "cubic"], "--interpolation must be one of"),
        # Found out after the data is read: the run folder claimed meanwhile is removed again.
        (["--num-classes", "3"], "--num-classes 3 is fewer than the 10 classes of the training data"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert train_mod.main(argv + ["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spanet-train: error: ") and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_unusable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert train_mod.main(["--model", "test_resnet", "--output", str(a_file)]) == 2
    assert "--output '" + str(a_file) + "' is a file, not a folder" in capsys.readouterr().err
    assert train_mod.main(["--model", "test_resnet", "--output", str(a_file / "sub")]) == 2
    assert "cannot create --output" in capsys.readouterr().err
    # A folder that cannot be written (simulated: the tests may run as root, who writes anywhere).
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert train_mod.main(["--model", "test_resnet", "--output", str(tmp_path / "runs"), "--name", "ro"]) == 2
    assert "run folder '" + str(tmp_path / "runs" / "ro") + "' is not writable: Permission denied" in \
        capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []


def test_run_folders_are_claimed_exclusively(tmp_path, monkeypatch):
    import datetime as real_datetime

    class Frozen(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime(2025, 1, 1, 12, 0, 0)

    monkeypatch.setattr(train_mod.datetime, "datetime", Frozen)
    args = train_mod.parse_args(["--model", "test_resnet", "--output", str(tmp_path)])
    # Two runs started within the same second get two folders.
    first, created = train_mod._claim_run_dir(args)
    second, _ = train_mod._claim_run_dir(args)
    assert created and os.path.basename(first) == "test_resnet-digits-20250101-120000"
    assert os.path.basename(second) == "test_resnet-digits-20250101-120000-1"
    # A named folder that exists (here: claimed by a run that has not saved a checkpoint yet) is refused.
    named = train_mod.parse_args(["--model", "test_resnet", "--output", str(tmp_path), "--name", "same"])
    train_mod._claim_run_dir(named)
    with pytest.raises(train_mod.UsageError, match="run folder .*same' already exists; choose another --name"):
        train_mod._claim_run_dir(named)


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
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == b"\x00garbage"
    # Starting a new run into an existing folder is refused.
    assert train_mod.main(["--model", "test_resnet", "--output", str(tmp_path), "--name", "r"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == b"\x00garbage"
    # A plain state dict is not resumable, and a checkpoint of another model is refused.
    torch.save({"w": torch.ones(1)}, str(run / "plain.pth"))
    assert train_mod.main(["--model", "test_resnet", "--resume", str(run / "plain.pth")]) == 2
    assert "not a spanet-train checkpoint" in capsys.readouterr().err
    ck.save_checkpoint({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "model_name": "resnet18",
                        "num_classes": 10}, str(run / "other.pth"))
    assert train_mod.main(["--model", "test_resnet", "--resume", str(run / "other.pth")]) == 2
    assert "trained with --model resnet18" in capsys.readouterr().err


TINY = ["--model", "test_resnet", "--train-samples", "32", "--val-samples", "16", "--batch-size", "8",
        "--smoothing", "0", "--no-progress"]


@pytest.fixture
def one_epoch_run(tmp_path):
    assert train_mod.main(TINY + ["--epochs", "1", "--output", str(tmp_path), "--name", "run"]) == 0
    return tmp_path / "run"


def test_damaged_or_non_finite_checkpoints_are_not_resumed(one_epoch_run, capsys):
    last = one_epoch_run / "last.pth"
    good = last.read_bytes()
    saved = ck.load_training_checkpoint(str(last))
    # 4 KiB of 0xFF in the largest weight tensor's record (as a disk or copy error would leave it).
    import zipfile

    with zipfile.ZipFile(last) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(good)
    start = record.header_offset + 30 + len(record.filename) + len(record.extra) + 64
    data[start:start + 4096] = b"\xff" * 4096
    last.write_bytes(bytes(data))
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.pth' is damaged: record" in err and "fails its CRC-32 check" in err
    assert last.read_bytes() == bytes(data)  # nothing overwritten
    # Intact file, but weights that hold NaN (a run that diverged before this check existed).
    saved["model"]["fc.weight"][0, 0] = float("nan")
    ck.save_checkpoint(saved, str(last))
    before = last.read_bytes()
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "2"]) == 2
    assert "holds non-finite weights: 'fc.weight' contains NaN or infinity" in capsys.readouterr().err
    assert last.read_bytes() == before


def test_resume_with_another_optimizer_or_model_kwargs_is_refused(one_epoch_run, capsys):
    before = (one_epoch_run / "last.pth").read_bytes()
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "2", "--opt", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "--opt 'sgd' differs from the 'adamw' of the run being resumed" in err and "--initial-checkpoint" in err
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "2", "--model-kwargs", "stem_chs=8"]) == 2
    assert "--model-kwargs {'stem_chs': 8} differs from the {} of the run" in capsys.readouterr().err
    assert (one_epoch_run / "last.pth").read_bytes() == before


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(one_epoch_run, capsys, monkeypatch):
    last = one_epoch_run / "last.pth"
    good = last.read_bytes()
    # From here on the training loss is NaN (the validation loss too, which does not matter).
    original = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: original(self, x, y) * float("nan"))
    # 4 optimizer steps per epoch: with a limit of 10 the steps do not stop the run, but the NaN weights
    # they leave are not saved.
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "3", "--max-nonfinite-steps", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("spanet-train: error: the weights became non-finite in epoch 2") and err.count("\n") == 1
    assert "the last good checkpoint" in err and last.read_bytes() == good
    assert train_mod.main(["--resume", str(one_epoch_run), "--epochs", "3", "--max-nonfinite-steps", "3",
                           "--log-interval", "2"]) == 1
    err = capsys.readouterr().err
    assert "the training loss was NaN or infinite for 4 consecutive optimizer steps (epoch 2, by step 8)" in err
    assert last.read_bytes() == good
    assert [n for n in os.listdir(one_epoch_run) if n.endswith(".tmp")] == []


def test_training_loop_syncs_the_host_only_at_log_intervals(tmp_path, monkeypatch):
    """Host reads of device tensors (.item, .cpu, .tolist, float(), bool(), ...) made by the training loop:
    none per micro-batch; one transfer per --log-interval optimizer steps and one at the end of the epoch."""
    calls = {"loop": 0, "totals": 0}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller == "_train_one_epoch":
                calls["loop"] += 1
            elif caller == "read_totals" and _name == "cpu":
                calls["totals"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    # 64 images / batch 8 = 8 optimizer steps per epoch; logs after steps 3 and 6, plus the epoch's end.
    argv = ["--model", "test_resnet", "--train-samples", "64", "--val-samples", "16", "--batch-size", "8",
            "--epochs", "2", "--log-interval", "3", "--no-progress", "--output", str(tmp_path), "--name", "s"]
    assert train_mod.main(argv) == 0
    assert calls == {"loop": 0, "totals": 2 * 3}


def test_pretrained_without_network_points_to_initial_checkpoint(tmp_path, capsys, monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("[Errno 101] Network is unreachable")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    assert train_mod.main(["--model", "test_resnet", "--pretrained", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load the pretrained weights of test_resnet" in err
    assert "Network is unreachable" in err and "--initial-checkpoint FILE" in err
    assert os.listdir(tmp_path) == []


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
    # The official train_spanet_baseX.sh sets DROP_PATH=0.5.
    assert train_mod.parse_args(["--data-dir", "/x", "--model", "spanet_baseX"]).drop_path == 0.5
    assert train_mod.PUBLISHED_DROP_PATH == {"spanet_small": 0.1, "spanet_medium": 0.2, "spanet_mediumX": 0.3,
                                             "spanet_base": 0.3, "spanet_baseX": 0.5}
    args = train_mod.parse_args(["--preset", "imagenet", "--epochs", "7", "--drop-path", "0.05", "--aa", "none"])
    assert (args.epochs, args.drop_path, args.aa, args.mixup) == (7, 0.05, None, 0.8)


def test_imagefolder_training_and_validation(tmp_path):
    """Train on an ImageFolder tree (the digits exported as PNGs) and re-validate the checkpoint."""
    from spanet import validate as validate_mod

    tree = _digits_tree(tmp_path / "tree")
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


def _digits_tree(root, train=40, val=20, size=16):
    from spanet import data as data_lib

    for split, count in (("train", train), ("val", val)):
        ds = data_lib.DigitsDataset(split, image_size=size)
        for i in range(count):
            folder = root / split / f"digit{ds.targets[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.images[i].save(folder / f"{i}.png")
    return str(root)


def test_imagenet_recipe_on_a_small_imagefolder(tmp_path):
    """The published recipe (RandAugment rand-m9-mstd0.5-inc1, MixUp/CutMix, random erasing) trains without
    the Pillow posterize crash, and a small global batch that scales the peak lr under --min-lr is warned of."""
    tree = _digits_tree(tmp_path / "tree", train=64, val=16, size=32)
    proc = _run(["--data-dir", tree, "--model", "test_resnet", "--epochs", "1", "-b", "8", "--img-size", "32",
                 "--no-progress", "--output", str(tmp_path / "runs"), "--name", "in"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spanet-train: warning: the peak lr 7.81e-06 (--lr-base 0.001 scaled to the global batch 8) is " \
           "not above --min-lr 1e-05" in proc.stderr


def test_spanet_bench_results_md_default_is_the_repository_file(tmp_path, monkeypatch, capsys):
    """--results-md without a path names the repository's benchmarks/RESULTS.md from any working folder,
    and a missing file is refused before anything runs."""
    from spanet.bench import cli

    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["--levels", "ops", "--results-md"])
    assert args.results_md == os.path.join(REPO, "benchmarks", "RESULTS.md") and os.path.isfile(args.results_md)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--levels", "ops", "--results-md", "missing.md"])
    assert exit_info.value.code == 2
    assert "--results-md: missing.md is not an existing file" in capsys.readouterr().err


def test_training_sources_name_only_what_the_repository_holds():
    """No reference a user of the repository cannot open (specification sections, issue numbers, files
    outside the repository) in the training and evaluation modules."""
    forbidden = re.compile(r"SPEC\b|\bissue \d|shared/|\.\./")
    for name in ("train.py", "validate.py", "data.py", "checkpoint.py", "reporting.py"):
        text = open(os.path.join(REPO, "spanet", name)).read()
        assert not forbidden.search(text), (name, forbidden.search(text).group())
