"""SPANet where users run it: torch.compile, autocast (bf16/fp16, CPU/CUDA), channels_last, torch.export, ONNX.

Each check compares against the eager float32 model, which test_models.py ties
to the reference model. A one-block-per-stage network with the published
stage layout (``TINY``) keeps compilation and export quick; spanet_small itself
runs where it is cheap, and in the slow set.

Tolerances ``(dtype, atol, rtol)`` on logits against eager float32:

| path | dtype | atol | rtol |
| --- | --- | --- | --- |
| compile, channels_last, torch.export | float32 | 1e-4 | 1e-4 |
| ONNX Runtime | float32 | 1e-4 | 1e-4 |
| autocast | bfloat16 | relative L2 error 5e-2 | |
| autocast | float16 | relative L2 error 1e-2 | |
"""
import importlib.util

import pytest
import torch

import spanet  # noqa: F401
import timm
from spanet.models import SPANet, export_onnx, export_program
from tests.spanet.reference_model import randomize_

TINY = dict(depths=(1, 1, 1, 1), dims=(24, 48, 96, 192), num_classes=17)
SIZES = [(32, 32), (45, 64), (67, 51)]
TOL = dict(atol=1e-4, rtol=1e-4)
AUTOCAST_REL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _x(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(SPANet(**TINY), seed=11).eval()


# ------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_and_backward(tiny, backend):
    torch._dynamo.reset()
    compiled = torch.compile(tiny, fullgraph=True, backend=backend)
    for size in SIZES[:2]:
        x = _x(2, 3, *size, seed=1)
        expected = tiny(x)
        got = compiled(x)
        torch.testing.assert_close(got, expected, **TOL)
        (g_eager,) = torch.autograd.grad(expected.square().sum(), tiny.network[0][0].token_mixer.pws[1].weight)
        (g_comp,) = torch.autograd.grad(got.square().sum(), tiny.network[0][0].token_mixer.pws[1].weight)
        torch.testing.assert_close(g_comp, g_eager, **TOL)


@pytest.mark.slow
def test_compile_inductor_spanet_small():
    model = randomize_(timm.create_model("spanet_small"), seed=2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = _x(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **TOL)


# ------------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", SIZES)
def test_autocast(tiny, device, dtype, size):
    model = tiny.to(device)
    x = _x(2, 3, *size, seed=2, device=device)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast(device_type=device, dtype=dtype):
            got = model(x)
    model.to("cpu")
    assert torch.isfinite(got).all()
    assert _rel(got, expected) < AUTOCAST_REL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_autocast_spanet_small_at_224_with_backward(device, dtype):
    model = randomize_(timm.create_model("spanet_small"), seed=3).to(device).eval()
    x = _x(1, 3, 224, 224, seed=3, device=device)
    expected = model(x)
    with torch.autocast(device_type=device, dtype=dtype):
        got = model(x)
    assert _rel(got, expected) < AUTOCAST_REL[dtype]
    got.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------ channels_last


def test_channels_last_spanet_small():
    model = randomize_(timm.create_model("spanet_small"), seed=4).eval()
    x = _x(2, 3, 64, 72, seed=4)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, **TOL)


def test_channels_last_backward(tiny):
    x = _x(2, 3, 45, 64, seed=5)
    expected = tiny(x)
    (g_ref,) = torch.autograd.grad(expected.sum(), tiny.network[2][0].token_mixer.proj_in.weight)
    cl = SPANet(**TINY).eval()
    cl.load_state_dict(tiny.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    got = cl(x.contiguous(memory_format=torch.channels_last))
    (g_cl,) = torch.autograd.grad(got.sum(), cl.network[2][0].token_mixer.proj_in.weight)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(g_cl, g_ref, **TOL)


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("size", SIZES[1:])
def test_torch_export(tiny, size):
    x = _x(1, 3, *size, seed=6)
    with torch.no_grad():
        expected = tiny(x)
    program = export_program(tiny, (x,))
    assert any("spanet.spg_aggregate" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), expected, **TOL)
    # Decomposed for runtimes without the custom op: the low-rank path in ATen ops.
    decomposed = export_program(tiny, (x,), decompose=True)
    assert not any("spanet" in str(n.target) for n in decomposed.graph.nodes)
    torch.testing.assert_close(decomposed.module()(x), expected, **TOL)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="torch.onnx.export(dynamo=True) needs the onnx and onnxscript packages",
)
def test_onnx_export_runs_in_onnxruntime(tiny, tmp_path):
    x = _x(1, 3, 45, 64, seed=7)
    path = tmp_path / "spanet_tiny.onnx"
    export_onnx(tiny, (x,), path=str(path))
    import onnx

    graph = onnx.load(str(path)).graph
    assert not any(node.domain.startswith("spanet") for node in graph.node)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), tiny(x), **TOL)
    # A dynamic batch: one file serves every batch size at the exported height and width.
    dynamic = tmp_path / "spanet_tiny_dynamic.onnx"
    x2 = _x(2, 3, 45, 64, seed=9)  # an example batch of 1 would specialise the dim
    export_onnx(tiny, (x2,), path=str(dynamic), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])
    x3 = _x(3, 3, 45, 64, seed=8)
    (got,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), tiny(x3), **TOL)


def test_empty_batch(tiny):
    with torch.no_grad():
        out = tiny(torch.randn(0, 3, 64, 64))
    assert out.shape == (0, tiny.num_classes)


def test_export_with_a_dynamic_batch(tiny):
    batch = torch.export.Dim("batch", min=1, max=64)
    x = _x(2, 3, 48, 40, seed=8)
    program = export_program(tiny, (x,), decompose=True, dynamic_shapes=({0: batch},))
    x5 = _x(5, 3, 48, 40, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x5), tiny(x5), **TOL)
    with pytest.raises(ValueError, match="dim 2 cannot be dynamic; only the batch dim"):
        export_program(tiny, (x,), dynamic_shapes=({2: torch.export.Dim("height")},))
