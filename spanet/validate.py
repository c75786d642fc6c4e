"""spanet-validate: evaluate a checkpoint on an ImageFolder split or on the embedded digits set.

Usage (``spanet-validate`` and ``python -m spanet.validate`` are the same program)::

    spanet-validate --checkpoint runs/<name>/best.pth            # a spanet-train run, on its own data
    spanet-validate --model spanet_small --checkpoint spanet-small.pth --data-dir /data/imagenet
                                                                 # a published checkpoint (plain state dict)

Reports top-1, top-5, loss and throughput (images per second), and optionally
writes them as JSON (``--results-file``).

Checkpoints: a spanet-train checkpoint, and the ``model.safetensors`` written
beside its ``best.pth``, carry their model name, class count and data config;
a plain state dict (``.pth`` or ``.safetensors``, e.g. the official
``spanet-small.pth``) needs ``--model`` and goes through the model's
``checkpoint_filter_fn``. Evaluation runs under ``torch.inference_mode()``.

Preprocessing: command-line flags, else the data config recorded in a
spanet-train checkpoint, else the model's ``pretrained_cfg`` (input size,
crop_pct, interpolation, mean/std), resolved by timm's ``resolve_data_config``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["evaluate", "resolve_channels_last", "parse_device", "unknown_model_message", "check_writable_file",
           "build_parser", "validate", "main"]


def resolve_channels_last(requested: Optional[bool], device: torch.device) -> bool:
    """``--channels-last`` as given, or by default on the CPU, where SPANet's layers and kernels are faster in it."""
    return device.type == "cpu" if requested is None else requested


def parse_device(value: str) -> Optional[torch.device]:
    """The ``--device`` flag: ``auto`` (None), ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` names the flag."""
    if value == "auto":
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {value} asked for CUDA but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {value}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def unknown_model_message(name: str) -> str:
    """``unknown model NAME; did you mean ...?`` with the closest registered timm names."""
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    return f"unknown model {name!r}{hint}"


