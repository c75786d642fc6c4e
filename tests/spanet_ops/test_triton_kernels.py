"""The Triton basis filter (``spanet_ops.triton.kernel``) against the paper-literal reference.

With CUDA the kernel runs compiled on the GPU. Without it, it runs on CPU tensors
through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set when
``triton.jit`` decorates the kernel and while it runs, so this module sets it
around its own import of :mod:`spanet_ops.triton` and around its own tests only
(other modules see the environment unchanged). The interpreter is slow: shapes
stay tiny. It computes every ``tl.dot`` in the operands' float32, so the TF32
arithmetic of the compiled bfloat16/float16 paths is checked here by emulating
the tensor cores' rounding (``test_*_error_model``), and on a GPU against the
same bounds.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import spanet_ops  # noqa: E402
from spanet_ops import plans  # noqa: E402
from spanet_ops import reference as ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _set_interpret(value):
    previous = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return previous


def _import_kernels(interpret: bool):
    """Import spanet_ops.triton decorated for the interpreter or compiled, re-importing it if needed."""
    module = sys.modules.get("spanet_ops.triton.kernel")
    if module is not None and module.INTERPRETED != interpret:
        for name in [m for m in sys.modules if m == "spanet_ops.triton" or m.startswith("spanet_ops.triton.")]:
            del sys.modules[name]
    previous = _set_interpret("1" if interpret else None)
    try:
        return importlib.import_module("spanet_ops.triton.kernel"), importlib.import_module("spanet_ops.triton.tuning")
    finally:
        _set_interpret(previous)


bf, tuning = _import_kernels(interpret=not CUDA)
assert bf.INTERPRETED != CUDA, "spanet_ops.triton was decorated for the wrong device"


@pytest.fixture(autouse=True)
def _interpreter_for_this_module():
    """Keep TRITON_INTERPRET=1 while these tests run on the CPU (the interpreter reads it at run time too)."""
    if CUDA:
        yield
        return
    previous = _set_interpret("1")
    try:
        yield
    finally:
        _set_interpret(previous)


#: (atol, rtol) of the kernel against float64 arithmetic on the same stored input, by storage
#: dtype, for values of order 1-8: float64 and float32 are exact to their arithmetic; float16 and
#: bfloat16 are within one rounding of the result (2^-11 and 2^-8 relative, times |y| <= 8), the
#: compiled kernels' TF32 products included (see the error-model tests).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}
DTYPES = list(TOLERANCES)

#: (H, W, radius): a stage-4 size, odd, non-square, a map smaller than the disc, a single row,
#: a single pixel, and one larger than one chunk of every configuration.
SHAPES = [(7, 7, 1.0), (5, 9, 2.0), (12, 16, 2.0), (3, 2, 2.0), (1, 8, 1.0), (1, 1, 1.0), (20, 17, 2.0)]


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype).to(DEVICE)


def _spf_terms(height, width, radius, lam, dtype):
    """The published SPF in the real basis: ``(basis (J, HW), scale (C, J), constant (C,))``."""
    lams = tuple(torch.as_tensor(lam, dtype=torch.float32).reshape(-1).tolist())
    plan = plans.circular_plan(height, width, radius, lams, len(lams), tuning.compute_dtype(dtype), DEVICE)
    return plan.basis_terms


def _expected(x, basis, scale, constant):
    """The contract in float64: ``constant[p] x + sum_j scale[p, j] <basis_j, x> basis_j``."""
    n = x.shape[0]
    flat = x.reshape(n, -1).double().cpu()
    phi = basis.double().cpu()
    p = torch.arange(n) % scale.shape[0]
    y = constant.double().cpu()[p, None] * flat + ((flat @ phi.t()) * scale.double().cpu()[p]) @ phi
    return y.reshape(x.shape)


def _orthonormal(j, hw, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hw, max(j, 1), generator=g, dtype=torch.float64))
    return q[:, :j].t().contiguous().to(dtype).to(DEVICE)


# --------------------------------------------------------------------------- the published SPF


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height, width, radius", SHAPES)
def test_spf_matches_reference(height, width, radius, dtype):
    """Plane n = (b, c) uses lam[c] (P = C = 3): the paper-literal SPF with per-channel masks."""
    lam = [0.7, 0.8, 0.9]
    basis, scale, constant = _spf_terms(height, width, radius, lam, dtype)
    x = _input((3, 3, height, width), dtype)
    y = bf.basis_filter(x.reshape(-1, height, width), basis, scale, constant)
    assert y.dtype == dtype and y.shape == (9, height, width) and y.is_contiguous() and y.device == x.device
    _close(y.reshape(x.shape), ref.spectral_pooling_filter(x.double().cpu(), radius, lam), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("j", [0, 1, 7, 8, 9, 16, 17, 70])
def test_any_basis_size(j, dtype):
    """Any orthonormal basis: J = 0 (y = c x), J below, at and above the 8/16 paddings, and
    J = 70 > 64, which runs as two basis blocks (the second adds its correction to y)."""
    height, width, planes = 9, 9, 3
    basis = _orthonormal(j, height * width, dtype, seed=j)
    g = torch.Generator().manual_seed(100 + j)
    scale = torch.randn(planes, j, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    constant = torch.randn(planes, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    x = _input((7 * planes, height, width), dtype, seed=j)
    _close(bf.basis_filter(x, basis, scale, constant), _expected(x, basis, scale, constant), dtype)


@pytest.mark.parametrize(
    "config",
    [
        tuning.Config(4, 16, 4, 1, 0),  # one program per block, 7 chunks
        tuning.Config(16, 16, 8, 2, 1),  # persistent over the blocks, pipelined
        tuning.Config(16, 64, 4, 2, 2),
        tuning.Config(4, 128, 4, 1, 0),  # the plane is one chunk, x kept between the GEMMs
        tuning.Config(32, 32, 8, 1, 3),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forced_configurations_on_tails(config, dtype):
    """Configurations the interpreter's default never runs, on a tail of planes and of pixels."""
    lam = [0.7, 0.8, 0.9, 0.6, 0.75]
    basis, scale, constant = _spf_terms(10, 11, 2.0, lam, dtype)  # 110 pixels: no chunk width divides it
    x = _input((7, 5, 10, 11), dtype, seed=3)  # 35 planes: no block size divides it
    y = bf.basis_filter_with_config(x.reshape(-1, 10, 11), basis, scale, constant, config)
    _close(y.reshape(x.shape), ref.spectral_pooling_filter(x.double().cpu(), 2.0, lam), dtype)


