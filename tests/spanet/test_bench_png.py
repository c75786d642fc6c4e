"""spanet-bench's PNG, read through matplotlib's artists: linear speed-up bars whose heights are
the medians and whose error bars span the interquartile range, readable text (no font below
8 pt, no ``6x10^0`` ticks), and a mark on every case where ``auto`` ran the slower algorithm.

The results are written by hand (known values), so the test needs no benchmark run.
"""
import struct

import matplotlib
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.text import Text

from spanet.bench import report

matplotlib.use("Agg")

MACHINE = dict(cpu="test CPU", torch_threads=1, gpu=None, torch="2.x", triton=None, timm="1.x", spanet="0.1.0",
               git_commit=None, kernels={"pytorch": True, "native_cpu": True})


def _ratio(median, q1, q3):
    return {"median": median, "q1": q1, "q3": q3}


def _op_row(op, dtype, fft, lowrank, auto, lowrank_vs_fft):
    return {"op": op, "shape": [1, 8, 6, 6], "radius": 1.0, "dtype": dtype, "mode": "fwd",
            "auto_algorithm": "lowrank",
            "speedup": {"fft": _ratio(*fft), "lowrank": _ratio(*lowrank), "auto": _ratio(*auto)},
            "speedup_vs_fft": {"lowrank": _ratio(*lowrank_vs_fft), "auto": _ratio(*lowrank_vs_fft)}}


def _sweep_row(size, mask, median, agree):
    faster = "lowrank" if median > 1 else "fft"
    return {"size": size, "channels": 4, "batch": 1, "mask": mask, "n_rows": 3, "n_cols": 3,
            "lowrank_speedup_over_fft": _ratio(median, median * 0.8, median * 1.25), "faster": faster,
            "auto": faster if agree else ("fft" if faster == "lowrank" else "lowrank"), "agree": agree}


RESULTS = {
    "machine": MACHINE,
    "operators": [
        _op_row("spectral_mask_filter", "fp32", (2.0, 1.5, 2.5), (6.0, 5.0, 7.0), (5.5, 5.0, 6.5), (3.0, 2.5, 3.5)),
        _op_row("spectral_mask_filter", "bf16", (2.0, 1.8, 2.2), (4.0, 3.0, 5.0), (4.5, 4.0, 5.0), (2.0, 1.5, 2.5)),
        # auto ran lowrank where fft was faster (lowrank/fft 0.5): a wrong choice, fp32 only.
        _op_row("spg_aggregate", "fp32", (1.2, 1.1, 1.3), (0.6, 0.5, 0.7), (0.7, 0.6, 0.8), (0.5, 0.4, 0.6)),
        _op_row("spg_aggregate", "bf16", (1.1, 1.0, 1.2), (1.3, 1.2, 1.4), (1.4, 1.3, 1.5), (1.2, 1.1, 1.3)),
    ],
    "modules": [
        {"module": "SPAM", "shape": [1, 8, 6, 6], "radius": 1.0, "dtype": dtype, "mode": "fwd",
         "speedup": {"fft": _ratio(1.1, 1.0, 1.2), "fused": _ratio(*fused)}}
        for dtype, fused in (("fp32", (1.8, 1.6, 2.0)), ("bf16", (0.4, 0.3, 0.5)))
    ],
    "models": [
        {"model": name, "mode": mode, "batch": 1, "resolution": 32, "images_per_s": _ratio(ips, ips * 0.9, ips * 1.1)}
        for name, base in (("spanet_small", 10.0), ("convnext_tiny", 12.0)) for mode, ips in
        (("train", base), ("infer", 3 * base))
    ],
    "sweep": [
        _sweep_row(8, "circular r=1", 3.0, True),
        _sweep_row(16, "circular r=1", 0.8, False),  # fft faster, auto ran lowrank
        _sweep_row(8, "general", 0.1, True),
        _sweep_row(16, "general", 1.5, False),  # lowrank faster, auto ran fft
    ],
}


