"""spanet-analyze: the paper's spectral analysis (Figs. 1, 2, 4) and class activation maps, for any timm model.

Usage (``spanet-analyze`` and ``python -m spanet.analysis`` are the same program)::

    spanet-analyze --checkpoint runs/<name>/best.pth          # a spanet-train run, on its own data
    spanet-analyze --checkpoint runs/a/best.pth,runs/b/best.pth   # two runs side by side
    spanet-analyze --model spanet_small,convnext_tiny --data-dir /data/imagenet/val   # random init (warns)

Writes to ``--out-dir``: ``spectrum_maps.png`` (Fig. 1), ``relative_log_amplitude.png``
(Fig. 2), ``context_maps.png`` (Fig. 4, SPANet models only), ``cam.png`` and
``analysis.json`` (every curve and number, with the models, weights and images
they came from).

Weights: ``--checkpoint`` takes one file per model (comma-separated): a
spanet-train checkpoint or run folder (it records the model, classes and
preprocessing) or a plain state dict such as a published release file (then
``--model`` says which). Without one the model is randomly initialised and a
warning says that the pictures show the untrained architecture.

Images: ``--data-dir`` (its ``val`` split folder when it has one, else the
folder itself, read recursively), else the data a spanet-train checkpoint
was trained on, else the embedded digits set's validation split;
``--num-images`` evenly spaced ones. Preprocessing: ``--img-size``, else the
checkpoint's recorded data config, else the model's ``pretrained_cfg``
(32 px for the digits set).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["OUTPUT_FILES", "UsageError", "analyze", "build_parser", "main"]

#: The files written to ``--out-dir`` (``context_maps.png`` only when a SPANet is analysed).
OUTPUT_FILES = ("spectrum_maps.png", "relative_log_amplitude.png", "context_maps.png", "cam.png", "analysis.json")
#: ``--cam-layer auto`` takes the last stage whose maps are at least this many pixels on a side.
MIN_CAM_MAP_SIDE = 4
_DIGITS_SIZE = 32


class UsageError(ValueError):
    """Bad spanet-analyze arguments or inputs: reported as ``spanet-analyze: error: ...``, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The spanet-analyze argument parser."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="spanet-analyze",
        description="Fourier spectrum maps, relative log amplitude, SPAM context maps and class activation maps "
        "of timm models (SPANet's Figs. 1, 2 and 4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="timm model names, comma-separated (default: those recorded in the checkpoints, else "
                   "spanet_small)")
    p.add_argument("--checkpoint", default=None,
                   help="one weight file per model, comma-separated: spanet-train checkpoints or run folders, or "
                   "plain state dicts; an empty entry or none: random initialisation")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="timm.create_model keyword arguments (key=value, e.g. depths='(1,1,1,1)') for the models "
                   "without a spanet-train checkpoint (those are built as they were trained)")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of the checkpoints")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size for plain state dicts (default: the model's pretrained_cfg)")
    p.add_argument("--data-dir", default=None,
                   help="an ImageFolder (its val split when present) or a folder of images (default: the "
                   "checkpoint's training data, else the embedded digits set)")
    p.add_argument("--num-images", type=int, default=32, help="images whose spectra are averaged")
    p.add_argument("--show-images", type=int, default=4, help="images shown in cam.png and context_maps.png")
    p.add_argument("--img-size", type=int, default=None, help="square input size (overrides the recorded one)")
    p.add_argument("--cam", choices=("gradcam", "gradcam++", "scorecam"), default="gradcam",
                   help="class activation map method")
    p.add_argument("--cam-layer", default="auto",
                   help=f"module name of the CAM's target layer; auto: the last stage whose maps are at least "
                   f"{MIN_CAM_MAP_SIDE}x{MIN_CAM_MAP_SIDE} at this input size")
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--out-dir", default="spanet-analyze-results", help="folder for the figures and analysis.json")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _csv(text: Optional[str]) -> List[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


# ------------------------------------------------------------------------------------- argument checks
def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".spanet-analyze-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir!r} is not a writable folder ({e.strerror or e})") from e
    existing = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        raise UsageError(
            f"--out-dir {out_dir!r} already holds {', '.join(existing)}; pass --overwrite or another --out-dir"
        )


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else " (see timm.list_models())"
    raise UsageError(f"unknown model {name!r}{hint}")


@dataclass
class _Weights:
    """Where one model's weights come from: ``path`` None is a random initialisation."""

    path: Optional[str] = None
    own: bool = False  # a spanet-train checkpoint
    recorded: Dict[str, Any] = field(default_factory=dict)


