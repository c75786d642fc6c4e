"""Choices of the basis-filter kernel: arithmetic per dtype, basis padding, and the configurations it may run.

Everything here is decided from shapes and dtypes only (no tensor data is
read), so a launch never synchronises with the device. The static analysis
(:mod:`spanet_ops.triton.roofline`) compiles exactly the configurations
:func:`candidate_configs` returns and checks them against the targets written
below; the autotuner picks among the same ones at run time.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple

import torch
import triton

#: ``tl.dot`` input precision per storage dtype. Every dot names its precision, so
#: ``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision`` and
#: ``TRITON_F32_DEFAULT`` do not reach the kernel.
#:
#: * float64, float32: "ieee" — exact in the compute dtype (float32 FFMA; float64 DMMA or DFMA).
#: * bfloat16: "tf32" — x is exact in TF32 (bfloat16's 8 significant bits fit its 11); the
#:   tensor cores drop the low 13 bits of the basis and of the scaled coefficients (relative
#:   2^-10), below the storage's own rounding (2^-9 of the result). Emulated at the stage
#:   shapes, the largest error is within 5% of the exact result rounded to bfloat16 and below
#:   that of plain PyTorch's bfloat16 matmuls (``test_bfloat16_tf32_error_model``).
#: * float16: "tf32x3" — TF32 would round the basis as coarsely as float16 rounds the
#:   result (2^-11), so every operand is split into hi + lo TF32 parts (three products);
#:   what is left is float32 arithmetic and the final rounding to float16
#:   (``test_float16_tf32x3_error_model``).
DOT_PRECISION: Dict[torch.dtype, str] = {
    torch.float64: "ieee",
    torch.float32: "ieee",
    torch.bfloat16: "tf32",
    torch.float16: "tf32x3",
}

#: Largest block of basis images one pass holds (its coefficients live in registers);
#: more images run in blocks of this size, each adding its correction to ``y``.
MAX_BLOCK_J = 64


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """The basis/scale dtype the kernel computes in: float64 for float64 storage, else float32."""
    return torch.float64 if storage == torch.float64 else torch.float32


def basis_blocks(j: int) -> tuple:
    """``(JA, JS)``: the analysis width (a dot's N, at least 8) and synthesis width (a dot's K, at least 16).

    ``J <= 8`` pads to 8 for the analysis and 16 (interleaved zeros) for the synthesis;
    above that both are the next power of two, up to :data:`MAX_BLOCK_J`. ``J = 0``: ``(0, 0)``.
    """
    if j == 0:
        return 0, 0
    ja = min(MAX_BLOCK_J, max(8, triton.next_power_of_2(j)))
    return ja, max(16, ja)


class Config(NamedTuple):
    """One launch configuration: planes per block, pixels per chunk, warps, pipeline stages, programs per SM.

    ``ctas_per_sm > 0``: a persistent grid of ``min(blocks, ctas_per_sm * SMs)`` programs walks
    the blocks; 0: one program per block (planes read once, no second read to keep in L2).
    """

    block_planes: int
    block_pixels: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int

    def triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_PLANES": self.block_planes, "BLOCK_PIXELS": self.block_pixels, "CTAS_PER_SM": self.ctas_per_sm},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    @classmethod
    def of(cls, config: triton.Config) -> "Config":
        k = config.kwargs
        return cls(k["BLOCK_PLANES"], k["BLOCK_PIXELS"], config.num_warps, config.num_stages, k["CTAS_PER_SM"])


class Hardware(NamedTuple):
    """What the configuration choice needs to know of a GPU."""

    sms: int
    l2_bytes: int


@functools.lru_cache(maxsize=None)
def hardware(device: torch.device) -> Hardware:
    """The :class:`Hardware` of a CUDA device (queried once per device, no synchronisation)."""
    props = torch.cuda.get_device_properties(device)
    return Hardware(props.multi_processor_count, props.L2_cache_size)


def padding(hw: int, block_pixels: int) -> float:
    """Pixels computed per pixel of the plane: ``ceil(HW / BLOCK_PIXELS) * BLOCK_PIXELS / HW``."""
    return triton.cdiv(hw, block_pixels) * block_pixels / hw


#: Every configuration the kernel is decorated with; :func:`candidate_configs` narrows it per problem.
CONFIG_SPACE = [
    Config(planes, pixels, warps, stages, ctas)
    for planes in (4, 16, 32, 64, 128)
    for pixels in (16, 32, 64, 128, 256)
    for warps in (2, 4, 8)
    for stages in (1, 2)
    for ctas in (0, 1, 2)
]

#: The configuration the interpreter runs (no autotuning there); with :data:`INTERPRETER_PROGRAMS`
#: programs the persistent loop walks several blocks.
INTERPRETER_CONFIG = Config(4, 16, 4, 1, 1)
INTERPRETER_PROGRAMS = 2


def grid_size(n: int, block_planes: int, ctas_per_sm: int, sms: int) -> int:
    """Programs to launch: one per block of planes, at most ``ctas_per_sm`` per SM (0: no cap)."""
    blocks = triton.cdiv(n, block_planes)
    return max(1, min(blocks, ctas_per_sm * sms) if ctas_per_sm else blocks)


#: The planes in flight (``ctas_per_sm * SMs * block_planes``) may fill this fraction of L2:
#: the synthesis reads every chunk a second time, which should hit L2, not DRAM.
L2_BUDGET = 0.6

#: Most programs per SM of a persistent grid: more than the SM holds at once would start late
#: and finish late; the static analysis checks that every variant's registers and shared
#: memory allow two.
MAX_CTAS_PER_SM = 2

#: Per arithmetic: the (block_planes, num_warps) pairs tried, largest first (tensor cores need
#: 16 planes per warp, or the warps repeat each other's MMAs); the most elements of a chunk per
#: thread that stay in registers; whether a small plane may be one chunk held between the two
#: GEMMs; and how many compiled variants (planes, pixels, warps, stages) the autotuner tries,
#: each possibly at two grid caps, which share the compiled code. The limits come from the
#: compiled sweep (``python -m spanet_ops.triton.roofline``); beyond them ptxas spills.
#: float64 is exact, not fast: one variant.
_FORMULATIONS = {
    "tf32": dict(blocks=((128, 4), (64, 4), (32, 2), (16, 2)), tile=64, one_chunk=True, variants=2),
    "tf32x3": dict(blocks=((128, 4), (64, 4), (32, 2), (16, 2)), tile=32, one_chunk=True, variants=2),
    "ieee": dict(blocks=((128, 4), (64, 4), (32, 4), (16, 2)), tile=32, one_chunk=False, variants=2),
    "ieee64": dict(blocks=((64, 4), (32, 4), (16, 2)), tile=8, one_chunk=False, variants=1),
}

_PIXEL_BLOCKS = (256, 128, 64, 32, 16)


def _formulation(storage: torch.dtype) -> dict:
    return _FORMULATIONS["ieee64" if storage == torch.float64 else DOT_PRECISION[storage]]


def _pixel_blocks(hw: int, one_chunk: bool) -> List[int]:
    """Chunk widths worth trying, widest first: one chunk for a small plane, else the least padding."""
    if hw <= 16 or (one_chunk and hw <= 64):
        return [max(16, triton.next_power_of_2(hw))]
    widths = [bk for bk in _PIXEL_BLOCKS if bk < hw]
    least = min(padding(hw, bk) for bk in widths)
    return [bk for bk in widths if padding(hw, bk) <= 1.1 * least]


def candidate_configs(hw: int, j: int, storage: torch.dtype, device: Hardware) -> List[Config]:
    """The configurations the autotuner may choose for planes of ``hw`` pixels and ``j`` basis images.

    The cost model, from the compiled kernels' instruction counts (``benchmarks/RESULTS.md``,
    "GPU kernels: static roofline"):

    * arithmetic per element is ``(JA + JS) * padding`` FMAs (three times that in MMAs for
      3xTF32): the chunk widths with the least padding are tried;
    * the other instructions per element fall as a block holds more planes: the largest
      blocks that stay in registers (the formulation's tile limit) come first;
    * a plane of several chunks is read a second time by the synthesis, from L2 if the planes
      in flight fit :data:`L2_BUDGET` of it: only blocks of which one per SM fits are tried,
      the persistent grid's ``ctas_per_sm`` is the most that fit, and twice that is timed too
      (more loads in flight against some second reads from DRAM); blocks that fit with eight
      warps per SM come first, and a variant with fewer gets a two-stage pipeline.
    """
    form = _formulation(storage)
    ja, _ = basis_blocks(j)
    planes_in_flight = int(L2_BUDGET * device.l2_bytes // (hw * (torch.finfo(storage).bits // 8)))
    found = []
    for block_planes, warps in form["blocks"]:
        threads = 32 * warps
        if block_planes * max(ja, 8) > 32 * threads:  # the coefficients of a wide basis block
            continue
        if warps == 2 and ja < 16 and form["one_chunk"]:  # compiled: two warps repeat an 8-wide analysis MMA
            continue
        for block_pixels in _pixel_blocks(hw, form["one_chunk"]):
            if block_planes * block_pixels > form["tile"] * threads:
                continue
            if hw <= block_pixels:  # read once: no bound on the planes in flight
                found.append(((0, -block_planes, -block_pixels), [Config(block_planes, block_pixels, warps, 1, 0)]))
                continue
            fit = planes_in_flight // (device.sms * block_planes)
            if fit == 0:
                continue
            ctas = min(MAX_CTAS_PER_SM, fit)
            # Few warps per SM: a two-stage pipeline keeps the next chunk's loads in flight.
            stages = 1 if ctas * warps >= 8 else 2
            grids = sorted({ctas, min(MAX_CTAS_PER_SM, 2 * ctas)})
            rank = (stages - 1, -block_planes, -block_pixels)
            found.append((rank, [Config(block_planes, block_pixels, warps, stages, c) for c in grids]))
    if not found:  # no block keeps its planes in L2: the smallest, one program per SM, pipelined
        block_planes, warps = form["blocks"][-1]
        widths = [bk for bk in _pixel_blocks(hw, False) if block_planes * bk <= form["tile"] * 32 * warps]
        return [Config(block_planes, (widths or [16])[0], warps, 2, 1)]
    found.sort(key=lambda entry: entry[0])
    chosen, per_block = [], {}
    for _, configs in found:
        block_planes = configs[0].block_planes
        if sum(per_block.values()) == form["variants"]:
            break
        if per_block.get(block_planes, 0) < 2:  # at most two chunk widths per block size
            chosen += configs
            per_block[block_planes] = per_block.get(block_planes, 0) + 1
    return chosen


def compiled_variants(configs: List[Config]) -> List[Config]:
    """The distinct compiled kernels among ``configs`` (the grid cap is a run-time argument)."""
    return list({c._replace(ctas_per_sm=min(c.ctas_per_sm, 1)): None for c in configs})


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the autotuner: the members of :data:`CONFIG_SPACE` in :func:`candidate_configs`."""
    x = named_args["x_ptr"]
    keep = set(candidate_configs(kwargs["HW"], kwargs["J"], x.dtype, hardware(x.device)))
    return [c for c in configs if Config.of(c) in keep]
