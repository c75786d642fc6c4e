"""Native kernels: the C++ low-rank filter and spg_aggregate against the reference.

Cases (fp32, batch 32):

* ``spectral_mask_filter`` at (32, 64, 56, 56), radius 2, forward+backward: the
  reference (fft2/fftshift/mask/ifftshift/ifft2 with a precomputed centred mask,
  autograd through ``torch.fft``) against the native low-rank kernel (target: at
  least 30x);
* the kernel alone, forward, against the memory-traffic floor
  ``torch.add(x, x, alpha=0.5)`` (one read, one write; target: within 2x);
* the models' training-step kernels at stage-1 shapes (batch 16, CPU): the
  ``(1, 7)`` depthwise conv's weight gradient (oneDNN against the native
  kernel) and the MLP forward+backward (the three layers against
  ``spanet::pointwise_mlp``);
* ``spg_aggregate`` forward+backward at (32, 64, 56, 56) radius 2 and
  (32, 320, 14, 14) radius 1 (the model's stages 1 and 3): the published
  per-chunk composition against the fused op (target: at least 3x); NCHW as
  published, and channels_last (the models' CPU layout) on both sides. A third
  row times the three dense GEMMs alone (forward, input and weight gradients):
  the floor of any exact implementation on PyTorch's GEMM, so its ratio is the
  best the fused op could reach on this machine.

Two ways to run, both measuring every side of a ratio in the same process:

    .venv/bin/python -m pytest benchmarks/bench_native.py --benchmark-enable \
        --benchmark-json=/tmp/native.json && .venv/bin/python benchmarks/report.py /tmp/native.json
    .venv/bin/python benchmarks/bench_native.py      # interleaved rounds, Markdown table with ratios

CUDA cases run when a GPU is present.
"""
import argparse
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import spanet_ops
from spanet_ops import algorithms, reference
from spanet_ops.plans import circular_plan

BATCH = 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FILTER_SHAPE = (BATCH, 64, 56, 56)
SPG_CASES = [
    ((BATCH, 64, 56, 56), 2.0, torch.contiguous_format),
    ((BATCH, 320, 14, 14), 1.0, torch.contiguous_format),
    ((BATCH, 64, 56, 56), 2.0, torch.channels_last),
    ((BATCH, 320, 14, 14), 1.0, torch.channels_last),
]
LAMS = (0.7, 0.8, 0.9)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def filter_candidates(device):
    """``{impl: run}`` for the filter forward+backward at FILTER_SHAPE (baseline: ``reference``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(FILTER_SHAPE, device=device, generator=gen, requires_grad=True)
    grad = torch.randn(FILTER_SHAPE, device=device, generator=gen)
    mask = spanet_ops.circular_mask(56, 56, 2.0, 0.7, device=device)

    def make(fn):
        def run():
            x.grad = None
            fn(x, mask).backward(grad)
            _sync(device)

        return run

    return {
        "reference": make(reference.spectral_mask_filter),
        "native lowrank": make(lambda x, m: spanet_ops.spectral_mask_filter(x, m, algorithm="lowrank")),
    }


def floor_candidates(device):
    """``{impl: run}`` for one forward pass of the kernel op against ``torch.add`` (baseline: ``add``)."""
    x = torch.randn(FILTER_SHAPE, device=device).reshape(-1, 56, 56)
    args = circular_plan(56, 56, 2.0, (0.7,), None, torch.float32, device).separable.kernel_args()

    def add():
        torch.add(x, x, alpha=0.5)
        _sync(device)

    def kernel():
        torch.ops.spanet.lowrank_filter_kernel(x, *args)
        _sync(device)

    return {"add (memory floor)": add, "native kernel": kernel}


# The models' training-step layers with CPU kernels of their own: stage-1 shapes at batch 16.
MODEL_BATCH = 16


def depthwise_candidates(device):
    """``{impl: run}`` for the (1, 7) depthwise conv's weight+bias gradient, channels_last (baseline: oneDNN)."""
    x = torch.randn(MODEL_BATCH, 64, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    weight = torch.randn(64, 1, 1, 7, device=device)

    def onednn():
        torch.ops.aten.convolution_backward(
            grad, x, weight, [64], [1, 1], [0, 3], [1, 1], False, [0, 0], 64, [False, True, True]
        )
        _sync(device)

    def native():
        torch.ops.spanet.depthwise_row_weight_grad_kernel(grad, x, weight, 3)
        _sync(device)

    return {"convolution_backward (oneDNN)": onednn, "native kernel": native}


def mlp_candidates(device):
    """``{impl: run}`` for the stage-1 MLP (64 -> 256 -> 64) fwd+bwd on pixels (baseline: the three layers)."""
    gen = torch.Generator(device=device).manual_seed(2)
    pixels = MODEL_BATCH * 56 * 56 // 2  # one of PointwiseMlp's two batch slices at batch 16
    x = torch.randn(pixels, 64, device=device, generator=gen, requires_grad=True)
    params = [
        (torch.randn(shape, device=device, generator=gen) * 0.1).requires_grad_()
        for shape in ((256, 64), (256,), (64, 256), (64,))
    ]
    grad = torch.randn(pixels, 64, device=device, generator=gen)

    def make(fn):
        def run():
            x.grad = None
            for p in params:
                p.grad = None
            fn().backward(grad)
            _sync(device)

        return run

    def layers():
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
        return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)

    return {"linear, GELU, linear": make(layers), "pointwise_mlp": make(lambda: torch.ops.spanet.pointwise_mlp(x, *params)[0])}


