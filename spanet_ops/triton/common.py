"""Building blocks shared by the Triton kernels: padded basis tiles, the coefficient scaling, launch policy.

Layout inside a program. The plan's bases ``basis_h`` ``(2K, H)`` and
``basis_w`` ``(2L, W)`` hold cosine rows then sine rows. ``tl.dot`` needs every
block dimension to be a power of two of at least 16, so each half is padded
on its own: the row tile is ``(2 KP, TH)`` with the cosines in rows
``[0, K)``, the sines in rows ``[KP, KP + K)`` and zeros elsewhere
(``KP = max(8, next_pow2(K))``); the same for columns. Padding each half
separately makes the cos/sin exchange that the coefficient scaling needs a
fixed half swap. A plane tile is ``(TH, TW)``: the whole plane padded to
powers of two (at least 16) when that fits :data:`MAX_TILE`, else a tile of a
larger plane (see :func:`tiling`); coefficients are linear in the plane, so
a large plane's coefficients are the sum of its tiles'.

The scaling (plans.py's docstring, ``algorithms._coefficient_scale``) maps
``G = [[Pac, Pad], [Pbc, Pbd]]`` to ``Z = [[R, Q], [Q, -R]]`` with
``R = w (Pac - Pbd)`` and ``Q = w (Pbc + Pad)``. With ``G' = S_h G S_w``
(``S`` swaps the halves), ``G' = [[Pbd, Pbc], [Pad, Pac]]`` and

    Z = Wf * G + Wf * E * G'

where ``Wf`` tiles ``w`` over the four blocks and ``E`` is -1 on the two
diagonal blocks and +1 on the other two — every entry checks against the
formulas above.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

#: Whether ``triton.jit`` built interpreter functions (``TRITON_INTERPRET=1`` at import).
#: The interpreter runs on CPU tensors; compiled kernels need CUDA tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

#: Largest padded tile a program holds, in elements: the tile, its result and
#: four basis tiles live in registers. Compiled for sm_90, a 64x64 tile needs
#: 155-191 registers per thread at 8 warps and no spill; a 128x128 tile spills
#: at any warp count. Planes whose padded size exceeds this are tiled.
MAX_TILE = 64 * 64

#: Largest number of deviating row or column frequencies a program holds (the
#: basis tiles grow with it). The published masks have 3 (r = 1) or 5 (r = 2);
#: masks with more go to the dispatcher's kernel op (``algorithm="auto"``
#: picks ``fft`` for them anyway).
MAX_FREQS = 16

#: ``tl.dot`` input precision by storage dtype. float32 data keeps full
#: float32 products ("ieee"); half-precision data is exact in TF32 (its
#: mantissa fits) and its result is rounded to 8 or 11 bits, so TF32 tensor
#: cores lose nothing that the storage keeps. Accumulation is float32 always.
DOT_PRECISION: Dict[torch.dtype, str] = {
    torch.float32: "ieee",
    torch.float16: "tf32",
    torch.bfloat16: "tf32",
}


def _pow2(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def frequency_blocks(n_rows: int, n_cols: int) -> Tuple[int, int]:
    """Half-block sizes ``(KP, LP)`` for ``K`` row and ``L`` column frequencies."""
    return _pow2(n_rows, 8), _pow2(n_cols, 8)


def tiling(height: int, width: int) -> Tuple[int, int, int, int]:
    """``(TH, TW, tiles_h, tiles_w)``: the whole padded plane when it fits :data:`MAX_TILE`, else tiles of it."""
    hp, wp = _pow2(height, 16), _pow2(width, 16)
    if hp * wp <= MAX_TILE:
        return hp, wp, 1, 1
    tw = min(wp, max(64, MAX_TILE // hp))
    th = min(hp, MAX_TILE // tw)
    return th, tw, triton.cdiv(height, th), triton.cdiv(width, tw)


def runs_here(t: torch.Tensor) -> bool:
    """Whether the kernels, as decorated, can run on ``t``'s device (CUDA, or CPU under the interpreter)."""
    return t.device.type == ("cpu" if INTERPRETED else "cuda")


def unsupported_reason(x: torch.Tensor, basis_h: torch.Tensor, basis_w: torch.Tensor) -> str:
    """Why the Triton kernels cannot take this problem, or ``""`` when they can.

    The wrappers send such problems to the dispatcher's kernel op (native or
    PyTorch), which is exact for every case.
    """
    if not runs_here(x):
        return f"tensors on {x.device} (the kernels were built for {'CPU (interpreter)' if INTERPRETED else 'CUDA'})"
    if x.dtype not in DOT_PRECISION:
        return f"storage dtype {x.dtype}"
    if basis_h.dtype != torch.float32 or basis_w.dtype != torch.float32:
        return f"compute dtype {basis_h.dtype} (the kernels compute in float32)"
    if basis_h.shape[0] == 0 or basis_w.shape[0] == 0:
        return "no deviating frequencies (the filter is a constant times x)"
    if basis_h.shape[0] // 2 > MAX_FREQS or basis_w.shape[0] // 2 > MAX_FREQS:
        return f"more than {MAX_FREQS} deviating frequencies per axis"
    return ""


