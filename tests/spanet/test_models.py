"""The five SPANet variants: registration, published layout, equality with the reference model, any size, MACs.

Tolerances, as ``(dtype, atol, rtol)`` on the logits against the reference model:

| comparison | dtype | atol | rtol |
| --- | --- | --- | --- |
| fast model vs reference model, any size | float32 | 1e-4 | 0 |
| ``spectral_impl`` variants vs reference | float32 | 1e-4 | 0 |
| grad checkpointing vs plain (outputs, grads) | float32 | 1e-5 | 1e-5 |
| training gradients vs reference model | float32 | 2e-5 x max abs of each gradient | 1e-4 |

MACs (conv + linear, ``torch.utils.flop_counter``) lie within 1% of docs/spec.md §3.
"""
import copy
import functools
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import spanet  # noqa: F401  (registers the models)
import spanet_ops
import timm
from spanet.models import SPAM, set_spectral_impl
from tests.spanet.reference_model import RefSPANet, randomize_

VARIANTS = ["spanet_small", "spanet_medium", "spanet_mediumX", "spanet_base", "spanet_baseX"]
DEFAULT_VARIANTS = ["spanet_small", "spanet_base"]
# The published keys, shapes and parameter counts of the five variants.
with open(os.path.join(os.path.dirname(__file__), "data", "official_state_dict_layout.json")) as _f:
    LAYOUT = json.load(_f)
SPEC_GMACS = {
    "spanet_small": 4.61, "spanet_medium": 6.79, "spanet_mediumX": 8.98, "spanet_base": 11.94, "spanet_baseX": 15.78,
}
ATOL_FP32 = 1e-4


@functools.lru_cache(maxsize=None)
def _pristine(name):
    """One freshly created model per variant, shared by the tests that only read it (creation is slow)."""
    return timm.create_model(name).eval()


def _variant_params(default):
    return [v if v in default else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]


@pytest.fixture(scope="module")
def small_pair():
    """A spanet_small with non-trivial weights, and the reference model holding the same state dict."""
    model = randomize_(timm.create_model("spanet_small"), seed=0).eval()
    ref = RefSPANet("spanet_small").eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


# ----------------------------------------------------------------------------------------- registration


def test_import_registers_the_five_variants():
    assert sorted(timm.list_models("spanet_*")) == sorted(VARIANTS)
    for name in VARIANTS:
        assert timm.is_model(name)
        assert timm.models.get_pretrained_cfg(name).url.endswith(name.replace("_", "-") + ".pth")


def test_create_model_kwargs():
    model = timm.create_model("spanet_small", num_classes=10, drop_path_rate=0.2, in_chans=1)
    assert model.head.weight.shape == (10, 512)
    assert model.patch_embed.proj.weight.shape == (64, 1, 7, 7)
    blocks = [b for i in range(0, 7, 2) for b in model.network[i]]
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
    # Linear over all blocks, from 0 to the rate (docs/spec.md §3).
    assert rates == pytest.approx(torch.linspace(0, 0.2, 24).tolist())
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_bad_spectral_impl_is_rejected():
    with pytest.raises(ValueError, match="spectral_impl"):
        timm.create_model("spanet_small", spectral_impl="fast")
    model = timm.create_model("spanet_small")
    with pytest.raises(ValueError, match="spectral_impl"):
        set_spectral_impl(model, "nope")


# ----------------------------------------------------------------------------------------- published layout


@pytest.mark.parametrize("name", VARIANTS)
def test_published_layout(name):
    model = _pristine(name)
    published = LAYOUT[name]
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, s) for k, s in published["state_dict"]]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == published["trainable_params"]
    assert sum(v.numel() for v in state.values()) == published["state_dict_numel"]
    # The filter tensors are the published centred masks at 224, and not trainable.
    params = dict(model.named_parameters())
    for stage, (size, radius) in enumerate(zip((56, 28, 14, 7), (2, 2, 1, 1))):
        for i, lam in enumerate(torch.arange(0.7, 0.9, 0.1).tolist()):
            key = f"network.{2 * stage}.0.token_mixer.sps.{i}.filter"
            assert key not in params
            expected = spanet_ops.reference.circular_mask(size, size, radius, lam).unsqueeze(0)
            assert torch.equal(state[key], expected), key


