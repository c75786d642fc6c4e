"""spanet-validate: evaluate a checkpoint on an ImageFolder split or on the embedded digits set.

Usage (``spanet-validate`` and ``python -m spanet.validate`` are the same program)::

    spanet-validate --checkpoint runs/<name>/best.pth            # a spanet-train run, on its own data
    spanet-validate --model spanet_small --checkpoint spanet-small.pth --data-dir /data/imagenet
                                                                 # a published checkpoint (plain state dict)

Reports top-1, top-5, loss and throughput (images per second), and optionally
writes them as JSON (``--results-file``).

Checkpoints: a spanet-train checkpoint carries its model name, class count and
data config; a plain state dict (e.g. the official ``spanet-small.pth``) needs
``--model`` and goes through the model's ``checkpoint_filter_fn``.

Preprocessing: command-line flags, else the data config recorded in a
spanet-train checkpoint, else the model's ``pretrained_cfg`` (input size,
crop_pct, interpolation, mean/std), resolved by timm's ``resolve_data_config``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["evaluate", "build_parser", "validate", "main"]


@torch.no_grad()
def resolve_channels_last(requested: Optional[bool], device: torch.device) -> bool:
    """``--channels-last`` as given, or by default on the CPU, where SPANet's layers and kernels are faster in it."""
    return device.type == "cpu" if requested is None else requested


def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    loss_fn: Optional[nn.Module] = None,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    distributed: bool = False,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy loss and images/s of ``model`` over ``loader``.

    With ``distributed`` the per-rank sums are all-reduced, so each image of a
    strided shard (see :func:`spanet.data.build_eval_loader`) counts exactly once.
    Top-5 is top-``min(5, num_classes)``.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, correct1, correct5, n
    start = time.perf_counter()
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(x)
        out = out.float()
        loss = loss_fn(out, y)
        # Integer hit counts (not per-batch float32 percentages): the totals are exact.
        hits = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
        n = x.shape[0]
        sums += torch.tensor([loss.item() * n, hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), n],
                             dtype=torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if distributed:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / n,
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "samples": int(sums[3].item()),
        "seconds": elapsed,
        "images_per_sec": sums[3].item() / max(elapsed, 1e-9),
    }


def build_parser() -> argparse.ArgumentParser:
    """The spanet-validate argument parser."""
    p = argparse.ArgumentParser(
        prog="spanet-validate",
        description="Evaluate a spanet-train checkpoint or a plain/published state dict: top-1, top-5, loss, "
        "throughput.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a spanet-train checkpoint/run folder, or a plain state dict")
    p.add_argument("--model", default=None, help="model name (default: the one recorded in the checkpoint)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--data-dir", default=None, help="ImageFolder root (default: the embedded digits set)")
    p.add_argument("--split", default="val", help="split folder under --data-dir")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: checkpoint/dataset)")
    p.add_argument("--img-size", type=int, default=None, help="square input size")
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="evaluate only N evenly spaced images")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 unless --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for the CPU, where SPANet is faster in it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--results-file", default=None, help="also write the results to this JSON file")
    return p


class _Error(ValueError):
    """Bad spanet-validate arguments: reported as ``spanet-validate: error: ...``, exit code 2."""


def _data_config(args: argparse.Namespace, model: nn.Module, recorded: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    base: Dict[str, Any] = dict(recorded or {})
    if args.img_size is not None:
        base["input_size"] = (3, args.img_size, args.img_size)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    cfg = resolve_data_config({k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}, model=model)
    return {
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "interpolation": str(cfg["interpolation"]),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as configured by :func:`build_parser`; returns the results dict (and prints it)."""
    import timm

    import spanet  # noqa: F401  (registers the spanet_* models in timm)

    from . import checkpoint as ckpt_lib
    from . import data as data_lib

    if args.batch_size < 1:
        raise _Error(f"--batch-size must be >= 1, got {args.batch_size}")
    path = args.checkpoint
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("best.pth", "last.pth")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise _Error(f"--checkpoint {args.checkpoint!r} is a folder without best.pth or last.pth")
    raw = ckpt_lib.load_checkpoint(path)
    own = isinstance(raw, dict) and raw.get("format") == ckpt_lib.FORMAT
    model_name = args.model or (raw.get("model_name") if own else None)
    if model_name is None:
        raise _Error(f"{path!r} is a plain state dict; pass --model to say which architecture it holds")
    if not timm.is_model(model_name):
        raise _Error(f"unknown model {model_name!r}")
    recorded_train_args = raw.get("args", {}) if own else {}
    # An own checkpoint knows its training data; a plain one defaults to the data the user points at.
    data_dir = args.data_dir
    if data_dir is None and own and recorded_train_args.get("data_dir"):
        data_dir = recorded_train_args["data_dir"]
    if data_dir is not None and not os.path.isdir(data_dir):
        raise _Error(f"--data-dir {data_dir!r} does not exist or is not a directory")

    recorded_cfg = raw.get("data_config") if own else None
    if data_dir is None and recorded_cfg is None and args.img_size is None:
        args.img_size = 32  # the embedded digits default size
    probe_size = args.img_size or (recorded_cfg["input_size"][-1] if recorded_cfg else 32)
    ds = data_lib.create_split_dataset(data_dir, args.split, is_training=False, image_size=probe_size,
                                       class_map=raw.get("class_to_idx") if own else None)
    num_classes = args.num_classes or (raw["num_classes"] if own else None) or data_lib.dataset_num_classes(ds)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    ckpt_lib.load_model_weights(model, path, use_ema=args.use_ema)
    data_config = _data_config(args, model, recorded_cfg)
    if data_dir is None and data_config["input_size"][-1] != probe_size:
        ds = data_lib.create_split_dataset(None, args.split, is_training=False,
                                           image_size=data_config["input_size"][-1])
    ds.transform = data_lib.build_transform(data_config, is_training=False)
    loader = data_lib.build_eval_loader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                        limit=args.samples, pin_memory=device.type == "cuda")
    model.to(device)
    args.channels_last = resolve_channels_last(args.channels_last, device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if args.amp else None
    metrics = evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=args.channels_last)
    results = {
        "model": model_name,
        "checkpoint": os.path.abspath(path),
        "weights": "ema" if args.use_ema else "model",
        "data": data_dir or "digits (embedded)",
        "split": args.split,
        "input_size": list(data_config["input_size"]),
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "samples": metrics["samples"],
        "images_per_sec": metrics["images_per_sec"],
        "device": str(device),
    }
    print(f"{model_name} on {results['data']} [{args.split}], {metrics['samples']} images at "
          f"{data_config['input_size'][-1]}px (crop_pct {data_config['crop_pct']}, {data_config['interpolation']}):\n"
          f"  top-1 {metrics['top1']:.3f}%  top-5 {metrics['top5']:.3f}%  loss {metrics['loss']:.4f}  "
          f"{metrics['images_per_sec']:.1f} img/s on {device}", flush=True)
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``spanet-validate``); returns the process exit code."""
    from .checkpoint import CheckpointError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except (_Error, CheckpointError, DataError) as e:
        print(f"spanet-validate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
