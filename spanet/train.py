"""spanet-train: train SPANet (or any timm model) with timm's recipe components.

Usage (``spanet-train`` and ``python -m spanet.train`` are the same program)::

    spanet-train                                    # spanet_small on the embedded digits set, CPU, minutes
    spanet-train --model resnet18 --epochs 5        # a timm baseline on the same data
    torchrun --nproc_per_node=8 -m spanet.train --data-dir /data/imagenet \\
        --model spanet_small --preset imagenet      # the published ImageNet-1K recipe
    spanet-train --resume runs/<name>               # continue a run exactly where its last checkpoint left it

Built on timm's own components: ``create_dataset``/``create_transform``
(RandAugment, random erasing, crop_pct), ``Mixup`` (MixUp + CutMix),
``LabelSmoothingCrossEntropy``/``SoftTargetCrossEntropy``,
``create_optimizer_v2`` (lr scaled linearly with the global batch),
``create_scheduler_v2`` (warm-up then cosine), ``ModelEmaV3``, ``NativeScaler``
and ``dispatch_clip_grad``, ``random_seed``, ``init_distributed_device_so``
(torchrun and SLURM). Adds drop path, gradient accumulation, AMP (bf16/fp16),
``torch.compile``, gradient checkpointing, layer decay, channels_last,
DistributedDataParallel (nccl on GPUs, gloo on CPUs) and exactly resumable,
atomically written checkpoints. Ours rather than timm's, on purpose: the data
stream and checkpoints that make a resume exact (timm's loader and
``CheckpointSaver`` do not replay augmentation or RNG state), the strided
evaluation shards that count each image once (timm's distributed sampler pads),
and atomic saves.

Presets set the defaults of every recipe flag; any flag given on the command
line overrides its preset value:

* ``digits`` (default without ``--data-dir``): a short schedule for the
  embedded 32x32 digits (no flips: digits are not mirror-symmetric).
* ``imagenet`` (default with ``--data-dir``): the published recipe, 300 epochs
  at 224, AdamW wd 0.05, lr 1e-3 per 1024 images, 5 warm-up epochs, cosine,
  MixUp 0.8, CutMix 1.0, RandAugment m9, random erasing 0.25, label smoothing
  0.1, drop path per variant (0.1/0.2/0.3/0.3/0.5 for S/M/MX/B/BX, as the
  official training scripts set them).

A run folder (``--output``/``--name``, default ``./runs/<model>-<data>-<time>``,
claimed with an exclusive create, so two runs never share one) receives
``last.pth``, ``best.pth`` (plus ``checkpoint-<epoch>.pth`` of the
``--checkpoint-hist`` best epochs), ``model.safetensors`` (the best weights),
``args.yaml``, TensorBoard event files, ``metrics.csv``, ``metrics.json``,
``summary.json``, ``loss.png``, ``accuracy.png`` and ``lr.png``.

A run whose loss stays non-finite for ``--max-nonfinite-steps`` consecutive
optimizer steps, or whose weights become non-finite, stops with an error and
leaves its last good checkpoint as it was.

Testing hook: with the environment variable ``SPANET_TRAIN_KILL_AFTER_STEPS=N``
the process SIGKILLs itself right after its N-th optimizer step (used by the
tests to check that a killed and resumed run ends with the uninterrupted weights).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
import os
import re
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad, random_seed, unwrap_model

from . import checkpoint as ckpt_lib
from . import data as data_lib
from . import reporting
from .validate import evaluate, parse_device, resolve_channels_last, unknown_model_message

__all__ = ["PRESETS", "PUBLISHED_DROP_PATH", "UsageError", "TrainingDiverged", "build_parser", "parse_args",
           "check_args", "train", "main"]

#: Drop path (stochastic depth) per variant in the official training scripts
#: (``image_classification/scripts/spanet/train_spanet_*.sh`` of the SPANet repository).
PUBLISHED_DROP_PATH = {
    "spanet_small": 0.1,
    "spanet_medium": 0.2,
    "spanet_mediumX": 0.3,
    "spanet_base": 0.3,
    "spanet_baseX": 0.5,
}

#: Recipe defaults per preset; a flag given on the command line always wins.
PRESETS: Dict[str, Dict[str, Any]] = {
    "digits": dict(
        img_size=32, crop_pct=1.0, interpolation="bicubic", train_interpolation="bicubic",
        epochs=5, batch_size=64, opt="adamw", lr_base=2e-3, lr_base_size=64, weight_decay=0.05,
        sched="cosine", sched_on_epochs=False, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5, cooldown_epochs=0,
        scale=(0.75, 1.0), ratio=(0.9, 1.1), hflip=0.0, vflip=0.0, color_jitter=0.0, aa=None,
        reprob=0.0, remode="pixel", mixup=0.0, cutmix=0.0, smoothing=0.1, drop_path=0.0,
    ),
    "imagenet": dict(
        img_size=224, crop_pct=None, interpolation="", train_interpolation="random",
        epochs=300, batch_size=128, opt="adamw", lr_base=1e-3, lr_base_size=1024, weight_decay=0.05,
        sched="cosine", sched_on_epochs=True, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10,
        scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), hflip=0.5, vflip=0.0, color_jitter=0.4,
        aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", mixup=0.8, cutmix=1.0, smoothing=0.1,
        drop_path=None,  # None: the published rate of the variant (PUBLISHED_DROP_PATH), else 0.1
    ),
}

_KILL_ENV = "SPANET_TRAIN_KILL_AFTER_STEPS"


class UsageError(ValueError):
    """Bad command-line arguments or inputs: reported as ``spanet-train: error: ...``, exit code 2."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite: reported as ``spanet-train: error: ...``, exit code 1."""


