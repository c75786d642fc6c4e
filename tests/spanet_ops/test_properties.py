"""Property tests (hypothesis) over shapes, masks and strides, against the reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spanet_ops
from spanet_ops import reference

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def filter_problems(draw):
    height = draw(st.integers(1, 17))
    width = draw(st.integers(1, 17))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, height, width, generator=gen, dtype=torch.float64)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-2)[..., ::2, :]
    kind = draw(st.sampled_from(["circular", "random", "sparse"]))
    mask_lead = lead[len(lead) - draw(st.integers(0, len(lead))):]
    if kind == "circular":
        radius = draw(st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0]))
        mask = spanet_ops.circular_mask(height, width, radius, draw(st.floats(0, 1)))
    elif kind == "random":
        mask = torch.rand(*mask_lead, height, width, generator=gen, dtype=torch.float64)
    else:  # a constant plus a few arbitrary (possibly asymmetric) bins
        mask = torch.full((*mask_lead, height, width), draw(st.floats(-2, 2)), dtype=torch.float64)
        for _ in range(draw(st.integers(0, 4))):
            mask[..., draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = draw(st.floats(-2, 2))
    centered = draw(st.booleans())
    return x, mask, centered


@SETTINGS
@given(filter_problems(), st.sampled_from(["auto", "fft", "lowrank"]))
def test_any_problem_matches_reference(problem, algorithm):
    x, mask, centered = problem
    y = spanet_ops.spectral_mask_filter(x, mask, centered=centered, algorithm=algorithm)
    expected = reference.spectral_mask_filter(x, mask.double(), centered)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)


@SETTINGS
@given(filter_problems())
def test_self_adjoint(problem):
    """<filter(x), g> == <x, filter(g)> for every real mask (docs/spec.md §1 fact 4)."""
    x, mask, centered = problem
    g = torch.randn_like(x)
    lhs = (spanet_ops.spectral_mask_filter(x, mask, centered=centered) * g).sum()
    rhs = (x * spanet_ops.spectral_mask_filter(g, mask, centered=centered)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=1e-9)
