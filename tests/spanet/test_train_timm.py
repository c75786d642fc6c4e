"""Tests for spanet-train as timm users expect it: the run folder's logs (TensorBoard, args.yaml, W&B),
model.safetensors, timm's flag names and utilities, -c/--config, the --help text and the lr plot.

Mechanics use timm's tiny ``test_resnet`` on a few digits images. Exact checks compare bitwise
(``torch.equal``) or with ``==`` on logged floats.
"""
import json
import os
import sys
import types

import pytest
import torch
import yaml

from spanet import checkpoint as ck
from spanet import data as data_lib
from spanet import train as train_mod
from spanet import validate as validate_mod

TINY = ["--model", "test_resnet", "--train-samples", "64", "--val-samples", "16", "--batch-size", "8",
        "--smoothing", "0", "--no-progress"]


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_folder_has_tensorboard_args_yaml_and_best_weights_as_safetensors(tmp_path):
    """3 epochs with EMA, 8 steps each, --log-interval 3: step scalars at steps 3 and 6 of each epoch, one row
    of epoch scalars per epoch equal to metrics.json; args.yaml is the recorded flags; model.safetensors holds
    exactly the best epoch's EMA weights and evaluates like best.pth."""
    pytest.importorskip("tensorboard")
    argv = TINY + ["--epochs", "3", "--log-interval", "3", "--model-ema", "--model-ema-warmup",
                   "--checkpoint-hist", "2", "--output", str(tmp_path), "--name", "logs"]
    assert train_mod.main(argv) == 0
    run = tmp_path / "logs"
    history = json.loads((run / "metrics.json").read_text())
    events = _events(run)
    assert [s for s, _ in events["train/loss"]] == [3, 6, 11, 14, 19, 22]
    assert [v for _, v in events["epoch/val_top1"]] == pytest.approx([h["val_top1"] for h in history], abs=1e-4)
    assert [s for s, _ in events["epoch/ema_val_top1"]] == [1, 2, 3]
    assert {"train/lr", "train/images_per_sec", "epoch/train_loss", "epoch/lr"} <= set(events)

    saved = ck.load_training_checkpoint(str(run / "last.pth"))
    recorded = yaml.safe_load((run / "args.yaml").read_text())
    assert recorded == saved["args"] and recorded["model"] == "test_resnet" and recorded["epochs"] == 3

    best = ck.load_training_checkpoint(str(run / "best.pth"))
    weights, meta = ck.read_safetensors(str(run / "model.safetensors"))
    assert meta["format"] == ck.WEIGHTS_FORMAT and meta["weights"] == "ema"
    assert int(meta["epoch"]) == best["epoch"] == best["best"]["epoch"]
    assert weights.keys() == best["model_ema"].keys()
    assert all(torch.equal(weights[k], best["model_ema"][k]) for k in weights)
    res = validate_mod.validate(validate_mod.build_parser().parse_args(
        ["--checkpoint", str(run / "model.safetensors"), "--samples", "16", "--no-progress"]))
    assert res["top1"] == history[best["epoch"] - 1]["ema_val_top1"] and res["weights"] == "ema"
    assert validate_mod.main(["--checkpoint", str(run / "model.safetensors"), "--use-ema"]) == 2

    # --checkpoint-hist 2: the two best epochs (best first, the earlier epoch on ties) are kept, the other removed.
    scores = sorted(((h["ema_val_top1"], h["epoch"]) for h in history), key=lambda e: (-e[0], e[1]))
    kept = sorted(e for _, e in scores[:2])
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint-")) == [f"checkpoint-{e}.pth" for e in kept]
    assert [e for _, e in saved["kept_best"]] == [e for _, e in scores[:2]]

    # -c args.yaml reproduces the run's flags (the name aside).
    again = train_mod.parse_args(["-c", str(run / "args.yaml"), "--name", "again"])
    assert {k: v for k, v in train_mod._parser_values(again).items() if k not in ("name", "config")} == \
        {k: v for k, v in recorded.items() if k not in ("name", "config")}


def test_no_tensorboard_and_log_wandb_without_wandb(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    argv = TINY + ["--epochs", "1", "--no-tensorboard", "--log-wandb", "--output", str(tmp_path), "--name", "n"]
    assert train_mod.main(argv) == 0
    assert "--log-wandb: wandb is not installed (pip install wandb); not logging" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path / "n") if n.startswith("events.out.tfevents")]