# ------------------------------------------------------------------------------------------ arguments
def _preset_text(dest: str) -> str:
    # What each preset sets, shown in --help instead of argparse's "(default: None)".
    special = {
        ("crop_pct", None): "the model's pretrained_cfg",
        ("interpolation", ""): "the model's pretrained_cfg",
        ("aa", None): "none",
        ("drop_path", None): "per variant, " + "/".join(f"{v:g}" for v in PUBLISHED_DROP_PATH.values())
        + " for S/M/MX/B/BX, else 0.1",
    }
    parts = []
    for preset, values in PRESETS.items():
        value = values[dest]
        if (dest, value) in special:
            shown = special[(dest, value)]
        elif isinstance(value, bool):
            shown = "on" if value else "off"
        elif isinstance(value, tuple):
            shown = " ".join(f"{v:.4g}" for v in value)
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{preset} {shown}")
    return "; ".join(parts)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where there is a real default (no ``None``, ``False`` or empty values)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default in (None, False, argparse.SUPPRESS) \
                or default == {} or isinstance(action, (argparse._StoreConstAction, argparse._StoreTrueAction)):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The spanet-train argument parser.

    Preset-controlled flags default to None until :func:`parse_args` fills them
    from the preset; their help shows each preset's value. Flag names follow
    timm's ``train.py`` where both have the flag (older spanet names remain as aliases).
    """
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="spanet-train",
        description="Train SPANet (or any timm model) with timm's recipe. Without arguments: spanet_small "
        "on the embedded digits set (8x8 handwritten digits upscaled to 32x32), on the CPU, in a few minutes.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("-c", "--config", default=None, metavar="YAML",
                   help="YAML file of flag values (keys as in args.yaml, e.g. batch_size: 64); flags typed on the "
                   "command line win over it, and it wins over the preset")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe defaults: digits without --data-dir, imagenet with it")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: embedded digits)")
    g.add_argument("--train-split", default="train", help="training split folder under --data-dir")
    g.add_argument("--val-split", default="val", help="validation split folder under --data-dir")
    g.add_argument("--img-size", type=int, help="square train/eval input size (digits are upscaled to it)")
    g.add_argument("--in-chans", type=int, default=None, choices=(1, 3),
                   help="input channels: 3 (RGB, default) or 1 (grayscale images; the model's first conv takes 1)")
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (default: the model's)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (default: the model's)")
    g.add_argument("--interpolation", help="eval resize interpolation")
    g.add_argument("--train-samples", "--train-num-samples", dest="train_samples", type=int, default=None,
                   help="use only N evenly spaced training images")
    g.add_argument("--val-samples", "--val-num-samples", dest="val_samples", type=int, default=None,
                   help="use only N evenly spaced validation images")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the dataset)")
    g.add_argument("-j", "--workers", type=int, default=None,
                   help="data-loader worker processes per rank (default: 0 for the embedded digits, which are in "
                   "memory and cheap to augment; with --data-dir timm's 4, or fewer when the CPUs per process "
                   "are fewer than 5, keeping one core for the training process)")
    g.add_argument("--pin-mem", action="store_true", help="pin host memory (GPU training)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="spanet_small", help="any timm model name (spanet_* registered by spanet)")
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (downloaded; without network use --pretrained-path)")
    g.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="load this file as the pretrained weights, adapted as timm does (a classifier of another "
                   "size is re-initialised, the first conv is adapted to --in-chans)")
    g.add_argument("--initial-checkpoint", default=None, metavar="FILE",
                   help="start from these weights: a spanet-train checkpoint or a plain/published state dict "
                   "(a classifier of another size is re-initialised)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--drop", type=float, default=None, help="dropout before the classifier (default: the model's)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs, key=value")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for the CPU, where SPANet's layers and "
                        "training kernels are faster in it; off on CUDA)")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model with this backend (inductor without a value)")
    g.add_argument("--compile", dest="torchcompile", action="store_const", const="inductor",
                   help="the same as --torchcompile (inductor)")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", help="timm optimizer name (create_optimizer_v2)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --lr-base scaling)")
    g.add_argument("--lr-base", type=float, help="peak lr for a global batch of --lr-base-size (scaled linearly)")
    g.add_argument("--lr-base-size", type=int, help="global batch the --lr-base refers to")
    g.add_argument("--weight-decay", type=float, help="weight decay (1-D parameters are exempt)")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay, e.g. 0.65 (timm's, through the model's group_matcher)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=float, nargs=2, default=None, help="optimizer betas (default: the optimizer's)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD-style momentum")
    g.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this value (> 0)")
    g.add_argument("--clip-mode", choices=("norm", "value", "agc"), default="norm",
                   help="what --clip-grad bounds: the global norm, each value, or adaptive clipping (timm's "
                   "dispatch_clip_grad)")
    g.add_argument("--sched", help="timm scheduler name (create_scheduler_v2)")
    g.add_argument("--sched-on-epochs", action=argparse.BooleanOptionalAction, default=None,
                   help="update the lr once per epoch (published) instead of every optimizer step")
    g.add_argument("--epochs", type=int, help="training epochs (plus --cooldown-epochs)")
    g.add_argument("--warmup-epochs", type=int, help="epochs of linear warm-up from --warmup-lr")
    g.add_argument("--warmup-lr", type=float, help="lr at the start of the warm-up")
    g.add_argument("--min-lr", type=float, help="lr at the end of the cosine")
    g.add_argument("--cooldown-epochs", type=int, help="epochs at min-lr after the cosine (timm semantics)")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--scale", type=float, nargs=2, help="RandomResizedCrop scale range")
    g.add_argument("--ratio", type=float, nargs=2, help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, help="vertical flip probability")
    g.add_argument("--color-jitter", type=float, help="colour jitter strength (unused with --aa)")
    g.add_argument("--aa", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none' to disable)")
    g.add_argument("--train-interpolation", help="train resize interpolation (random, bicubic, ...)")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--mixup", type=float, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None,
                   help="CutMix box size range as fractions of the image (instead of --cutmix's alpha)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of MixUp or CutMix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of CutMix rather than MixUp when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"),
                   help="MixUp/CutMix parameters per batch, pair or element")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn MixUp/CutMix off from this epoch (0: never)")
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per optimizer step")
    g.add_argument("--model-ema-warmup", action="store_true", help="warm the EMA decay up (short runs)")

    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=int, help="batch per process (global = b x processes x accum)")
    g.add_argument("-vb", "--validation-batch-size", "--val-batch-size", dest="validation_batch_size", type=int,
                   default=None, help="eval batch (default: 2 x --batch-size)")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--amp", action="store_true", help="automatic mixed precision")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="autocast dtype (float16 adds timm's NativeScaler)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads per process (torch.set_num_threads); default: PyTorch's choice. "
                   "On a shared machine 1 avoids oversubscription")
    g.add_argument("--seed", type=int, default=42, help="seed of the weights, data order and augmentation")
    g.add_argument("--output", default="runs", help="parent folder of run folders")
    g.add_argument("--name", "--experiment", dest="name", default=None,
                   help="run folder name (default: <model>-<data>-<time>)")
    g.add_argument("--resume", default=None, help="a checkpoint or a run folder (its last.pth) to continue")
    g.add_argument("--checkpoint-hist", type=int, default=1,
                   help="keep the N best epochs: best.pth, and for N > 1 also checkpoint-<epoch>.pth of each")
    g.add_argument("--log-interval", type=int, default=50,
                   help="optimizer steps between step logs; the host syncs with the device only then (timm's "
                   "semantics)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard event files in the run folder (default: on when tensorboard is installed)")
    g.add_argument("--log-wandb", action="store_true",
                   help="also log to Weights & Biases (project: --name's run; a no-op, with a message, without wandb)")
    g.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="stop with an error once the loss has been NaN/inf for this many consecutive optimizer "
                   "steps (checked at each --log-interval and epoch end); the last good checkpoint is kept")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar or step logs (off a terminal, step logs replace the bar)")
    for action in p._actions:
        if action.dest in PRESETS["digits"]:
            action.help = f"{action.help} (presets: {_preset_text(action.dest)})"
    return p


# Taken from the command line even when resuming: where and how this process runs, not what it trains.
_RUN_CONTROL = frozenset({"resume", "name", "output", "device", "workers", "pin_mem", "no_progress", "threads",
                          "log_interval", "config", "tensorboard", "log_wandb", "torchcompile", "compile_mode",
                          "grad_checkpointing"})
# Recorded flags a resumed run may not change: the saved model and optimizer states only fit them.
_FIXED_ON_RESUME = ("model_kwargs", "opt")


def _explicit_flags(argv: Optional[Sequence[str]]) -> set:
    # Re-parse with every default suppressed: what remains was typed on the command line.
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _read_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The flag values of a ``-c/--config`` YAML file (timm's format: ``dest: value``, e.g. ``args.yaml``)."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--config {path!r} cannot be read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from e
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UsageError(f"--config {path!r} must hold a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in dests)
    if unknown:
        raise UsageError(f"--config {path!r} has keys that are no spanet-train flag: {', '.join(unknown)}")
    values.pop("config", None)
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``: a ``-c/--config`` YAML file, then the preset, fill every flag the command line leaves unset.

    With ``--resume``, the arguments recorded in the checkpoint come first
    (so ``spanet-train --resume RUN`` continues the same recipe); flags typed
    on the command line still win.
    """
    parser = build_parser()
    config, _ = parser.parse_known_args(argv)
    if config.config is not None:
        parser.set_defaults(**_read_config(config.config, parser))
    args = parser.parse_args(argv)
    if args.resume is not None and os.path.exists(args.resume):
        recorded = ckpt_lib.load_training_checkpoint(_resume_path(args.resume), mmap=True).get("args", {})
        explicit = _explicit_flags(argv)
        for key in _FIXED_ON_RESUME:
            if key in explicit and key in recorded and ckpt_lib.plain_values(getattr(args, key)) != recorded[key]:
                raise UsageError(
                    f"--{key.replace('_', '-')} {getattr(args, key)!r} differs from the {recorded[key]!r} of the run "
                    f"being resumed, whose saved state only fits its own; start a new run with "
                    f"--initial-checkpoint {_resume_path(args.resume)} instead"
                )
        for key, value in recorded.items():
            if hasattr(args, key) and key not in explicit and key not in _RUN_CONTROL:
                setattr(args, key, tuple(value) if isinstance(value, list) else value)
    if args.preset is None:
        args.preset = "digits" if args.data_dir is None else "imagenet"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path is None:
        args.drop_path = PUBLISHED_DROP_PATH.get(args.model, 0.1)
    if isinstance(args.aa, str) and args.aa.lower() in ("", "none"):
        args.aa = None
    return args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Validate arguments before anything is built; raises :class:`UsageError` naming the flag."""
    import timm

    def require(ok: bool, name: str, rule: str) -> None:
        if not ok:
            value = getattr(args, name)
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise UsageError(f"{_flag(name)} must be {rule}, got {shown}")

    for name in ("batch_size", "epochs", "grad_accum_steps", "lr_base_size", "img_size", "validation_batch_size",
                 "train_samples", "val_samples", "num_classes", "threads", "recount", "log_interval",
                 "max_nonfinite_steps", "checkpoint_hist"):
        value = getattr(args, name)
        require(value is None or value >= 1, name, ">= 1")
    for name in ("workers", "warmup_epochs", "cooldown_epochs", "mixup_off_epoch", "seed"):
        value = getattr(args, name)
        require(value is None or value >= 0, name, ">= 0")

    def finite(value) -> bool:
        return value is not None and math.isfinite(value)

    for name in ("lr", "lr_base", "clip_grad", "opt_eps"):
        value = getattr(args, name)
        require(value is None or (finite(value) and value > 0), name, "finite and > 0")
    for name in ("weight_decay", "warmup_lr", "min_lr", "momentum", "color_jitter", "mixup", "cutmix"):
        value = getattr(args, name)
        require(value is None or (finite(value) and value >= 0), name, "finite and >= 0")
    for name in ("hflip", "vflip", "reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
        value = getattr(args, name)
        require(value is None or (finite(value) and 0.0 <= value <= 1.0), name, "a probability in [0, 1]")
    for name in ("drop_path", "smoothing"):
        value = getattr(args, name)
        require(finite(value) and 0.0 <= value < 1.0, name, "in [0, 1)")
    require(args.drop is None or (finite(args.drop) and 0.0 <= args.drop < 1.0), "drop", "in [0, 1)")
    require(args.layer_decay is None or (finite(args.layer_decay) and 0.0 < args.layer_decay <= 1.0),
            "layer_decay", "in (0, 1]")
    if args.opt_betas is not None:
        require(all(finite(b) and 0.0 <= b < 1.0 for b in args.opt_betas), "opt_betas", "two values in [0, 1)")
    require(all(finite(v) for v in args.scale) and 0.0 < args.scale[0] <= args.scale[1] <= 1.0, "scale",
            "LOW HIGH with 0 < LOW <= HIGH <= 1 (fractions of the image area)")
    require(all(finite(v) for v in args.ratio) and 0.0 < args.ratio[0] <= args.ratio[1], "ratio",
            "LOW HIGH with 0 < LOW <= HIGH")
    if args.cutmix_minmax is not None:
        require(all(finite(v) for v in args.cutmix_minmax) and 0.0 < args.cutmix_minmax[0]
                <= args.cutmix_minmax[1] <= 1.0, "cutmix_minmax", "LOW HIGH with 0 < LOW <= HIGH <= 1")
    try:
        parse_device(args.device)
        data_lib.check_preprocessing(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
                                     interpolation=args.interpolation,
                                     train_interpolation=args.train_interpolation)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.batch_size % 2:
        raise UsageError(f"MixUp/CutMix need an even --batch-size, got {args.batch_size}")
    if not timm.is_model(args.model):
        raise UsageError(unknown_model_message(args.model))
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir!r} does not exist or is not a directory")
    for name in ("initial_checkpoint", "pretrained_path"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{_flag(name)} {path!r} does not exist")
    if args.pretrained_path is not None and (args.pretrained or args.initial_checkpoint):
        raise UsageError("--pretrained-path replaces --pretrained and --initial-checkpoint; pass one of them")
    if args.resume is not None and not os.path.exists(args.resume):
        raise UsageError(f"--resume {args.resume!r} does not exist")


# ---------------------------------------------------------------------------------------- distributed
class Dist:
    """Process-group facts for this process (a single process is world_size 1, rank 0).

    timm's ``init_distributed_device_so`` reads torchrun's and SLURM's
    environment, starts the process group (nccl on GPUs, gloo on CPUs) and
    gives each process the GPU of its local rank.
    """

    def __init__(self, device_arg: str):
        from timm.utils.distributed import init_distributed_device_so

        requested = parse_device(device_arg)  # already checked by check_args
        device = str(requested) if requested is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        info = init_distributed_device_so(device=device)
        self.device = torch.device(info["device"])
        self.world_size = int(info["world_size"])
        self.rank = int(info["global_rank"])
        self.local_rank = int(info["local_rank"])
        self.distributed = bool(info["distributed"])
        # Processes on this node, which share its CPUs (for the default --workers): torchrun's, else SLURM's.
        per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
        self.local_world_size = int(re.match(r"\d+", per_node).group()) if re.match(r"\d+", per_node) else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------- helpers
def _writable_dir(path: str) -> None:
    # Found out now, not after an epoch of training: create and delete a file in the folder.
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"run folder {path!r} is not writable: {e.strerror or e}") from e


def _claim_run_dir(args: argparse.Namespace) -> "tuple[str, bool]":
    """The run folder and whether this call created it.

    Resuming without ``--name`` continues in the checkpoint's folder. Otherwise
    the folder is created here with an exclusive ``mkdir``: a folder that
    exists is never shared, so two runs started at once cannot write into one
    (a default name that is taken gets a ``-1``, ``-2``, ... suffix).
    """
    if args.resume is not None and args.name is None:
        resume = os.path.abspath(args.resume)
        run_dir = resume if os.path.isdir(resume) else os.path.dirname(resume)
        _writable_dir(run_dir)
        return run_dir, False
    data = "digits" if args.data_dir is None else os.path.basename(os.path.normpath(args.data_dir))
    default_name = f"{args.model}-{data}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return claim_run_dir(args.output, args.name, default_name), True


def claim_run_dir(output: str, name: Optional[str], default_name: str) -> str:
    """Create a new, writable run folder ``output/name`` with an exclusive ``mkdir`` and return its path.

    A folder that exists is never shared, so two runs started at once cannot
    write into one: a taken ``name`` is a :class:`UsageError`, a taken
    ``default_name`` (used when ``name`` is None) gets a ``-1``, ``-2``, ... suffix.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a file, not a folder")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --output {output!r}: {e.strerror or e}") from e
    if name is not None:
        candidates = iter([name])
    else:
        candidates = itertools.chain([default_name], (f"{default_name}-{i}" for i in itertools.count(1)))
    for candidate in candidates:
        run_dir = os.path.join(output, candidate)
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            if name is not None:
                raise UsageError(
                    f"run folder {run_dir!r} already exists; choose another --name, or pass --resume {run_dir} "
                    "to continue the run it holds"
                ) from None
            continue
        except OSError as e:
            raise UsageError(f"cannot create run folder {run_dir!r}: {e.strerror or e}") from e
        try:
            _writable_dir(run_dir)
        except UsageError:
            os.rmdir(run_dir)
            raise
        return run_dir
    raise AssertionError("unreachable: the default names never run out")