def check_writable_file(path: str, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` unless ``path`` can be written (checked before any work is done)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: the folder {parent!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path!r} is not writable: {e.strerror}") from e
    if not existed:
        os.unlink(path)


def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    loss_fn: Optional[nn.Module] = None,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    distributed: bool = False,
    progress: bool = False,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy loss and images/s of ``model`` over ``loader``.

    Runs in eval mode under ``torch.inference_mode()`` (no autograd graph, no
    training-only kernels) and restores the model's mode afterwards. The sums
    stay on the device until the end: one host sync per pass. With
    ``distributed`` the per-rank sums are all-reduced, so each image of a
    strided shard (see :func:`spanet.data.build_eval_loader`) counts exactly
    once. Top-5 is top-``min(5, num_classes)``. ``progress`` shows a bar.
    """
    from . import reporting

    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct1, correct5
    seen = 0
    start = time.perf_counter()
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    bar = reporting.progress(len(loader), "validate", enabled=progress)
    try:
        with torch.inference_mode():
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    out = model(x)
                out = out.float()
                n = x.shape[0]
                # Integer hit counts (not per-batch float32 percentages): the totals are exact.
                hits = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
                sums += torch.stack([loss_fn(out, y).double() * n, hits[:, 0].sum().double(),
                                     hits.any(dim=1).sum().double()])
                seen += n
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64, device=device)])
    if distributed:
        torch.distributed.all_reduce(totals)
    totals = totals.cpu()  # the pass's one host sync
    elapsed = time.perf_counter() - start
    n = max(totals[3].item(), 1.0)
    return {
        "loss": totals[0].item() / n,
        "top1": 100.0 * totals[1].item() / n,
        "top5": 100.0 * totals[2].item() / n,
        "samples": int(totals[3].item()),
        "seconds": elapsed,
        "images_per_sec": totals[3].item() / max(elapsed, 1e-9),
    }


def build_parser() -> argparse.ArgumentParser:
    """The spanet-validate argument parser."""
    p = argparse.ArgumentParser(
        prog="spanet-validate",
        description="Evaluate a spanet-train checkpoint or a plain/published state dict: top-1, top-5, loss, "
        "throughput.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="a spanet-train run folder, checkpoint or model.safetensors, or a plain state dict "
                   "(.pth or .safetensors, e.g. a published checkpoint)")
    p.add_argument("--model", default=None, help="model name (default: the one recorded in the checkpoint)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--data-dir", default=None, help="ImageFolder root (default: the embedded digits set)")
    p.add_argument("--split", default="val", help="split folder under --data-dir")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: checkpoint/dataset)")
    p.add_argument("--img-size", type=int, default=None, help="square input size")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction, in (0, 1]")
    p.add_argument("--interpolation", default=None, help="resize interpolation (bicubic, bilinear, ...)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean")
    p.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (> 0)")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="data-loader worker processes (default: 0 for the embedded digits, else timm's 4, fewer "
                   "on a machine with fewer than 5 CPUs)")
    p.add_argument("--samples", type=int, default=None, help="evaluate only N evenly spaced images")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 unless --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16", help="autocast dtype")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for the CPU, where SPANet is faster in it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads); default: PyTorch's choice. On a shared "
                   "machine 1 avoids oversubscription")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown off a terminal)")
    p.add_argument("--results-file", default=None, help="also write the results to this JSON file")
    return p


class _Error(ValueError):
    """Bad spanet-validate arguments: reported as ``spanet-validate: error: ...``, exit code 2."""


def _check_args(args: argparse.Namespace) -> None:
    from . import data as data_lib

    for name in ("batch_size", "samples", "num_classes", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _Error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise _Error(f"--workers must be >= 0, got {args.workers}")
    try:
        parse_device(args.device)
        data_lib.check_preprocessing(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
                                     interpolation=args.interpolation)
        if args.results_file:
            check_writable_file(args.results_file, "--results-file")
    except ValueError as e:
        raise _Error(str(e)) from e


def _recorded_run(path: str, ckpt_lib) -> Dict[str, Any]:
    """What a spanet-train file records of its run (model, classes, data, preprocessing); {} for a plain one.

    Reads a training checkpoint (``last.pth``/``best.pth``) or the metadata of
    the ``model.safetensors`` written beside ``best.pth``.
    """
    import json

    if path.endswith(".safetensors"):
        meta = ckpt_lib.read_safetensors(path)[1]
        if meta.get("format") != ckpt_lib.WEIGHTS_FORMAT:
            return {}
        return {
            "model_name": meta["model_name"],
            "num_classes": int(meta["num_classes"]),
            "data_dir": meta.get("data_dir") or None,
            "data_config": json.loads(meta["data_config"]),
            "class_to_idx": json.loads(meta["class_to_idx"]) if meta.get("class_to_idx") else None,
            "weights": meta.get("weights", "model"),
        }
    raw = ckpt_lib.load_checkpoint(path)
    if not (isinstance(raw, dict) and raw.get("format") == ckpt_lib.FORMAT):
        return {}
    return {
        "model_name": raw.get("model_name"),
        "num_classes": raw.get("num_classes"),
        "data_dir": (raw.get("args") or {}).get("data_dir"),
        "data_config": raw.get("data_config"),
        "class_to_idx": raw.get("class_to_idx"),
    }


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as configured by :func:`build_parser`; returns the results dict (and prints it)."""
    import timm

    import spanet  # noqa: F401  (registers the spanet_* models in timm)

    from . import checkpoint as ckpt_lib
    from . import data as data_lib
    from . import reporting

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("best.pth", "last.pth")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise _Error(f"--checkpoint {args.checkpoint!r} is a folder without best.pth or last.pth")
    recorded = _recorded_run(path, ckpt_lib)
    if args.use_ema and recorded.get("weights") is not None:
        raise _Error(f"{path!r} holds one set of weights (the best epoch's {recorded['weights']} weights); "
                     "--use-ema reads the EMA weights of a .pth checkpoint")
    model_name = args.model or recorded.get("model_name")
    if model_name is None:
        raise _Error(f"{path!r} is a plain state dict; pass --model to say which architecture it holds")
    if not timm.is_model(model_name):
        raise _Error(unknown_model_message(model_name))
    # A spanet-train file knows its training data; a plain one defaults to the data the user points at.
    data_dir = args.data_dir or recorded.get("data_dir")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise _Error(f"--data-dir {data_dir!r} does not exist or is not a directory")

    recorded_cfg = recorded.get("data_config")
    if data_dir is None and recorded_cfg is None and args.img_size is None:
        args.img_size = 32  # the embedded digits default size
    probe_size = args.img_size or (recorded_cfg["input_size"][-1] if recorded_cfg else 32)
    in_chans = int(recorded_cfg["input_size"][0]) if recorded_cfg else 3
    ds = data_lib.create_split_dataset(data_dir, args.split, is_training=False, image_size=probe_size,
                                       class_map=recorded.get("class_to_idx"), in_chans=in_chans)
    data_classes = data_lib.dataset_num_classes(ds)
    num_classes = args.num_classes or recorded.get("num_classes") or data_classes
    if num_classes < data_classes:
        raise _Error(f"--num-classes {num_classes} is fewer than the {data_classes} classes of the data; "
                     f"the labels would not fit the classifier")

    device = parse_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                              **({"in_chans": in_chans} if in_chans != 3 else {}))
    ckpt_lib.load_model_weights(model, path, use_ema=args.use_ema)
    data_config = data_lib.resolve_data_config(model, img_size=args.img_size, crop_pct=args.crop_pct,
                                               interpolation=args.interpolation, mean=args.mean, std=args.std,
                                               recorded=recorded_cfg, in_chans=in_chans)
    if data_dir is None and data_config["input_size"][-1] != probe_size:
        ds = data_lib.create_split_dataset(None, args.split, is_training=False,
                                           image_size=data_config["input_size"][-1], in_chans=in_chans)
    ds.transform = data_lib.build_transform(data_config, is_training=False)
    loader = data_lib.build_eval_loader(ds, batch_size=args.batch_size,
                                        num_workers=data_lib.resolve_workers(args.workers, data_dir),
                                        limit=args.samples, pin_memory=device.type == "cuda")
    model.to(device)
    args.channels_last = resolve_channels_last(args.channels_last, device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if args.amp else None
    metrics = evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                       progress=not args.no_progress)
    results = {
        "model": model_name,
        "checkpoint": os.path.abspath(path),
        "weights": recorded.get("weights") or ("ema" if args.use_ema else "model"),
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
        reporting.write_json(args.results_file, results)
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
    except KeyboardInterrupt:
        print("spanet-validate: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
