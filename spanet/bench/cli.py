"""The ``spanet-bench`` command line (also ``python -m spanet.bench``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

import torch

from . import measure, models, operators, report, sweep

LEVELS = ("ops", "module", "model", "sweep")

#: ``--results-md`` without a path: the repository's results file, found from this package, not the cwd.
DEFAULT_RESULTS_MD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "RESULTS.md"
)

#: ``--quick``: a subset that runs in under two minutes on a 2-core CPU.
QUICK = dict(
    levels="ops,module,model,sweep",
    # One thread: on a shared, loaded machine two threads per process oversubscribe the cores
    # and the timings scatter by several times; one thread keeps the summary's ratios stable.
    threads=1,
    batch=1,
    shapes="64:56:2,320:14:1",
    dtypes="fp32,bf16",
    modes="fwd+bwd",
    module_shapes="64:56:2",
    models="spanet_small,spanet_small:reference,convnext_tiny",
    model_modes="infer",
    model_batch=2,
    resolution=64,
    warmup=1,
    repeats=5,
    model_repeats=3,
    min_sample_ms=5.0,
    sweep_sizes="14,56,112",
    sweep_batch=1,
    sweep_channels="32",
    sweep_radii="2,8",
)


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _choices(parser: argparse.ArgumentParser, flag: str, values: Sequence[str], allowed: Sequence[str]) -> List[str]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        parser.error(f"{flag}: {', '.join(bad) or 'empty'} not in {', '.join(allowed)}")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option has a default; ``--quick`` swaps in the QUICK defaults)."""
    p = argparse.ArgumentParser(
        prog="spanet-bench",
        description="Throughput and memory benchmarks of spanet_ops and the spanet models against torch.fft "
        "and against the timm models of spanet_small's size. Levels: ops (operators), module (SPAM), "
        "model (images/s and peak memory), sweep (scaling of lowrank vs fft and auto's choice).",
    )
    p.add_argument("--quick", action="store_true", help="a small subset (under two minutes on a 2-core CPU)")
    p.add_argument("--levels", default="ops,module,model,sweep", help=f"comma list of {', '.join(LEVELS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    g = p.add_argument_group("operators and SPAM")
    g.add_argument("--batch", type=int, default=8, help="batch of the operator and SPAM inputs")
    g.add_argument("--ops", default=",".join(operators.OPS), help="comma list of operators")
    g.add_argument("--shapes", default=",".join(f"{s.channels}:{s.size}:{s.radius:g}" for s in operators.STAGES),
                   help="operator shapes as C:H:r (default: the four SPANet stages)")
    g.add_argument("--module-shapes", default=None, help="SPAM shapes as C:H:r (default: --shapes)")
    g.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    g.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    g = p.add_argument_group("models")
    g.add_argument("--models", default=",".join(models.DEFAULT_MODELS),
                   help="comma list of timm model names; spanet_*:IMPL picks SPAM's spectral_impl")
    g.add_argument("--baseline-model", default=models.DEFAULT_BASELINE_MODEL, help="model the others are compared with")
    g.add_argument("--model-modes", default="train,infer", help="comma list of train, infer")
    g.add_argument("--model-batch", type=int, default=16)
    g.add_argument("--resolution", type=int, default=224)
    g.add_argument("--amp", action="store_true", help="models under bf16 autocast")
    g.add_argument("--model-repeats", type=int, default=5)
    g = p.add_argument_group("scaling sweep")
    g.add_argument("--sweep-sizes", default=",".join(map(str, sweep.SIZES)))
    g.add_argument("--sweep-channels", default=",".join(map(str, sweep.CHANNELS)))
    g.add_argument("--sweep-radii", default=",".join(f"{r:g}" for r in sweep.RADII))
    g.add_argument("--sweep-batch", type=int, default=1)
    g.add_argument("--no-general", action="store_true", help="leave out the general (full-rank) mask")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=2, help="warm-up calls per candidate")
    g.add_argument("--repeats", type=int, default=9, help="timed rounds per case")
    g.add_argument("--min-sample-ms", type=float, default=20.0, help="each sample spans at least this (calls batched)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="spanet-bench-results", help="directory of the JSON and PNG")
    g.add_argument("--json", default=None, help="JSON path (default OUT_DIR/spanet-bench.json)")
    g.add_argument("--png", default=None, help="PNG path (default OUT_DIR/spanet-bench.png)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--results-md", nargs="?", const=DEFAULT_RESULTS_MD, default=None, metavar="PATH",
                   help="append the Markdown tables to the 'spanet-bench' section of PATH "
                        "(default PATH: benchmarks/RESULTS.md of the source checkout spanet runs from, "
                        "wherever the command is started); nothing is appended without this flag")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the levels of these earlier results (machine and settings of the "
                        "first) and print/write them")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check ``argv``; errors exit with a message naming the bad option."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.argv = " ".join(shlex.quote(a) for a in argv)
    args.levels = _choices(parser, "--levels", _csv(args.levels), LEVELS)
    args.ops = _choices(parser, "--ops", _csv(args.ops), operators.OPS)
    args.dtypes = _choices(parser, "--dtypes", _csv(args.dtypes), tuple(operators.DTYPES))
    args.modes = _choices(parser, "--modes", _csv(args.modes), operators.MODES)
    args.model_modes = _choices(parser, "--model-modes", _csv(args.model_modes), models.MODEL_MODES)
    try:
        args.shapes = operators.parse_shapes(args.shapes)
        args.module_shapes = operators.parse_shapes(args.module_shapes) if args.module_shapes else args.shapes
        args.sweep_sizes = [int(s) for s in _csv(args.sweep_sizes)]
        args.sweep_channels = [int(s) for s in _csv(args.sweep_channels)]
        args.sweep_radii = [float(s) for s in _csv(args.sweep_radii)]
    except ValueError as exc:
        parser.error(str(exc))
    args.models = _csv(args.models)
    if "model" in args.levels:
        if not args.models:
            parser.error("--models is empty")
        for name in args.models:
            try:
                models.split_model_name(name)
            except ValueError as exc:
                parser.error(f"--models: {exc}")
    for flag in ("batch", "model_batch", "resolution", "repeats", "model_repeats", "sweep_batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.min_sample_ms < 0:
        parser.error("--warmup and --min-sample-ms must be >= 0")
    if any(s < 1 for s in args.sweep_sizes + args.sweep_channels) or any(r < 0 for r in args.sweep_radii):
        parser.error("--sweep-sizes and --sweep-channels must be >= 1 and --sweep-radii >= 0")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.results_md and not os.path.isfile(args.results_md):
        # Refused now, not after the whole benchmark has run.
        where = " (spanet is not running from a source checkout: pass a PATH)" \
            if args.results_md == DEFAULT_RESULTS_MD else ""
        parser.error(f"--results-md: {args.results_md} is not an existing file{where}")
    return args


def run(args: argparse.Namespace) -> dict:
    """Run the levels ``args.levels`` asks for; return the JSON-ready results.

    ``--threads`` applies for the run only: the caller's thread count is restored after it.
    """
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_levels(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run_levels(args: argparse.Namespace) -> dict:
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    device = args.device
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats, min_sample_s=args.min_sample_ms / 1e3)
    results = {
        "schema": "spanet-bench/1",
        "machine": measure.machine_info(device),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()
                     if k not in ("shapes", "module_shapes")},
        "memory_method": (
            "torch.cuda.max_memory_allocated over one step minus memory_allocated at its start"
            if device.type == "cuda"
            else "peak of the running sum of torch CPU allocator events (torch.profiler, profile_memory=True) "
            "over one step, above the memory live at its start"
        ),
    }
    results["settings"]["shapes"] = [[s.channels, s.size, s.radius] for s in args.shapes]
    results["settings"]["module_shapes"] = [[s.channels, s.size, s.radius] for s in args.module_shapes]
    if "ops" in args.levels:
        results["operators"] = operators.run_operators(
            stages=args.shapes, batch=args.batch, ops=args.ops, dtypes=args.dtypes, modes=args.modes,
            progress=say, **timing,
        )
    if "module" in args.levels:
        results["modules"] = models.run_modules(
            stages=args.module_shapes, batch=args.batch, dtypes=args.dtypes, modes=args.modes, progress=say, **timing
        )
    if "model" in args.levels:
        results["models"] = models.run_models(
            names=args.models, modes=args.model_modes, batch=args.model_batch, resolution=args.resolution,
            device=device, amp=args.amp, warmup=max(args.warmup, 1), repeats=args.model_repeats,
            baseline=args.baseline_model, progress=say,
        )
    if "sweep" in args.levels:
        rows = sweep.run_sweep(
            sizes=args.sweep_sizes, channels=args.sweep_channels, radii=args.sweep_radii,
            include_general=not args.no_general, batch=args.sweep_batch, progress=say, **timing,
        )
        results["sweep"] = rows
        results["crossovers"] = sweep.crossovers(rows)
        results["calibration"] = sweep.calibrate(rows, device.type)
    return results


def write_outputs(args: argparse.Namespace, results: dict) -> dict:
    """Write the JSON, PNG and Markdown that ``args`` asks for; return their paths."""
    paths = {"json": args.json or os.path.join(args.out_dir, "spanet-bench.json")}
    report.write_json(paths["json"], results)
    if not args.no_plot:
        paths["png"] = args.png or os.path.join(args.out_dir, "spanet-bench.png")
        report.plot(paths["png"], results)
    if args.results_md:
        report.append_markdown(args.results_md, report.render_markdown(results))
        paths["markdown"] = args.results_md
    return paths


def merge_results(paths: Sequence[str]) -> dict:
    """Merge earlier JSON results: each level from the last file holding it; machine and settings of the first.

    Raises:
        ValueError: a file is not spanet-bench JSON.
    """
    import json

    merged: dict = {"merged_runs": []}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("schema") != "spanet-bench/1":
            raise ValueError(f"{path} is not spanet-bench JSON (schema spanet-bench/1)")
        merged["merged_runs"].append(data.get("settings", {}).get("argv", ""))
        for key, value in data.items():
            if key == "merged_runs":
                merged["merged_runs"][-1:] = value
            elif key in ("machine", "settings", "memory_method", "schema"):
                merged.setdefault(key, value)
            else:
                merged[key] = value
    return merged


def bench(argv: Optional[Sequence[str]] = None) -> dict:
    """Run ``spanet-bench`` with ``argv``: print the tables, write JSON/PNG/Markdown, return the results."""
    args = parse_args(argv)
    if args.from_json:
        try:
            results = merge_results(args.from_json)
        except (OSError, ValueError) as exc:
            build_parser().error(f"--from-json: {exc}")
    else:
        results = run(args)
    print()
    print(report.render_text(results))
    paths = write_outputs(args, results)
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``spanet-bench``; returns the exit status (0)."""
    bench(argv)
    return 0


def quick_summary(argv: Sequence[str] = ()) -> dict:
    """Run ``spanet-bench --quick`` (plus ``argv``), print its tables, and return the results.

    This is what the README's main job calls; it writes the JSON and PNG to
    ``spanet-bench-results/`` and appends nothing to RESULTS.md.
    """
    return bench(["--quick", *argv])
