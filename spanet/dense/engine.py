"""Training and evaluation loops of spanet-dense.

:func:`train` runs a configured training (see :mod:`spanet.dense.cli`):
AdamW, a per-iteration learning rate (:func:`learning_rate`: linear warm-up,
then steps at given epochs, mmdetection's 1x schedule, or mmsegmentation's
polynomial decay), evaluation every ``--eval-interval`` epochs
(:func:`evaluate`: COCO box/mask mAP or mIoU), and the habits of spanet-train:
atomic checkpoints after every epoch (``last.pth``, ``best.pth``) that hold
everything an exact resume needs, a tqdm bar, ``metrics.csv``/``metrics.json``,
``loss.png``/``metrics.png`` and ``summary.json``, and DistributedDataParallel
under ``torchrun`` (nccl on GPUs, gloo on CPUs).

Exact resume: the data order of an epoch is a function of ``(seed, epoch)``
(``DistributedSampler``), each sample's augmentation of ``(seed, epoch,
index)`` (:class:`spanet.data.SampleSeededDataset`), and the model's own
random draws (the detectors' RPN and RoI samplers, multi-scale sizes, drop
path) come from the global RNGs, whose states the checkpoint carries. A run
killed and resumed from its last checkpoint therefore ends with the weights of
an uninterrupted one, bit for bit on the CPU.

Testing hook: with ``SPANET_DENSE_KILL_AFTER_STEPS=N`` the process SIGKILLs
itself right after its N-th optimizer step.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt_lib
from .. import data as data_lib
from .. import reporting
from . import builders
from .data import (
    IGNORE_INDEX,
    CocoInstances,
    DetectionTrainTransform,
    FolderSegmentation,
    SegmentationTransform,
    SyntheticShapes,
    collate_samples,
)
from .metrics import ConfusionMatrix, coco_map, detections_to_coco

__all__ = ["FORMAT", "FORMAT_VERSION", "TrainingDiverged", "learning_rate", "build_datasets", "build_model",
           "evaluate", "train", "evaluate_checkpoint", "load_dense_checkpoint", "primary_metric"]

#: ``"format"`` of every spanet-dense checkpoint.
FORMAT = "spanet-dense-checkpoint"
#: Bumped when the layout of a checkpoint changes incompatibly.
FORMAT_VERSION = 1

_KILL_ENV = "SPANET_DENSE_KILL_AFTER_STEPS"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of that step is saved."""


def primary_metric(task: str) -> str:
    """The metric that picks ``best.pth``: box mAP for detection and instance segmentation, mIoU for semantic."""
    return "mIoU" if task == "semantic" else "box_AP"