def test_log_wandb_logs_each_epoch(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda row: calls.append(("log", row)), finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert train_mod.main(TINY + ["--epochs", "2", "--log-wandb", "--output", str(tmp_path), "--name", "w"]) == 0
    history = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert calls[0][0] == "init" and calls[0][1]["name"] == "w" and calls[0][1]["config"]["epochs"] == 2
    logged = [c[1] for c in calls if c[0] == "log"]
    assert [row["epoch"] for row in logged] == [1, 2]
    assert [row["val_top1"] for row in logged] == [h["val_top1"] for h in history]
    assert calls[-1] == ("finish",)


def test_timm_flag_names_and_aliases():
    parse = train_mod.parse_args
    assert parse(["--torchcompile"]).torchcompile == "inductor"
    assert parse(["--torchcompile", "eager"]).torchcompile == "eager"
    assert parse(["--compile"]).torchcompile == "inductor" and parse([]).torchcompile is None
    assert parse(["-vb", "7"]).validation_batch_size == parse(["--val-batch-size", "7"]).validation_batch_size == 7
    assert parse(["--experiment", "e1"]).name == "e1"
    assert parse(["--train-num-samples", "5", "--val-num-samples", "3"]).train_samples == 5
    args = parse(["--in-chans", "1", "--grad-checkpointing", "--layer-decay", "0.7", "--clip-mode", "agc",
                  "--checkpoint-hist", "3", "--pretrained-path", "w.pth"])
    assert (args.in_chans, args.grad_checkpointing, args.layer_decay, args.clip_mode, args.checkpoint_hist,
            args.pretrained_path) == (1, True, 0.7, "agc", 3, "w.pth")


def test_help_shows_each_presets_values_and_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        train_mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "training epochs (plus --cooldown-epochs) (presets: digits 5; imagenet 300)" in text
    assert "(presets: digits 0.002; imagenet 0.001)" in text  # --lr-base
    assert "(presets: digits 0; imagenet per variant, 0.1/0.2/0.3/0.3/0.5 for S/M/MX/B/BX, else 0.1)" in text
    assert "(presets: digits none; imagenet rand-m9-mstd0.5-inc1)" in text
    assert "--seed SEED seed of the weights, data order and augmentation (default: 42)" in text
    for action in train_mod.build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings


def test_config_yaml_sits_between_the_command_line_and_the_preset(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 16\nepochs: 3\nscale: [0.5, 1.0]\nlr-base: 0.01\n")
    args = train_mod.parse_args(["-c", str(config), "--epochs", "4"])
    assert (args.batch_size, args.epochs, tuple(args.scale), args.lr_base) == (16, 4, (0.5, 1.0), 0.01)
    assert args.weight_decay == 0.05  # the preset fills the rest
    config.write_text("batch_size: 16\nbatchsize: 3\n")
    assert train_mod.main(["-c", str(config), "--output", str(tmp_path / "runs")]) == 2
    assert "has keys that are no spanet-train flag: batchsize" in capsys.readouterr().err
    config.write_text("[1, 2")
    assert train_mod.main(["-c", str(config)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_default_workers():
    cpus = len(os.sched_getaffinity(0))
    assert data_lib.resolve_workers(None, None) == 0  # the embedded digits: in memory
    assert data_lib.resolve_workers(None, "/data") == max(0, min(4, cpus - 1))
    assert data_lib.resolve_workers(None, "/data", local_world_size=cpus) == 0
    assert data_lib.resolve_workers(3, None) == 3
    assert train_mod.parse_args(["--data-dir", "/x"]).workers is None  # resolved where the process count is known


def test_distributed_facts_come_from_timm(monkeypatch):
    """SLURM's variables are read by timm's init_distributed_device_so (one task here: no process group)."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    dist = train_mod.Dist("cpu")
    assert (dist.world_size, dist.rank, dist.distributed, dist.local_world_size) == (1, 0, False, 4)
    assert dist.device == torch.device("cpu")


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_modes_go_through_timms_dispatch_clip_grad(tmp_path, monkeypatch, mode):
    seen = []
    real = train_mod.dispatch_clip_grad

    def recording(parameters, value, mode="norm", **kwargs):
        parameters = list(parameters)
        seen.append((len(parameters), value, mode))
        return real(parameters, value, mode=mode, **kwargs)

    monkeypatch.setattr(train_mod, "dispatch_clip_grad", recording)
    argv = TINY + ["--epochs", "1", "--clip-grad", "0.5", "--clip-mode", mode, "--output", str(tmp_path)]
    assert train_mod.main(argv) == 0
    n_params = len(list(__import__("timm").create_model("test_resnet").parameters()))
    expected = n_params - 2 if mode == "agc" else n_params  # adaptive clipping leaves the classifier out
    assert seen == [(expected, 0.5, mode)] * 8  # one per optimizer step


def test_layer_decay_scales_the_groups(tmp_path):
    assert train_mod.main(TINY + ["--epochs", "1", "--layer-decay", "0.5", "--output", str(tmp_path),
                                  "--name", "ld"]) == 0
    groups = ck.load_training_checkpoint(str(tmp_path / "ld" / "last.pth"))["optimizer"]["param_groups"]
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] < 1.0
    assert all(b / a == pytest.approx(2.0) for a, b in zip(scales, scales[1:]))


def test_grad_checkpointing_gives_the_same_training(tmp_path):
    base = ["--model", "spanet_small", "--train-samples", "16", "--val-samples", "8", "--batch-size", "8",
            "--epochs", "1", "--img-size", "32", "--no-progress", "--output", str(tmp_path)]
    assert train_mod.main(base + ["--name", "plain"]) == 0
    assert train_mod.main(base + ["--name", "ckpt", "--grad-checkpointing"]) == 0
    a = ck.load_training_checkpoint(str(tmp_path / "plain" / "last.pth"))["model"]
    b = ck.load_training_checkpoint(str(tmp_path / "ckpt" / "last.pth"))["model"]
    for k in a:  # the recomputed forward is the same arithmetic; fp32, atol 1e-6
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_in_chans_1_and_pretrained_path_adaptation(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    donor = timm.create_model("test_resnet", num_classes=7)
    path = str(tmp_path / "donor.pth")
    torch.save(donor.state_dict(), path)
    argv = TINY + ["--epochs", "1", "--in-chans", "1", "--pretrained-path", path, "--lr", "1e-12",
                   "--warmup-lr", "0", "--min-lr", "0",
                   "--output", str(tmp_path), "--name", "gray"]
    assert train_mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "classifier re-initialised: fc.weight, fc.bias" in out and "first conv adapted to 1 input channels" in out
    saved = ck.load_training_checkpoint(str(tmp_path / "gray" / "last.pth"))
    assert saved["data_config"]["input_size"] == [1, 32, 32] and len(saved["data_config"]["mean"]) == 1
    conv = saved["model"]["conv1.0.weight"]
    # timm's adapt_input_conv for one channel: the sum over the RGB filters (lr 1e-12 keeps them).
    torch.testing.assert_close(conv, donor.state_dict()["conv1.0.weight"].sum(dim=1, keepdim=True), atol=1e-6, rtol=0)
    res = validate_mod.validate(validate_mod.build_parser().parse_args(
        ["--checkpoint", str(tmp_path / "gray"), "--samples", "16", "--no-progress"]))
    logged = json.loads((tmp_path / "gray" / "metrics.json").read_text())[-1]
    assert res["top1"] == logged["val_top1"] and res["input_size"] == [1, 32, 32]


def test_lr_plot_replays_the_schedule_exactly(tmp_path):
    """The lr curve of lr.png is the training's own schedule: at each epoch boundary it equals the lr the run
    logged there."""
    assert train_mod.main(TINY + ["--epochs", "3", "--output", str(tmp_path), "--name", "lr"]) == 0
    run = tmp_path / "lr"
    history = json.loads((run / "metrics.json").read_text())
    args = train_mod.parse_args(["--resume", str(run)])
    curve = dict(train_mod._lr_curve(args, 2e-3 * 8 / 64, updates_per_epoch=8, points=10**6))
    assert [curve[float(h["epoch"])] for h in history] == [h["lr"] for h in history]
    assert sorted(n for n in os.listdir(run) if n.endswith(".png")) == ["accuracy.png", "loss.png", "lr.png"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_name"] == "lr" and summary["args_yaml"].endswith("args.yaml")
