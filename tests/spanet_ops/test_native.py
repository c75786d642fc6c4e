"""Native kernels (spanet_ops._C) against the reference.

The C++ CPU kernels and the CUDA kernels register for the ``spanet`` kernel ops;
these tests check that they are built and registered, that every public operator
running on them matches the paper-literal reference across shapes and dtypes,
their gradients (gradcheck, fp64), their op registration (opcheck), and their
error messages. CUDA tests skip cleanly without a GPU.
"""
import importlib
import os
import shutil
import sys

import pytest
import torch

import spanet_ops
from spanet_ops import algorithms, reference
from spanet_ops.plans import circular_plan

backends_module = importlib.import_module("spanet_ops.backends")
NATIVE = backends_module.native_module()
requires_native = pytest.mark.skipif(NATIVE is None, reason="spanet_ops native extension not built")
requires_cuda_device = pytest.mark.skipif(
    not (torch.cuda.is_available() and NATIVE is not None and NATIVE.has_cuda()),
    reason="needs a CUDA device and the native CUDA kernels",
)

# (dtype, atol, rtol) against the fp64 reference of the same (rounded) input.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOLERANCES)
# Spatial sizes: the model's, odd, non-square, smaller than the disc, widths not a multiple of a vector.
SIZES = [(56, 56), (14, 14), (7, 7), (13, 10), (3, 5), (2, 2), (1, 1), (9, 33)]
RADII = [1.0, 2.0, 2.5]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def _nvcc_present() -> bool:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return True
    return shutil.which("nvcc") is not None or os.path.isfile("/usr/local/cuda/bin/nvcc")


# --------------------------------------------------------------------------- build and registration


def test_native_extension_built():
    """The set-up builds the extension (unless told not to), and backends() says so."""
    if os.environ.get("SPANET_BUILD_NATIVE", "1") == "0" or os.environ.get("SPANET_DISABLE_NATIVE") == "1":
        pytest.skip("native build disabled by the environment")
    report = spanet_ops.backends()
    assert report["native_cpu"] == {"available": True, "reason": "built"}, report
    assert NATIVE.build_info()["openmp"] is True