# ------------------------------------------------------------------------------------------ schedule
def learning_rate(step: int, *, base_lr: float, schedule: str, total_steps: int, steps_per_epoch: int,
                  lr_steps: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9, min_lr: float = 0.0,
                  warmup_steps: int = 0, warmup_ratio: float = 0.001) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    ``schedule="step"``: ``base_lr * gamma**k`` after ``k`` of the epochs
    ``lr_steps`` (mmdetection's 1x: 12 epochs, steps at 8 and 11).
    ``schedule="poly"``: ``(base_lr - min_lr) * (1 - step / total_steps)**power + min_lr``
    (mmsegmentation's ``poly``). Both start with ``warmup_steps`` of linear
    warm-up from ``warmup_ratio`` times the scheduled rate (mmdetection's
    ``warmup='linear'``).
    """
    if schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        lr = base_lr * gamma ** sum(1 for m in lr_steps if epoch >= m)
    elif schedule == "poly":
        lr = (base_lr - min_lr) * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power + min_lr
    else:
        raise ValueError(f"schedule must be 'step' or 'poly', got {schedule!r}")
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr


# ---------------------------------------------------------------------------------------------- data
def build_datasets(args: argparse.Namespace, *, train: bool = True):
    """``(train_set or None, val_set)`` of ``args.task`` from ``args.data_dir`` (or the synthetic set)."""
    task = args.task
    if args.data_dir is None:
        if task == "semantic":
            train_tf = SegmentationTransform((args.img_size, args.img_size), True, args.img_size,
                                             tuple(args.ratio_range), args.hflip)
        else:
            train_tf = DetectionTrainTransform(args.hflip)
        val = SyntheticShapes(args.val_images, args.img_size, seed=args.data_seed, split="val", task=task)
        if not train:
            return None, val
        return SyntheticShapes(args.train_images, args.img_size, seed=args.data_seed, split="train", task=task,
                               transforms=train_tf), val
    if task == "semantic":
        scale = tuple(args.seg_scale)
        train_set = None
        if train:
            train_set = FolderSegmentation(
                args.data_dir, args.train_split, num_classes=args.num_classes,
                reduce_zero_label=args.reduce_zero_label,
                transforms=SegmentationTransform(scale, True, args.img_size, tuple(args.ratio_range), args.hflip))
        val = FolderSegmentation(args.data_dir, args.val_split, num_classes=args.num_classes,
                                 reduce_zero_label=args.reduce_zero_label,
                                 transforms=SegmentationTransform(scale, False))
        return train_set, val
    with_masks = task == "instance"
    train_set = None
    category_ids = getattr(args, "category_ids", None)
    if train:
        train_set = CocoInstances(args.data_dir, args.train_split, with_masks=with_masks, train=True,
                                  transforms=DetectionTrainTransform(args.hflip), category_ids=category_ids)
        category_ids = train_set.category_ids
    val = CocoInstances(args.data_dir, args.val_split, with_masks=with_masks, train=False,
                        category_ids=category_ids)
    return train_set, val


def _eval_loader(val_set, args: argparse.Namespace, rank: int, world_size: int):
    val_set = torch.utils.data.Subset(val_set, data_lib.subset_indices(len(val_set), args.val_samples))
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=args.val_batch_size or args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate_samples)
    return loader, val_set


def _train_loader(train_set, args: argparse.Namespace, rank: int, world_size: int):
    subset = torch.utils.data.Subset(train_set, data_lib.subset_indices(len(train_set), args.train_samples))
    seeded = data_lib.SampleSeededDataset(subset, args.seed)
    if len(seeded) < args.batch_size * world_size:
        raise data_lib.DataError(f"the training split has {len(seeded)} images, fewer than one global batch "
                                 f"({args.batch_size} x {world_size} processes); lower --batch-size")
    sampler = data_lib.EpochSampler(seeded, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                    drop_last=True)
    loader = torch.utils.data.DataLoader(
        seeded, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        collate_fn=collate_samples, generator=torch.Generator())
    return loader, sampler


# --------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, num_classes: int, initial_weights: bool = True) -> nn.Module:
    """The ``args.arch`` model on ``args.model`` with the run's backbone and head arguments.

    ``initial_weights=False`` skips ``--pretrained``/``--backbone-checkpoint`` (the weights come from a
    spanet-dense checkpoint next); the freezing they imply is kept.
    """
    kwargs: Dict[str, Any] = dict(args.head_kwargs or {})
    kwargs.update(fpn_channels=args.fpn_channels, channels_last=args.channels_last,
                  model_kwargs=dict(args.model_kwargs or {}, drop_path_rate=args.drop_path))
    trainable_layers = args.trainable_layers
    if trainable_layers is None and (args.pretrained or args.backbone_checkpoint):
        trainable_layers = 3  # the builders' default with loaded weights, also when they are not loaded here
    if trainable_layers is not None:
        kwargs["trainable_layers"] = trainable_layers
    if initial_weights and args.backbone_checkpoint:
        kwargs["checkpoint"] = args.backbone_checkpoint
    if initial_weights and args.pretrained:
        kwargs["pretrained"] = True
    if args.arch != "semantic_fpn":
        training_sizes = tuple(args.multi_scale) if args.multi_scale else args.min_size
        kwargs.update(min_size=training_sizes, max_size=args.max_size)
    try:
        return builders.ARCHS[args.arch](num_classes, args.model, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build {args.arch} with --head-kwargs {args.head_kwargs}: {e}") from e


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------- evaluation
def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: str, *, device: torch.device, num_classes: int,
             coco_gt=None, category_ids: Optional[Sequence[int]] = None, image_ids: Optional[Sequence[int]] = None,
             amp_dtype: Optional[torch.dtype] = None, distributed: bool = False,
             progress_enabled: bool = False) -> Dict[str, Any]:
    """Evaluate ``model`` on ``loader`` (batches of ``(images, targets)`` tuples).

    Detection/instance: COCO box (and mask) mAP against ``coco_gt`` over
    ``image_ids``, in percent (:func:`~spanet.dense.metrics.coco_map`).
    Semantic: mIoU, mAcc and aAcc (:class:`~spanet.dense.metrics.ConfusionMatrix`),
    logits resized to each label's size. Under DDP every rank passes its shard;
    all ranks return the same numbers.
    """
    module = _unwrap(model)
    module.eval()
    start = time.perf_counter()
    seen = 0
    bar = reporting.progress(len(loader), "eval", enabled=progress_enabled)
    if task == "semantic":
        matrix = ConfusionMatrix(num_classes)
        for images, labels in loader:
            same_size = len({tuple(im.shape) for im in images}) == 1
            groups = [(torch.stack(images), list(labels))] if same_size else [(im[None], [lb]) for im, lb in
                                                                                 zip(images, labels)]
            for batch, batch_labels in groups:
                with _autocast(device, amp_dtype):
                    logits = module(batch.to(device))["out"].float()
                for logit, label in zip(logits, batch_labels):
                    if logit.shape[-2:] != label.shape:
                        logit = F.interpolate(logit[None], size=label.shape, mode="bilinear",
                                              align_corners=False)[0]
                    matrix.update(logit.argmax(0).cpu(), label)
            seen += len(images)
            bar.update(1)
        bar.close()
        if distributed:
            matrix.all_reduce()
        out = matrix.compute()
    else:
        results: List[Dict[str, Any]] = []
        for images, targets in loader:
            with _autocast(device, amp_dtype):
                outputs = module([im.to(device) for im in images])
            for output, target in zip(outputs, targets):
                results += detections_to_coco(output, int(target["image_id"]), category_ids,
                                              with_masks=task == "instance")
            seen += len(images)
            bar.update(1)
        bar.close()
        if distributed:
            gathered: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        iou_types = ("bbox", "segm") if task == "instance" else ("bbox",)
        out = coco_map(coco_gt, results, iou_types, image_ids=image_ids)
    elapsed = time.perf_counter() - start
    counts = torch.tensor([float(seen)], dtype=torch.float64)
    if distributed:
        torch.distributed.all_reduce(counts)
    out["images_per_sec"] = float(counts.item()) / max(elapsed, 1e-9)
    return out


# ----------------------------------------------------------------------------------------- training
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _kill_after_steps() -> Optional[int]:
    value = os.environ.get(_KILL_ENV)
    return int(value) if value else None


def _to_device(targets, device):
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def _train_one_epoch(epoch: int, model: nn.Module, loader, optimizer, scaler, state: Dict[str, Any],
                     ctx: Dict[str, Any]) -> Dict[str, float]:
    args, dist, device = ctx["args"], ctx["dist"], ctx["device"]
    model.train()
    sums: Dict[str, float] = {}
    seen = steps = 0
    start = time.perf_counter()
    bar = reporting.progress(min(len(loader), ctx["total_steps"] - state["global_step"]),
                             f"epoch {epoch + 1}/{ctx['num_epochs']}", enabled=dist.is_main and not args.no_progress)
    for images, targets in loader:
        if state["global_step"] >= ctx["total_steps"]:
            break
        lr = ctx["lr_at"](state["global_step"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        if args.task == "semantic":
            images = torch.stack(images).to(device)
            labels = torch.stack(targets).to(device)
            with _autocast(device, ctx["amp_dtype"]):
                logits = model(images)["out"]
            losses = {"loss_ce": F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)}
        else:
            with _autocast(device, ctx["amp_dtype"]):
                losses = model([im.to(device) for im in images], _to_device(targets, device))
        loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(sum(values.values())):
            raise TrainingDiverged(
                f"the loss is not finite at step {state['global_step'] + 1} (epoch {epoch + 1}): "
                + ", ".join(f"{k} {v}" for k, v in values.items())
                + "; lower --lr or set --clip-grad; the last checkpoint is kept as it was")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_(ctx["params"], args.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["global_step"] += 1
        ctx["process_steps"] += 1
        if ctx["kill_after"] is not None and ctx["process_steps"] >= ctx["kill_after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = len(images)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * batch
        sums["loss"] = sums.get("loss", 0.0) + sum(values.values()) * batch
        seen += batch
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", lr=f"{lr:.2e}",
                        img_s=f"{seen * dist.world_size / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    names = sorted(k for k in sums if k != "loss")
    totals = torch.tensor([sums.get("loss", 0.0)] + [sums[k] for k in names] + [float(seen)], dtype=torch.float64)
    if dist.distributed:
        torch.distributed.all_reduce(totals)
    count = max(totals[-1].item(), 1.0)
    row = {"train_loss": totals[0].item() / count}
    row.update({f"train_{k}": totals[1 + i].item() / count for i, k in enumerate(names)})
    row.update({"lr": float(optimizer.param_groups[0]["lr"]), "steps": state["global_step"],
                "train_images_per_sec": totals[-1].item() / max(elapsed, 1e-9), "epoch_time": elapsed})
    return row


def _resume_path(resume: str) -> str:
    if os.path.isdir(resume):
        path = os.path.join(resume, "last.pth")
        if not os.path.isfile(path):
            raise ckpt_lib.CheckpointError(f"--resume {resume!r} is a folder without last.pth")
        return path
    return resume


def load_dense_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a spanet-dense checkpoint; :class:`~spanet.checkpoint.CheckpointError` names a foreign or bad file."""
    ckpt = ckpt_lib.load_checkpoint(path, map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {path!r} is not a spanet-dense checkpoint (no format={FORMAT!r} key); to start from "
            "backbone weights use --backbone-checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ckpt_lib.CheckpointError(f"checkpoint {path!r} has format version {ckpt.get('format_version')}, "
                                       f"this spanet reads version {FORMAT_VERSION}")
    return ckpt


def _eval_context(args, val_set):
    """Ground truth, category ids and image ids the evaluation of ``val_set`` needs."""
    if args.task == "semantic":
        return {}
    if isinstance(val_set.dataset, SyntheticShapes):
        coco, category_ids = val_set.dataset.coco(), None
        image_ids = [int(i) for i in val_set.indices]
    else:
        coco, category_ids = val_set.dataset.coco, val_set.dataset.category_ids
        image_ids = [val_set.dataset.image_id(i) for i in val_set.indices]
    return {"coco_gt": coco, "category_ids": category_ids, "image_ids": image_ids}


def _plots(run_dir: str, history: Sequence[Dict[str, Any]], metric_keys: Sequence[str]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return []
    paths = []
    loss_keys = [k for k in history[-1] if k.startswith("train_loss")]
    for filename, title, ylabel, keys in (("loss.png", "training loss", "loss", loss_keys),
                                          ("metrics.png", "validation", "%", metric_keys)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=key.replace("train_", "").replace("val_", ""))
        paths.append(reporting.finish_epoch_plot(fig, ax, os.path.join(run_dir, filename), ylabel, title))
    return paths


def _metric_keys(task: str) -> List[str]:
    if task == "semantic":
        return ["val_mIoU", "val_mAcc", "val_aAcc"]
    keys = ["val_box_AP", "val_box_AP50", "val_box_AP75"]
    return keys + (["val_mask_AP", "val_mask_AP50"] if task == "instance" else [])


def _table(history: Sequence[Dict[str, Any]], task: str) -> str:
    cols = [("epoch", "epoch", "{:d}"), ("train_loss", "train loss", "{:.4f}")]
    cols += [(k, k[4:], "{:.2f}") for k in _metric_keys(task)]
    cols += [("lr", "lr", "{:.2e}"), ("train_images_per_sec", "img/s", "{:.1f}"), ("epoch_time", "time s", "{:.1f}")]
    return reporting.format_table(history, cols)


def train(args: argparse.Namespace, dist, run_dir: str) -> Dict[str, Any]:
    """Run the training configured by :func:`spanet.dense.cli.parse_args` in ``run_dir``; returns the summary.

    ``dist`` is a :class:`spanet.train.Dist`. Raises
    :class:`~spanet.data.DataError`, :class:`~spanet.checkpoint.CheckpointError`,
    ``ValueError`` or :class:`TrainingDiverged` for bad inputs or a diverged run.
    """
    device = dist.device
    say = reporting.printer(dist.is_main)
    resume_ckpt = load_dense_checkpoint(_resume_path(args.resume)) if args.resume else None
    if resume_ckpt is not None:
        args.category_ids = resume_ckpt.get("category_ids")
    train_set, val_set = build_datasets(args)
    num_classes = train_set.num_classes
    category_ids = getattr(train_set, "category_ids", None)
    if resume_ckpt is not None and resume_ckpt["num_classes"] != num_classes:
        raise ckpt_lib.CheckpointError(f"the checkpoint has {resume_ckpt['num_classes']} classes, this run's data "
                                       f"{num_classes}; check --data-dir")

    _seed_all(args.seed)  # the same initial weights on every rank
    model = build_model(args, num_classes, initial_weights=resume_ckpt is None).to(device)
    _seed_all(args.seed + dist.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    train_loader, sampler = _train_loader(train_set, args, dist.rank, dist.world_size)
    val_loader, val_subset = _eval_loader(val_set, args, dist.rank, dist.world_size)
    eval_ctx = _eval_context(args, val_subset)
    steps_per_epoch = len(train_loader)
    total_steps = args.iters if args.iters else args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    def lr_at(step: int) -> float:
        return learning_rate(step, base_lr=args.lr, schedule=args.schedule, total_steps=total_steps,
                             steps_per_epoch=steps_per_epoch, lr_steps=args.lr_steps, gamma=args.lr_gamma,
                             power=args.poly_power, min_lr=args.min_lr, warmup_steps=args.warmup_iters,
                             warmup_ratio=args.warmup_ratio)

    start_epoch, history, best = 0, [], {"metric": None, "epoch": None}
    state = {"global_step": 0}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
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
            say(f"note: the checkpoint was written by {len(rng)} processes, this run has {dist.world_size}; "
                "the random streams are re-seeded, so the run will not replay bit-exactly")
            _seed_all(args.seed + 1000 * start_epoch + dist.rank)
        say(f"resumed from {_resume_path(args.resume)} at epoch {start_epoch} (step {state['global_step']})")

    train_model = model
    if dist.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    data_name = "synthetic shapes (embedded)" if args.data_dir is None else args.data_dir
    say(f"spanet-dense: {args.arch} on {args.model} ({n_params / 1e6:.2f} M params, {num_classes} classes), "
        f"task {args.task}, {data_name}, preset {args.preset}, {dist.world_size} process(es) on {device.type}")
    say(f"  {steps_per_epoch} steps of {args.batch_size} images per process per epoch, {total_steps} steps "
        f"({num_epochs} epochs), lr {args.lr:.3g} ({args.schedule}), run folder {run_dir}")

    ctx = {"args": args, "dist": dist, "device": device, "amp_dtype": amp_dtype, "params": params,
           "num_epochs": num_epochs, "total_steps": total_steps, "lr_at": lr_at, "process_steps": 0,
           "kill_after": _kill_after_steps()}
    metric_name = primary_metric(args.task)
    last_path, best_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth")
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        row: Dict[str, Any] = {"epoch": epoch + 1}
        row.update(_train_one_epoch(epoch, train_model, train_loader, optimizer, scaler, state, ctx))
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == num_epochs:
            metrics = evaluate(model, val_loader, args.task, device=device, num_classes=num_classes,
                               amp_dtype=amp_dtype, distributed=dist.distributed,
                               progress_enabled=dist.is_main and not args.no_progress, **eval_ctx)
            row.update({f"val_{k}": v for k, v in metrics.items() if k != "IoU"})
        history.append(row)
        score = row.get(f"val_{metric_name}")
        is_best = score is not None and (best["metric"] is None or score > best["metric"])
        if is_best:
            best = {"metric": score, "epoch": epoch + 1}
        rng_states = dist.all_gather_object(ckpt_lib.capture_rng_state())
        if dist.is_main:
            checkpoint = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "task": args.task, "arch": args.arch, "model_name": args.model, "num_classes": num_classes,
                "class_names": list(train_set.class_names), "category_ids": category_ids,
                "epoch": epoch + 1, "global_step": state["global_step"],
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states, "world_size": dist.world_size,
                "args": ckpt_lib.plain_values(vars(args)), "history": ckpt_lib.plain_values(history), "best": best,
                "versions": {"torch": str(torch.__version__)},
            }
            ckpt_lib.save_checkpoint(checkpoint, last_path)
            if is_best:
                ckpt_lib.copy_checkpoint(last_path, best_path)
            reporting.write_metrics(run_dir, history)
            line = f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}"
            if score is not None:
                line += ", " + ", ".join(f"{k[4:]} {row[k]:.2f}" for k in _metric_keys(args.task) if k in row)
            say(line + f", lr {row['lr']:.2e}, {row['train_images_per_sec']:.1f} img/s, {row['epoch_time']:.1f}s")
        dist.barrier()

    rank_hashes = dist.all_gather_object(ckpt_lib.state_dict_sha256(model.state_dict()))
    summary: Dict[str, Any] = {}
    if dist.is_main:
        plots = _plots(run_dir, history, _metric_keys(args.task))
        final = history[-1] if history else {}
        summary = {
            "task": args.task, "arch": args.arch, "model": args.model,
            "data": "synthetic" if args.data_dir is None else args.data_dir,
            "epochs": num_epochs, "steps": state["global_step"], "world_size": dist.world_size,
            "metric": metric_name,
            "final": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
            "best_metric": best["metric"], "best_epoch": best["epoch"],
            "run_dir": os.path.abspath(run_dir),
            "last_checkpoint": os.path.abspath(last_path),
            "best_checkpoint": os.path.abspath(best_path) if os.path.exists(best_path) else None,
            "metrics_csv": os.path.abspath(os.path.join(run_dir, reporting.METRICS_CSV)),
            "metrics_json": os.path.abspath(os.path.join(run_dir, reporting.METRICS_JSON)),
            "plots": [os.path.abspath(p) for p in plots],
            "rank_weights_sha256": rank_hashes, "ranks_identical": len(set(rank_hashes)) == 1,
        }
        reporting.write_json(os.path.join(run_dir, "summary.json"), summary)
        say(_table(history, args.task))
        finals = ", ".join(f"{k} {v:.2f}" for k, v in summary["final"].items()
                           if k in [m[4:] for m in _metric_keys(args.task)])
        say(f"final validation: {finals}")
        say(f"checkpoint: {summary['last_checkpoint']} (best: {summary['best_checkpoint']})")
        say(f"log:        {summary['metrics_csv']} and {summary['metrics_json']}")
        say(f"plots:      {', '.join(summary['plots'])}")
        if dist.world_size > 1:
            say(f"ranks hold identical weights: {'yes' if summary['ranks_identical'] else 'NO'}")
    return summary


def evaluate_checkpoint(args: argparse.Namespace, dist) -> Dict[str, Any]:
    """Evaluate the spanet-dense checkpoint ``args.evaluate`` on the validation split; returns the metrics."""
    ckpt = load_dense_checkpoint(args.evaluate)
    args.category_ids = ckpt.get("category_ids")
    _, val_set = build_datasets(args, train=False)
    model = build_model(args, int(ckpt["num_classes"]), initial_weights=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ckpt_lib.CheckpointError(f"checkpoint {args.evaluate!r} does not fit {args.arch} on {args.model}: "
                                       f"{str(e).splitlines()[0]}") from e
    model.to(dist.device)
    loader, subset = _eval_loader(val_set, args, dist.rank, dist.world_size)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
    metrics = evaluate(model, loader, args.task, device=dist.device, num_classes=int(ckpt["num_classes"]),
                       amp_dtype=amp_dtype, distributed=dist.distributed,
                       progress_enabled=dist.is_main and not args.no_progress, **_eval_context(args, subset))
    return metrics
