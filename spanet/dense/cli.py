"""spanet-dense: train and evaluate SPANet detectors and segmenters (torchvision models).

Usage (``spanet-dense`` and ``python -m spanet.dense`` are the same program)::

    spanet-dense --task instance                  # Mask R-CNN on SPANet-S, embedded synthetic shapes, CPU, minutes
    spanet-dense --task semantic                  # Semantic FPN, mIoU
    spanet-dense --task detection --arch retinanet
    torchrun --nproc_per_node=8 -m spanet.dense --task instance --data-dir /data/coco \\
        --backbone-checkpoint spanet-small.pth    # the paper's COCO Mask R-CNN 1x
    spanet-dense --resume runs/<name>             # continue exactly where the last checkpoint left off
    spanet-dense --evaluate runs/<name>/best.pth  # evaluate a checkpoint on its validation split

Presets fill every recipe flag the command line leaves unset: ``synthetic``
(default without ``--data-dir``), ``coco`` (detection and instance
segmentation with ``--data-dir``: the paper's 1x recipe) and ``ade20k``
(semantic segmentation with ``--data-dir``: the paper's Semantic FPN recipe).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

__all__ = ["PRESETS", "HEAD_PRESETS", "TASK_ARCHS", "UsageError", "build_parser", "parse_args", "check_args", "run",
           "main"]

#: The architectures of each task; the first is the default.
TASK_ARCHS = {"detection": ("fasterrcnn", "retinanet"), "instance": ("maskrcnn",), "semantic": ("semantic_fpn",)}

#: Recipe defaults per preset; a flag given on the command line wins.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Small and short: trains from scratch on 2 CPU cores in a few minutes.
    "synthetic": dict(
        img_size=64, min_size=None, max_size=None, train_images=256, val_images=64, epochs=6, iters=None,
        batch_size=4, lr=1e-3, weight_decay=0.05, schedule="step", lr_steps=(5,), warmup_iters=50,
        fpn_channels=128, hflip=0.5, ratio_range=(1.0, 1.0), trainable_layers=None, eval_interval=1,
        train_split="train", val_split="val", seg_scale=None, num_classes=None,
    ),
    # The paper's COCO setup: 1x schedule (12 epochs, lr x0.1 at 8 and 11), AdamW lr 1e-4, wd 1e-4,
    # 500 warm-up iterations, shorter side 800 (longer at most 1333), global batch 8 (e.g. 4 x -b 2).
    "coco": dict(
        img_size=None, min_size=800, max_size=1333, train_images=None, val_images=None, epochs=12, iters=None,
        batch_size=2, lr=1e-4, weight_decay=1e-4, schedule="step", lr_steps=(8, 11), warmup_iters=500,
        fpn_channels=256, hflip=0.5, ratio_range=(1.0, 1.0), trainable_layers=5, eval_interval=1,
        train_split="train2017", val_split="val2017", seg_scale=None, num_classes=None,
    ),
    # The paper's ADE20K setup: 80k iterations at global batch 16 (e.g. 4 x -b 4), AdamW lr 2e-4, wd 1e-4,
    # poly decay (power 0.9), random rescale 0.5-2 of (2048, 512) and 512 x 512 crops; 150 classes.
    "ade20k": dict(
        img_size=512, min_size=None, max_size=None, train_images=None, val_images=None, epochs=None,
        iters=80000, batch_size=4, lr=2e-4, weight_decay=1e-4, schedule="poly", lr_steps=(), warmup_iters=0,
        fpn_channels=256, hflip=0.5, ratio_range=(0.5, 2.0), trainable_layers=5, eval_interval=8,
        train_split="training", val_split="validation", seg_scale=(2048, 512), num_classes=150,
    ),
}

#: Builder keyword arguments per (preset, arch); ``--head-kwargs`` entries override them.
HEAD_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "synthetic": {
        # torchvision's heads, narrower and with fewer sampled boxes (anchors: see _synthetic_anchor_sizes).
        "fasterrcnn": dict(representation_size=256,
                           rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                           rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                           rpn_batch_size_per_image=128, box_batch_size_per_image=64),
        "maskrcnn": dict(representation_size=256, mask_layers=(128, 128),
                         rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                         rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                         rpn_batch_size_per_image=128, box_batch_size_per_image=64),
        "retinanet": dict(),
        "semantic_fpn": dict(head_channels=64),
    },
    "coco": {"fasterrcnn": {}, "maskrcnn": {}, "retinanet": {}},
    "ade20k": {"semantic_fpn": {}},
}

# Taken from the command line even when resuming: where and how this process runs, not what it trains.
_RUN_CONTROL = frozenset({"resume", "name", "output", "device", "workers", "no_progress", "threads", "evaluate",
                          "results_file"})


class UsageError(ValueError):
    """Bad command-line arguments: reported as ``spanet-dense: error: ...``, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The spanet-dense argument parser (preset-controlled flags default to None until a preset fills them)."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="spanet-dense",
        description="Train and evaluate SPANet detectors and segmenters (torchvision models). Without "
        "--data-dir: the embedded synthetic shapes set, on the CPU, in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=sorted(TASK_ARCHS), default="instance",
                   help="detection (boxes), instance (boxes and masks) or semantic (label maps)")
    p.add_argument("--arch", default=None, help="fasterrcnn or retinanet (detection), maskrcnn (instance), "
                   "semantic_fpn (semantic); default: the first")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe defaults (default: synthetic without --data-dir, coco or ade20k with it)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="COCO-format folder (annotations/*.json + images) for "
                   "detection/instance, ADE20K-style folder (images/, annotations/) for semantic; default: synthetic")
    g.add_argument("--train-split", default=None)
    g.add_argument("--val-split", default=None)
    g.add_argument("--img-size", type=int, default=None,
                   help="side of the synthetic images; training crop of semantic segmentation")
    g.add_argument("--min-size", type=int, default=None, help="detectors: shorter side images are resized to "
                   "(default: --img-size for the synthetic set)")
    g.add_argument("--max-size", type=int, default=None, help="detectors: longest side allowed after resizing")
    g.add_argument("--multi-scale", type=int, nargs="+", default=None,
                   help="detectors: shorter sides drawn from in training (e.g. 480 512 ... 800); eval uses the last")
    g.add_argument("--ratio-range", type=float, nargs=2, default=None,
                   help="semantic: random rescale range in training (ADE20K: 0.5 2.0)")
    g.add_argument("--seg-scale", type=int, nargs=2, default=None,
                   help="semantic: images are fitted into LONG SHORT, e.g. 2048 512 (default: --img-size)")
    g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability in training")
    g.add_argument("--train-images", type=int, default=None, help="size of the synthetic training split")
    g.add_argument("--val-images", type=int, default=None, help="size of the synthetic validation split")
    g.add_argument("--data-seed", type=int, default=0, help="seed the synthetic set is drawn from")
    g.add_argument("--train-samples", type=int, default=None, help="use only N evenly spaced training images")
    g.add_argument("--val-samples", type=int, default=None, help="use only N evenly spaced validation images")
    g.add_argument("--num-classes", type=int, default=None, help="semantic: classes of the label maps")
    g.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=True,
                   help="semantic folders: label 0 is 'other' (ignored), 1..K are the classes (ADE20K)")
    g.add_argument("-j", "--workers", type=int, default=0, help="data-loader worker processes per rank")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="spanet_small", help="SPANet variant of the backbone")
    g.add_argument("--pretrained", action="store_true", help="backbone from timm's pretrained weights")
    g.add_argument("--backbone-checkpoint", default=None,
                   help="backbone weights: an ImageNet classification checkpoint (ours or the published file) or "
                   "a published dense (mmdetection/mmsegmentation) checkpoint")
    g.add_argument("--trainable-layers", type=int, default=None,
                   help="how many of the stem and four stages train, 0-5 (default: the preset's, 5 for coco and "
                   "ade20k as published; synthetic: 5, or 3 with --pretrained/--backbone-checkpoint)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the backbone")
    g.add_argument("--fpn-channels", type=int, default=None, help="FPN width (published: 256)")
    g.add_argument("--head-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="builder/torchvision model keyword arguments, key=value (e.g. box_batch_size_per_image=128 "
                   "mask_layers=(256,256)); they override the preset's")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="timm.create_model keyword arguments of the backbone, key=value")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the backbone on channels_last maps (default: on for the CPU)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (not scaled with the batch)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--iters", type=int, default=None, help="train for this many steps instead of --epochs")
    g.add_argument("--schedule", choices=("step", "poly"), default=None)
    g.add_argument("--lr-steps", type=int, nargs="*", default=None, help="step schedule: epochs where lr drops")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: factor at each step")
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--min-lr", type=float, default=0.0, help="poly schedule: final lr")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--warmup-ratio", type=float, default=0.001, help="warm-up starts at this fraction of the lr")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")

    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=int, default=None, help="images per process and step")
    g.add_argument("--val-batch-size", type=int, default=None, help="eval batch (default: --batch-size)")
    g.add_argument("--eval-interval", type=int, default=None, help="evaluate every N epochs (and after the last)")
    g.add_argument("--amp", action="store_true", help="automatic mixed precision")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads); 1 avoids oversubscription on a shared CPU")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output", default="runs", help="parent folder of run folders")
    g.add_argument("--name", default=None, help="run folder name (default: dense-<task>-<data>-<time>)")
    g.add_argument("--resume", default=None, help="a checkpoint or a run folder (its last.pth) to continue")
    g.add_argument("--evaluate", default=None, metavar="CHECKPOINT",
                   help="only evaluate this spanet-dense checkpoint on the validation split")
    g.add_argument("--results-file", default=None, help="with --evaluate: write the metrics as JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _synthetic_anchor_sizes(img_size: int):
    # The shapes span 15-45% of the side: anchors from 1/8 of the side up, one octave per pyramid level
    # (torchvision's 32-512 are for 800 px COCO images).
    base = max(4, round(img_size / 8))
    return tuple(base * 2**level for level in range(5))


def _explicit_flags(argv: Optional[Sequence[str]]) -> set:
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; the preset fills the flags left unset.

    With ``--resume`` or ``--evaluate`` the arguments recorded in the
    checkpoint come first (the same task, model, data and recipe); flags typed
    on the command line still win.
    """
    from .engine import _resume_path, load_dense_checkpoint

    parser = build_parser()
    args = parser.parse_args(argv)
    recorded_from = args.evaluate or args.resume
    if recorded_from is not None and os.path.exists(recorded_from):
        path = args.evaluate or _resume_path(args.resume)
        recorded = load_dense_checkpoint(path, mmap=True).get("args", {})
        explicit = _explicit_flags(argv)
        for key, value in recorded.items():
            if hasattr(args, key) and key not in explicit and key not in _RUN_CONTROL:
                setattr(args, key, tuple(value) if isinstance(value, list) else value)
    if args.arch is None:
        args.arch = TASK_ARCHS[args.task][0]
    if args.preset is None:
        args.preset = "synthetic" if args.data_dir is None else ("ade20k" if args.task == "semantic" else "coco")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    head = dict(HEAD_PRESETS.get(args.preset, {}).get(args.arch, {}))
    if args.preset == "synthetic" and args.arch != "semantic_fpn":
        head["anchor_sizes"] = _synthetic_anchor_sizes(args.img_size)
    head.update(args.head_kwargs or {})
    args.head_kwargs = head
    if args.data_dir is None:
        args.min_size = args.min_size or args.img_size
        args.max_size = args.max_size or args.img_size
    if args.seg_scale is None and args.img_size is not None:
        args.seg_scale = (args.img_size, args.img_size)
    args.lr_steps = tuple(args.lr_steps or ())
    return args


def _positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Validate the arguments before anything is built; raises :class:`UsageError` naming the flag."""
    import timm

    from .. import models

    if args.arch not in TASK_ARCHS[args.task]:
        raise UsageError(f"--arch {args.arch} does not do --task {args.task}; choose "
                         f"{' or '.join(TASK_ARCHS[args.task])}")
    if args.preset == "ade20k" and args.task != "semantic" or args.preset == "coco" and args.task == "semantic":
        raise UsageError(f"--preset {args.preset} is not a recipe for --task {args.task}")
    if not timm.is_model(args.model) or args.model not in models.spanet.MODEL_CONFIGS:
        raise UsageError(f"--model must be a SPANet variant ({', '.join(models.spanet.MODEL_CONFIGS)}), "
                         f"got {args.model!r}")
    _positive(args, ("img_size", "min_size", "max_size", "train_images", "val_images", "train_samples",
                     "val_samples", "num_classes", "epochs", "iters", "batch_size", "val_batch_size",
                     "eval_interval", "threads", "fpn_channels"))
    if args.epochs is None and args.iters is None:
        raise UsageError("give --epochs or --iters")
    if args.workers < 0 or args.seed < 0 or args.data_seed < 0:
        raise UsageError("--workers, --seed and --data-seed must be >= 0")
    for name in ("lr", "weight_decay", "lr_gamma", "poly_power", "min_lr", "warmup_ratio", "clip_grad"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be finite, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be finite and > 0, got {args.lr}")
    if args.weight_decay < 0 or args.warmup_iters < 0 or args.min_lr < 0:
        raise UsageError("--weight-decay, --warmup-iters and --min-lr must be >= 0")
    if not 0 < args.warmup_ratio <= 1 or not 0 < args.lr_gamma <= 1 or args.poly_power < 0:
        raise UsageError("--warmup-ratio and --lr-gamma must be in (0, 1] and --poly-power >= 0")
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise UsageError(f"--clip-grad must be > 0, got {args.clip_grad}")
    if not 0.0 <= args.hflip <= 1.0:
        raise UsageError(f"--hflip must be in [0, 1], got {args.hflip}")
    if not 0.0 <= args.drop_path < 1.0:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    low, high = args.ratio_range
    if not 0 < low <= high:
        raise UsageError(f"--ratio-range must be 0 < LOW <= HIGH, got {low} {high}")
    if args.multi_scale is not None and (args.task == "semantic" or min(args.multi_scale) < 1):
        raise UsageError("--multi-scale takes positive sizes and is for the detectors (semantic: --ratio-range)")
    if args.trainable_layers is not None and not 0 <= args.trainable_layers <= 5:
        raise UsageError(f"--trainable-layers must be in 0..5, got {args.trainable_layers}")
    if args.task == "semantic" and args.data_dir is not None and args.num_classes is None:
        raise UsageError("--num-classes is needed for semantic segmentation folders")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir!r} does not exist or is not a directory")
    # A resumed or evaluated run takes its weights from its own checkpoint, not from the initial backbone file.
    flags = ("evaluate",) if (args.resume or args.evaluate) else ("backbone_checkpoint",)
    for flag in flags:
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} does not exist or is not a file")
    if args.pretrained and args.backbone_checkpoint:
        raise UsageError("give --pretrained or --backbone-checkpoint, not both")
    if args.resume is not None and not os.path.exists(args.resume):
        raise UsageError(f"--resume {args.resume!r} does not exist")
    if args.resume and args.evaluate:
        raise UsageError("give --resume or --evaluate, not both")
    if args.results_file is not None:
        if args.evaluate is None:
            raise UsageError("--results-file goes with --evaluate (a training writes summary.json)")
        from ..validate import check_writable_file

        try:
            check_writable_file(args.results_file, "--results-file")
        except ValueError as e:
            raise UsageError(str(e)) from e