@requires_native
def test_cuda_objects_built_whenever_toolchain_present():
    """A CUDA build of torch plus nvcc means the CUDA kernels are compiled in (GPU or not)."""
    report = spanet_ops.backends()["native_cuda"]
    info = NATIVE.build_info()
    if torch.version.cuda is None or not _nvcc_present() or os.environ.get("SPANET_CPU_ONLY") == "1":
        assert report["available"] is False and report["reason"].startswith("not compiled"), report
        return
    assert info["cuda"] is True and report["available"] is True, (report, info)
    archs = info["cuda_archs"].split(",")
    assert archs and all(a[:2].isdigit() for a in archs), info
    assert report["reason"] == "built for " + ", ".join("sm_" + a for a in archs) + f" (+ PTX compute_{archs[-1]})"
    assert info["cuda_ptx"] == archs[-1]  # PTX of the highest arch, for newer GPUs
    for op in ("circular_fft_filter_kernel", "spg_lowrank_kernel", "spg_lowrank_input_grad_kernel",
               "spg_lowrank_weight_grad_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"spanet::{op}", "CUDA"), op
    # One CUDA implementation per op: the low-rank filter is Triton's (basis form), registered from Python.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("spanet::lowrank_filter_kernel", "CUDA")


@requires_native
def test_cuda_arch_problem_names_the_fix():
    info = NATIVE.build_info()
    if not info["cuda"]:
        assert "built without its CUDA kernels" in NATIVE.cuda_arch_problem(9, 0)
        return
    for arch in info["cuda_archs"].split(","):
        assert NATIVE.cuda_arch_problem(int(arch[:-1]), int(arch[-1])) == ""
    assert NATIVE.cuda_arch_problem(12, 0) == ""  # newer than the PTX: the driver compiles it
    problem = NATIVE.cuda_arch_problem(7, 5)
    assert "sm_75" in problem and "SPANET_CUDA_ARCHS=75" in problem


@requires_native
def test_cpu_kernels_registered():
    """The dispatcher holds CPU kernels (preferred over the Python CompositeExplicitAutograd defaults)."""
    for op in ("lowrank_filter_kernel", "spg_lowrank_kernel", "spg_lowrank_input_grad_kernel",
               "spg_lowrank_weight_grad_kernel", "gelu_slope_kernel", "depthwise_row_weight_grad_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"spanet::{op}", "CPU"), op


def test_backends_reports_reason_for_every_family():
    report = spanet_ops.backends()
    for name in ("pytorch", "native_cpu", "native_cuda"):
        assert isinstance(report[name]["available"], bool) and report[name]["reason"], report


# --------------------------------------------------------------------------- kernel ops vs the PyTorch algorithms


def _lowrank_inputs(height, width, radius, dtype, planes=3, repeat=2, seed=0, compute=None):
    """``x`` and the separable kernel's plan arguments for ``planes`` random balances."""
    gen = torch.Generator().manual_seed(seed)
    compute = compute or (torch.float64 if dtype == torch.float64 else torch.float32)
    lams = tuple(torch.rand(planes, generator=gen).tolist())
    plan = circular_plan(height, width, radius, lams, planes, compute, "cpu")
    x = torch.randn(planes * repeat, height, width, generator=gen, dtype=torch.float64).to(dtype)
    return (x, *plan.separable.kernel_args())


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("radius", RADII)
def test_lowrank_kernel_matches_algorithm(size, radius, dtype):
    x, *args = _lowrank_inputs(*size, radius, dtype)
    out = torch.ops.spanet.lowrank_filter_kernel(x, *args)
    _, *args64 = _lowrank_inputs(*size, radius, dtype, compute=torch.float64)
    expected = algorithms.lowrank_filter(x.double(), *args64)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, expected, dtype)


@requires_native
@pytest.mark.parametrize("size", [(7, 7), (9, 6), (14, 14)])
def test_lowrank_kernel_unfolded_passes_match(size):
    """even_rows = -1 (no parity structure claimed) takes the plain passes: the same result."""
    x, *args = _lowrank_inputs(*size, 2.0, torch.float64)
    folded = torch.ops.spanet.lowrank_filter_kernel(x, *args)
    args[3] = -1
    torch.testing.assert_close(torch.ops.spanet.lowrank_filter_kernel(x, *args), folded, atol=1e-12, rtol=1e-12)


@requires_native
def test_lowrank_kernel_general_mask_and_noncontiguous_planes():
    """A general sparse-deviation mask (many bins, P = 1) and strided input, vs the reference filter."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.full((12, 11), 0.4, dtype=torch.float64)
    mask[torch.rand(12, 11, generator=gen) < 0.1] = 1.7
    x = torch.randn(5, 11, 12, generator=gen, dtype=torch.float64).transpose(-1, -2)
    out = spanet_ops.spectral_mask_filter(x, mask, algorithm="lowrank")
    torch.testing.assert_close(out, reference.spectral_mask_filter(x, mask), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- public operators on the native kernels vs the reference


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("algorithm", ["lowrank", "fft", "auto"])
def test_spectral_pooling_filter_matches_reference(size, dtype, algorithm):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, *size, generator=gen, dtype=torch.float64).to(dtype)
    lam = torch.tensor([0.7, 0.8, 0.9, 0.25])
    out = spanet_ops.spectral_pooling_filter(x, 2.0, lam, algorithm=algorithm)
    assert out.dtype == dtype
    assert_close(out, reference.spectral_pooling_filter(x.double(), 2.0, lam), dtype)


# --------------------------------------------------------------------------- gradients (fp64)


@requires_native
@pytest.mark.parametrize("size", [(7, 7), (6, 9)])
def test_gradcheck_spectral_pooling_filter(size):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.7, 0.2, 0.9])

    def fn(x):
        return spanet_ops.spectral_pooling_filter(x, 2.0, lam, algorithm="lowrank")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@requires_native
def test_gradient_matches_reference_autograd():
    """fp32 gradient of the native path vs autograd through the reference's torch.fft."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 14, 14, generator=gen, requires_grad=True)
    grad = torch.randn(2, 3, 14, 14, generator=gen)
    lam = torch.tensor([0.7, 0.8, 0.9])
    (g_native,) = torch.autograd.grad(spanet_ops.spectral_pooling_filter(x, 2.0, lam, algorithm="lowrank"), x, grad)
    (g_ref,) = torch.autograd.grad(reference.spectral_pooling_filter(x, 2.0, lam), x, grad)
    assert_close(g_native, g_ref, torch.float32)


# --------------------------------------------------------------------------- opcheck with the native kernels registered


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_lowrank_kernel(dtype):
    args = _lowrank_inputs(9, 6, 2.0, dtype)
    torch.library.opcheck(torch.ops.spanet.lowrank_filter_kernel, args)


def test_opcheck_circular_fft_kernel():
    torch.library.opcheck(torch.ops.spanet.circular_fft_filter_kernel, (torch.randn(2, 3, 8, 7),
                                                                        torch.tensor([0.7, 0.8, 0.9]), 4, 4))


@requires_native
def test_opcheck_public_ops_on_native_kernels():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.spanet.spectral_pooling_filter, (x, [0.7, 0.8, 0.9], 2.0, "lowrank"))


