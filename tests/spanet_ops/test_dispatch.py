"""The dispatch layer: few aten ops per call, no host reads on the hot path, one path through the modules.

Also the defects of hostile inputs fixed with it: devices, radii at the edge of
float range, empty inputs, and plans that must not hold dense bases they do not use.
"""
import math
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import spanet_ops
from spanet_ops import plans, reference

#: aten ops that read tensor data on the host (a stream sync on CUDA).
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::equal", "aten::nonzero", "aten::is_nonzero"}


def _small_problem(requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 7, 7, generator=gen, requires_grad=requires_grad)
    weight = torch.randn(6, 6, generator=gen, requires_grad=requires_grad)
    bias = torch.randn(6, generator=gen, requires_grad=requires_grad)
    return x, weight, bias


MASK = spanet_ops.circular_mask(7, 7, 1, 0.7)
PUBLIC_CALLS = {
    "spectral_mask_filter": lambda x, w, b: spanet_ops.spectral_mask_filter(x, MASK),
    "spectral_pooling_filter": lambda x, w, b: spanet_ops.spectral_pooling_filter(x, 1, 0.7),
    "spectral_pooling_filter_per_channel": lambda x, w, b: spanet_ops.spectral_pooling_filter(x, 1, [0.6] * 6),
    "spg_aggregate": lambda x, w, b: spanet_ops.spg_aggregate(x, w, b, radius=1),
    "spg_aggregate_channels_last": lambda x, w, b: spanet_ops.spg_aggregate(
        x.contiguous(memory_format=torch.channels_last), w, b, radius=1
    ),
}


def _events(fn):
    fn()  # the plan is cached by the first call
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.events()


# --------------------------------------------------------------------------- aten ops per call


@pytest.mark.parametrize("name", list(PUBLIC_CALLS))
def test_public_op_forward_dispatches_at_most_eight_ops(name):
    """The op's implementation dispatches at most 8 operators (its direct children in the profile)."""
    x, weight, bias = _small_problem()
    call = PUBLIC_CALLS[name]
    events = _events(lambda: call(x, weight, bias))
    roots = [e for e in events if e.name.startswith("spanet::") and e.cpu_parent is None]
    assert len(roots) == 1, [e.name for e in roots]
    children = [c.name for c in roots[0].cpu_children]
    assert len(children) <= 8, children


# --------------------------------------------------------------------------- no host reads


class _NoHostReads:
    """Make every Python-level host read of tensor data raise while active."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")

    def __enter__(self):
        self.saved = {m: getattr(torch.Tensor, m) for m in self.METHODS}

        def forbidden(name):
            def read(self_, *args, **kwargs):
                raise AssertionError(f"host read Tensor.{name}() on the hot path")

            return read

        for m in self.METHODS:
            setattr(torch.Tensor, m, forbidden(m))
        return self

    def __exit__(self, *exc):
        for m, fn in self.saved.items():
            setattr(torch.Tensor, m, fn)


def _assert_no_host_reads(fn):
    fn()  # plans are built (and may read) on the first call only
    with _NoHostReads():
        events = _events(fn)
    reads = sorted({e.name for e in events} & HOST_READS)
    assert not reads, reads


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("name", list(PUBLIC_CALLS))
def test_public_ops_read_no_tensor_data_on_the_host(name, backward):
    x, weight, bias = _small_problem(requires_grad=backward)
    call = PUBLIC_CALLS[name]

    def run():
        out = call(x, weight, bias)
        if backward:
            out.backward(torch.ones_like(out))

    _assert_no_host_reads(run)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_model_step_reads_no_tensor_data_on_the_host(training, channels_last):
    """A whole spanet_small forward (and backward in training) at 64x64 issues no host read."""
    import timm

    import spanet  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model("spanet_small", num_classes=10).train(training).to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)

    def step():
        out = model(x)
        if training:
            out.sum().backward()

    _assert_no_host_reads(step)


def test_spf_with_balances_that_require_grad():
    """A balance tensor that requires grad takes the mask's linear form: exact, and differentiable in lam."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    lam32 = torch.tensor([0.7, 0.2, 0.9], requires_grad=True)  # float32, as the published balances
    out = spanet_ops.spectral_pooling_filter(x, 2.0, lam32)
    expected = reference.spectral_pooling_filter(x.detach(), 2.0, lam32.detach().tolist())
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    lam64 = lam32.detach().double().requires_grad_()  # float64 balances keep float64 (gradcheck needs it)
    assert torch.autograd.gradcheck(lambda x, lam: spanet_ops.spectral_pooling_filter(x, 2.0, lam), (x, lam64))