def test_one_scale_row_for_every_plane():
    """P = 1: every plane uses row 0."""
    basis, scale, constant = _spf_terms(6, 10, 2.0, 0.8, torch.float32)
    x = _input((5, 6, 10), torch.float32, seed=1)
    _close(bf.basis_filter(x, basis, scale, constant), ref.spectral_pooling_filter(x.double().cpu(), 2.0, 0.8),
           torch.float32)


def test_self_adjoint_so_it_is_its_own_backward():
    """<y(x), g> = <x, y(g)>: the filter is symmetric, so the backward pass is the same kernel."""
    basis, scale, constant = _spf_terms(7, 9, 2.0, [0.7, 0.9], torch.float64)
    x, g = _input((4, 7, 9), torch.float64, seed=5), _input((4, 7, 9), torch.float64, seed=6)
    forward = (bf.basis_filter(x, basis, scale, constant) * g).sum()
    adjoint = (x * bf.basis_filter(g, basis, scale, constant)).sum()
    torch.testing.assert_close(forward, adjoint, atol=1e-10, rtol=1e-12)


def test_strided_and_empty_inputs():
    basis, scale, constant = _spf_terms(8, 6, 1.0, [0.7, 0.8], torch.float32)
    x = _input((4, 6, 8), torch.float32, seed=7).transpose(1, 2)  # (4, 8, 6), not contiguous
    _close(bf.basis_filter(x, basis, scale, constant), _expected(x, basis, scale, constant), torch.float32)
    empty = bf.basis_filter(x[:0], basis, scale, constant)
    assert empty.shape == (0, 8, 6) and empty.dtype == torch.float32


