"""A short demonstration: each algorithm against the paper-literal reference.

Run ``python -m spanet_ops.demo``. Prints, at the four SPANet stage shapes,
the maximum error of every algorithm against the reference and the median
forward+backward time of each, with the speed-up over the reference.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import reference, spectral_pooling_filter
from .masks import circular_mask

STAGES = ((64, 56, 2.0), (128, 28, 2.0), (320, 14, 1.0), (512, 7, 1.0))


def _time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _fwd_bwd(fn, x):
    def run():
        x.grad = None
        fn(x).sum().backward()

    return run


def main(argv=None) -> None:
    """Print the error and timing table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"{'shape':>20} {'algorithm':>10} {'max err':>10} {'fwd+bwd ms':>11} {'speed-up':>9}")
    for channels, size, radius in STAGES:
        x = torch.randn(args.batch, channels, size, size, requires_grad=True)
        mask = circular_mask(size, size, radius, 0.8)
        expected = reference.spectral_mask_filter(x.detach().double(), mask.double())
        t_ref = _time(_fwd_bwd(lambda t: reference.spectral_mask_filter(t, mask), x), args.repeats)
        for algorithm in ("reference", "fft", "lowrank"):
            fn = lambda t, a=algorithm: spectral_pooling_filter(t, radius, 0.8, algorithm=a)  # noqa: E731
            err = (fn(x.detach()).double() - expected).abs().max().item()
            t = _time(_fwd_bwd(fn, x), args.repeats)
            shape = f"({args.batch},{channels},{size},{size})"
            print(f"{shape:>20} {algorithm:>10} {err:>10.2e} {t * 1e3:>11.2f} {t_ref / t:>8.1f}x")


if __name__ == "__main__":
    main()