def _checkpoint_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("best.pth", "last.pth"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UsageError(f"--checkpoint {path!r} is a folder without best.pth or last.pth")
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint {path!r} does not exist")
    return path


def _read_weights(path: str) -> _Weights:
    from spanet import checkpoint as ckpt_lib

    path = _checkpoint_file(path)
    raw = ckpt_lib.load_checkpoint(path, mmap=True)
    if isinstance(raw, dict) and raw.get("format") == ckpt_lib.FORMAT:
        keys = ("model_name", "num_classes", "data_config", "args")  # args: model_kwargs, data_dir
        return _Weights(path, True, {k: raw.get(k) for k in keys})
    return _Weights(path, False, {})


def _plan_models(args: argparse.Namespace) -> List[tuple]:
    """``[(model name, _Weights)]`` from --model and --checkpoint, every name and file checked.

    ``--checkpoint`` entries pair with ``--model`` names by position; an empty entry (``a.pth,``) leaves
    that model randomly initialised.
    """
    names = _csv(args.model)
    paths = [p.strip() or None for p in args.checkpoint.split(",")] if args.checkpoint else []
    if names and paths and len(names) != len(paths):
        raise UsageError(f"--model names {len(names)} models but --checkpoint {len(paths)} files; give one per model "
                         "(an empty entry, as in 'a.pth,', for a random initialisation)")
    weights = [_read_weights(p) if p else _Weights() for p in paths]
    if not names:
        for w in weights:
            if w.path is None:
                raise UsageError("an empty --checkpoint entry needs --model to say which model it stands for")
            if not w.own:
                raise UsageError(f"{w.path!r} is a plain state dict; pass --model to say which architecture it holds")
        names = [w.recorded["model_name"] for w in weights] or ["spanet_small"]
    for name in names:
        _check_model_name(name)
    weights = weights or [_Weights() for _ in names]
    for name, w in zip(names, weights):
        if w.own and w.recorded["model_name"] != name:
            raise UsageError(f"checkpoint {w.path!r} holds a {w.recorded['model_name']}, not a {name}; check --model")
    return list(zip(names, weights))


# ------------------------------------------------------------------------------------------- data
@dataclass
class _Images:
    """The images analysed (``indices`` into the digits' val split or ``folder``) and their ids (file paths)."""

    source: str
    indices: List[int]
    ids: List[str]
    folder: Any = None  # timm ImageDataset, None for the digits set

    def pil(self, image_size: int) -> List[Any]:
        if self.folder is None:
            from spanet.data import DigitsDataset

            digits = DigitsDataset("val", image_size=image_size)
            return [digits.images[i] for i in self.indices]
        return [self.folder[i][0] for i in self.indices]

    def labels(self) -> List[Any]:
        """Each image's label: the digit, or the name of its class folder ('' for a flat folder)."""
        if self.folder is None:
            from spanet.data import DigitsDataset

            targets = DigitsDataset("val", image_size=8).targets
            return [targets[i] for i in self.indices]
        names = {index: name for name, index in self.folder.reader.class_to_idx.items()}
        return [names.get(int(self.folder.reader.samples[i][1]), "") for i in self.indices]


def _open_images(args: argparse.Namespace, plan: List[tuple]) -> _Images:
    from spanet import data as data_lib

    data_dir = args.data_dir
    if data_dir is None:
        recorded = [w.recorded.get("args") or {} for _, w in plan if w.own]
        data_dir = next((r.get("data_dir") for r in recorded if r.get("data_dir")), None)
    if data_dir is None:
        from spanet.data import digits_split_indices

        total = len(digits_split_indices("val"))
        indices = data_lib.subset_indices(total, args.num_images)
        return _Images("digits (embedded, val split)", indices, [f"digits/val/{i}" for i in indices])
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir!r} does not exist or is not a folder")
    try:
        root = data_lib.find_split_dir(data_dir, "val")
    except data_lib.DataError:
        root = data_dir
    from timm.data import ImageDataset

    try:
        folder = ImageDataset(os.path.abspath(root))
    except Exception as e:  # timm raises bare RuntimeError/AssertionError for a folder without images
        raise UsageError(f"--data-dir {root!r} holds no readable images ({e})") from e
    if len(folder) == 0:
        raise UsageError(f"--data-dir {root!r} holds no images")
    indices = data_lib.subset_indices(len(folder), args.num_images)
    return _Images(os.path.abspath(root), indices, [folder.filename(i, absolute=True) for i in indices], folder)