def test_runs_the_kernel_not_another_op():
    """The launcher is the op's CUDA kernel: it must not dispatch to a spanet op or to a matmul."""
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    basis, scale, constant = _spf_terms(7, 7, 1.0, [0.7, 0.8], torch.float32)
    x = _input((4, 7, 7), torch.float32, seed=8)
    with Record():
        bf.basis_filter(x, basis, scale, constant)
    assert not [op for op in seen if op.startswith("spanet") or "mm" in op or "matmul" in op], seen


def test_bad_input_names_the_problem():
    basis, scale, constant = _spf_terms(7, 7, 1.0, [0.7, 0.8], torch.float32)
    x = _input((4, 7, 7), torch.float32)
    with pytest.raises(TypeError, match="x must be float64, float32, float16 or bfloat16"):
        bf.basis_filter(x.to(torch.int32), basis, scale, constant)
    with pytest.raises(TypeError, match="basis must be torch.float64 for torch.float64 planes"):
        bf.basis_filter(x.double(), basis, scale, constant)
    with pytest.raises(ValueError, match=r"x must be planes \(N, H, W\)"):
        bf.basis_filter(x[0], basis, scale, constant)
    with pytest.raises(ValueError, match=r"basis must be \(J, H\*W\) = \(J, 49\)"):
        bf.basis_filter(x, basis[:, :48], scale, constant)
    with pytest.raises(ValueError, match=r"scale must be \(P, J\)"):
        bf.basis_filter(x, basis, scale[:, :3], constant)
    with pytest.raises(ValueError, match=r"constant must be \(P,\) = \(2,\)"):
        bf.basis_filter(x, basis, scale, constant[:1])
    with pytest.raises(ValueError, match="N = 3 must be a multiple of P = 2"):
        bf.basis_filter(x[:3], basis, scale, constant)
    other = torch.device("cpu") if CUDA else torch.device("meta")
    with pytest.raises(ValueError, match="scale must be on x's device"):
        bf.basis_filter(x, basis, scale.to(other), constant)


# --------------------------------------------------------------------------- the compiled arithmetic, emulated


def _tf32_truncated(t):
    """What a TF32 tensor-core MMA reads of float32 operands: the low 13 mantissa bits dropped."""
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _tf32_split(t):
    """3xTF32's split: hi rounded to nearest TF32, lo the float32 remainder (truncated by the MMA)."""
    hi = ((t.float().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return hi, _tf32_truncated(t.float() - hi)


def _tf32x3_dot(a, b):
    (ah, al), (bh, bl) = _tf32_split(a), _tf32_split(b)
    return ah @ bh + ah @ bl + al @ bh


def _stage_problem(side, radius, channels, storage, seed=0):
    basis, scale, constant = plans.circular_plan(side, side, radius, (0.7, 0.8, 0.9), channels, torch.float32,
                                                 "cpu").basis_terms
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2 * channels, side * side, generator=g) * 2).to(storage).float()
    p = torch.arange(x.shape[0]) % channels
    exact = _expected(x, basis, scale, constant).reshape(x.shape)
    return x, basis, scale[p], constant[p, None], exact


@pytest.mark.parametrize("side, radius, channels", [(56, 2.0, 64), (28, 2.0, 128), (14, 1.0, 320), (7, 1.0, 512)])
def test_bfloat16_tf32_error_model(side, radius, channels):
    """bfloat16 storage, TF32 dots (input_precision="tf32"): x is exact in TF32, the basis and the
    scaled coefficients lose their low 13 bits. Bound, against plain PyTorch at the same precision
    (the two matmuls on bfloat16 operands, float32 accumulation, bfloat16 coefficients): the
    kernel's largest error is at most plain PyTorch's, and within 5% of the exact result's own
    rounding to bfloat16 (what any bfloat16 output must lose)."""
    x, basis, scale, constant, exact = _stage_problem(side, radius, channels, torch.bfloat16)
    coef = (_tf32_truncated(x) @ _tf32_truncated(basis).t()) * scale
    kernel = (_tf32_truncated(coef) @ _tf32_truncated(basis) + constant * x).bfloat16()
    xb, phib = x.bfloat16(), basis.bfloat16()
    plain = (constant * x).bfloat16() + ((xb @ phib.t()) * scale.bfloat16()) @ phib
    error = lambda y: (y.double() - exact).abs().max().item()  # noqa: E731
    rounding = error(exact.bfloat16())
    assert error(kernel) <= 1.05 * rounding, (error(kernel), rounding)
    assert error(kernel) <= error(plain), (error(kernel), error(plain))