def _claim_run_dir(args: argparse.Namespace) -> str:
    """The run folder: the checkpoint's when resuming, else a new one (:func:`spanet.train.claim_run_dir`)."""
    from ..train import claim_run_dir

    if args.resume is not None and args.name is None:
        resume = os.path.abspath(args.resume)
        return resume if os.path.isdir(resume) else os.path.dirname(resume)
    data = "synthetic" if args.data_dir is None else os.path.basename(os.path.normpath(args.data_dir))
    default_name = f"dense-{args.task}-{args.arch}-{data}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return claim_run_dir(args.output, args.name, default_name)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or, with ``--evaluate``, evaluate) as configured by :func:`parse_args`; returns the summary or metrics."""
    import torch

    from .. import train as train_lib
    from ..checkpoint import remove_stale_temporaries
    from ..validate import resolve_channels_last
    from . import engine

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dist = train_lib.Dist(args.device)
    except train_lib.UsageError as e:
        raise UsageError(str(e)) from e
    try:
        args.channels_last = resolve_channels_last(args.channels_last, dist.device)
        if args.evaluate is not None:
            metrics = engine.evaluate_checkpoint(args, dist)
            if dist.is_main:
                shown = {k: v for k, v in metrics.items() if k != "IoU"}
                print("  ".join(f"{k} {v:.2f}" for k, v in shown.items()), flush=True)
                if args.results_file:
                    from ..reporting import write_json

                    write_json(args.results_file, {"checkpoint": os.path.abspath(args.evaluate), **metrics})
            return metrics
        created = dist.is_main and args.resume is None
        run_dir = _claim_run_dir(args) if dist.is_main else None
        run_dir = dist.all_gather_object(run_dir)[0]
        if args.resume is not None and dist.is_main:
            remove_stale_temporaries(run_dir)
        try:
            return engine.train(args, dist, run_dir)
        except BaseException:
            # A run that fails before its first checkpoint (bad data, a diverged first epoch) leaves no folder.
            if created and not os.listdir(run_dir):
                os.rmdir(run_dir)
            raise
    finally:
        dist.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``spanet-dense``); returns the process exit code."""
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from .engine import TrainingDiverged

    try:
        run(parse_args(argv))
    except (UsageError, DataError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"spanet-dense: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spanet-dense: interrupted; resume with --resume <run folder>", file=sys.stderr)
        return 130
    return 0