def spg_candidates(shape, radius, device, memory_format=torch.contiguous_format):
    """``{impl: run}`` for spg_aggregate forward+backward (baseline: ``reference``)."""
    gen = torch.Generator(device=device).manual_seed(1)
    channels = shape[1]
    x = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=memory_format).requires_grad_()
    weight = (torch.randn(channels, channels, device=device, generator=gen) / channels**0.5).requires_grad_()
    bias = torch.zeros(channels, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=memory_format)
    sizes = spanet_ops.chunk_sizes(channels)

    def ref():
        weights = list(torch.split(weight, sizes, dim=1))
        return reference.spg_aggregate(x, weights, [bias, None, None], LAMS, radius)

    def fused():
        return spanet_ops.spg_aggregate(x, weight, bias, LAMS, radius)

    layout = algorithms.is_channels_last(x)

    def gemm_floor():
        # The three dense GEMMs that any exact implementation on PyTorch's GEMM runs (forward,
        # input gradient, weight gradient), with nothing spectral: the best time the fused op could reach.
        x3, g3 = algorithms.pixels(x.detach(), layout), algorithms.pixels(grad, layout)
        algorithms.dense_1x1(x3, weight.detach(), layout)
        algorithms.dense_1x1(g3, weight.detach().transpose(0, 1), layout)
        algorithms.dense_1x1_weight_grad(g3, x3, layout)
        _sync(device)

    def make(fn):
        def run():
            x.grad = weight.grad = bias.grad = None
            fn().backward(grad)
            _sync(device)

        return run

    return {"reference": make(ref), "fused": make(fused), "dense GEMMs alone (floor)": gemm_floor}


def _cases(device):
    yield f"{device} filter fwd+bwd {'x'.join(map(str, FILTER_SHAPE))}", "reference", filter_candidates
    yield f"{device} kernel fwd vs memory floor {'x'.join(map(str, FILTER_SHAPE))}", "add (memory floor)", floor_candidates
    if device == "cpu":
        yield f"cpu depthwise (1,7) weight grad {MODEL_BATCH}x64x56x56 channels_last", (
            "convolution_backward (oneDNN)"
        ), depthwise_candidates
        yield f"cpu MLP fwd+bwd {MODEL_BATCH // 2 * 56 * 56}x64->256->64", "linear, GELU, linear", mlp_candidates
    for shape, radius, memory_format in SPG_CASES:
        layout = " channels_last" if memory_format == torch.channels_last else ""
        yield (
            f"{device} spg_aggregate fwd+bwd {'x'.join(map(str, shape))} r={radius:g}{layout}",
            "reference",
            lambda device, shape=shape, radius=radius, fmt=memory_format: spg_candidates(shape, radius, device, fmt),
        )


CASES = [(device, group, baseline, build) for device in DEVICES for group, baseline, build in _cases(device)]


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("impl_index", [0, 1], ids=["baseline", "native"])
def bench_native(benchmark, case, impl_index):
    device, group, baseline, build = case
    candidates = build(device)
    impl = list(candidates)[impl_index]
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline=baseline)
    benchmark.pedantic(candidates[impl], warmup_rounds=1, rounds=5, iterations=1)


def measure_interleaved(candidates, baseline, rounds):
    """Median seconds per candidate and the median of its per-round ratios ``baseline / it``.

    The candidates alternate within every round, so load from other processes
    hits each round's pair alike.
    """
    for run in candidates.values():
        run()  # warm-up: plans, caches, allocator
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: (statistics.median(values), statistics.median(b / t for b, t in zip(times[baseline], values)))
        for name, values in times.items()
    }


def machine() -> str:
    """The CPU model (and GPU, when present) of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}"


def main(argv=None):
    """Print a Markdown table: every ratio from interleaved rounds in this one process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    backend = spanet_ops.backends()
    print(f"Machine: {machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; native CPU: {backend['native_cpu']['reason']}; "
          f"native CUDA: {backend['native_cuda']['reason']}")
    print()
    print("| case | implementation | median ms | ratio (baseline / this, median of rounds) |")
    print("| --- | --- | ---: | ---: |")
    for device, group, baseline, build in CASES:
        for name, (seconds, ratio) in measure_interleaved(build(device), baseline, args.rounds).items():
            print(f"| {group} | {name} | {seconds * 1e3:.1f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
