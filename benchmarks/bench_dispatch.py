"""Per-call cost of the public operators against the paper-literal FFT path, and small-input model inference.

Tiny problems time the layer between the public operators and their kernels:
at ``(1, 6, 7, 7)`` the arithmetic is negligible, so a call costs what its
dispatch, checks and plan lookup cost. Each public op is timed against the
paper-literal ``fft2 -> fftshift -> mask -> ifftshift -> ifft2 -> real`` of
:func:`spanet_ops.reference.spectral_mask_filter` (six aten ops), forward and
forward+backward; ``spg_aggregate`` also against the published composition
(:func:`spanet_ops.reference.spg_aggregate`: chunk, three such filters, three
1x1 convs, sum). Then spanet_small against ``spanet_small:reference`` at batch 1,
64x64, inference, next to spanet_small with its contexts' spectral part free (the
concatenated 1x1 conv alone): the most any ``spg_aggregate`` could gain there. One thread, interleaved rounds in one process
(:func:`spanet.bench.measure.time_interleaved`); ratios are medians of per-round
ratios, so load from other processes hits both sides alike.

    .venv/bin/python benchmarks/bench_dispatch.py                 # prints a Markdown table
    .venv/bin/python benchmarks/bench_dispatch.py --repeats 30 --json out.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import spanet  # noqa: F401  (registers the models)
import spanet_ops
import timm
from spanet.bench.measure import machine_info, machine_line, paired_ratio, time_interleaved
from spanet.models import SPAM, set_spectral_impl
from spanet_ops import reference

SHAPE = (1, 6, 7, 7)
RADIUS = 1.0
LAMS = (0.7, 0.8, 0.9)


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def op_candidates(backward: bool):
    """``{name: call}``: the reference FFT path, the published spg composition and the public ops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen, requires_grad=backward)
    weight = torch.randn(SHAPE[1], SHAPE[1], generator=gen, requires_grad=backward)
    bias = torch.randn(SHAPE[1], generator=gen, requires_grad=backward)
    mask = spanet_ops.circular_mask(SHAPE[-2], SHAPE[-1], RADIUS, LAMS[0])
    weights = list(torch.split(weight, spanet_ops.chunk_sizes(SHAPE[1]), dim=1))
    calls = {
        "reference FFT path": lambda: reference.spectral_mask_filter(x, mask),
        "published spg composition": lambda: reference.spg_aggregate(x, weights, [bias, None, None], LAMS, RADIUS),
        "spectral_mask_filter": lambda: spanet_ops.spectral_mask_filter(x, mask),
        "spectral_pooling_filter": lambda: spanet_ops.spectral_pooling_filter(x, RADIUS, LAMS[0]),
        "spg_aggregate": lambda: spanet_ops.spg_aggregate(x, weight, bias, LAMS, RADIUS),
    }
    if backward:
        return {name: _fwd_bwd(fn, [x, weight, bias]) for name, fn in calls.items()}
    return calls


def _dense_context_only(spam, x):
    """SPAM's context without its spectral part: the concatenated 1x1 conv alone (the ceiling of any spg)."""
    weight = torch.cat([pw.weight for pw in spam.pws], dim=1)
    return torch.nn.functional.conv2d(x, weight, torch.stack([pw.bias for pw in spam.pws]).sum(0))


def model_candidates(batch: int, size: int):
    """``{name: call}``: spanet_small inference, fused, with the published per-chunk FFT path, and with the
    spectral part free (the ceiling any spg_aggregate could reach), all with the same weights."""
    torch.manual_seed(0)
    fast = timm.create_model("spanet_small").eval()
    ref = timm.create_model("spanet_small").eval()
    free = timm.create_model("spanet_small").eval()
    ref.load_state_dict(fast.state_dict())
    free.load_state_dict(fast.state_dict())
    set_spectral_impl(ref, "reference")
    for module in free.modules():
        if isinstance(module, SPAM):
            module.context = _dense_context_only.__get__(module)
    x = torch.randn(batch, 3, size, size)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    return {"spanet_small:reference": infer(ref), "spanet_small": infer(fast), "spectral part free": infer(free)}


