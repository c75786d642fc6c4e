"""spectral_mask_filter: the published reference vs the ``fft`` and ``lowrank`` algorithms.

Run (the default test run skips benchmarks):

    .venv/bin/python -m pytest benchmarks/bench_filter.py --benchmark-enable \
        --benchmark-json=/tmp/filter.json
    .venv/bin/python benchmarks/report.py /tmp/filter.json

Shapes are the four SPANet stages at 224 (batch 32, fp32); CUDA cases run
when a GPU is present. ``lowrank`` uses the native kernel when it is built
(``SPANET_DISABLE_NATIVE=1`` measures the PyTorch algorithm instead).
"""
import pytest
import torch

import spanet_ops
from spanet_ops import reference

STAGES = [(64, 56, 2.0), (128, 28, 2.0), (320, 14, 1.0), (512, 7, 1.0)]
BATCH = 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = {
    "reference": lambda x, mask: reference.spectral_mask_filter(x, mask),
    "fft": lambda x, mask: spanet_ops.spectral_mask_filter(x, mask, algorithm="fft"),
    "lowrank": lambda x, mask: spanet_ops.spectral_mask_filter(x, mask, algorithm="lowrank"),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{BATCH}x{s[0]}x{s[1]}x{s[1]}")
def bench_spectral_mask_filter(benchmark, stage, impl, mode, device):
    channels, size, radius = stage
    x = torch.randn(BATCH, channels, size, size, device=device, requires_grad=mode == "forward_backward")
    mask = spanet_ops.circular_mask(size, size, radius, 0.7, device=device)
    fn = IMPLS[impl]
    benchmark.group = f"{device} {mode} {BATCH}x{channels}x{size}x{size}"
    benchmark.extra_info.update(impl=impl, baseline="reference")

    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(x, mask)
            _sync(device)
    else:
        grad = torch.randn_like(x)

        def run():
            x.grad = None
            fn(x, mask).backward(grad)
            _sync(device)

    benchmark.pedantic(run, warmup_rounds=2, rounds=7, iterations=1)
