"""Ahead-of-time analysis of the basis-filter kernel for a GPU target, without a GPU.

:func:`kernel_stats` compiles one configuration through Triton's own compiler
for an explicit target (``GPUTarget("cuda", 80 | 90, 32)``), with the argument
specialisation a launch at SPANet's shapes gets (16-byte aligned pointers, ``N`` and
``P`` multiples of 16), and reads the
result: registers and spills (``cuobjdump --dump-resource-usage``), shared
memory, and the SASS instruction mix per output element — every instruction
of one block of planes, the chunk loops counted once per chunk (the persistent
loop's prologue is amortised over the blocks and left out). Tensor-core work
is counted in FMAs from each MMA's shape (``HMMA.1688`` = 16x8x8 per warp,
``HGMMA.64xNx8`` = 64xNx8 per warpgroup, ``DMMA.884`` / ``DMMA.8x8x4``).

No GPU is needed: Triton's NVIDIA backend ships ptxas and cuobjdump.

:func:`predicted_fraction` turns the counts into the fraction of copy
bandwidth a device could reach: the kernel moves the bytes of a copy (one read
and one write of ``x``) and is limited by the slowest of DRAM, instruction
issue, the FMA pipe and the tensor cores (:data:`DEVICES` names the figures
assumed); :func:`loads_at_copy_speed` gives each pipe's share at copy speed.
``python -m spanet_ops.triton.roofline`` prints the table of ``benchmarks/RESULTS.md``
("GPU kernels: static roofline") for the four SPANet stage shapes.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import tuning
from .kernel import _basis_filter_kernel

#: The SPANet stage shapes at 224x224: ``(side, radius, channels)`` of spanet_small.
STAGES: Tuple[Tuple[int, float, int], ...] = ((56, 2.0, 64), (28, 2.0, 128), (14, 1.0, 320), (7, 1.0, 512))

#: Basis images of the published disc: 13 for r = 2, 5 for r = 1 (see ``spanet_ops.plans``).
DISC_IMAGES = {1.0: 5, 2.0: 13}


@dataclass(frozen=True)
class Device:
    """The peak figures the prediction assumes for one GPU (dense, boost clock)."""

    name: str
    capability: int
    sms: int
    clock_hz: float
    copy_bytes_per_s: float  # device-to-device copy: bytes read + bytes written per second
    l2_bytes: int
    fp32_lanes_per_sm: int  # FFMA per clock per SM
    tf32_fma_per_s: float  # tensor cores, dense
    fp64_fma_per_s: float
    registers_per_sm: int = 65536
    shared_per_sm: int = 0

    @property
    def issue_per_s(self) -> float:
        """Thread-instructions per second: four schedulers per SM, one warp instruction each per clock."""
        return self.sms * 4 * 32 * self.clock_hz

    @property
    def ffma_per_s(self) -> float:
        return self.sms * self.fp32_lanes_per_sm * self.clock_hz


#: A100 SXM 80 GB, H100 SXM and H200 SXM. Copy bandwidth: A100 and H100 at 88% of the HBM
#: peak (2.04 and 3.35 TB/s), a typical device-to-device copy; H200 the 4.3 TB/s measured
#: copy. L2: NVIDIA's figures (40 and 50 MB); H200 60 MB as given for the target machine.
#: TF32 tensor cores dense: 156 and 495 TFLOPS; FP64 (FMA units): 9.7 and 34 TFLOPS.
DEVICES: Dict[str, Device] = {
    "A100": Device("A100", 80, 108, 1.41e9, 0.88 * 2.04e12, 40 * 2**20, 64, 78e12, 4.85e12, shared_per_sm=164 * 1024),
    "H100": Device("H100", 90, 132, 1.98e9, 0.88 * 3.35e12, 50 * 2**20, 128, 247e12, 17e12, shared_per_sm=228 * 1024),
    "H200": Device("H200", 90, 132, 1.98e9, 4.3e12, 60 * 2**20, 128, 247e12, 17e12, shared_per_sm=228 * 1024),
}

_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class KernelStats:
    """One compiled configuration: resources and its instruction mix per output element."""

    capability: int
    storage: torch.dtype
    hw: int
    j: int
    config: tuning.Config
    registers: int
    spill_bytes: int  # stack and local memory (0 when nothing spills)
    shared_bytes: int
    instructions: float  # per output element, every SASS instruction of a block of planes
    ffma: float  # float32 FMAs per element on the FMA pipe (FFMA)
    dfma: float  # float64 FMAs per element (DFMA)
    mma_fma: float  # tensor-core FMAs per element (padding and replication included)
    local_memory_ops: int  # LDL/STL instructions in the code
    compile_seconds: float

    @property
    def threads(self) -> int:
        return 32 * self.config.num_warps

    def ctas_per_sm_by_registers(self, registers_per_sm: int = 65536) -> int:
        """Resident CTAs per SM that the register file allows (allocation in warps of 8-register units)."""
        per_warp = 32 * math.ceil(self.registers / 8) * 8
        return registers_per_sm // (per_warp * self.config.num_warps)

    @property
    def dram_bytes(self) -> int:
        """Bytes per element from and to DRAM: one read and one write of the planes."""
        return 2 * torch.finfo(self.storage).bits // 8


def _signature(storage: torch.dtype) -> Tuple[dict, dict]:
    compute = _TYPES[tuning.compute_dtype(storage)]
    io = "*" + _TYPES[storage]
    signature = {"x_ptr": io, "y_ptr": io, "basis_ptr": "*" + compute, "scale_ptr": "*" + compute,
                 "constant_ptr": "*" + compute, "N": "i32", "P": "i32", "N_BUCKET": "i32", "CTAS_PER_SM": "i32"}
    for name in ("HW", "J", "JA", "JS", "PRECISION", "BLOCK_PLANES", "BLOCK_PIXELS"):
        signature[name] = "constexpr"
    # What a launch specialises on: 16-byte aligned tensors, N and P divisible by 16 (SPANet: P = C).
    aligned = ("x_ptr", "y_ptr", "basis_ptr", "scale_ptr", "constant_ptr", "N", "P")
    attrs = {(_basis_filter_kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return signature, attrs


def compile_kernel(capability: int, storage: torch.dtype, hw: int, j: int, config: tuning.Config):
    """Compile one configuration for ``sm_<capability>`` (no GPU needed); returns Triton's compiled kernel."""
    signature, attrs = _signature(storage)
    ja, js = tuning.basis_blocks(j)
    constants = dict(HW=hw, J=j, JA=ja, JS=js, PRECISION=tuning.DOT_PRECISION[storage],
                     BLOCK_PLANES=config.block_planes, BLOCK_PIXELS=config.block_pixels)
    source = ASTSource(_basis_filter_kernel, signature, constants, attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _sass_and_resources(cubin: bytes) -> Tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.remove(path)
    return sass, usage


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_MMA_SHAPES = {"1688": (16, 8, 8), "16816": (16, 8, 16), "16832": (16, 8, 32), "884": (8, 8, 4), "1684": (16, 8, 4)}


def _mma_fma_per_thread(opcode: str) -> float:
    """FMAs one thread's share of this instruction performs (0 for non-MMA instructions).

    Shapes read ``HMMA.1688`` / ``DMMA.884`` (sm_80) or ``DMMA.8x8x4`` (sm_90): one warp;
    ``HGMMA.64x16x8``: one warpgroup (four warps).
    """
    parts = opcode.split(".")
    if parts[0] not in ("HMMA", "DMMA", "HGMMA") or len(parts) < 2:
        return 0.0
    if "x" in parts[1]:
        m, n, k = (int(v) for v in parts[1].split("x"))
    elif parts[1] in _MMA_SHAPES:
        m, n, k = _MMA_SHAPES[parts[1]]
    else:
        raise ValueError(f"unknown MMA shape in {opcode}")
    return m * n * k / (128 if parts[0] == "HGMMA" else 32)


def _instruction_weights(lines: List[Tuple[int, str, str]], chunks: int) -> List[float]:
    """How many times each instruction runs per block of planes.

    Backward branches delimit loops. The outermost loop walks a program's blocks (once per
    block; what lies outside it runs once per program and is amortised away); the loops
    inside a block are the chunk loops (``chunks`` times each).
    """
    index = {address: i for i, (address, _, _) in enumerate(lines)}
    loops = []
    for i, (address, opcode, operands) in enumerate(lines):
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
                loops.append((index[int(target.group(1), 16)], i))
    outer = 1
    weights = []
    for i in range(len(lines)):
        depth = sum(1 for a, b in loops if a <= i <= b) - outer
        weights.append(0.0 if depth < 0 else float(chunks) ** depth)
    return weights


def kernel_stats(capability: int, storage: torch.dtype, hw: int, j: int, config: tuning.Config) -> KernelStats:
    """Compile one configuration for ``sm_<capability>`` and count its resources and instructions."""
    start = time.perf_counter()
    kernel = compile_kernel(capability, storage, hw, j, config)
    seconds = time.perf_counter() - start
    sass, usage = _sass_and_resources(kernel.asm["cubin"])
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]
    weights = _instruction_weights(lines, triton.cdiv(hw, config.block_pixels))
    elements = config.block_planes * hw / (32 * config.num_warps)  # output elements per thread per block
    total = ffma = dfma = mma = 0.0
    local_ops = 0
    for (_, opcode, _), weight in zip(lines, weights):
        base = opcode.split(".")[0]
        local_ops += base in ("LDL", "STL")
        if base in ("NOP", "EXIT") or weight == 0.0:
            continue
        total += weight
        ffma += weight * (base == "FFMA")
        dfma += weight * (base == "DFMA")
        mma += weight * _mma_fma_per_thread(opcode)
    return KernelStats(capability, storage, hw, j, config, registers, spill, kernel.metadata.shared,
                       total / elements, ffma / elements, dfma / elements, mma / elements, local_ops, seconds)