def _row(samples, name, baseline):
    median_us = sorted(samples[name])[len(samples[name]) // 2] * 1e6
    ratio = paired_ratio(samples[baseline], samples[name])  # > 1: `name` is faster
    return median_us, 1.0 / ratio["median"], 1.0 / ratio["q3"], 1.0 / ratio["q1"]


def run(repeats: int, min_sample_s: float, model_batch: int, model_size: int) -> dict:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    results = {"machine": machine_info(device), "ops": {}, "model": {}}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        samples = time_interleaved(op_candidates(backward), device=device, warmup=20, repeats=repeats,
                                   min_sample_s=min_sample_s)
        for name in samples:
            us, rel, lo, hi = _row(samples, name, "reference FFT path")
            results["ops"].setdefault(name, {})[mode] = {"us": us, "vs_reference": rel, "vs_reference_iqr": [lo, hi]}
            if name == "spg_aggregate":
                _, rel_pub, lo, hi = _row(samples, name, "published spg composition")
                results["ops"][name][mode].update(vs_published_spg=rel_pub, vs_published_spg_iqr=[lo, hi])
    samples = time_interleaved(model_candidates(model_batch, model_size), device=device, warmup=3,
                               repeats=repeats, min_sample_s=min_sample_s)
    results["model"] = {
        "batch": model_batch,
        "size": model_size,
        "median_ms": {name: sorted(s)[len(s) // 2] * 1e3 for name, s in samples.items()},
        "speedup_over_reference": paired_ratio(samples["spanet_small:reference"], samples["spanet_small"]),
        "ceiling_over_reference": paired_ratio(samples["spanet_small:reference"], samples["spectral part free"]),
    }
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {machine_line(results['machine'])}; one thread; shape {SHAPE}, radius {RADIUS:g}.",
        "",
        "| call | fwd µs | fwd / reference | fwd+bwd µs | fwd+bwd / reference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, modes in results["ops"].items():
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = modes[mode]
            cells += [f"{r['us']:.1f}", f"{r['vs_reference']:.2f}x ({r['vs_reference_iqr'][0]:.2f}-{r['vs_reference_iqr'][1]:.2f})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    spg = results["ops"]["spg_aggregate"]
    lines += [
        "",
        f"spg_aggregate / published spg composition: fwd {spg['fwd']['vs_published_spg']:.2f}x, "
        f"fwd+bwd {spg['fwd+bwd']['vs_published_spg']:.2f}x.",
    ]
    m = results["model"]
    r, c = m["speedup_over_reference"], m["ceiling_over_reference"]
    lines.append(
        f"spanet_small inference at batch {m['batch']}, {m['size']}x{m['size']}: {r['median']:.2f}x "
        f"spanet_small:reference (IQR {r['q1']:.2f}-{r['q3']:.2f}); with the spectral part free "
        f"{c['median']:.2f}x (IQR {c['q1']:.2f}-{c['q3']:.2f}); medians "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in m["median_ms"].items())
        + "."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (default 15)")
    parser.add_argument("--min-sample-ms", type=float, default=50.0, help="shortest timed sample (default 50 ms)")
    parser.add_argument("--model-batch", type=int, default=1, help="model batch (default 1)")
    parser.add_argument("--model-size", type=int, default=64, help="model input size (default 64)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args.repeats, args.min_sample_ms / 1e3, args.model_batch, args.model_size)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def bench_dispatch_smoke():
    """pytest (``--benchmark-disable`` collects ``bench_*``): one short round, so the script keeps working."""
    results = run(repeats=1, min_sample_s=0.0, model_batch=1, model_size=32)
    assert set(results["ops"]) >= {"spectral_mask_filter", "spectral_pooling_filter", "spg_aggregate"}
    assert {"speedup_over_reference", "ceiling_over_reference"} <= set(results["model"])


if __name__ == "__main__":
    sys.exit(main())