def _resume_path(resume: str) -> str:
    if os.path.isdir(resume):
        path = os.path.join(resume, "last.pth")
        if not os.path.isfile(path):
            raise UsageError(f"--resume {resume!r} is a folder without last.pth")
        return path
    return resume


def _autocast(device: torch.device, args: argparse.Namespace):
    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _parser_values(args: argparse.Namespace) -> Dict[str, Any]:
    # The flags as plain values, for args.yaml (which -c reads back), W&B and the checkpoint.
    dests = {a.dest for a in build_parser()._actions} - {"help"}
    return {k: v for k, v in ckpt_lib.plain_values(vars(args)).items() if k in dests}


def _create_scheduler(optimizer, args: argparse.Namespace, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    try:
        return create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=args.sched_on_epochs, updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError) as e:
        raise UsageError(f"cannot create scheduler {args.sched!r}: {e}") from e


def _lr_curve(args: argparse.Namespace, peak: float, updates_per_epoch: int, points: int = 1000):
    """The run's lr schedule as (epoch, lr) points: the same scheduler stepped like the training loop steps
    it, on a one-parameter stand-in for the optimizer."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler, num_epochs = _create_scheduler(stand_in, args, updates_per_epoch)
    stride = max(1, num_epochs * updates_per_epoch // points)
    curve = []
    for epoch in range(num_epochs):
        for update in range(updates_per_epoch):
            step = epoch * updates_per_epoch + update
            if step % stride == 0:
                curve.append((epoch + update / updates_per_epoch, stand_in.param_groups[0]["lr"]))
            scheduler.step_update(num_updates=step + 1)
        scheduler.step(epoch + 1)
    curve.append((float(num_epochs), stand_in.param_groups[0]["lr"]))
    return curve


def _hist_path(run_dir: str, epoch: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{epoch}.pth")


def _weights_metadata(args, num_classes, data_config, class_map, epoch: int, ema: bool) -> Dict[str, str]:
    # What spanet-validate needs to evaluate model.safetensors as it does best.pth (safetensors metadata are
    # strings).
    import json

    return {
        "format": ckpt_lib.WEIGHTS_FORMAT,
        "model_name": args.model,
        "num_classes": str(num_classes),
        "epoch": str(epoch),
        "weights": "ema" if ema else "model",
        "data_dir": args.data_dir or "",
        "data_config": json.dumps(ckpt_lib.plain_values(data_config)),
        "class_to_idx": json.dumps(ckpt_lib.plain_values(class_map)) if class_map else "",
    }


def _kill_after_steps() -> Optional[int]:
    value = os.environ.get(_KILL_ENV)
    return int(value) if value else None


# ------------------------------------------------------------------------------------------- training
def _train_one_epoch(
    epoch: int,
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    loss_fn: nn.Module,
    state: Dict[str, Any],
    ctx: Dict[str, Any],
) -> Dict[str, float]:
    """One epoch. The running loss and the non-finite counts stay on the device; the host reads them (and
    logs) only every ``--log-interval`` optimizer steps and at the end of the epoch, as timm does."""
    args, dist, device = ctx["args"], ctx["dist"], ctx["device"]
    mixup_fn, scaler, model_ema = ctx["mixup_fn"], ctx["scaler"], ctx["model_ema"]
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    model.train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_group_start = (updates_per_epoch - 1) * accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    group_nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a loss of this step's group was NaN/inf
    nonfinite_run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite optimizer steps
    worst_run = torch.zeros((), dtype=torch.int64, device=device)  # the longest such run in this epoch
    seen = 0
    start = time.perf_counter()
    show = dist.is_main and not args.no_progress
    bar = reporting.progress(num_batches, f"epoch {epoch + 1}/{ctx['num_epochs']}", enabled=show)

    def read_totals() -> "tuple[float, float, int]":
        # The host sync: mean loss so far and the longest non-finite run, over all ranks.
        sums = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        worst = worst_run.double().reshape(1)
        if dist.distributed:
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        host = torch.cat([sums, worst]).cpu()
        if host[2].item() >= args.max_nonfinite_steps:
            raise TrainingDiverged(
                f"the training loss was NaN or infinite for {int(host[2].item())} consecutive optimizer steps "
                f"(epoch {epoch + 1}, by step {state['global_step']}); stopped, and the last good checkpoint "
                f"{ctx['last_path']!r} is kept as it was. Lower --lr, use --clip-grad, or check the data"
            )
        return host[0].item(), host[1].item(), int(host[2].item())

    optimizer.zero_grad(set_to_none=True)
    update = 0
    for i, (x, y) in enumerate(loader):
        group_size = accum if i < last_group_start else num_batches - last_group_start
        is_step = (i + 1) % accum == 0 or i + 1 == num_batches
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Under DDP only the last micro-batch of a group all-reduces gradients.
        sync = contextlib.nullcontext() if (is_step or not dist.distributed) else model.no_sync()
        with sync:
            with _autocast(device, args):
                out = model(x)
                loss = loss_fn(out, y)
            scaled = loss / group_size
            if scaler is not None:
                # timm's NativeScaler: the scaled backward; on a group's last micro-batch also unscale, clip, step.
                # (It reads GradScaler's inf check on the host there: fp16 only.)
                scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                       parameters=ctx["clip_parameters"], need_update=is_step)
            else:
                scaled.backward()
                if is_step:
                    if args.clip_grad:
                        dispatch_clip_grad(ctx["clip_parameters"], args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        detached = loss.detach()
        loss_sum += detached.double() * x.shape[0]
        group_nonfinite |= ~torch.isfinite(detached)
        seen += x.shape[0]
        bar.update(1)
        if not is_step:
            continue
        optimizer.zero_grad(set_to_none=True)
        nonfinite_run = torch.where(group_nonfinite, nonfinite_run + 1, 0)
        worst_run = torch.maximum(worst_run, nonfinite_run)
        group_nonfinite.zero_()
        state["global_step"] += 1
        update += 1
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=state["global_step"])
        scheduler.step_update(num_updates=state["global_step"])
        ctx["process_steps"] += 1
        if ctx["kill_after"] is not None and ctx["process_steps"] >= ctx["kill_after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if update % args.log_interval == 0 and update < updates_per_epoch:
            total_loss, total_seen, _ = read_totals()
            lr = optimizer.param_groups[0]["lr"]
            rate = total_seen / max(time.perf_counter() - start, 1e-9)
            if bar.disable and show:  # off a terminal: a log line instead of the bar
                print(f"  epoch {epoch + 1} step {update}/{updates_per_epoch}: loss {total_loss / total_seen:.4f}, "
                      f"lr {lr:.2e}, {rate:.0f} img/s", flush=True)
            bar.set_postfix(loss=f"{total_loss / total_seen:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            ctx["loggers"].log_step(state["global_step"], {"train/loss": total_loss / total_seen, "train/lr": lr,
                                                           "train/images_per_sec": rate})
    bar.close()
    total_loss, total_seen, _ = read_totals()
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(total_seen, 1.0),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "train_images_per_sec": total_seen / max(elapsed, 1e-9),
        "epoch_time": elapsed,
    }


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a training as configured by :func:`parse_args`; returns the summary (also in summary.json).

    Raises :class:`UsageError`, :class:`spanet.data.DataError` or
    :class:`spanet.checkpoint.CheckpointError` for bad inputs, before any file
    of an existing run is touched, and :class:`TrainingDiverged` when the loss
    or the weights become non-finite (the last good checkpoint is kept). A run
    folder this call created is removed again if it fails before writing to it.
    """
    check_args(args)
    dist = Dist(args.device)
    claimed: Dict[str, Any] = {}
    try:
        return _train(args, dist, claimed)
    except BaseException:
        if claimed.get("created"):
            with contextlib.suppress(OSError):
                os.rmdir(claimed["run_dir"])  # only succeeds while the folder is empty
        raise
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: Dist, claimed: Dict[str, Any]) -> Dict[str, Any]:
    import timm
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3, NativeScaler

    device = dist.device
    args.channels_last = resolve_channels_last(args.channels_last, device)
    args.workers = data_lib.resolve_workers(args.workers, args.data_dir, dist.local_world_size)
    say = reporting.printer(dist.is_main)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Resume: read and check the checkpoint first, so that a bad one fails before anything is built or written.
    resume_ckpt = None
    if args.resume is not None:
        resume_file = _resume_path(args.resume)
        resume_ckpt = ckpt_lib.load_training_checkpoint(resume_file)
        if resume_ckpt["model_name"] != args.model:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {resume_file!r} was trained with --model {resume_ckpt['model_name']}, "
                f"not {args.model}; pass the same --model to resume"
            )
        ckpt_lib.check_finite(resume_ckpt["model"], resume_file)
        if resume_ckpt.get("model_ema") is not None:
            ckpt_lib.check_finite(resume_ckpt["model_ema"], resume_file, "EMA weights")
        ckpt_lib.check_finite(resume_ckpt["optimizer"].get("state", {}), resume_file, "optimizer state")

    # The run folder is claimed (and checked writable) now, before any work: rank 0 decides for all ranks.
    claim: Any = None
    if dist.is_main:
        try:
            claim = _claim_run_dir(args) + (None,)
        except UsageError as e:
            claim = (None, False, str(e))
    run_dir, created, claim_error = dist.all_gather_object(claim)[0]
    if claim_error is not None:
        raise UsageError(claim_error)
    claimed.update(run_dir=run_dir, created=created and dist.is_main)
    last_path = os.path.join(run_dir, "last.pth")
    best_path = os.path.join(run_dir, "best.pth")
    weights_path = os.path.join(run_dir, "model.safetensors")
    if resume_ckpt is not None and dist.is_main:
        removed = ckpt_lib.remove_stale_temporaries(run_dir)
        if removed:
            say(f"removed {len(removed)} temporary file(s) an interrupted save left in {run_dir}: "
                f"{', '.join(removed)}")

    # Data (model-independent parts first: the number of classes sizes the model).
    in_chans = args.in_chans or 3
    train_ds = data_lib.create_split_dataset(args.data_dir, args.train_split, is_training=True,
                                             image_size=args.img_size, in_chans=in_chans)
    class_map = data_lib.dataset_class_to_idx(train_ds)
    if class_map:
        data_lib.check_val_classes(args.data_dir, args.val_split, class_map)
    val_ds = data_lib.create_split_dataset(args.data_dir, args.val_split, is_training=False,
                                           image_size=args.img_size, class_map=class_map, in_chans=in_chans)
    data_classes = data_lib.dataset_num_classes(train_ds)
    num_classes = args.num_classes or data_classes
    if num_classes < data_classes:
        raise UsageError(f"--num-classes {num_classes} is fewer than the {data_classes} classes of the training "
                         "data; the labels would not fit the classifier")
    if resume_ckpt is not None and resume_ckpt["num_classes"] != num_classes:
        raise ckpt_lib.CheckpointError(
            f"checkpoint has {resume_ckpt['num_classes']} classes, this run {num_classes}; check --data-dir"
        )

    # Model: the same initial weights on every rank (seeded before the per-rank seed is set).
    random_seed(args.seed, 0)
    model_kwargs = dict(args.model_kwargs or {})
    model_kwargs.setdefault("drop_path_rate", args.drop_path)
    if args.drop is not None:
        model_kwargs.setdefault("drop_rate", args.drop)
    if args.in_chans is not None:
        model_kwargs.setdefault("in_chans", args.in_chans)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as e:
        raise UsageError(f"cannot create {args.model} with {model_kwargs}: {e}") from e
    except Exception as e:  # a download (network, hub) or a local pretrained file failed
        if not args.pretrained:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(
            f"cannot load the pretrained weights of {args.model} ({type(e).__name__}: {reason}); without network, "
            "fetch the weight file elsewhere and pass it with --pretrained-path FILE (adapted as pretrained weights "
            "are) or --initial-checkpoint FILE instead of --pretrained"
        ) from e
    initial = args.initial_checkpoint or args.pretrained_path
    if initial:
        info = ckpt_lib.load_model_weights(model, initial, drop_mismatched_head=True,
                                           adapt_input_conv=args.pretrained_path is not None)
        say(f"initial weights: {initial}" +
            (f" (classifier re-initialised: {', '.join(info['dropped'])})" if info["dropped"] else "") +
            (f" (first conv adapted to {in_chans} input channels)" if info["adapted"] else ""))
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise UsageError(f"--grad-checkpointing: {args.model} does not support it ({e})") from e
    data_config = data_lib.resolve_data_config(model, img_size=args.img_size, crop_pct=args.crop_pct,
                                               interpolation=args.interpolation, mean=args.mean, std=args.std,
                                               in_chans=in_chans)
    train_ds.transform = data_lib.build_transform(
        data_config, True, data_lib.AugConfig.from_args(args, data_config["interpolation"]))
    val_ds.transform = data_lib.build_transform(data_config, False)
    random_seed(args.seed, dist.rank)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    global_batch = args.batch_size * dist.world_size * args.grad_accum_steps
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    if dist.is_main and (args.min_lr >= lr or args.warmup_lr > lr):
        print(f"spanet-train: warning: the peak lr {lr:.3g} (--lr-base {args.lr_base:g} scaled to the global batch "
              f"{global_batch}) is not above --min-lr {args.min_lr:g} / --warmup-lr {args.warmup_lr:g}: the "
              "schedule will not decay from it; lower --min-lr and --warmup-lr, or pass --lr", file=sys.stderr)
    opt_kwargs: Dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    except (ValueError, AssertionError, KeyError) as e:
        raise UsageError(f"cannot create optimizer {args.opt!r}: {e}") from e
    scaler = None
    if args.amp and args.amp_dtype == "float16":
        scaler = NativeScaler(device.type)

    train_loader, train_sampler = data_lib.build_train_loader(
        train_ds, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed, rank=dist.rank,
        world_size=dist.world_size, limit=args.train_samples, pin_memory=args.pin_mem,
    )
    val_loader = data_lib.build_eval_loader(
        val_ds, batch_size=args.validation_batch_size or 2 * args.batch_size, num_workers=args.workers,
        rank=dist.rank, world_size=dist.world_size, limit=args.val_samples, pin_memory=args.pin_mem,
    )
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = _create_scheduler(optimizer, args, updates_per_epoch)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes,
        )
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    val_loss_fn = nn.CrossEntropyLoss()

    # Restore the full training state.
    start_epoch, history, best = 0, [], {"metric": None, "epoch": None}
    kept_best: List[List[float]] = []  # [score, epoch] of the --checkpoint-hist best epochs, best first
    state = {"global_step": 0}
    if resume_ckpt is not None:
        if model_ema is not None and resume_ckpt.get("model_ema") is None:
            raise ckpt_lib.CheckpointError("the checkpoint has no EMA weights; resume without --model-ema")
        try:
            unwrap_model(model).load_state_dict(resume_ckpt["model"])
            if model_ema is not None:
                model_ema.module.load_state_dict(resume_ckpt["model_ema"])
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            scheduler.load_state_dict(resume_ckpt["scheduler"])
            if scaler is not None and resume_ckpt.get("scaler"):
                scaler.load_state_dict(resume_ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ckpt_lib.CheckpointError(
                f"checkpoint {resume_file!r} does not fit the run being resumed ({reason}); resume with the "
                "flags it was trained with (--model-kwargs, --opt, ...)"
            ) from e
        start_epoch = int(resume_ckpt["epoch"])
        state["global_step"] = int(resume_ckpt["global_step"])
        history = list(resume_ckpt.get("history", []))
        best = dict(resume_ckpt.get("best", best))
        kept_best = [list(e) for e in resume_ckpt.get("kept_best", [])]
        rng = resume_ckpt.get("rng") or []
        if len(rng) == dist.world_size:
            ckpt_lib.restore_rng_state(rng[dist.rank])
        else:
            say(f"note: checkpoint was written by {len(rng)} processes, this run has {dist.world_size}; "
                "RNG streams are re-seeded, so augmentation will not replay bit-exactly")
            random_seed(args.seed + 1000 * start_epoch, dist.rank)
        say(f"resumed from {_resume_path(args.resume)} at epoch {start_epoch} (step {state['global_step']})")

    if dist.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.compile_mode)

    run_name = os.path.basename(os.path.normpath(run_dir))
    args_yaml = os.path.join(run_dir, "args.yaml")
    if dist.is_main:
        reporting.write_yaml(args_yaml, _parser_values(args))
    loggers = reporting.RunLoggers(run_dir, enabled=dist.is_main, tensorboard=args.tensorboard, wandb=args.log_wandb,
                                   run_name=run_name, config=_parser_values(args),
                                   purge_step=state["global_step"] if resume_ckpt is not None else None)
    n_params = sum(p.numel() for p in unwrap_model(model).parameters())
    say(f"spanet-train: {args.model} ({n_params / 1e6:.2f} M params, {num_classes} classes) on "
        f"{'digits (embedded)' if args.data_dir is None else args.data_dir}, preset {args.preset}, "
        f"{dist.world_size} process(es) on {device.type}")
    say(f"  {len(train_loader)} batches of {args.batch_size} per process per epoch, global batch {global_batch}, "
        f"peak lr {lr:.3g}, {num_epochs} epochs, input {data_config['input_size'][1]}px; run folder {run_dir}")

    ctx = {"args": args, "dist": dist, "device": device, "mixup_fn": mixup_fn, "scaler": scaler,
           "model_ema": model_ema, "num_epochs": num_epochs, "process_steps": 0,
           "kill_after": _kill_after_steps(), "last_path": last_path, "loggers": loggers,
           # Adaptive clipping leaves the classifier out, as timm's train.py does.
           "clip_parameters": list(model_parameters(model, exclude_head="agc" in args.clip_mode))}
    ema_module = model_ema.module if model_ema is not None else None
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if args.amp else None
    for epoch in range(start_epoch, num_epochs):
        train_sampler.set_epoch(epoch)  # the order, and each sample's augmentation, of this epoch
        metrics: Dict[str, Any] = {"epoch": epoch + 1}
        metrics.update(_train_one_epoch(epoch, model, train_loader, optimizer, scheduler, train_loss_fn, state, ctx))
        val = evaluate(model, val_loader, device, loss_fn=val_loss_fn, amp_dtype=amp_dtype,
                       channels_last=args.channels_last, distributed=dist.distributed)
        metrics.update({"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                        "val_images_per_sec": val["images_per_sec"]})
        if ema_module is not None:
            ema_val = evaluate(ema_module, val_loader, device, loss_fn=val_loss_fn, amp_dtype=amp_dtype,
                               channels_last=args.channels_last, distributed=dist.distributed)
            metrics.update({"ema_val_loss": ema_val["loss"], "ema_val_top1": ema_val["top1"],
                            "ema_val_top5": ema_val["top5"]})
        scheduler.step(epoch + 1)
        history.append(metrics)
        score = metrics["ema_val_top1" if ema_module is not None else "val_top1"]
        is_best = best["metric"] is None or score > best["metric"]
        if is_best:
            best = {"metric": score, "epoch": epoch + 1}
        # Best first; among equal scores the earlier epoch (as for best.pth).
        ranked = sorted(kept_best + [[score, epoch + 1]], key=lambda e: (-e[0], e[1]))
        kept_best, fallen = ranked[:args.checkpoint_hist], ranked[args.checkpoint_hist:]

        # Every rank holds the same weights, so every rank takes the same decision here.
        bad = ckpt_lib.first_nonfinite(unwrap_model(model).state_dict())
        if bad is None and ema_module is not None:
            bad = ckpt_lib.first_nonfinite(ema_module.state_dict())
        if bad is not None:
            raise TrainingDiverged(
                f"the weights became non-finite in epoch {epoch + 1} ({bad!r} holds NaN or infinity); stopped "
                f"without saving, and the last good checkpoint {last_path!r} is kept as it was. Lower --lr or "
                "use --clip-grad"
            )
        rng_states = dist.all_gather_object(ckpt_lib.capture_rng_state())
        if dist.is_main:
            checkpoint = {
                "format": ckpt_lib.FORMAT,
                "format_version": ckpt_lib.FORMAT_VERSION,
                "model_name": args.model,
                "num_classes": num_classes,
                "epoch": epoch + 1,
                "global_step": state["global_step"],
                "model": unwrap_model(model).state_dict(),
                "model_ema": ema_module.state_dict() if ema_module is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": ckpt_lib.plain_values(scheduler.state_dict()),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "world_size": dist.world_size,
                "args": _parser_values(args),
                "data_config": ckpt_lib.plain_values(data_config),
                "class_to_idx": ckpt_lib.plain_values(class_map) if class_map else None,
                "history": history,
                "best": best,
                "kept_best": kept_best,
                "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
            }
            ckpt_lib.save_checkpoint(checkpoint, last_path)
            if is_best:
                ckpt_lib.copy_checkpoint(last_path, best_path)
                # The weights that scored best (the EMA's when there is one), in the model's own layout.
                best_weights = ema_module if ema_module is not None else unwrap_model(model)
                ckpt_lib.save_safetensors(best_weights.state_dict(), weights_path, _weights_metadata(
                    args, num_classes, data_config, class_map, epoch + 1, ema_module is not None))
            if args.checkpoint_hist > 1:
                if [score, epoch + 1] in kept_best:
                    ckpt_lib.copy_checkpoint(last_path, _hist_path(run_dir, epoch + 1))
                for _, old_epoch in fallen:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_hist_path(run_dir, int(old_epoch)))
            reporting.write_metrics(run_dir, history)
            loggers.log_epoch(epoch + 1, metrics)
            say(reporting.epoch_line(metrics, ema=ema_module is not None))
        dist.barrier()
    loggers.close()

    # Distributed sanity check: every rank must end with bit-identical weights.
    final_sd = unwrap_model(model).state_dict()
    rank_hashes = dist.all_gather_object(ckpt_lib.state_dict_sha256(final_sd))
    summary: Dict[str, Any] = {}
    if dist.is_main:
        plots = reporting.write_plots(run_dir, history, run_name=run_name,
                                      lr_curve=_lr_curve(args, lr, updates_per_epoch))
        final = history[-1] if history else {}
        summary = {
            "model": args.model,
            "data": "digits" if args.data_dir is None else args.data_dir,
            "epochs": num_epochs,
            "world_size": dist.world_size,
            "final_val_top1": final.get("val_top1"),
            "final_val_top5": final.get("val_top5"),
            "final_val_loss": final.get("val_loss"),
            "best_val_top1": best["metric"],
            "best_epoch": best["epoch"],
            "run_dir": os.path.abspath(run_dir),
            "last_checkpoint": os.path.abspath(last_path),
            "best_checkpoint": os.path.abspath(best_path),
            "best_weights": os.path.abspath(weights_path),
            "args_yaml": os.path.abspath(args_yaml),
            "tensorboard": loggers.event_files,
            "run_name": run_name,
            "metrics_csv": os.path.abspath(os.path.join(run_dir, reporting.METRICS_CSV)),
            "metrics_json": os.path.abspath(os.path.join(run_dir, reporting.METRICS_JSON)),
            "plots": [os.path.abspath(p) for p in plots],
            "rank_weights_sha256": rank_hashes,
            "ranks_identical": len(set(rank_hashes)) == 1,
        }
        reporting.write_json(os.path.join(run_dir, "summary.json"), summary)
        say(reporting.summary_table(history, ema=ema_module is not None))
        say(reporting.summary_footer(summary))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``spanet-train``); returns the process exit code."""
    try:
        args = parse_args(argv)
        train(args)
    except (UsageError, data_lib.DataError, ckpt_lib.CheckpointError) as e:
        print(f"spanet-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"spanet-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spanet-train: interrupted; resume with --resume <run folder>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