def loads_at_copy_speed(stats: KernelStats, device: Device) -> Dict[str, float]:
    """The fraction of each of ``device``'s pipes the kernel would keep busy at copy bandwidth."""
    elements_per_s = device.copy_bytes_per_s / stats.dram_bytes
    fp64_mma = stats.mma_fma if stats.storage == torch.float64 else 0.0
    return {
        "issue": stats.instructions * elements_per_s / device.issue_per_s,
        "fma": stats.ffma * elements_per_s / device.ffma_per_s,
        "fp64": (stats.dfma + fp64_mma) * elements_per_s / device.fp64_fma_per_s,
        "tensor": (stats.mma_fma - fp64_mma) * elements_per_s / device.tf32_fma_per_s,
    }


def predicted_fraction(stats: KernelStats, device: Device) -> float:
    """Fraction of ``device``'s copy bandwidth the kernel can reach: copy time over the slowest limit.

    An upper bound: it assumes the pipes overlap perfectly and that the second read of a
    chunk (planes of several chunks) and the basis come from L2 at no cost.
    """
    return min(1.0, 1.0 / max(max(loads_at_copy_speed(stats, device).values()), 1e-30))


def l2_bytes_per_element(stats: KernelStats) -> float:
    """Bytes per element read from L2 besides the first read of ``x``: the second read and the basis."""
    ja, js = tuning.basis_blocks(stats.j)
    c = stats.config
    compute = torch.finfo(tuning.compute_dtype(stats.storage)).bits // 8
    second = stats.dram_bytes / 2 if stats.hw > c.block_pixels else 0.0
    return second + (ja + js) * compute * tuning.padding(stats.hw, c.block_pixels) / c.block_planes