# --------------------------------------------------------------------------- errors


@requires_native
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: (a[0][0, 0], *a[1:]), "planes x \\(\\.\\.\\., H, W\\)"),
        (lambda a: (a[0], a[1][:, :-1], *a[2:]), "row_factors must be \\(R, 8\\)"),
        (lambda a: (*a[:5], a[5].double(), *a[6:]), "col_factors must have the dtype of row_factors"),
        (lambda a: (a[0], a[1], a[2] + 7, *a[3:]), "row_factors's index holds"),
        (lambda a: (*a[:4], 9, *a[5:]), "even_rows must be in"),
        (lambda a: (*a[:8], a[8][:, :-1], a[9]), "weight must be \\(P, K, L\\)"),
        (lambda a: (a[0][:5], *a[1:]), "multiple of the mask planes P = 3"),
        (lambda a: (a[0].to(torch.int32), *a[1:]), "x must be float64, float32, float16 or bfloat16"),
    ],
)
def test_lowrank_kernel_errors_name_the_problem(mutate, message):
    args = mutate(_lowrank_inputs(8, 8, 2.0, torch.float32))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.spanet.lowrank_filter_kernel(*args)


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
@requires_cuda_device
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_public_ops_match_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 14, 15, generator=gen, dtype=torch.float64).to(dtype)
    lam = [0.7, 0.8, 0.9, 0.1, 0.5, 0.3]
    expected = reference.spectral_pooling_filter(x.double(), 2.0, lam)
    for algorithm in ("lowrank", "fft"):
        out = spanet_ops.spectral_pooling_filter(x.cuda(), 2.0, lam, algorithm=algorithm)
        assert_close(out.cpu(), expected, dtype)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64).to(dtype).double()
    sizes = spanet_ops.chunk_sizes(6)
    expected = reference.spg_aggregate(x.double(), list(torch.split(weight, sizes, dim=1)), [None] * 3,
                                       (0.7, 0.8, 0.9), 2.0)
    out = spanet_ops.spg_aggregate(x.cuda(), weight.to(dtype).cuda(), None, algorithm="lowrank")
    assert_close(out.cpu(), expected, dtype)


@pytest.mark.gpu
@requires_cuda_device
def test_cuda_kernels_gradcheck_and_opcheck():
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    lam = [0.7, 0.8, 0.9]
    assert torch.autograd.gradcheck(lambda x: spanet_ops.spectral_pooling_filter(x, 2.0, lam, algorithm="fft"), (x,))
    torch.library.opcheck(torch.ops.spanet.circular_fft_filter_kernel,
                          (x.detach().float(), torch.tensor(lam, device="cuda"), 4, 4))
