"""GPU benchmark of the Triton basis filter at the SPANet stage shapes, against copy bandwidth.

    python benchmarks/bench_triton.py [--batch 32 256] [--dtypes float32 bfloat16] [--out table.md]

For each stage shape ``(B, C, H, W)`` of spanet_small at 224 (64x56x56 r=2,
128x28x28 r=2, 320x14x14 r=1, 512x7x7 r=1) and dtype it times, on one tensor:

* ``copy``: ``y.copy_(x)``, the roofline (one read and one write, what the filter moves);
* ``kernel``: :func:`spanet_ops.triton.basis_filter` launched eagerly, and replayed
  from a CUDA graph (no launch overhead), each as a fraction of the copy's time;
* ``pytorch``: the same filter as two matmuls in the compute dtype (the arithmetic of
  the op's PyTorch default);
* ``op``: ``torch.ops.spanet.basis_filter_kernel``, when the dispatch layer defines it.

It also records the autotuner's choice and the kernel's largest error against
float64 arithmetic. Timings are medians of ``triton.testing.do_bench`` (L2 flushed
between runs); every row of a table comes from one process. Without a CUDA device
it says so and exits 0. :func:`stage_rows` is what ``benchmarks/gpu_check.py`` runs
(on the CPU too, through Triton's interpreter, for its smoke run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

#: (channels, side, radius): spanet_small's four stages at 224x224.
STAGES = ((64, 56, 2.0), (128, 28, 2.0), (320, 14, 1.0), (512, 7, 1.0))
LAMS = (0.7, 0.8, 0.9)


def timed_ms(fn: Callable[[], object], device: torch.device, graph: bool = False) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` (or ``do_bench_cudagraph``) on CUDA, a few timed calls on the CPU."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def spf_problem(batch: int, channels: int, side: int, radius: float, dtype: torch.dtype, device: torch.device):
    """Planes ``(B*C, side, side)`` and the published SPF's terms in the real basis."""
    from spanet_ops import plans

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    basis, scale, constant = plans.circular_plan(side, side, radius, tuple(LAMS), channels, compute, device).basis_terms
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch * channels, side, side, generator=gen).to(device=device, dtype=dtype)
    return x, basis, scale, constant


def pytorch_filter(x: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """``constant[p] x + ((X basis^T) * scale[p]) basis`` as two matmuls in the basis' dtype."""
    n, planes = x.shape[0], scale.shape[0]
    flat = x.reshape(n // planes, planes, -1).to(basis.dtype)
    y = torch.addcmul(torch.matmul(torch.matmul(flat, basis.t()) * scale, basis), flat, constant[:, None])
    return y.reshape(x.shape).to(x.dtype)


def max_error(y: torch.Tensor, x: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, constant: torch.Tensor,
              planes: int = 64) -> float:
    """Largest ``|y - exact|`` over the first ``planes`` planes (a multiple of P), exact in float64."""
    count = min(x.shape[0], max(planes // scale.shape[0], 1) * scale.shape[0])
    exact = pytorch_filter(x[:count].double(), basis.double(), scale.double(), constant.double())
    return float((y[:count].double() - exact).abs().max())


def stage_rows(batch: int, channels: int, side: int, radius: float, dtype: torch.dtype, device: torch.device,
               graphs: bool = True) -> List[Dict[str, object]]:
    """One row per variant (copy, kernel, kernel in a graph, pytorch, op) of one stage shape and dtype."""
    from spanet_ops.triton import basis_filter, kernel

    x, basis, scale, constant = spf_problem(batch, channels, side, radius, dtype, device)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    shape = f"{batch}x{channels}x{side}x{side}"
    common = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "batch": batch}

    out = basis_filter(x, basis, scale, constant)  # tunes, outside the timings
    error = max_error(out, x, basis, scale, constant)
    config = getattr(kernel._tuned_kernel, "best_config", None) if device.type == "cuda" else None
    copy_ms = timed_ms(lambda: y.copy_(x), device)
    rows = [dict(common, variant="copy", ms=copy_ms, **{"GB/s": nbytes / copy_ms / 1e6, "of copy": 1.0})]

    def add(variant, ms, **extra):
        rows.append(dict(common, variant=variant, ms=ms, **{"GB/s": nbytes / ms / 1e6, "of copy": copy_ms / ms}, **extra))

    add("kernel", timed_ms(lambda: basis_filter(x, basis, scale, constant), device), error=error,
        config=str(tuple(config.all_kwargs().values())) if config is not None else "")
    if graphs and device.type == "cuda":
        add("kernel (graph)", timed_ms(lambda: basis_filter(x, basis, scale, constant), device, graph=True))
    add("pytorch", timed_ms(lambda: pytorch_filter(x, basis, scale, constant), device))
    op = getattr(getattr(torch.ops, "spanet", None), "basis_filter_kernel", None)
    if op is not None:
        add("op", timed_ms(lambda: op(x, basis, scale, constant), device))
    return rows


COLUMNS = ("shape", "dtype", "variant", "ms", "GB/s", "of copy", "error", "config")


def markdown(rows: Sequence[Dict[str, object]], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a markdown table: three significant digits, blanks where a column does not apply."""

    def cell(value):
        if value is None:
            return ""
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float64", "float32", "float16", "bfloat16"])
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: skipped, no CUDA device (the Triton kernel serves CUDA tensors)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"bench_triton: skipped, Triton is not importable ({exc})")
        return 0
    device = torch.device("cuda")
    rows: List[Dict[str, object]] = []
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for batch in args.batch:
            for channels, side, radius in STAGES:
                rows += stage_rows(batch, channels, side, radius, dtype, device)
    table = f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
