"""torch.fx on the SPANet variants: the checks of timm's FX model tests, and torchvision's feature extraction.

timm's ``tests/test_models.py`` traces each model with its registered leaf modules and
functions (``get_notrace_modules``/``get_notrace_functions``) through torchvision's
``create_feature_extractor``, then (forward) requires the traced output to equal the
eager one exactly, (backward) requires a gradient for every parameter, and (torchscript)
scripts the traced module. timm runs them at the model's ``min_input_size`` (32x32 here).
spanet_small runs by default, all five variants with SPANET_SLOW=1.
"""
import pytest
import torch
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import spanet  # noqa: F401
import timm
from timm.models import get_notrace_functions, get_notrace_modules

VARIANTS = ["spanet_small", "spanet_medium", "spanet_mediumX", "spanet_base", "spanet_baseX"]
NAMES = [v if v == "spanet_small" else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]
SIZE = (3, 32, 32)  # timm's FX tests: min_input_size when the default exceeds their 128 target


def _tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx_model(model, train=False):
    """The traced model returning its last node (in train mode, the nodes feeding the output), as timm does."""
    kwargs = _tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    train_return_nodes, eval_return_nodes = [train_nodes[-1]], [eval_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**kwargs).trace(model).nodes))
        outputs = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-names.index(name)] for name in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx(name):
    model = timm.create_model(name).eval()
    with torch.inference_mode():
        x = torch.randn(1, *SIZE)
        expected = model(x)
        traced = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(traced, expected)
    assert not torch.isnan(expected).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_backward_fx(name):
    model = timm.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    traced = _fx_model(model, train=True)
    out = torch.cat(tuple(traced(torch.randn(2, *SIZE)).values()))
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(p.grad.numel() for p in traced.parameters()) == num_params
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx_torchscript(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = torch.randn(1, *SIZE)
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(x).values()))
        expected = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_torchvision_feature_extractor_gives_the_stage_maps():
    model = timm.create_model("spanet_small").eval()
    nodes = {f"network.{2 * i}": f"stage{i}" for i in range(4)}
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=_tracer_kwargs())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = extractor(x)
        _, expected = model.forward_intermediates(x)
    assert list(maps) == ["stage0", "stage1", "stage2", "stage3"]
    for got, want in zip(maps.values(), expected):
        assert torch.equal(got, want)


def test_timm_fx_feature_extraction():
    """timm's FX feature wrapper (``feature_cls="fx"``) gives the same maps as the default getter."""
    torch.manual_seed(0)
    fx = timm.create_model("spanet_small", features_only=True, feature_cfg={"feature_cls": "fx"}).eval()
    torch.manual_seed(0)
    getter = timm.create_model("spanet_small", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(fx(x), getter(x)):
            assert torch.equal(got, want)


def test_reference_impl_traces_too():
    model = timm.create_model("spanet_small", spectral_impl="reference").eval()
    x = torch.randn(1, *SIZE)
    with torch.inference_mode():
        assert torch.equal(torch.cat(tuple(_fx_model(model)(x).values())), model(x))
