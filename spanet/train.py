"""spanet-train: train SPANet (or any timm model) with timm's recipe components.

Usage (``spanet-train`` and ``python -m spanet.train`` are the same program)::

    spanet-train                                    # spanet_small on the embedded digits set, CPU, minutes
    spanet-train --model resnet18 --epochs 5        # a timm baseline on the same data
    torchrun --nproc_per_node=8 -m spanet.train --data-dir /data/imagenet \\
        --model spanet_small --preset imagenet      # the published ImageNet-1K recipe (SPEC section 4)
    spanet-train --resume runs/<name>               # continue a run exactly where its last checkpoint left it

Built on timm's own components: ``create_dataset``/``create_transform``
(RandAugment, random erasing, crop_pct), ``Mixup`` (MixUp + CutMix),
``LabelSmoothingCrossEntropy``/``SoftTargetCrossEntropy``,
``create_optimizer_v2`` (lr scaled linearly with the global batch),
``create_scheduler_v2`` (warm-up then cosine), ``ModelEmaV3``. Adds drop path,
gradient accumulation, AMP (bf16/fp16), ``torch.compile``, channels_last,
DistributedDataParallel under ``torchrun`` (nccl on GPUs, gloo on CPUs) and
exactly resumable, atomically written checkpoints.

Presets set the defaults of every recipe flag; any flag given on the command
line overrides its preset value:

* ``digits`` (default without ``--data-dir``): a short schedule for the
  embedded 32x32 digits (no flips: digits are not mirror-symmetric).
* ``imagenet`` (default with ``--data-dir``): the published recipe, 300 epochs
  at 224, AdamW wd 0.05, lr 1e-3 per 1024 images, 5 warm-up epochs, cosine,
  MixUp 0.8, CutMix 1.0, RandAugment m9, random erasing 0.25, label smoothing
  0.1, drop path per variant (0.1/0.2/0.3/0.3/0.4 for S/M/MX/B/BX).

A run folder (``--output``/``--name``, default ``./runs/<model>-<data>-<time>``)
receives ``last.pth``, ``best.pth``, ``metrics.csv``, ``metrics.json``,
``summary.json``, ``loss.png`` and ``accuracy.png``.

Testing hook: with the environment variable ``SPANET_TRAIN_KILL_AFTER_STEPS=N``
the process SIGKILLs itself right after its N-th optimizer step (used by the
tests to check that a killed and resumed run ends with the uninterrupted weights).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.utils import unwrap_model

from . import checkpoint as ckpt_lib
from . import data as data_lib
from . import reporting
from .validate import evaluate, resolve_channels_last

__all__ = ["PRESETS", "UsageError", "build_parser", "parse_args", "train", "main"]

#: Drop path (stochastic depth) per variant in the published scripts.
PUBLISHED_DROP_PATH = {
    "spanet_small": 0.1,
    "spanet_medium": 0.2,
    "spanet_mediumX": 0.3,
    "spanet_base": 0.3,
    "spanet_baseX": 0.4,
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


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    """The spanet-train argument parser (preset-controlled flags default to None until a preset fills them)."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="spanet-train",
        description="Train SPANet (or any timm model) with timm's recipe. Without arguments: spanet_small "
        "on the embedded digits set (sklearn load_digits, 32x32), on the CPU, in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe defaults (default: digits without --data-dir, imagenet with it)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: embedded digits)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--img-size", type=int, help="square train/eval input size (digits are upscaled to it)")
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction (None: the model's pretrained_cfg)")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (default: model's)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (default: model's)")
    g.add_argument("--interpolation", help="eval resize interpolation ('' : model's)")
    g.add_argument("--train-samples", type=int, default=None, help="use only N evenly spaced training images")
    g.add_argument("--val-samples", type=int, default=None, help="use only N evenly spaced validation images")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the dataset)")
    g.add_argument("-j", "--workers", type=int, default=0, help="data-loader worker processes per rank")
    g.add_argument("--pin-mem", action="store_true", help="pin host memory (GPU training)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="spanet_small", help="any timm model name (spanet_* registered by spanet)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs them cached)")
    g.add_argument("--initial-checkpoint", default=None,
                   help="start from these weights: a spanet-train checkpoint or a plain/published state dict")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--drop", type=float, default=None, help="dropout before the classifier")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs, key=value")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for the CPU, where SPANet's layers and "
                        "training kernels are faster in it; off on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", help="timm optimizer name (create_optimizer_v2)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --lr-base scaling)")
    g.add_argument("--lr-base", type=float, help="peak lr for a global batch of --lr-base-size (scaled linearly)")
    g.add_argument("--lr-base-size", type=int, help="global batch the --lr-base refers to")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs=2, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--sched", help="timm scheduler name (create_scheduler_v2)")
    g.add_argument("--sched-on-epochs", action=argparse.BooleanOptionalAction, default=None,
                   help="update the lr once per epoch (published) instead of every optimizer step")
    g.add_argument("--epochs", type=int)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--cooldown-epochs", type=int, help="epochs at min-lr after the cosine (timm semantics)")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--scale", type=float, nargs=2, help="RandomResizedCrop scale range")
    g.add_argument("--ratio", type=float, nargs=2, help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--hflip", type=float)
    g.add_argument("--vflip", type=float)
    g.add_argument("--color-jitter", type=float)
    g.add_argument("--aa", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none' to disable)")
    g.add_argument("--train-interpolation", help="train resize interpolation (random, bicubic, ...)")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--mixup", type=float, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn MixUp/CutMix off from this epoch (0: never)")
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", help="warm the EMA decay up (short runs)")

    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=int, help="batch per process (global = b x processes x accum)")
    g.add_argument("--val-batch-size", type=int, default=None, help="eval batch (default: 2 x --batch-size)")
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--amp", action="store_true", help="automatic mixed precision")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads per process (torch.set_num_threads); default: PyTorch's choice. "
                   "On a shared machine 1 avoids oversubscription")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output", default="runs", help="parent folder of run folders")
    g.add_argument("--name", default=None, help="run folder name (default: <model>-<data>-<time>)")
    g.add_argument("--resume", default=None, help="a checkpoint or a run folder (its last.pth) to continue")
    g.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    return p


