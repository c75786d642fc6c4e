"""Static proof of the basis-filter kernel for sm_80 and sm_90, without a GPU.

Every configuration the autotuner can choose at the four SPANet stage shapes
(:func:`spanet_ops.triton.tuning.candidate_configs` for the A100, H100 and H200
models of :mod:`spanet_ops.triton.roofline`), in every storage dtype, is compiled
through Triton's compiler for an explicit target and checked:

* no register spills (no stack, no local memory, no LDL/STL);
* registers and shared memory allow at least two CTAs per SM (the persistent grid
  runs at most :data:`~spanet_ops.triton.tuning.MAX_CTAS_PER_SM` = 2 programs per SM);
* at most 40 FMAs per output element, padding included, on the FMA pipe and on the
  tensor cores, in float32 and bfloat16 (float16's 3xTF32 is three times the
  tensor-core work; float64 is exact, not fast); the counts match the formulation's
  ``(JA + JS) * padding``, which checks the counting;
* two ``tl.dot`` per basis block and nothing else that multiplies matrices (no
  permutation dots).

The compiled kernels are cached by Triton (``~/.triton/cache``), so a second run
takes well under a minute; a cold run compiles 54 kernels (about 100 s on two shared cores).
"""
from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import re
import sys

import pytest
import torch

pytest.importorskip("triton")


def _import_compiled():
    """spanet_ops.triton decorated for compilation (another test module may hold an interpreted copy)."""
    module = sys.modules.get("spanet_ops.triton.kernel")
    if module is not None and module.INTERPRETED:
        for name in [m for m in sys.modules if m == "spanet_ops.triton" or m.startswith("spanet_ops.triton.")]:
            del sys.modules[name]
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return importlib.import_module("spanet_ops.triton.roofline"), importlib.import_module("spanet_ops.triton.tuning")
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous


roofline, tuning = _import_compiled()

_TOOLS = os.path.dirname(roofline._cuobjdump())
if not all(os.path.isfile(os.path.join(_TOOLS, tool)) for tool in ("ptxas", "cuobjdump")):
    pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed", allow_module_level=True)

CAPABILITIES = (80, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _variants(capability, storage, hw, j):
    """Compiled variants the autotuner may run on any modelled device of this capability, with
    the most programs per SM any of their configurations asks for."""
    most = {}
    for device in roofline.DEVICES.values():
        if device.capability != capability:
            continue
        for config in tuning.candidate_configs(hw, j, storage, tuning.Hardware(device.sms, device.l2_bytes)):
            variant = config._replace(ctas_per_sm=min(config.ctas_per_sm, 1))
            most[variant] = max(most.get(variant, 0), config.ctas_per_sm)
    return most


CASES = [
    (capability, storage, hw, j, variant, ctas)
    for capability in CAPABILITIES
    for storage, hw, j in roofline.stage_problems(DTYPES)
    for variant, ctas in _variants(capability, storage, hw, j).items()
]


def _case_id(case):
    capability, storage, hw, j, variant, _ = case
    return f"sm{capability}-{str(storage)[6:]}-{hw}-J{j}-{'x'.join(str(v) for v in variant[:4])}"


def _stats(case):
    return roofline.kernel_stats(*case)


@pytest.fixture(scope="module")
def stats():
    """Compile every case once for the whole module, on the cores there are (compilation is single-threaded)."""
    cases = [case[:5] for case in CASES]
    workers = min(4, os.cpu_count() or 1)
    if workers == 1:
        return {case: _stats(case) for case in cases}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return dict(zip(cases, pool.map(_stats, cases)))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_no_spills_and_two_ctas_per_sm(case, stats):
    capability, storage, hw, j, variant, ctas = case
    s = stats[case[:5]]
    assert s.spill_bytes == 0 and s.local_memory_ops == 0, s
    device = next(d for d in roofline.DEVICES.values() if d.capability == capability)
    assert s.ctas_per_sm_by_registers(device.registers_per_sm) >= max(2, ctas), s
    assert 2 * (s.shared_bytes + 1024) <= device.shared_per_sm, s


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fma_count_per_element(case, stats):
    """The FMAs are exactly the two GEMMs' ``(JA + JS) * padding`` per element (three times that
    for 3xTF32): no warp repeats another's products, and nothing else multiplies."""
    capability, storage, hw, j, variant, _ = case
    s = stats[case[:5]]
    ja, js = tuning.basis_blocks(j)
    work = (ja + js) * tuning.padding(hw, variant.block_pixels)
    precision = tuning.DOT_PRECISION[storage]
    if storage == torch.float64:  # DMMA (exact float64 FMAs on the tensor cores) or DFMA
        assert abs(s.dfma + s.mma_fma - work) <= 1.0 and s.ffma == 0, s
    elif precision == "ieee":
        assert abs(s.ffma - work) <= 1.0 and s.mma_fma == 0, s
    else:
        assert abs(s.mma_fma - work * (3 if precision == "tf32x3" else 1)) <= 0.02 * work, s
    if storage in (torch.float32, torch.bfloat16):
        assert s.ffma <= 40 and s.mma_fma <= 40, s


@pytest.mark.parametrize("storage", DTYPES, ids=str)
def test_two_dots_per_basis_block_and_no_other(storage):
    """The kernel's only matrix products: analysis and synthesis, once per basis block (3xTF32
    splits each into three)."""
    per_product = 3 if tuning.DOT_PRECISION[storage] == "tf32x3" else 1
    for j, blocks in ((13, 1), (70, 2)):
        kernel = roofline.compile_kernel(90, storage, 196, j, tuning.Config(16, 64, 4, 1, 1))
        dots = re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot) ", kernel.asm["ttgir"])
        assert len(dots) == 2 * blocks * per_product