def _data_config(model, weights: _Weights, img_size: Optional[int], digits: bool) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    base = dict(weights.recorded.get("data_config") or {})
    if img_size is not None:
        base["input_size"] = (3, img_size, img_size)
    elif digits and not base:
        base["input_size"] = (3, _DIGITS_SIZE, _DIGITS_SIZE)
    cfg = resolve_data_config({k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


# ------------------------------------------------------------------------------------------ analysis
def _progress(iterable, args, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=args.no_progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _cam_layer(model, requested: str, input_side: int) -> str:
    from .cam import default_cam_layer

    if requested != "auto":
        try:
            model.get_submodule(requested)
        except AttributeError:
            raise UsageError(f"--cam-layer {requested!r}: the model has no such module") from None
        return requested
    info = getattr(model, "feature_info", None) or []
    large = [e["module"] for e in info if isinstance(e, dict) and input_side // e["reduction"] >= MIN_CAM_MAP_SIDE]
    return large[-1] if large else default_cam_layer(model)


def _display(batch: torch.Tensor, cfg: Dict[str, Any]) -> List[Any]:
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return list((batch.cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def _analyze_model(name: str, weights: _Weights, images: _Images, args, device) -> Dict[str, Any]:
    import timm

    from spanet import checkpoint as ckpt_lib
    from spanet import data as data_lib

    from .cam import class_activation_map
    from .context import context_map, spam_blocks
    from .features import collect_features
    from .spectra import SpectrumAccumulator, diagonal_profile, normalized_frequencies

    num_classes = weights.recorded.get("num_classes") if weights.own else args.num_classes
    recorded_args = weights.recorded.get("args") or {}
    kwargs = dict(recorded_args.get("model_kwargs") or {}) if weights.own else dict(args.model_kwargs)
    if num_classes:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(args.seed)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot create {name} with {kwargs}: {e}") from e
    if weights.path is None:
        print(f"spanet-analyze: warning: {name} is randomly initialised (no --checkpoint): the pictures show the "
              "untrained architecture and mean little", file=sys.stderr, flush=True)
    else:
        ckpt_lib.load_model_weights(model, weights.path, use_ema=args.use_ema)
    model.eval().to(device)
    cfg = _data_config(model, weights, args.img_size, images.folder is None)
    transform = data_lib.build_transform(cfg, is_training=False)
    side = cfg["input_size"][-1]
    pil = images.pil(side)

    accumulators: Dict[str, SpectrumAccumulator] = {}
    shapes: Dict[str, List[int]] = {}
    bar = _progress(None, args, total=len(pil), desc=f"{name}: images", unit="img")
    for start in range(0, len(pil), args.batch_size):
        batch = torch.stack([transform(img) for img in pil[start:start + args.batch_size]]).to(device)
        with torch.inference_mode():
            features = collect_features(model, batch)
        for layer, fmap in _progress(features.items(), args, desc="layers", leave=False, unit="layer"):
            accumulators.setdefault(layer, SpectrumAccumulator()).add(fmap)
            shapes[layer] = list(fmap.shape[1:])
        bar.update(batch.shape[0])
    bar.close()

    layers = []
    names = list(accumulators)
    for index, layer in enumerate(names):
        spectrum = accumulators[layer].mean().cpu()
        curve, delta = diagonal_profile(spectrum)
        layers.append({
            "name": layer,
            "depth": index / max(len(names) - 1, 1),
            "shape": shapes[layer],
            "frequency": normalized_frequencies(len(curve)).tolist(),
            "relative_log_amplitude": curve.tolist(),
            # A 1x1 or 2x2 map has only the zero frequency on the diagonal: no high-frequency value to report.
            "delta_at_pi": delta if len(curve) > 1 else None,
            "spectrum_map": spectrum.tolist(),
        })

    shown = torch.stack([transform(img) for img in pil[: args.show_images]]).to(device)
    display = _display(shown, cfg)
    cam_layer = _cam_layer(model, args.cam_layer, side)
    cam = class_activation_map(model, shown, target_layer=cam_layer, method=args.cam)
    labels = images.labels()[: args.show_images]

    contexts = []
    last_of_stage = {}  # "network.4" -> "network.4.11.token_mixer": the stage's last SPAM
    for block_name, _ in spam_blocks(model):
        last_of_stage[block_name.rsplit(".", 2)[0]] = block_name
    for block_name in last_of_stage.values():
        if min(shapes[block_name][1:]) < 2:  # a 1x1 context is one number: nothing to see over the image
            continue
        contexts.append((block_name, context_map(model, shown, block=block_name).context.cpu().numpy()))

    return {
        "record": {
            "model": name,
            "weights": {
                "checkpoint": os.path.abspath(weights.path) if weights.path else None,
                "kind": ("spanet-train checkpoint" if weights.own else "state dict") if weights.path
                else "random initialisation",
                "ema": bool(args.use_ema and weights.path),
                "state_dict_sha256": ckpt_lib.state_dict_sha256(model.state_dict()),
            },
            "model_kwargs": kwargs,
            "data_config": cfg,
            "layers": layers,
            "cam": {
                "method": args.cam,
                "layer": cam.layer,
                "images": images.ids[: args.show_images],
                "labels": labels,
                "classes": cam.classes,
            },
            "context_blocks": [block for block, _ in contexts],
        },
        "display": display,
        "cam_maps": cam.maps.numpy(),
        "contexts": contexts,
    }


def _versions() -> Dict[str, str]:
    import timm

    import spanet

    return {"spanet": spanet.__version__, "torch": torch.__version__, "timm": timm.__version__}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    return device


def analyze(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the analysis configured by :func:`build_parser`; returns the contents of ``analysis.json``."""
    import spanet  # noqa: F401  (registers the spanet_* models in timm)

    from . import plots

    for flag in ("num_images", "show_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f"--img-size must be >= 8, got {args.img_size}")
    args.show_images = min(args.show_images, args.num_images)
    _check_out_dir(args.out_dir, args.overwrite)
    plan = _plan_models(args)
    images = _open_images(args, plan)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)

    results = [_analyze_model(name, weights, images, args, device) for name, weights in plan]
    records = [r["record"] for r in results]
    labels = [r["model"] if r["weights"]["checkpoint"] else f"{r['model']} (random init)" for r in records]

    def out(name: str) -> str:
        return os.path.join(args.out_dir, name)

    curves = [{"label": label, "layers": r["layers"]} for label, r in zip(labels, records)]
    plots.plot_spectrum_maps(curves, out("spectrum_maps.png"))
    plots.plot_relative_log_amplitude(curves, out("relative_log_amplitude.png"))
    written = ["spectrum_maps.png", "relative_log_amplitude.png"]
    context_rows = [
        {"label": f"{label}\nimage {i}", "image": result["display"][i],
         "contexts": [(block, maps[i]) for block, maps in result["contexts"]]}
        for label, result in zip(labels, results) if result["contexts"]
        for i in range(len(result["display"]))
    ]
    if context_rows:
        plots.plot_context_maps(context_rows, out("context_maps.png"))
        written.append("context_maps.png")
    cam_rows = [
        {"label": f"{label}\n{r['record']['cam']['layer']}",
         "tiles": [(f"label {lab}, cam of {cls}", img, cam)
                   for lab, cls, img, cam in zip(r["record"]["cam"]["labels"], r["record"]["cam"]["classes"],
                                                 r["display"], r["cam_maps"])]}
        for label, r in zip(labels, results)
    ]
    plots.plot_cams(cam_rows, out("cam.png"))
    written.append("cam.png")
    analysis = {
        "tool": "spanet-analyze",
        "versions": _versions(),
        "images": {"source": images.source, "ids": images.ids, "labels": images.labels()},
        "models": records,
        "note": "relative_log_amplitude: Park & Kim's log(|FFT2|+1e-6), fftshifted, averaged over images and "
        "channels, read along the diagonal from the zero frequency outward, minus its first value; delta_at_pi "
        "is its last value (null for maps with only the zero frequency on that diagonal)",
    }
    with open(out("analysis.json"), "w") as f:
        json.dump(analysis, f)
    written.append("analysis.json")
    for stale in set(OUTPUT_FILES) - set(written):  # an earlier run's context maps (--overwrite) would mislead
        if os.path.exists(out(stale)):
            os.remove(out(stale))
    print(f"spanet-analyze: {', '.join(r['model'] for r in records)} on {len(images.ids)} images of "
          f"{images.source}; wrote {', '.join(written)} to {os.path.abspath(args.out_dir)}", flush=True)
    for record in records:
        deltas = [(layer["name"], layer["delta_at_pi"]) for layer in record["layers"]
                  if layer["delta_at_pi"] is not None]
        if deltas:
            summary = ", ".join(f"{name} {delta:+.2f}" for name, delta in (deltas[0], deltas[-1]))
            print(f"  {record['model']}: delta log amplitude at pi, first and last layer with a frequency axis: "
                  f"{summary}", flush=True)
    return analysis


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``spanet-analyze``); returns the process exit code."""
    from spanet.checkpoint import CheckpointError
    from spanet.data import DataError

    args = build_parser().parse_args(argv)
    try:
        analyze(args)
    except (UsageError, CheckpointError, DataError) as e:
        print(f"spanet-analyze: error: {e}", file=sys.stderr)
        return 2
    return 0