@pytest.mark.parametrize("side, radius, channels", [(56, 2.0, 64), (7, 1.0, 512)])
def test_float16_tf32x3_error_model(side, radius, channels):
    """float16 storage, 3xTF32 dots: before the final rounding the error is that of float32
    arithmetic (under 2^-20 of max |y|, 2^-9 of float16's half ulp there), so the float16 result
    is the correctly rounded one except next to a rounding tie, and then one ulp off."""
    x, basis, scale, constant, exact = _stage_problem(side, radius, channels, torch.float16, seed=1)
    y = _tf32x3_dot(_tf32x3_dot(x, basis.t()) * scale, basis) + constant * x
    assert (y.double() - exact).abs().max().item() < 2.0**-20 * exact.abs().max().item()
    differs = y.half() != exact.half()
    assert differs.float().mean().item() < 1e-3
    ulp = torch.finfo(torch.float16).eps * exact[differs].abs().clamp_min(2.0**-14)
    assert ((y.half() - exact.half()).double()[differs].abs() <= ulp.double() * 1.0001).all()


# --------------------------------------------------------------------------- configuration choice (no GPU needed)


HARDWARE = {"A100": tuning.Hardware(108, 40 * 2**20), "H200": tuning.Hardware(132, 60 * 2**20)}


@pytest.mark.parametrize("hardware", list(HARDWARE.values()), ids=list(HARDWARE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw, j", [(49, 5), (196, 5), (784, 13), (3136, 13), (1, 1), (50176, 13), (1000, 70)])
def test_candidates_are_valid_configurations(hw, j, dtype, hardware):
    """Every problem gets candidates, all in the decorated space, and the planes in flight of a
    persistent grid fit the L2 budget whenever some block can."""
    candidates = tuning.candidate_configs(hw, j, dtype, hardware)
    assert candidates and set(candidates) <= set(tuning.CONFIG_SPACE)
    plane_bytes = hw * torch.finfo(dtype).bits // 8
    smallest_grid = {}
    for config in candidates:
        if config.ctas_per_sm == 0:
            assert hw <= config.block_pixels  # only a plane read once goes without a cap
        else:
            variant = config._replace(ctas_per_sm=0)
            smallest_grid[variant] = min(smallest_grid.get(variant, 9), config.ctas_per_sm)
    fits = [v for v, ctas in smallest_grid.items()
            if ctas * hardware.sms * v.block_planes * plane_bytes <= tuning.L2_BUDGET * hardware.l2_bytes]
    # Each persistent variant is timed at a grid whose planes fit L2, unless no block fits at all
    # (then: the smallest block, one program per SM).
    assert len(fits) == len(smallest_grid) or (len(candidates) == 1 and candidates[0].ctas_per_sm == 1)
    ja, js = tuning.basis_blocks(j)
    assert ja >= min(j, tuning.MAX_BLOCK_J) and js >= max(16, ja) and ja % 8 == 0 == js % 16


@pytest.mark.skipif(CUDA, reason="the interpreter's stand-in for autotuning; on a GPU the autotuner times for real")
def test_autotuned_launch_prunes_to_the_candidates_and_caches_per_bucket(monkeypatch):
    """The launcher's autotuned path (what CUDA tensors take), run by the interpreter with a stand-in
    timer: it times exactly the candidates, picks one, and keys on the power-of-two bucket of N,
    never on N, so a batch size in the same bucket reuses the choice."""
    assert "N" not in bf._tuned_kernel.keys and "N_BUCKET" in bf._tuned_kernel.keys
    hardware = tuning.Hardware(2, 2**20)
    monkeypatch.setattr(tuning, "hardware", lambda device: hardware)
    monkeypatch.setattr(bf._tuned_kernel, "cache", {})
    timed = []

    def timer(kernel_call, quantiles):
        kernel_call()
        timed.append(kernel_call)
        return [float(len(timed))] * len(quantiles)  # the first candidate is the fastest

    monkeypatch.setattr(bf._tuned_kernel, "_do_bench", timer)
    basis, scale, constant = _spf_terms(10, 11, 2.0, [0.7, 0.8, 0.9], torch.float32)
    for n in (33, 36, 39):  # one bucket: 64
        x = _input((n, 10, 11), torch.float32, seed=n)
        _close(bf._launch(x, basis, scale, constant, None, autotune=True), _expected(x, basis, scale, constant),
               torch.float32)
    candidates = tuning.candidate_configs(110, 13, torch.float32, hardware)
    assert len(timed) == len(candidates) and len(bf._tuned_kernel.cache) == 1
    pruned = tuning.prune_configs(bf._tuned_kernel.configs, {"x_ptr": x}, HW=110, J=13)
    assert {tuning.Config.of(c) for c in pruned} == set(candidates)
    assert tuning.Config.of(bf._tuned_kernel.best_config) == tuning.Config.of(pruned[0])


# --------------------------------------------------------------------------- compiled, on a GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels and autotuning)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side, radius, channels", [(56, 2.0, 64), (28, 2.0, 128), (14, 1.0, 320), (7, 1.0, 512)])
def test_stage_shapes_compiled(side, radius, channels, dtype):
    """The four SPANet stage sizes at batch 2, autotuned, against the reference."""
    lam = [v for v, n in zip((0.7, 0.8, 0.9), spanet_ops.chunk_sizes(channels)) for _ in range(n)]  # per channel
    basis, scale, constant = _spf_terms(side, side, radius, lam, dtype)
    x = _input((2, channels, side, side), dtype, seed=60)
    y = bf.basis_filter(x.reshape(-1, side, side), basis, scale, constant)
    _close(y.reshape(x.shape), ref.spectral_pooling_filter(x.double().cpu(), radius, lam), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_float32_ignores_global_tf32_settings():
    basis, scale, constant = _spf_terms(28, 28, 2.0, [0.7, 0.8], torch.float32)
    x = _input((64, 28, 28), torch.float32, seed=61)
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        strict = bf.basis_filter(x, basis, scale, constant)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        relaxed = bf.basis_filter(x, basis, scale, constant)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous[:2]
        torch.set_float32_matmul_precision(previous[2])
    assert torch.equal(strict, relaxed)
    _close(strict, _expected(x, basis, scale, constant), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_new_batch_size_in_the_bucket_does_not_retune():
    basis, scale, constant = _spf_terms(14, 14, 1.0, [0.7, 0.8], torch.bfloat16)
    for n in (300, 400, 512):  # one bucket: 512
        bf.basis_filter(_input((n, 14, 14), torch.bfloat16), basis, scale, constant)
    keys = [k for k in bf._tuned_kernel.cache if k[1] == 196]
    assert len([k for k in keys if k[0] == 512]) == 1, keys
    bf.basis_filter(_input((600, 14, 14), torch.bfloat16), basis, scale, constant)
    assert len([k for k in bf._tuned_kernel.cache if k[1] == 196]) == len(keys) + 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_host_synchronisation_after_tuning():
    basis, scale, constant = _spf_terms(28, 28, 2.0, [0.7, 0.8], torch.float32)
    x = _input((64, 28, 28), torch.float32, seed=62)
    bf.basis_filter(x, basis, scale, constant)  # tunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bf.basis_filter(x, basis, scale, constant)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    """Triton launches on the current device: the launcher must switch to x's (cuda:1 here)."""
    device = torch.device("cuda", 1)
    basis, scale, constant = (t.to(device) for t in _spf_terms(14, 14, 1.0, [0.7, 0.8], torch.float32))
    x = _input((4, 14, 14), torch.float32).to(device)
    assert torch.cuda.current_device() == 0
    y = bf.basis_filter(x, basis, scale, constant)
    assert y.device == device
    _close(y, _expected(x, basis, scale, constant), torch.float32)