# --------------------------------------------------------------------------- one path through the modules


def _module_stacks(fn):
    """Every stack of spanet_ops modules (outermost first, consecutive repeats collapsed) seen during ``fn()``."""
    stacks = []

    def modules_of(frame):
        names = []
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith("spanet_ops"):
                names.append(name)
            frame = frame.f_back
        collapsed = []
        for name in reversed(names):
            if not collapsed or collapsed[-1] != name:
                collapsed.append(name)
        return collapsed

    def tracer(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("spanet_ops"):
            stacks.append(modules_of(frame))

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return stacks


@pytest.mark.parametrize("channels_last", [False, True])
def test_x_takes_one_path_through_spg_aggregate(channels_last):
    """Public function, family module, plan, kernel: no module is entered again once the path left it."""
    x, weight, bias = _small_problem(requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    spanet_ops.spg_aggregate(x, weight, bias, radius=1)  # plan cached

    def run():
        spanet_ops.spg_aggregate(x, weight, bias, radius=1).sum().backward()

    stacks = _module_stacks(run)
    assert stacks
    for stack in stacks:
        assert len(stack) == len(set(stack)), f"re-entered a module: {stack}"
        assert stack[0] == "spanet_ops.ops.spg", stack
    entered = [stack[1] for stack in stacks if len(stack) > 1]
    # Checks, the balances' conversion, the plan, the kernels (and the layout helper of the PyTorch kernels).
    allowed = {"spanet_ops.validation", "spanet_ops.masks", "spanet_ops.plans", "spanet_ops.ops.kernels",
               "spanet_ops.algorithms"}
    assert set(entered) <= allowed, set(entered)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("algorithm", ["auto", "fft", "lowrank", "reference"])
def test_mask_on_another_device_is_refused(algorithm):
    x = torch.randn(2, 3, 8, 8)
    mask = torch.ones(8, 8, device="meta")
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        spanet_ops.spectral_mask_filter(x, mask, algorithm=algorithm)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("algorithm", ["auto", "fft", "lowrank", "reference"])
def test_spg_parameters_on_another_device_are_refused(which, algorithm):
    x, weight, bias = _small_problem()
    if which == "weight":
        weight = weight.to("meta")
    else:
        bias = bias.to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but x is on cpu"):
        spanet_ops.spg_aggregate(x, weight, bias, radius=1, algorithm=algorithm)


# --------------------------------------------------------------------------- radii


def test_tiny_radius_keeps_the_centre_inside():
    """r = 1e-160: r**2 underflows in floats; the exact decision keeps d = 0 < r (lam, not the boundary's 1/3)."""
    mask = spanet_ops.circular_mask(5, 5, 1e-160, 0.7)
    assert mask[2, 2] == torch.tensor(0.7)
    torch.testing.assert_close(mask, reference.circular_mask(5, 5, 1e-160, 0.7), atol=0, rtol=0)
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        spanet_ops.spectral_pooling_filter(x, 1e-160, 0.7), reference.spectral_pooling_filter(x, 1e-160, 0.7),
        atol=1e-12, rtol=1e-12,
    )


@pytest.mark.parametrize("radius", [1.35e154, 1e300, sys.float_info.max])
def test_huge_radius_covers_every_bin(radius):
    """r**2 overflows a float: every bin is inside, with no OverflowError."""
    mask = spanet_ops.circular_mask(6, 7, radius, 0.7)
    assert torch.equal(mask, torch.full((6, 7), 0.7))
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    lam32 = float(torch.tensor(0.7, dtype=torch.float32))  # the published mask's float32 value
    torch.testing.assert_close(spanet_ops.spectral_pooling_filter(x, radius, 0.7), lam32 * x, atol=1e-12, rtol=0)


def test_integer_radius_boundary_is_exact():
    """Bins at d == r exactly (here (0, +-5), (+-3, +-4), (+-4, +-3), (+-5, 0)) hold 1/3."""
    mask = spanet_ops.circular_mask(16, 16, 5, 0.8)
    assert int((mask == torch.tensor(1 / 3, dtype=torch.float32)).sum()) == 12


@pytest.mark.parametrize("radius", [True, "2", None])
def test_radius_must_be_a_number(radius):
    with pytest.raises(TypeError, match="radius must be a real number"):
        spanet_ops.circular_mask(8, 8, radius, 0.7)
    with pytest.raises(TypeError, match="radius must be a real number"):
        spanet_ops.spectral_pooling_filter(torch.ones(8, 8), radius, 0.7)
    with pytest.raises(TypeError, match="radius must be a real number"):
        spanet_ops.spg_aggregate(torch.ones(1, 3, 8, 8), torch.ones(3, 3), None, radius=radius)


@pytest.mark.parametrize("radius", [-1.0, float("nan"), float("inf")])
def test_raw_ops_refuse_bad_radii(radius):
    x, weight, bias = _small_problem()
    with pytest.raises(ValueError, match="radius must be a finite non-negative number"):
        torch.ops.spanet.spectral_pooling_filter(x, [0.7], radius, "auto")
    with pytest.raises(ValueError, match="radius must be a finite non-negative number"):
        torch.ops.spanet.spg_aggregate(x, weight, bias, [0.7, 0.8, 0.9], radius, "auto")


@pytest.mark.parametrize("lams", [[float("nan")], [-0.5], [1.5], []])
def test_raw_ops_refuse_bad_balances(lams):
    x, weight, bias = _small_problem()
    with pytest.raises(ValueError, match="lam"):
        torch.ops.spanet.spectral_pooling_filter(x, lams, 1.0, "auto")


@pytest.mark.parametrize("algorithm", [None, 3, "fast"])
def test_algorithm_must_be_a_known_name(algorithm):
    x = torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match="unknown algorithm"):
        spanet_ops.spectral_mask_filter(x, torch.ones(4, 4), algorithm=algorithm)
    with pytest.raises(ValueError, match="unknown algorithm"):
        spanet_ops.spectral_pooling_filter(x, 1, 0.7, algorithm=algorithm)
    with pytest.raises(ValueError, match="unknown algorithm"):
        spanet_ops.spg_aggregate(torch.ones(1, 3, 4, 4), torch.ones(3, 3), None, algorithm=algorithm)


