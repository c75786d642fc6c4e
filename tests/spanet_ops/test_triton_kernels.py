"""The Triton kernels (spanet_ops.triton) against the paper-literal reference.

With CUDA the kernels run compiled on the GPU. Without it they run on CPU
tensors through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set when
``triton.jit`` decorates the kernels and while they run, so this module sets
it around its own import of :mod:`spanet_ops.triton` and around its own tests
only (other modules see the environment unchanged). The interpreter is slow:
shapes stay tiny.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

import spanet_ops  # noqa: E402
from spanet_ops import algorithms, plans  # noqa: E402
from spanet_ops import reference as ref  # noqa: E402

backends = importlib.import_module("spanet_ops.backends")  # the module (spanet_ops.backends is the report function)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _set_interpret(value):
    previous = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return previous


def _import_kernels():
    """Import spanet_ops.triton compiled (CUDA) or interpreted (CPU), re-importing a copy decorated otherwise."""
    common = sys.modules.get("spanet_ops.triton.common")
    if common is not None and common.INTERPRETED == CUDA:
        for name in [m for m in sys.modules if m == "spanet_ops.triton" or m.startswith("spanet_ops.triton.")]:
            del sys.modules[name]
    return importlib.import_module("spanet_ops.triton")


if CUDA:
    st = _import_kernels()
else:
    _previous = _set_interpret("1")
    try:
        st = _import_kernels()
    finally:
        _set_interpret(_previous)

from spanet_ops.triton import common  # noqa: E402

assert common.INTERPRETED != CUDA, "spanet_ops.triton was decorated for the wrong device"


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


#: (dtype, atol, rtol) of the kernels against the float64 reference applied to the same stored input.
#: float32: float32 arithmetic; float16/bfloat16: the output's rounding (2^-11, 2^-8 relative) plus
#: TF32 products on GPU, on values of order 1-4.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
DTYPES = list(TOLERANCES)

#: (H, W, radius): a stage-4 size, odd, non-square, a map smaller than the disc, a single row,
#: and one above 16 on a side (two padded tile sizes).
SHAPES = [(7, 7, 1.0), (5, 9, 2.0), (12, 16, 2.0), (3, 2, 2.0), (1, 8, 1.0), (20, 17, 2.0)]


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def _spf_terms(height, width, radius, lam):
    plan = plans.circular_plan(height, width, radius, torch.float32, DEVICE)
    weight, constant = plan.lowrank_terms(torch.as_tensor(lam, dtype=torch.float32, device=DEVICE))
    return plan.basis, weight, constant


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype).to(DEVICE)


# --------------------------------------------------------------------------- lowrank_filter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height, width, radius", SHAPES)
def test_lowrank_forward_per_channel_lam(height, width, radius, dtype):
    """Plane n = (b, c) uses lam[c] (n % C): against the reference SPF with per-channel masks."""
    lam = [0.7, 0.8, 0.9]
    basis, weight, constant = _spf_terms(height, width, radius, lam)
    x = _input((3, 3, height, width), dtype)  # 9 planes: an odd count leaves a tail for the plane loop
    assert common.unsupported_reason(x, basis.basis_h, basis.basis_w) == ""
    y = st.lowrank_filter(x.reshape(-1, height, width), basis.basis_h, basis.basis_w, weight, constant)
    assert y.dtype == dtype and y.shape == (9, height, width) and y.is_contiguous()
    expected = ref.spectral_pooling_filter(x.double().cpu(), radius, lam)
    _close(y.reshape(x.shape).cpu(), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_scalar_lam(dtype):
    basis, weight, constant = _spf_terms(6, 10, 2.0, 0.8)
    x = _input((5, 6, 10), dtype, seed=1)
    y = st.lowrank_filter(x, basis.basis_h, basis.basis_w, weight, constant)
    _close(y.cpu(), ref.spectral_pooling_filter(x.double().cpu(), 2.0, 0.8), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height, width, radius", [(7, 7, 1.0), (5, 9, 2.0), (20, 17, 2.0)])
def test_lowrank_backward_is_the_kernel_on_the_gradient(height, width, radius, dtype):
    """The op layer computes grad_x as the filter of grad_y: check that against the reference's autograd."""
    lam = [0.7, 0.9]
    basis, weight, constant = _spf_terms(height, width, radius, lam)
    x = _input((2, 2, height, width), torch.float64, seed=2).cpu().requires_grad_(True)
    grad_y = _input((2, 2, height, width), dtype, seed=3)
    ref.spectral_pooling_filter(x, radius, lam).backward(grad_y.double().cpu())
    grad_x = st.lowrank_filter(grad_y.reshape(-1, height, width), basis.basis_h, basis.basis_w, weight, constant)
    _close(grad_x.reshape(grad_y.shape).cpu(), x.grad, dtype)