# --------------------------------------------------------------------------- autotuning


def _configs() -> List[triton.Config]:
    # PLANES: planes per program (the bases are loaded once per program);
    # num_stages > 1 lets the compiler prefetch the next plane during the current one.
    return [
        triton.Config({"PLANES": planes}, num_warps=warps, num_stages=stages)
        for planes in (1, 4, 16)
        for warps in (2, 4, 8)
        for stages in (1, 2)
    ]


CONFIGS = _configs()

#: The one configuration the interpreter runs: two planes per program, so the
#: plane loop and its tail mask are exercised.
INTERPRETER_CONFIG = triton.Config({"PLANES": 2}, num_warps=4, num_stages=1)


def prune_configs(configs, named_args, **kwargs):
    """Drop configurations that cannot pay off for the tile size; one fixed config under the interpreter."""
    if INTERPRETED:
        return [INTERPRETER_CONFIG]
    area = kwargs["TH"] * kwargs["TW"]
    work = named_args["N"] * named_args.get("TILES_H", 1) * named_args.get("TILES_W", 1)
    kept = []
    for config in configs:
        warps, planes = config.num_warps, config.kwargs["PLANES"]
        if area <= 1024 and warps > 4:  # a 32x32 tile gives 8 warps too little work each
            continue
        if area >= 64 * 64 and warps < 4:  # a 64x64 tile spills at 2 warps (sm_90)
            continue
        if planes > 1 and work < 2 * planes * 132:  # keep two waves of programs on a 132-SM H100
            continue
        kept.append(config)
    return kept or [configs[0]]


AUTOTUNE_KEY = ["H", "W", "K", "L", "P", "N"]


# --------------------------------------------------------------------------- device functions


@triton.jit
def load_basis(ptr, K, N, start, KP: tl.constexpr, NP: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Columns ``[start, start + NP)`` of a ``(2K, N)`` basis as a padded ``(2 KP, NP)`` float32 tile (or transposed)."""
    i = tl.arange(0, 2 * KP)
    k = i % KP
    src = (i // KP) * K + k
    n = start + tl.arange(0, NP)
    if TRANSPOSED:
        offs = src[None, :] * N + n[:, None]
        mask = (k < K)[None, :] & (n < N)[:, None]
    else:
        offs = src[:, None] * N + n[None, :]
        mask = (k < K)[:, None] & (n < N)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def half_swap(KP: tl.constexpr):
    """The ``(2 KP, 2 KP)`` permutation exchanging the cosine and sine halves."""
    i = tl.arange(0, 2 * KP)
    return (i[None, :] == (i[:, None] + KP) % (2 * KP)).to(tl.float32)


@triton.jit
def coefficient_offsets(K, L, KP: tl.constexpr, LP: tl.constexpr):
    """Offsets into an unpadded ``(2K, 2L)`` grid for the padded ``(2KP, 2LP)`` tile, and their mask."""
    i = tl.arange(0, 2 * KP)
    j = tl.arange(0, 2 * LP)
    row = (i // KP) * K + i % KP
    col = (j // LP) * L + j % LP
    offs = row[:, None] * (2 * L) + col[None, :]
    mask = (i % KP < K)[:, None] & (j % LP < L)[None, :]
    return offs, mask


@triton.jit
def scale_grids(w_ptr, p, K, L, KP: tl.constexpr, LP: tl.constexpr):
    """``(Wf, Wf * E)`` for mask plane ``p`` of a weight ``(P, K, L)`` (see the module docstring)."""
    i = tl.arange(0, 2 * KP)
    j = tl.arange(0, 2 * LP)
    k = i % KP
    l = j % LP
    mask = (k < K)[:, None] & (l < L)[None, :]
    wf = tl.load(w_ptr + p * K * L + k[:, None] * L + l[None, :], mask=mask, other=0.0).to(tl.float32)
    sign = tl.where((i < KP)[:, None] == (j < LP)[None, :], -1.0, 1.0)
    return wf, wf * sign


@triton.jit
def scaled_coefficients(x, a, bt, swap_h, swap_w, wf, wg, PRECISION: tl.constexpr):
    """Analysis ``G = A x B^T`` of a float32 plane tile, then the scaling to ``Z = [[R, Q], [Q, -R]]``."""
    t = tl.dot(x, bt, input_precision=PRECISION)  # (HP, 2LP)
    g = tl.dot(a, t, input_precision=PRECISION)  # (2KP, 2LP)
    # The half swaps are permutations: exact in "ieee", and only 16^3-sized.
    g_swapped = tl.dot(tl.dot(swap_h, g, input_precision="ieee"), swap_w, input_precision="ieee")
    return wf * g + wg * g_swapped


@triton.jit
def synthesise(z, at, b, PRECISION: tl.constexpr):
    """Planes ``A^T Z B`` ``(HP, WP)`` from a padded coefficient tile ``Z``."""
    v = tl.dot(z, b, input_precision=PRECISION)  # (2KP, WP)
    return tl.dot(at, v, input_precision=PRECISION)