@pytest.fixture(scope="module")
def fig():
    figure = report.figure(RESULTS)
    figure.canvas.draw()  # lays out the ticks and their labels
    yield figure
    import matplotlib.pyplot as plt

    plt.close(figure)


def _axes(fig, gid):
    (ax,) = [a for a in fig.get_axes() if a.get_gid() == gid]
    return ax


def _wrong_marks(ax):
    return [(x, y) for line in ax.get_lines() if line.get_gid() == "auto-wrong"
            for x, y in zip(line.get_xdata(), line.get_ydata())]


@pytest.mark.parametrize("gid", ["operators:spectral_mask_filter", "operators:spg_aggregate", "modules",
                                 "models:train", "models:infer"])
def test_bars_are_linear_from_zero_with_iqr_error_bars(fig, gid):
    ax = _axes(fig, gid)
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars and len(errors) == len(bars)
    for bar, err in zip(bars, errors):
        heights = [p.get_height() for p in bar.patches]
        (segments,) = [c.get_segments() for c in err.lines[2]]
        for height, seg in zip(heights, segments):
            low, high = sorted(y for _, y in seg)
            # the hand-written IQRs: q1/q3 bracket the median (for models, 0.9x and 1.1x)
            assert low < height < high


def test_bar_heights_and_error_bars_are_the_known_values(fig):
    ax = _axes(fig, "operators:spg_aggregate")
    by_label = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert [p.get_height() for p in by_label["lowrank fp32"].patches] == [0.6]
    assert [p.get_height() for p in by_label["auto bf16"].patches] == [1.4]
    errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [sorted(y for _, y in c.lines[2][0].get_segments()[0]) for c in errors]
    assert [0.5, 0.7] in [[round(v, 12) for v in s] for s in spans]  # lowrank fp32's q1, q3


def test_wrong_auto_choices_are_marked(fig):
    assert _wrong_marks(_axes(fig, "operators:spectral_mask_filter")) == []
    marks = _wrong_marks(_axes(fig, "operators:spg_aggregate"))
    assert len(marks) == 1
    auto_fp32 = next(c for c in _axes(fig, "operators:spg_aggregate").containers
                     if isinstance(c, BarContainer) and c.get_label() == "auto fp32")
    patch = auto_fp32.patches[0]
    assert marks[0][0] == pytest.approx(patch.get_x() + patch.get_width() / 2)
    assert marks[0][1] > 0.8  # above the bar's upper quartile
    assert _wrong_marks(_axes(fig, "sweep:circular r=1")) == [(16, 0.8)]
    assert _wrong_marks(_axes(fig, "sweep:general")) == [(16, 1.5)]
    assert "auto wrong in 1 of 2" in _axes(fig, "sweep:general").get_title()


def test_sweep_axis_has_plain_power_of_two_ticks(fig):
    ax = _axes(fig, "sweep:circular r=1")  # the first of a row labels the shared y axis
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "1x" in labels
    assert set(labels) <= {"1/16x", "1/8x", "1/4x", "1/2x", "1x", "2x", "4x", "8x"}
    assert ax.yaxis.get_minor_locator().tick_values(0.1, 10) == []
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"]


def test_text_is_readable(fig):
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert len(texts) > 50
    small = sorted({(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 8})
    assert not small, f"text below 8 pt: {small[:5]}"
    math = [t.get_text() for t in texts if "$" in t.get_text() or "10^" in t.get_text()]
    assert not math, f"mathtext/exponent labels: {math[:5]}"
    ops_labels = [t.get_text() for t in _axes(fig, "operators:spg_aggregate").get_yticklabels()]
    assert ops_labels and all(label.endswith("x") for label in ops_labels)


def test_plot_writes_the_png(tmp_path):
    path = tmp_path / "out" / "bench.png"
    assert report.plot(str(path), RESULTS) == ["operators", "SPAM module", "models", "sweep"]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1500 and height > 1500  # 15 in at 100 dpi; five rows of axes
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot(str(path), {"machine": MACHINE})