def test_lowrank_general_sparse_mask():
    """Any real mask that is a constant plus a few bins (not symmetric, per channel) via its MaskPlan."""
    g = torch.Generator().manual_seed(4)
    height, width = 9, 12
    mask = torch.full((2, height, width), 0.3)
    for c, (u, v) in enumerate([(0, 0), (4, 7)]):
        mask[c, u, v] = torch.rand((), generator=g) * 2 - 1
    mask[:, 2, 1] = torch.tensor([1.5, -0.25])
    plan = plans.mask_plan(mask.to(DEVICE), True, torch.float32)
    x = _input((3, 2, height, width), torch.float32, seed=5)
    y = st.lowrank_filter(x.reshape(-1, height, width), plan.basis.basis_h, plan.basis.basis_w, plan.weight, plan.constant)
    _close(y.reshape(x.shape).cpu(), ref.spectral_mask_filter(x.double().cpu(), mask.double()), torch.float32)


def test_lowrank_matches_pytorch_algorithm_bitwise_close():
    """Same contract as algorithms.lowrank_filter (float32 arithmetic both): agreement to float32 rounding."""
    basis, weight, constant = _spf_terms(14, 14, 1.0, [0.7, 0.8])
    x = _input((4, 14, 14), torch.float32, seed=6)
    args = (basis.basis_h, basis.basis_w, weight, constant)
    torch.testing.assert_close(st.lowrank_filter(x, *args), algorithms.lowrank_filter(x, *args), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height, width", [(65, 40), (70, 90)])
def test_lowrank_tiled_large_planes(height, width, dtype):
    """Planes beyond one program's tile run as tiled analysis + synthesis passes, with the same result."""
    th, tw, tiles_h, tiles_w = common.tiling(height, width)
    assert tiles_h * tiles_w > 1 and th * tw <= common.MAX_TILE
    lam = [0.7, 0.9]
    basis, weight, constant = _spf_terms(height, width, 2.0, lam)
    x = _input((1, 2, height, width), dtype, seed=7)
    y = st.lowrank_filter(x.reshape(-1, height, width), basis.basis_h, basis.basis_w, weight, constant)
    _close(y.reshape(x.shape).cpu(), ref.spectral_pooling_filter(x.double().cpu(), 2.0, lam), dtype)


def test_lowrank_constant_mask_goes_to_the_kernel_op():
    """A mask without deviating bins has empty bases: routed to the dispatcher's op (y = c x)."""
    mask = torch.full((6, 5), 0.4, device=DEVICE)
    plan = plans.mask_plan(mask, True, torch.float32)
    x = _input((2, 6, 5), torch.float32, seed=9)
    assert "no deviating" in common.unsupported_reason(x, plan.basis.basis_h, plan.basis.basis_w)
    y = st.lowrank_filter(x, plan.basis.basis_h, plan.basis.basis_w, plan.weight, plan.constant)
    _close(y.cpu(), ref.spectral_mask_filter(x.double().cpu(), mask.double().cpu()), torch.float32)


def test_lowrank_float64_goes_to_the_kernel_op():
    """float64 computes in float64 (the kernels compute in float32): routed to the dispatcher's op."""
    plan64 = plans.circular_plan(5, 6, 2.0, torch.float64, DEVICE)
    w64, c64 = plan64.lowrank_terms(torch.tensor(0.7, device=DEVICE))
    x64 = _input((2, 5, 6), torch.float64, seed=8)
    assert "float64" in common.unsupported_reason(x64, plan64.basis.basis_h, plan64.basis.basis_w)
    y64 = st.lowrank_filter(x64, plan64.basis.basis_h, plan64.basis.basis_w, w64, c64)
    torch.testing.assert_close(y64.cpu(), ref.spectral_pooling_filter(x64.cpu(), 2.0, 0.7), atol=1e-12, rtol=1e-12)


def test_lowrank_bad_input_names_the_problem():
    basis, weight, constant = _spf_terms(7, 7, 1.0, [0.7, 0.8])
    x = _input((3, 7, 7), torch.float32)
    with pytest.raises(ValueError, match="multiple of the weight's planes"):
        st.lowrank_filter(x, basis.basis_h, basis.basis_w, weight, constant)
    with pytest.raises(ValueError, match=r"planes must be \(N, H, W\)"):
        st.lowrank_filter(x[0], basis.basis_h, basis.basis_w, weight, constant)
    with pytest.raises(ValueError, match="basis_w must be"):
        st.lowrank_filter(x[:2], basis.basis_h, basis.basis_w[:, :5], weight, constant)


# --------------------------------------------------------------------------- through the public ops


@pytest.fixture
def triton_dispatch(monkeypatch):
    """Route the public ops to the Triton kernels (on CPU: the interpreter) and count the calls."""
    calls = {"lowrank_filter": 0}

    def counting(name):
        kernel = getattr(st, name)

        def wrapper(*args):
            calls[name] += 1
            return kernel(*args)

        return wrapper

    monkeypatch.setattr(backends, "use_triton", lambda t: True)
    for name in calls:
        monkeypatch.setattr(st, name, counting(name))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_spf_forward_backward_through_triton(triton_dispatch, dtype):
    lam = torch.tensor([0.7, 0.8, 0.9])
    x = _input((2, 3, 7, 10), dtype, seed=40).requires_grad_(True)
    grad_y = _input((2, 3, 7, 10), dtype, seed=41)
    y = spanet_ops.spectral_pooling_filter(x, 2.0, lam, algorithm="lowrank")
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert triton_dispatch["lowrank_filter"] == 2  # forward, and backward by self-adjointness

    x_ref = x.detach().double().cpu().requires_grad_(True)
    y_ref = ref.spectral_pooling_filter(x_ref, 2.0, lam)
    y_ref.backward(grad_y.double().cpu())
    _close(y.detach().cpu(), y_ref.detach(), dtype)
    _close(grad_x.cpu(), x_ref.grad, dtype)


# --------------------------------------------------------------------------- compiled, on a GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels and autotuning)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side, radius, channels", [(56, 2.0, 64), (28, 2.0, 128), (14, 1.0, 320), (7, 1.0, 512)])
def test_stage_shapes_compiled(side, radius, channels, dtype):
    """The four SPANet stage sizes at batch 2, with autotuning, against the reference."""
    lam = spanet_ops.channel_lams((0.7, 0.8, 0.9), channels)
    basis, weight, constant = _spf_terms(side, side, radius, lam)
    x = _input((2, channels, side, side), dtype, seed=60)
    y = st.lowrank_filter(x.reshape(-1, side, side), basis.basis_h, basis.basis_w, weight, constant)
    _close(y.reshape(x.shape).cpu(), ref.spectral_pooling_filter(x.double().cpu(), radius, lam), dtype)
