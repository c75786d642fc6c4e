"""Fast SPANet vs the published-way model, in one process, interleaved.

The "reference" side is, by default (``--reference published``), the tests'
reference model (``tests/spanet/reference_model.py``): docs/spec.md §2-3 written
literally in plain PyTorch, the published computation (per-chunk
``fft2 -> fftshift -> mask -> ifftshift -> ifft2``, three 1x1 convs, plain conv
MLPs). ``--reference impl`` takes this package's model with
``spectral_impl="reference"`` instead, which shares every other layer's
implementation with the fast side. Both sides hold the same weights. The fast
side runs channels_last by default (``--fast-layout``), the reference side NCHW
as the published code does (``--reference-layout``).

    .venv/bin/python benchmarks/bench_models.py                      # train + infer, spanet_small, B=16, 224
    .venv/bin/python benchmarks/bench_models.py --mode infer --repeats 5 --profile
    .venv/bin/python benchmarks/bench_models.py --reference-layout channels_last   # same layout on both sides

Timings alternate fast / reference so that load from other processes hits
both alike; the reported ratio is the median of the per-round ratios.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import spanet  # noqa: F401  (registers the models)
import timm
from spanet.models import set_spectral_impl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.spanet


def _train_step(model, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()


def _infer(model, x):
    with torch.inference_mode():
        model(x)


def _runner(model, mode, x, target):
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return lambda: _train_step(model, optimizer, x, target)
    model.eval()
    return lambda: _infer(model, x)


def bench(args):
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    layouts = {"fast": args.fast_layout, "reference": args.reference_layout}
    results = {}
    for mode in args.mode:
        fast = timm.create_model(args.model)
        if args.reference == "published":
            from tests.spanet.reference_model import RefSPANet

            ref = RefSPANet(args.model)
        else:
            ref = timm.create_model(args.model)
            set_spectral_impl(ref, "reference")
        ref.load_state_dict(fast.state_dict())
        models = {"fast": fast, "reference": ref}
        runs = {}
        for name, model in models.items():
            fmt = torch.channels_last if layouts[name] == "channels_last" else torch.contiguous_format
            runs[name] = _runner(model.to(memory_format=fmt), mode, x.contiguous(memory_format=fmt), target)
        for run in runs.values():  # warm-up: plans, allocator, oneDNN primitives
            run()
        times = {"fast": [], "reference": []}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ratios = [r / f for f, r in zip(times["fast"], times["reference"])]
        results[mode] = dict(
            fast=statistics.median(times["fast"]),
            reference=statistics.median(times["reference"]),
            speedup=statistics.median(ratios),
        )
        if args.profile:
            with torch.profiler.profile() as prof:
                runs["fast"]()
            print(f"--- profile of the fast model, {mode} ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spanet_small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--fast-layout", default="channels_last", choices=["channels_last", "nchw"])
    parser.add_argument("--reference-layout", default="nchw", choices=["channels_last", "nchw"],
                        help="the published code runs NCHW")
    parser.add_argument("--reference", default="published", choices=["published", "impl"],
                        help="published: the tests' literal reference model; impl: this model, spectral_impl='reference'")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the fast model")
    parser.add_argument("--profile-rows", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = bench(args)
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, reference={args.reference}, "
        f"layouts fast={args.fast_layout} reference={args.reference_layout}, "
        f"{args.repeats} interleaved rounds"
    )
    print("| mode | fast (s) | reference (s) | speedup |")
    print("| --- | --- | --- | --- |")
    for mode, r in results.items():
        print(f"| {mode} | {r['fast']:.3f} | {r['reference']:.3f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
