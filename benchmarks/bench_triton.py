"""GPU benchmark of the Triton kernels (spanet_ops.triton) at the SPANet stage shapes.

    python benchmarks/bench_triton.py [--batch 32] [--dtypes float32 bfloat16] [--out table.md]

For each stage shape ``(B, C, H, W)`` (spanet_small at 224: 64x56x56 r=2,
128x28x28 r=2, 320x14x14 r=1, 512x7x7 r=1) and dtype it times, with
``triton.testing.do_bench`` (median of repeated runs, L2 flushed between runs):

* the SPF forward and forward+backward through the public op with
  ``algorithm="lowrank"`` (the Triton kernel on CUDA), ``"fft"`` and the
  paper-literal reference;
* the Triton kernel alone and the dispatcher's kernel op (the native CUDA
  kernel when built, else PyTorch), each with its effective bandwidth (one
  read and one write of the tensor) as a fraction of the measured copy
  bandwidth (``y.copy_(x)`` on the same tensor);
* the fused split-SPG aggregation (forward, forward+backward) with
  ``"lowrank"`` (the dense GEMM plus the coefficient-space correction, all
  cuBLAS) against ``"fft"`` (filter, then the conv), and the bare 1x1 conv
  it rides on.

Every row of one table comes from one process on one GPU, the variants of a
shape timed back to back. Without a CUDA device (or without Triton) the
script says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List

import torch

STAGES = [  # (channels, side, radius): spanet_small at 224
    (64, 56, 2.0),
    (128, 28, 2.0),
    (320, 14, 1.0),
    (512, 7, 1.0),
]
LAMS = (0.7, 0.8, 0.9)
DEVICE = "cuda"


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by triton.testing.do_bench."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _fwd_bwd(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run():
        x.grad = None
        op(x).backward(grad)

    return run


def _stage_rows(batch: int, channels: int, side: int, radius: float, dtype: torch.dtype) -> List[Dict[str, object]]:
    import spanet_ops
    from spanet_ops import plans, reference
    from spanet_ops.triton import lowrank_filter
    from spanet_ops.triton.common import unsupported_reason

    device = torch.device(DEVICE)
    lam = spanet_ops.channel_lams(LAMS, channels).to(device)
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    nbytes = 2 * x.numel() * x.element_size()  # one read and one write

    copy_dst = torch.empty_like(x)
    copy_ms = _bench(lambda: copy_dst.copy_(x))

    plan = plans.circular_plan(side, side, radius, torch.float32, device)
    weight, constant = plan.lowrank_terms(lam)
    planes = x.reshape(-1, side, side)
    routed = unsupported_reason(planes, plan.basis.basis_h, plan.basis.basis_w)
    lowrank_name = f"lowrank (kernel op: {routed})" if routed else "lowrank (Triton)"
    terms = (plan.basis.basis_h, plan.basis.basis_w, weight, constant)
    kernel_ms = {
        "Triton lowrank_filter": _bench(lambda: lowrank_filter(planes, *terms)),
        # What the op runs without Triton: the native CUDA kernel when built, else PyTorch.
        "kernel op (native or PyTorch)": _bench(lambda: torch.ops.spanet.lowrank_filter_kernel(planes, *terms)),
    }

    def spf(algorithm):
        return lambda t: spanet_ops.spectral_pooling_filter(t, radius, lam, algorithm=algorithm)

    # The paper-literal filter with its mask built once (as the published module does), in float32.
    masks = torch.stack([reference.circular_mask(side, side, radius, value) for value in lam.tolist()]).to(device)

    def spf_reference(t):
        return reference.spectral_mask_filter(t.float(), masks).to(t.dtype)

    rows: List[Dict[str, object]] = []
    shape = f"{batch}x{channels}x{side}x{side} r={radius:g}"
    variants = {lowrank_name: spf("lowrank"), "fft": spf("fft"), "reference": spf_reference}
    fwd = {name: _bench(lambda op=op: op(x)) for name, op in variants.items()}
    fwd_bwd = {name: _bench(_fwd_bwd(op, xg, grad)) for name, op in variants.items()}
    for name in variants:
        rows.append(
            {
                "op": "SPF",
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "variant": name,
                "fwd ms": fwd[name],
                "fwd+bwd ms": fwd_bwd[name],
                "fwd vs lowrank": fwd[name] / fwd[lowrank_name],
                "fwd+bwd vs lowrank": fwd_bwd[name] / fwd_bwd[lowrank_name],
            }
        )
    for name, ms in kernel_ms.items():
        rows.append(
            {
                "op": "SPF kernel",
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "variant": name,
                "fwd ms": ms,
                "fwd vs lowrank": ms / kernel_ms["Triton lowrank_filter"],
                "GB/s": nbytes / ms / 1e6,
                "of copy": copy_ms / ms,
                "copy GB/s": nbytes / copy_ms / 1e6,
            }
        )

    w = torch.randn(channels, channels, device=device, dtype=dtype) / channels**0.5
    b = torch.randn(channels, device=device, dtype=dtype)
    conv_ms = _bench(lambda: torch.nn.functional.conv2d(x, w[:, :, None, None], b))
    # For forward+backward the conv's parameters take gradients too, as in training.
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)

    def spg(algorithm, weight, bias):
        return lambda t: spanet_ops.spg_aggregate(t, weight, bias, LAMS, radius, algorithm=algorithm)

    spg_names = {"lowrank (GEMMs)": "lowrank", "fft": "fft"}
    spg_fwd = {name: _bench(lambda a=algorithm: spg(a, w, b)(x)) for name, algorithm in spg_names.items()}
    spg_fwd_bwd = {name: _bench(_fwd_bwd(spg(a, wg, bg), xg, grad)) for name, a in spg_names.items()}
    for name in spg_names:
        rows.append(
            {
                "op": "SPG",
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "variant": name,
                "fwd ms": spg_fwd[name],
                "fwd+bwd ms": spg_fwd_bwd[name],
                "fwd vs lowrank": spg_fwd[name] / spg_fwd["lowrank (GEMMs)"],
                "fwd+bwd vs lowrank": spg_fwd_bwd[name] / spg_fwd_bwd["lowrank (GEMMs)"],
                "fwd vs 1x1 conv": spg_fwd[name] / conv_ms,
            }
        )
    return rows


COLUMNS = [
    "op",
    "shape",
    "dtype",
    "variant",
    "fwd ms",
    "fwd+bwd ms",
    "fwd vs lowrank",
    "fwd+bwd vs lowrank",
    "fwd vs 1x1 conv",
    "GB/s",
    "copy GB/s",
    "of copy",
]


def markdown(rows: List[Dict[str, object]]) -> str:
    """The rows as a markdown table; numbers with three significant digits, blanks where a column does not apply."""

    def cell(value):
        if value is None:
            return ""
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(col)) for col in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton: skipped, no CUDA device (the Triton kernels serve CUDA tensors)")
        return 0
    try:
        import spanet_ops.triton  # noqa: F401
    except ImportError as exc:
        print(f"bench_triton: skipped, Triton is not importable ({exc})")
        return 0

    rows: List[Dict[str, object]] = []
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for channels, side, radius in STAGES:
            rows += _stage_rows(args.batch, channels, side, radius, dtype)
    table = f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
