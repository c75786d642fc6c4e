"""torch.library.opcheck on every spanet op, and torch.compile(fullgraph=True) against eager."""
import pytest
import torch
from torch.library import opcheck

import spanet_ops

from .samples import SMALL_SAMPLES, make

OPCHECK_SAMPLES = [s for s in SMALL_SAMPLES if s.x_shape[-1] * s.x_shape[-2] <= 100]


@pytest.mark.parametrize("algorithm", ["auto", "fft", "lowrank"])
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=str)
def test_opcheck_spectral_mask_filter(sample, algorithm):
    x, mask = make(sample, torch.float32, requires_grad=True)
    opcheck(torch.ops.spanet.spectral_mask_filter.default, (x, mask, sample.centered, algorithm))


def test_opcheck_spectral_mask_grad():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    g = torch.randn(2, 3, 6, 7, requires_grad=True)
    mask = torch.rand(3, 6, 7)
    opcheck(torch.ops.spanet.spectral_mask_grad.default, (x, g, mask, True))


@pytest.mark.parametrize("lam", [[0.7], [0.7, 0.8, 0.9]])
def test_opcheck_spectral_pooling_filter(lam):
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    opcheck(torch.ops.spanet.spectral_pooling_filter.default, (x, lam, 2.0, "auto"))


def test_opcheck_spg_aggregate():
    x = torch.randn(2, 6, 7, 8, requires_grad=True)
    weight = torch.randn(5, 6, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    lam = [0.7, 0.8, 0.9]
    opcheck(torch.ops.spanet.spg_aggregate.default, (x, weight, bias, lam, 2.0, "auto"))
    opcheck(torch.ops.spanet.spg_aggregate.default, (x, weight, None, lam, 1.0, "fft"))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    opcheck(torch.ops.spanet.spg_aggregate.default, (x_cl, weight, bias, lam, 2.0, "lowrank"))


@pytest.mark.parametrize("algorithm", ["lowrank", "fft"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck_spg_aggregate_gradient_ops(algorithm, layout):
    grad = torch.randn(2, 5, 7, 8).contiguous(memory_format=layout).requires_grad_()
    x = torch.randn(2, 6, 7, 8).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(5, 6, requires_grad=True)
    lam = [0.7, 0.8, 0.9]
    opcheck(torch.ops.spanet.spg_aggregate_input_grad.default, (grad, weight, lam, 2.0, algorithm))
    opcheck(torch.ops.spanet.spg_aggregate_weight_grad.default, (grad, x, lam, 2.0, algorithm))


def test_opcheck_kernel_ops():
    from spanet_ops.plans import circular_plan

    plan = circular_plan(9, 8, 2.0, (0.7, 0.8, 0.9), 3, torch.float32, "cpu")
    planes = torch.randn(6, 9, 8)
    utils = ("test_schema", "test_faketensor")
    opcheck(torch.ops.spanet.lowrank_filter_kernel.default, (planes, *plan.separable.kernel_args()), test_utils=utils)
    opcheck(torch.ops.spanet.basis_filter_kernel.default, (planes, *plan.basis_terms), test_utils=utils)
    x = torch.randn(2, 3, 9, 8)
    weight = torch.randn(5, 3)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        g = torch.randn(2, 5, 9, 8).contiguous(memory_format=layout)
        opcheck(torch.ops.spanet.spg_lowrank_kernel.default, (xl, weight, torch.randn(5), *plan.spg_terms),
                test_utils=utils)
        opcheck(torch.ops.spanet.spg_lowrank_input_grad_kernel.default, (g, weight, *plan.spg_terms),
                test_utils=utils)
        opcheck(torch.ops.spanet.spg_lowrank_weight_grad_kernel.default, (g, xl, *plan.spg_terms), test_utils=utils)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    mask = spanet_ops.circular_mask(14, 14, 1, 0.8)
    weight = torch.randn(5, 6)

    def fn(x, m):
        y = spanet_ops.spectral_mask_filter(x, m) * 2
        z = spanet_ops.spectral_pooling_filter(y, 2, 0.7)
        ctx = spanet_ops.spg_aggregate(z, weight, None, (0.7, 0.8, 0.9), 1.0)
        return ctx.sum(dim=1)

    x = torch.randn(2, 6, 14, 14, requires_grad=True)
    m = mask.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out = fn(x, m)
    compiled_out = compiled(x, m)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    eager_grads = torch.autograd.grad(eager_out.sum(), (x, m))
    compiled_grads = torch.autograd.grad(compiled(x, m).sum(), (x, m))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    mask = spanet_ops.circular_mask(10, 12, 2, 0.7)

    def fn(x):
        return spanet_ops.spectral_mask_filter(x.relu(), mask) + 1

    x = torch.randn(3, 10, 12)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x), atol=1e-5, rtol=1e-5)