def stage_problems(dtypes: Iterable[torch.dtype]) -> List[Tuple[torch.dtype, int, int]]:
    """``(storage, H*W, J)`` for every stage shape and dtype."""
    return [(dtype, side * side, DISC_IMAGES[radius]) for side, radius, _ in STAGES for dtype in dtypes]


def roofline_rows(capabilities=(80, 90), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """Stats of every compiled variant the autotuner may choose, at every stage shape, dtype and target."""
    rows = []
    for capability in capabilities:
        devices = [d for d in DEVICES.values() if d.capability == capability]
        for storage, hw, j in stage_problems(dtypes):
            configs = []
            for device in devices:
                configs += tuning.candidate_configs(hw, j, storage, tuning.Hardware(device.sms, device.l2_bytes))
            for config in tuning.compiled_variants(configs):
                rows.append(kernel_stats(capability, storage, hw, j, config))
    return rows


def markdown_table(rows: List[KernelStats]) -> str:
    """Per stage shape, dtype and target: the variant with the best predicted fraction, and its figures."""

    def score(row):
        fractions = [predicted_fraction(row, d) for d in DEVICES.values() if d.capability == row.capability]
        return (min(fractions), -row.instructions)

    best: Dict[Tuple[int, torch.dtype, int], KernelStats] = {}
    for row in rows:
        key = (row.hw, row.storage, row.capability)
        if key not in best or score(row) > score(best[key]):
            best[key] = row
    header = ["plane", "J", "dtype", "target", "planes, pixels, warps, stages", "x read", "DRAM B/elem",
              "L2 B/elem", "FFMA/elem", "MMA FMA/elem", "instr/elem", "issue at copy speed", "regs",
              "CTAs/SM (regs)", "spills", "predicted of copy"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    order = sorted(best, key=lambda k: (-k[0], [torch.float32, torch.bfloat16, torch.float16, torch.float64].index(k[1]), k[2]))
    for hw, storage, capability in order:
        row = best[(hw, storage, capability)]
        c = row.config
        side = int(round(math.sqrt(hw)))
        reads = "once" if hw <= c.block_pixels else "once + L2"
        devices = [d for d in DEVICES.values() if d.capability == capability]
        predictions = ", ".join(f"{d.name} {predicted_fraction(row, d):.0%}" for d in devices)
        issue = ", ".join(f"{d.name} {loads_at_copy_speed(row, d)['issue']:.0%}" for d in devices)
        lines.append(
            f"| {side}x{side} | {row.j} | {_TYPES[storage]} | sm_{capability} | {c.block_planes}, {c.block_pixels}, "
            f"{c.num_warps}, {c.num_stages} | {reads} | {row.dram_bytes} | {l2_bytes_per_element(row):.1f} | "
            f"{row.ffma + row.dfma:.1f} | {row.mma_fma:.1f} | {row.instructions:.1f} | {issue} | {row.registers} | "
            f"{row.ctas_per_sm_by_registers()} | {row.spill_bytes} | {predictions} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    args = parser.parse_args(argv)
    print(markdown_table(roofline_rows(tuple(args.targets))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