@pytest.mark.parametrize("name", _variant_params(["spanet_small"]))
def test_state_dict_moves_both_ways_with_the_published_layout(name):
    model = randomize_(timm.create_model(name), seed=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ref = RefSPANet(name)  # the published layout, with the filters as Parameters as published
    ref.load_state_dict(saved, strict=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(ref.state_dict(), strict=True)
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("name", _variant_params(DEFAULT_VARIANTS))
def test_matches_reference_model_at_224(name):
    model = randomize_(timm.create_model(name), seed=2).eval()
    ref = RefSPANet(name).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected = model(x), ref(x)
    assert expected.abs().max() > 0.1  # non-trivial logits
    torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 49), (95, 96), (40, 130)])
def test_matches_reference_model_at_any_size(small_pair, size):
    model, ref = small_pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("impl", ["lowrank", "fft", "reference"])
def test_spectral_impls_agree(small_pair, impl):
    model, ref = small_pair
    x = torch.randn(2, 3, 61, 72, generator=torch.Generator().manual_seed(5))
    try:
        set_spectral_impl(model, impl)
        assert all(m.spectral_impl == impl for m in model.modules() if isinstance(m, SPAM))
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=ATOL_FP32, rtol=0)
    finally:
        model.set_spectral_impl("fused")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_training_gradients_match_reference_model(small_pair, memory_format):
    # The training path: fused spg_aggregate, PointwiseConv's GEMMs (channels_last) and the saved-slope GELU.
    model, ref = small_pair
    model, ref = copy.deepcopy(model).train(), copy.deepcopy(ref).train()
    x = torch.randn(2, 3, 45, 62, generator=torch.Generator().manual_seed(6))
    grad = torch.randn(2, 1000, generator=torch.Generator().manual_seed(7))
    x_fast = x.contiguous(memory_format=memory_format).requires_grad_()
    x_ref = x.clone().requires_grad_()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ref_params = dict(ref.named_parameters())
    got = torch.autograd.grad(model(x_fast), [x_fast, *params.values()], grad)
    expected = torch.autograd.grad(ref(x_ref), [x_ref, *(ref_params[name] for name in params)], grad)
    assert len(params) > 100
    for name, g, e in zip(["input", *params], got, expected):
        # Relative to each gradient's scale: the paths sum in different orders (GEMM vs conv, low-rank vs FFT).
        torch.testing.assert_close(g, e, atol=2e-5 * float(e.abs().max()), rtol=1e-4, msg=name)


def test_forward_changes_no_module_state(small_pair):
    model, _ = small_pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(1, 3, 45, 77))
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_cast_keeps_the_published_balances():
    # lam is float32 in the published code: a half-precision model must still use exactly those values.
    model = timm.create_model("spanet_small").to(torch.bfloat16)
    mixer = model.network[0][0].token_mixer
    assert mixer.lams == torch.arange(0.7, 0.9, 0.1).tolist()  # Python floats: no cast reaches them


# ----------------------------------------------------------------------------------------- MACs


def _gmacs(model):
    # A meta-device copy: the flop counter needs shapes only.
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return counter.get_total_flops() / 2e9


@pytest.mark.parametrize("name", VARIANTS)
def test_macs_at_224_match_spec(name):
    model = copy.deepcopy(_pristine(name)).to("meta")
    assert _gmacs(model) == pytest.approx(SPEC_GMACS[name], rel=0.01)


def test_macs_of_the_reference_path_match_spec():
    # The published path's convs (FFTs uncounted) give the same count as the fused op's registered formula.
    model = set_spectral_impl(copy.deepcopy(_pristine("spanet_small")).to("meta"), "reference")
    assert _gmacs(model) == pytest.approx(SPEC_GMACS["spanet_small"], rel=0.01)