# Taken from the command line even when resuming: where and how this process runs, not what it trains.
_RUN_CONTROL = frozenset({"resume", "name", "output", "device", "workers", "pin_mem", "no_progress", "threads"})


def _explicit_flags(argv: Optional[Sequence[str]]) -> set:
    # Re-parse with every default suppressed: what remains was typed on the command line.
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``: the preset fills every flag the command line leaves unset.

    With ``--resume``, the arguments recorded in the checkpoint come first
    (so ``spanet-train --resume RUN`` continues the same recipe); flags typed
    on the command line still win.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None and os.path.exists(args.resume):
        recorded = ckpt_lib.load_training_checkpoint(_resume_path(args.resume), mmap=True).get("args", {})
        explicit = _explicit_flags(argv)
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


def check_args(args: argparse.Namespace) -> None:
    """Validate arguments before anything is built; raises :class:`UsageError` naming the problem."""
    import timm

    positive = ("batch_size", "epochs", "grad_accum_steps", "lr_base_size", "img_size")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("val_batch_size", "train_samples", "val_samples", "num_classes", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.lr_base is not None and not args.lr_base > 0:
        raise UsageError(f"--lr-base must be > 0, got {args.lr_base}")
    if args.warmup_epochs < 0 or args.cooldown_epochs < 0:
        raise UsageError("--warmup-epochs and --cooldown-epochs must be >= 0")
    if not 0.0 <= args.drop_path < 1.0:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.batch_size % 2:
        raise UsageError(f"MixUp/CutMix need an even --batch-size, got {args.batch_size}")
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UsageError(f"unknown model {args.model!r}{hint}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir!r} does not exist or is not a directory")
    if args.initial_checkpoint is not None and not os.path.isfile(args.initial_checkpoint):
        raise UsageError(f"--initial-checkpoint {args.initial_checkpoint!r} does not exist")
    if args.resume is not None and not os.path.exists(args.resume):
        raise UsageError(f"--resume {args.resume!r} does not exist")


# ---------------------------------------------------------------------------------------- distributed
class Dist:
    """Process-group facts for this process (a single process is world_size 1, rank 0)."""

    def __init__(self, device_arg: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise UsageError(f"--device {device_arg} asked for CUDA but no CUDA device is available")
        if want_cuda:
            # Under torchrun each process takes the GPU of its local rank.
            if self.world_size > 1 or device_arg in ("auto", "cuda"):
                self.device = torch.device("cuda", self.local_rank if self.world_size > 1 else 0)
            else:
                self.device = torch.device(device_arg)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.distributed = self.world_size > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

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


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- helpers
def _primitive(value: Any) -> Any:
    # Checkpoints must load with weights_only=True: keep the recorded args to plain values.
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_primitive(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    return str(value)


def _resolve_run_dir(args: argparse.Namespace) -> str:
    if args.resume is not None and args.name is None:
        resume = os.path.abspath(args.resume)
        return resume if os.path.isdir(resume) else os.path.dirname(resume)
    name = args.name
    if name is None:
        data = "digits" if args.data_dir is None else os.path.basename(os.path.normpath(args.data_dir))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{args.model}-{data}-{stamp}"
    return os.path.join(args.output, name)


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


def _resolve_data_config(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    overrides = {
        "input_size": (3, args.img_size, args.img_size) if args.img_size else None,
        "crop_pct": args.crop_pct,
        "interpolation": args.interpolation or None,
        "mean": args.mean,
        "std": args.std,
    }
    cfg = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    return {
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "interpolation": str(cfg["interpolation"]),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
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
    args, dist, device = ctx["args"], ctx["dist"], ctx["device"]
    mixup_fn, scaler, model_ema = ctx["mixup_fn"], ctx["scaler"], ctx["model_ema"]
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    model.train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_group_start = (updates_per_epoch - 1) * accum
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    start = time.perf_counter()
    bar = reporting.progress(num_batches, f"epoch {epoch + 1}/{ctx['num_epochs']}",
                             enabled=dist.is_main and not args.no_progress)
    optimizer.zero_grad(set_to_none=True)
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
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += loss.detach().double().cpu() * x.shape[0]
        seen += x.shape[0]
        if is_step:
            if scaler is not None:
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            if model_ema is not None:
                model_ema.update(unwrap_model(model), step=state["global_step"])
            scheduler.step_update(num_updates=state["global_step"])
            ctx["process_steps"] += 1
            if ctx["kill_after"] is not None and ctx["process_steps"] >= ctx["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(
            loss=f"{(loss_sum / max(seen, 1)).item():.4f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            img_s=f"{seen * dist.world_size / max(elapsed, 1e-9):.0f}",
        )
    bar.close()
    elapsed = time.perf_counter() - start
    totals = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64, device=device)
    if dist.distributed:
        torch.distributed.all_reduce(totals)
    return {
        "train_loss": totals[0].item() / max(totals[1].item(), 1.0),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "train_images_per_sec": totals[1].item() / max(elapsed, 1e-9),
        "epoch_time": elapsed,
    }


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a training as configured by :func:`parse_args`; returns the summary (also in summary.json).

    Raises :class:`UsageError`, :class:`spanet.data.DataError` or
    :class:`spanet.checkpoint.CheckpointError` for bad inputs, before any file
    of an existing run is touched.
    """
    check_args(args)
    dist = Dist(args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: Dist) -> Dict[str, Any]:
    import timm
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    device = dist.device
    args.channels_last = resolve_channels_last(args.channels_last, device)
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
    run_dir = _resolve_run_dir(args)
    last_path = os.path.join(run_dir, "last.pth")
    best_path = os.path.join(run_dir, "best.pth")
    if resume_ckpt is None and os.path.exists(last_path):
        raise UsageError(
            f"run folder {run_dir!r} already holds a checkpoint; pass --resume {run_dir} to continue it "
            "or choose another --name"
        )

    # Data (model-independent parts first: the number of classes sizes the model).
    train_ds = data_lib.create_split_dataset(args.data_dir, args.train_split, is_training=True,
                                             image_size=args.img_size)
    class_map = data_lib.dataset_class_to_idx(train_ds)
    if class_map:
        data_lib.check_val_classes(args.data_dir, args.val_split, class_map)
    val_ds = data_lib.create_split_dataset(args.data_dir, args.val_split, is_training=False,
                                           image_size=args.img_size, class_map=class_map)
    num_classes = args.num_classes or data_lib.dataset_num_classes(train_ds)
    if resume_ckpt is not None and resume_ckpt["num_classes"] != num_classes:
        raise ckpt_lib.CheckpointError(
            f"checkpoint has {resume_ckpt['num_classes']} classes, this run {num_classes}; check --data-dir"
        )

    # Model: the same initial weights on every rank (seeded before the per-rank seed is set).
    _seed_all(args.seed)
    model_kwargs = dict(args.model_kwargs or {})
    model_kwargs.setdefault("drop_path_rate", args.drop_path)
    if args.drop is not None:
        model_kwargs.setdefault("drop_rate", args.drop)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as e:
        raise UsageError(f"cannot create {args.model} with {model_kwargs}: {e}") from e
    if args.initial_checkpoint:
        info = ckpt_lib.load_model_weights(model, args.initial_checkpoint, drop_mismatched_head=True)
        say(f"initial weights: {args.initial_checkpoint}" +
            (f" (classifier re-initialised: {', '.join(info['dropped'])})" if info["dropped"] else ""))
    data_config = _resolve_data_config(args, model)
    aug = data_lib.AugConfig(
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, train_interpolation=args.train_interpolation or data_config["interpolation"],
        no_aug=args.no_aug,
    )
    train_ds.transform = data_lib.build_transform(data_config, True, aug)
    val_ds.transform = data_lib.build_transform(data_config, False)
    _seed_all(args.seed + dist.rank)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    global_batch = args.batch_size * dist.world_size * args.grad_accum_steps
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    opt_kwargs: Dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **opt_kwargs)
    except (ValueError, AssertionError, KeyError) as e:
        raise UsageError(f"cannot create optimizer {args.opt!r}: {e}") from e
    scaler = None
    if args.amp and args.amp_dtype == "float16":
        scaler = torch.amp.GradScaler(device.type)

    train_loader, train_sampler = data_lib.build_train_loader(
        train_ds, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed, rank=dist.rank,
        world_size=dist.world_size, limit=args.train_samples, pin_memory=args.pin_mem,
    )
    val_loader = data_lib.build_eval_loader(
        val_ds, batch_size=args.val_batch_size or 2 * args.batch_size, num_workers=args.workers,
        rank=dist.rank, world_size=dist.world_size, limit=args.val_samples, pin_memory=args.pin_mem,
    )
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=args.sched_on_epochs, updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError) as e:
        raise UsageError(f"cannot create scheduler {args.sched!r}: {e}") from e

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
    state = {"global_step": 0}
    if resume_ckpt is not None:
        unwrap_model(model).load_state_dict(resume_ckpt["model"])
        if model_ema is not None:
            if resume_ckpt.get("model_ema") is None:
                raise ckpt_lib.CheckpointError("the checkpoint has no EMA weights; resume without --model-ema")
            model_ema.module.load_state_dict(resume_ckpt["model_ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"])
        state["global_step"] = int(resume_ckpt["global_step"])
        history = list(resume_ckpt.get("history", []))
        best = dict(resume_ckpt.get("best", best))
        rng = resume_ckpt.get("rng") or []
        if len(rng) == dist.world_size:
            ckpt_lib.restore_rng_state(rng[dist.rank])
        else:
            say(f"note: checkpoint was written by {len(rng)} processes, this run has {dist.world_size}; "
                "RNG streams are re-seeded, so augmentation will not replay bit-exactly")
            _seed_all(args.seed + 1000 * start_epoch + dist.rank)
        say(f"resumed from {_resume_path(args.resume)} at epoch {start_epoch} (step {state['global_step']})")

    if dist.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if args.compile:
        model = torch.compile(model, mode=args.compile_mode)

    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
    n_params = sum(p.numel() for p in unwrap_model(model).parameters())
    say(f"spanet-train: {args.model} ({n_params / 1e6:.2f} M params, {num_classes} classes) on "
        f"{'digits (embedded)' if args.data_dir is None else args.data_dir}, preset {args.preset}, "
        f"{dist.world_size} process(es) on {device.type}")
    say(f"  {len(train_loader)} batches of {args.batch_size} per process per epoch, global batch {global_batch}, "
        f"peak lr {lr:.3g}, {num_epochs} epochs, input {data_config['input_size'][1]}px; run folder {run_dir}")

    ctx = {"args": args, "dist": dist, "device": device, "mixup_fn": mixup_fn, "scaler": scaler,
           "model_ema": model_ema, "num_epochs": num_epochs, "process_steps": 0,
           "kill_after": _kill_after_steps()}
    ema_module = model_ema.module if model_ema is not None else None
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if args.amp else None
    for epoch in range(start_epoch, num_epochs):
        train_sampler.set_epoch(epoch)
        # Seeds the loader's worker processes: the data stream of an epoch depends only on (seed, epoch, rank).
        train_loader.generator.manual_seed(args.seed * 100003 + epoch * 1009 + dist.rank)
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
                "scheduler": _primitive(scheduler.state_dict()),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "world_size": dist.world_size,
                "args": _primitive(vars(args)),
                "data_config": _primitive(data_config),
                "class_to_idx": _primitive(class_map) if class_map else None,
                "history": history,
                "best": best,
                "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
            }
            ckpt_lib.save_checkpoint(checkpoint, last_path)
            if is_best:
                ckpt_lib.copy_checkpoint(last_path, best_path)
            reporting.write_metrics(run_dir, history)
            say(reporting.epoch_line(metrics, ema=ema_module is not None))
        dist.barrier()

    # Distributed sanity check: every rank must end with bit-identical weights.
    final_sd = unwrap_model(model).state_dict()
    rank_hashes = dist.all_gather_object(ckpt_lib.state_dict_sha256(final_sd))
    summary: Dict[str, Any] = {}
    if dist.is_main:
        plots = reporting.write_plots(run_dir, history)
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
    except KeyboardInterrupt:
        print("spanet-train: interrupted; resume with --resume <run folder>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