# --------------------------------------------------------------------------- empty inputs


EMPTY_SHAPES = [(0, 3, 7, 7), (2, 0, 7, 7)]


@pytest.mark.parametrize("algorithm", ["auto", "fft", "lowrank", "reference"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_or_channels_give_empty_results(shape, algorithm):
    x = torch.randn(shape, requires_grad=True)
    mask = spanet_ops.circular_mask(7, 7, 2, 0.7)
    for out in (
        spanet_ops.spectral_mask_filter(x, mask, algorithm=algorithm),
        spanet_ops.spectral_pooling_filter(x, 2, 0.7, algorithm=algorithm),
    ):
        assert out.shape == x.shape and out.numel() == 0
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape


@pytest.mark.parametrize("algorithm", ["auto", "fft", "lowrank", "reference"])
def test_spg_on_an_empty_batch(algorithm):
    x = torch.randn(0, 6, 7, 7, requires_grad=True)
    weight = torch.randn(5, 6, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    out = spanet_ops.spg_aggregate(x, weight, bias, algorithm=algorithm)
    assert out.shape == (0, 5, 7, 7)
    grads = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert grads[0].shape == x.shape
    assert torch.equal(grads[1], torch.zeros(5, 6)) and torch.equal(grads[2], torch.zeros(5))


@pytest.mark.parametrize("shape", [(2, 3, 0, 7), (2, 3, 7, 0)])
def test_empty_plane_is_refused_like_torch_fft(shape):
    with pytest.raises(ValueError, match="empty plane"):
        spanet_ops.spectral_pooling_filter(torch.randn(shape), 2, 0.7)
    with pytest.raises(ValueError, match="empty plane"):
        spanet_ops.spectral_mask_filter(torch.randn(shape), torch.ones(shape[-2:]))


# --------------------------------------------------------------------------- memory of plans


def test_large_radius_builds_no_dense_basis():
    """512x512 at r = 20: auto picks fft, and no (J, H*W) basis is built for it (it would take ~1 GB)."""
    plans.clear_plan_caches()
    x = torch.randn(1, 2, 512, 512)
    spanet_ops.spectral_pooling_filter(x, 20, 0.7)
    spanet_ops.spectral_pooling_filter(x, 20, 0.7, algorithm="fft")
    out = spanet_ops.spg_aggregate(x[:, :1].expand(1, 3, 512, 512), torch.randn(2, 3), None, radius=20.0)
    assert out.shape == (1, 2, 512, 512)
    geometry = plans.disc_geometry(512, 512, 20, torch.float32, "cpu")
    assert "_real_basis" not in vars(geometry)
    assert plans.plan_cache().nbytes < 16 * 2**20, plans.plan_cache().nbytes
    plans.clear_plan_caches()


def test_plan_cache_is_bounded_by_bytes():
    cache = plans.PlanCache(max_bytes=3 * 4096)
    for i in range(10):
        cache.put(i, torch.zeros(1024))  # 4 KiB each
    assert len(cache) == 3 and cache.nbytes == 3 * 4096
    assert cache.lookup(9) is not None and cache.lookup(0) is None
    cache.put("big", torch.zeros(8 * 1024))  # larger than the bound: kept alone until the next entry
    assert cache.nbytes <= 3 * 4096 or len(cache) == 1


def test_large_radius_matches_reference():
    """Radius 16 at 40x40 (a disc of 797 bins): every algorithm still equals the paper's composition."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 40, 40, generator=gen, dtype=torch.float64)
    expected = reference.spectral_pooling_filter(x, 16.0, 0.8)
    for algorithm in ("auto", "fft", "lowrank"):
        got = spanet_ops.spectral_pooling_filter(x, 16.0, 0.8, algorithm=algorithm)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    expected = reference.spg_aggregate(x, list(torch.split(weight, [1, 1, 1], dim=1)), [None] * 3, (0.7, 0.8, 0.9),
                                       16.0)
    for algorithm in ("auto", "fft", "lowrank"):
        got = spanet_ops.spg_aggregate(x, weight, None, radius=16.0, algorithm=algorithm)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    assert math.isfinite(float(expected.abs().max()))


# --------------------------------------------------------------------------- registration of the device kernels


def test_triton_serves_the_basis_filter_on_cuda(monkeypatch):
    """basis_filter_kernel's CUDA kernel is registered through torch.library and hands the call to Triton's launcher."""
    from spanet_ops.ops import kernels

    assert torch._C._dispatch_has_kernel_for_dispatch_key("spanet::basis_filter_kernel", "CUDA")
    calls = []

    class FakeTriton:
        @staticmethod
        def basis_filter(*args):
            calls.append(args)
            return args[0]

    monkeypatch.setattr(kernels, "triton_module", lambda: FakeTriton)
    planes = torch.randn(1, 3, 4, 5)
    basis, scale, constant = torch.randn(2, 20), torch.randn(1, 2), torch.randn(1)
    assert torch.equal(kernels._basis_filter_cuda(planes, basis, scale, constant), planes)
    assert len(calls) == 1 and calls[0][0].shape == (3, 4, 5)  # the launcher takes (N, H, W)
    monkeypatch.setattr(kernels, "triton_module", lambda: None)  # no Triton: PyTorch's GEMMs
    expected = torch.ops.spanet.basis_filter_kernel(planes, basis, scale, constant)
    torch.testing.assert_close(kernels._basis_filter_cuda(planes, basis, scale, constant), expected)
