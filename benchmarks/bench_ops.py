"""pytest-benchmark suite of spanet-bench's operator and module levels.

Complements ``bench_filter.py`` (spectral_mask_filter, fp32, reference vs
fft vs lowrank) with what it leaves out:

* ``spg_aggregate`` (SPAM's fused split-SPG aggregation) against the published
  per-chunk reference, fp32 and bf16;
* ``spectral_mask_filter`` in bf16 and through ``auto`` (the bf16 rows'
  reference runs in fp32: ``torch.fft`` has no bf16 CPU kernels);
* the SPAM module with each ``spectral_impl``.

At the four SPANet stage shapes, forward and forward+backward; CUDA cases run
when a GPU is present. Run (the default test run skips benchmarks):

    .venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-json=/tmp/ops.json

``SPANET_BENCH_BATCH`` sets the batch (default 8). The inputs come from the
same builders as ``spanet-bench`` (:mod:`spanet.bench.operators`,
:mod:`spanet.bench.models`), so both measure the same thing; ``spanet-bench``
adds interleaved, paired ratios in one process.
"""
import os

import pytest
import torch

from spanet.bench.measure import synchronize
from spanet.bench.models import MODULE_IMPLS, spam_candidates
from spanet.bench.operators import DTYPES, MODES, STAGES, operator_candidates

BATCH = int(os.environ.get("SPANET_BENCH_BATCH", "8"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (op, dtype, candidate): bench_filter.py already covers the fp32 filter against fft and lowrank.
OP_CASES = [("spg_aggregate", d, c) for d in DTYPES for c in ("reference", "fft", "lowrank", "auto")]
OP_CASES += [("spectral_mask_filter", "fp32", "auto")]
OP_CASES += [("spectral_mask_filter", "bf16", c) for c in ("reference", "fft", "lowrank", "auto")]


def _stage_id(stage):
    return f"{BATCH}x{stage.channels}x{stage.size}x{stage.size}-r{stage.radius:g}"


def _run(benchmark, fn, device):
    def timed():
        fn()
        synchronize(device)

    benchmark.pedantic(timed, warmup_rounds=2, rounds=7, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", STAGES, ids=_stage_id)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "-".join(c))
def bench_operator(benchmark, case, stage, mode, device):
    op, dtype, candidate = case
    device = torch.device(device)
    algorithms = () if candidate == "reference" else (candidate,)
    fn = operator_candidates(op, stage, BATCH, DTYPES[dtype], mode, device, algorithms)[candidate]
    # The bf16 rows share a group with their fp32 reference.
    benchmark.group = f"{device.type} {op} {dtype} {mode} {_stage_id(stage)}"
    benchmark.extra_info.update(op=op, candidate=candidate, dtype="fp32" if candidate == "reference" else dtype)
    _run(benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", STAGES, ids=_stage_id)
@pytest.mark.parametrize("impl", MODULE_IMPLS)
def bench_spam(benchmark, impl, stage, mode, device):
    device = torch.device(device)
    fn = spam_candidates(stage, BATCH, torch.float32, mode, device, impls=(impl,))[impl]
    benchmark.group = f"{device.type} SPAM fp32 {mode} {_stage_id(stage)}"
    benchmark.extra_info.update(module="SPAM", spectral_impl=impl)
    _run(benchmark, fn, device)
