"""Output: terminal tables, Markdown (appended to benchmarks/RESULTS.md), JSON and a PNG plot."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .measure import machine_line

#: The RESULTS.md section this tool writes under.
RESULTS_SECTION = "## spanet-bench"

Table = Tuple[str, List[str], List[List[str]]]  # title, headers, rows


def _ratio(r: Optional[Dict[str, float]]) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})"


def _ms(t: Dict[str, float]) -> str:
    return f"{t['median']:.3g}" if t["median"] >= 0.1 else f"{t['median']:.2g}"


def tables(results: dict) -> List[Table]:
    """The result tables: operators, SPAM, models, sweep, calibration (those present)."""
    out: List[Table] = []
    ops = results.get("operators") or []
    if ops:
        names = [n for n in ("fft", "lowrank", "auto") if n in ops[0]["time_ms"]]
        headers = ["op", "shape", "r", "dtype", "mode", "ref fp32 ms"] + [f"{n} ms" for n in names]
        headers += [f"{n} speed-up" for n in names] + ["auto runs"]
        rows = [
            [
                r["op"],
                "x".join(map(str, r["shape"])),
                f"{r['radius']:g}",
                r["dtype"],
                r["mode"],
                _ms(r["time_ms"]["reference"]),
                *[_ms(r["time_ms"][n]) for n in names],
                *[_ratio(r["speedup"][n]) for n in names],
                r["auto_algorithm"],
            ]
            for r in ops
        ]
        out.append(("Operators: speed-up over the torch.fft reference (fp32; bf16 rows too), median (IQR)", headers, rows))
    modules = results.get("modules") or []
    if modules:
        names = [n for n in modules[0]["time_ms"] if n != "reference"]
        headers = ["module", "shape", "r", "dtype", "mode", "ref fp32 ms"] + [f"{n} ms" for n in names]
        headers += [f"{n} speed-up" for n in names]
        rows = [
            [
                r["module"],
                "x".join(map(str, r["shape"])),
                f"{r['radius']:g}",
                r["dtype"],
                r["mode"],
                _ms(r["time_ms"]["reference"]),
                *[_ms(r["time_ms"][n]) for n in names],
                *[_ratio(r["speedup"][n]) for n in names],
            ]
            for r in modules
        ]
        out.append(("SPAM (token mixer): speed-up of each spectral_impl over the reference", headers, rows))
    models = results.get("models") or []
    if models:
        base = models[0]["baseline"]
        headers = ["model", "mode", "params M", "img/s median (IQR)", f"vs {base}" if base else "vs -",
                   "step ms", "peak step MiB", "resident MiB"]
        rows = [
            [
                r["model"],
                r["mode"],
                f"{r['params_m']:.1f}",
                f"{r['images_per_s']['median']:.2f} ({r['images_per_s']['q1']:.2f}-{r['images_per_s']['q3']:.2f})",
                _ratio(r["relative"]),
                f"{r['step_ms']['median']:.1f}",
                f"{r['peak_step_memory_mib']:.1f}",
                f"{r['resident_memory_mib']:.1f}",
            ]
            for r in models
        ]
        first = models[0]
        amp = ", bf16 autocast" if first["amp_bf16"] else ", fp32"
        out.append((f"Models: batch {first['batch']} at {first['resolution']}x{first['resolution']}{amp}", headers, rows))
    sweep = results.get("sweep") or []
    if sweep:
        headers = ["size", "C", "mask", "K=L", "fft ms", "lowrank ms", "lowrank speed-up over fft", "faster", "auto", "agree"]
        rows = [
            [
                str(r["size"]),
                str(r["channels"]),
                r["mask"],
                str(r["n_rows"]),
                _ms(r["time_ms"]["fft"]),
                _ms(r["time_ms"]["lowrank"]),
                _ratio(r["lowrank_speedup_over_fft"]),
                r["faster"],
                r["auto"],
                "yes" if r["agree"] else "NO",
            ]
            for r in sweep
        ]
        batch = sweep[0]["batch"]
        out.append((f"Scaling sweep: forward fp32, batch {batch}, lowrank vs fft", headers, rows))
        cross = results.get("crossovers") or {}
        if cross.get("by_size"):
            rows = [
                [str(c["channels"]), c["mask"], ", ".join(map(str, c["lowrank_faster_at"])) or "none",
                 str(c["lowrank_faster_from_size"] or "never")]
                for c in cross["by_size"]
            ]
            out.append(("Crossover by size: where lowrank beats fft",
                        ["C", "mask", "lowrank faster at sizes", "lowrank faster from size on"], rows))
        if cross.get("by_radius"):
            rows = [[str(c["channels"]), str(c["size"]),
                     "none" if c["largest_lowrank_radius"] is None else f"{c['largest_lowrank_radius']:g}"]
                    for c in cross["by_radius"]]
            out.append(("Crossover by radius: lowrank stops winning above this radius",
                        ["C", "size", "largest radius where lowrank wins"], rows))
        cal = results.get("calibration")
        if cal:
            rows = [[
                f"{cal['current_fft_cost_factor']:g}",
                f"{cal['cases_agreeing_current']}/{cal['cases']}",
                f"{cal['weighted_agreement_current']:.1%}",
                f"{cal['fitted_fft_cost_factor']:g} ({cal['equally_good_interval'][0]:g}-{cal['equally_good_interval'][1] or 'inf'})",
                f"{cal['weighted_agreement_fitted']:.1%}",
            ]]
            out.append((
                f"auto's cost model (spanet_ops.plans.FFT_COST_FACTOR['{cal['device_type']}']) against the sweep",
                ["current factor", "cases agreeing", "cost-weighted agreement", "fitted factor (interval)",
                 "fitted agreement"],
                rows,
            ))
    return out


def render_text(results: dict) -> str:
    """Fixed-width tables for the terminal, headed by the machine line."""
    parts = [f"machine: {machine_line(results['machine'])}"]
    for title, headers, rows in tables(results):
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        parts.append("")
        parts.append(title)
        parts.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        parts.append("  ".join("-" * w for w in widths))
        parts.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(parts)


def render_markdown(results: dict) -> str:
    """A Markdown block: heading with the date and settings, machine, method note and tables."""
    machine = results["machine"]
    settings = results["settings"]
    runs = results.get("merged_runs") or [settings["argv"]]
    lines = [
        f"### {machine['time_utc']} — " + " + ".join(f"`spanet-bench {argv}`".replace(" `", "`") for argv in runs),
        "",
        f"Machine: {machine_line(machine)}.",
        "",
        "Medians with interquartile ranges; ratios are per-round paired ratios of candidates timed "
        "interleaved in the same run. bf16 rows compare against the fp32 reference (torch.fft has no bf16 "
        "CPU kernels). Peak memory: " + results["memory_method"] + ".",
    ]
    for title, headers, rows in tables(results):
        lines += ["", f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def append_markdown(path: str, block: str) -> None:
    """Insert ``block`` at the end of the RESULTS_SECTION of ``path`` (or at the end of the file).

    Other sections of the file are left byte for byte as they were.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find(RESULTS_SECTION)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{RESULTS_SECTION}\n\n{block}"
    else:
        nxt = text.find("\n## ", start + len(RESULTS_SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        head = text[:end].rstrip("\n") + "\n\n" + block
        text = head + ("\n" + text[end:] if nxt >= 0 else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, results: dict) -> None:
    """Write ``results`` as indented JSON (non-finite floats are refused, so the file is strict JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, allow_nan=False)
        f.write("\n")


# --------------------------------------------------------------------------- plot
#
# Speed-ups are bars on a linear axis from 0 (bar lengths are then proportional to the
# speed-up) with the interquartile range of the paired ratios as error bars. The sweep's
# lowrank/fft ratio spans orders of magnitude either side of 1, so it is drawn on a log2
# axis whose ticks are plain powers of two (1/4x, 1x, 4x). No text is smaller than 8 pt.

#: Font sizes (points) of the plot: titles, labels, ticks, legends.
FONT_SIZES = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
              "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 11}
#: Marks a measured case where ``auto`` ran the slower of ``lowrank`` and ``fft``.
WRONG_AUTO = dict(marker="X", color="#d62728", markersize=11, markeredgecolor="black", markeredgewidth=0.8,
                  linestyle="none", zorder=5)
WRONG_AUTO_LABEL = "auto chose the slower algorithm"
_PANEL_HEIGHT = 3.4  # inches per row of axes
#: The levels drawn, in order, and their panel titles.
PANELS = {"operators": "operators", "modules": "SPAM module", "models": "models", "sweep": "sweep"}


def plot(path: str, results: dict) -> List[str]:
    """Write the PNG of :func:`figure` to ``path``; returns the panel titles."""
    fig = figure(results)
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [title for level, title in PANELS.items() if results.get(level)]


def figure(results: dict):
    """A matplotlib Figure with one panel per level present: operators, SPAM, models, sweep.

    Each Axes' gid names its panel (``"operators:<op>"``, ``"modules"``, ``"models:<mode>"``,
    ``"sweep:<mask>"``); the markers of wrong ``auto`` choices have gid ``"auto-wrong"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in PANELS if results.get(name)]
    if not panels:
        raise ValueError("nothing to plot: the results hold no level")
    rows = {"operators": len({r["op"] for r in results.get("operators") or []}), "modules": 1, "models": 1,
            "sweep": math.ceil(len({r["mask"] for r in results.get("sweep") or []}) / 3)}
    heights = [rows[p] for p in panels]
    with plt.rc_context(FONT_SIZES):
        fig = plt.figure(figsize=(15, _PANEL_HEIGHT * sum(heights) + 0.6), layout="constrained")
        subfigs = fig.subfigures(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0]
        draw = {"operators": _plot_operators, "modules": _plot_modules, "models": _plot_models, "sweep": _plot_sweep}
        for panel, subfig in zip(panels, subfigs):
            draw[panel](subfig, results[panel])
        for ax in fig.get_axes():  # ticks are made when drawn, after this context: fix their size now
            ax.tick_params(labelsize=FONT_SIZES["xtick.labelsize"])
        fig.suptitle("spanet-bench: " + machine_line(results["machine"]), wrap=True)
    return fig


def _shape_label(row: dict) -> str:
    c, h, w = row["shape"][1:]
    return f"C={c}, {h}x{w}\n{row['mode']}"


def _speedup_bars(ax, groups: List[tuple], series: List[tuple], value) -> dict:
    """Grouped bars of median speed-ups with IQR error bars; ``value(group, series)`` gives a
    ratio dict or None. Returns ``{(group, series): (x, top of error bar)}`` of drawn bars."""
    width = 0.8 / max(len(series), 1)
    drawn, all_medians = {}, [1.0]
    for i, s in enumerate(series):
        xs, medians, lows, highs = [], [], [], []
        for j, g in enumerate(groups):
            ratio = value(g, s)
            if ratio is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            xs.append(x)
            medians.append(ratio["median"])
            lows.append(ratio["median"] - ratio["q1"])
            highs.append(ratio["q3"] - ratio["median"])
            drawn[(g, s)] = (x, ratio["q3"])
        all_medians += medians
        if xs:
            ax.bar(xs, medians, width, yerr=[lows, highs], capsize=3, error_kw=dict(elinewidth=1.0),
                   label=" ".join(s))
    ax.axhline(1.0, color="black", linewidth=0.9)
    ax.set_xticks(range(len(groups)))
    ax.set_xlim(-0.5, len(groups) - 0.5)
    # A noisy case's upper quartile must not flatten every bar: error bars reaching above the
    # axis are cut at its top, where their upper quartile is written.
    top = 1.35 * max(all_medians)
    ax.set_ylim(0, top)
    for (x, q3) in drawn.values():
        if q3 > top:
            ax.annotate(f"q3 {q3:.3g}x", (x, top), xytext=(0, -2), textcoords="offset points", ha="center",
                        va="top", rotation=90, fontsize=8, bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none"))
    ax.yaxis.set_major_formatter(_times_formatter())
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return drawn


def _times_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}x")


def _wrong_auto(row: dict) -> bool:
    """Whether ``auto`` ran the slower of lowrank and fft in this operator case."""
    ratio = (row.get("speedup_vs_fft") or {}).get("lowrank")
    if ratio is None or row.get("auto_algorithm") not in ("lowrank", "fft"):
        return False
    return row["auto_algorithm"] != ("lowrank" if ratio["median"] > 1.0 else "fft")


def _plot_operators(subfig, rows: Sequence[dict]) -> None:
    ops = list(dict.fromkeys(r["op"] for r in rows))
    axes = subfig.subplots(len(ops), 1, squeeze=False)[:, 0]
    names = [n for n in ("fft", "lowrank", "auto") if n in rows[0]["speedup"]]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    series = [(n, "fp32") for n in names if "fp32" in dtypes] + [("auto", d) for d in dtypes if d != "fp32"]
    for ax, op in zip(axes, ops):
        mine = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys((tuple(r["shape"]), r["mode"]) for r in mine))
        by_key = {(tuple(r["shape"]), r["mode"], r["dtype"]): r for r in mine}

        def value(g, s, by_key=by_key):
            row = by_key.get((g[0], g[1], s[1]))
            return row["speedup"].get(s[0]) if row else None

        drawn = _speedup_bars(ax, groups, series, value)
        wrong = [drawn[(g, s)] for g in groups for s in series
                 if s[0] == "auto" and (g, s) in drawn and _wrong_auto(by_key[(g[0], g[1], s[1])])]
        if wrong:
            top = ax.get_ylim()[1]
            ax.plot([x for x, _ in wrong], [y + 0.03 * top for _, y in wrong], gid="auto-wrong",
                    label=WRONG_AUTO_LABEL, **WRONG_AUTO)
        ax.set_xticklabels([_shape_label(by_key[(g[0], g[1], dtypes[0])] if (g[0], g[1], dtypes[0]) in by_key
                                         else next(r for r in mine if (tuple(r["shape"]), r["mode"]) == g))
                            for g in groups])
        ax.set_gid(f"operators:{op}")
        ax.set_ylabel("speed-up over the\nfp32 reference")
        ax.set_title(f"{op}: speed-up over the torch.fft reference (median, IQR error bars)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _plot_modules(subfig, rows: Sequence[dict]) -> None:
    ax = subfig.subplots()
    names = list(rows[0]["speedup"])
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    series = [(n, "fp32") for n in names if "fp32" in dtypes]
    series += [(n, d) for d in dtypes if d != "fp32" for n in names if n == "fused"]
    groups = list(dict.fromkeys((tuple(r["shape"]), r["mode"]) for r in rows))
    by_key = {(tuple(r["shape"]), r["mode"], r["dtype"]): r for r in rows}

    def value(g, s):
        row = by_key.get((g[0], g[1], s[1]))
        return row["speedup"].get(s[0]) if row else None

    _speedup_bars(ax, groups, series, value)
    ax.set_xticklabels([_shape_label(next(r for r in rows if (tuple(r["shape"]), r["mode"]) == g)) for g in groups])
    ax.set_gid("modules")
    ax.set_ylabel("speed-up over\nspectral_impl=reference")
    ax.set_title("SPAM (token mixer): speed-up of each spectral_impl over the reference (median, IQR error bars)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _plot_models(subfig, rows: Sequence[dict]) -> None:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    axes = subfig.subplots(1, len(modes), squeeze=False)[0]
    first = rows[0]
    for ax, mode in zip(axes, modes):
        mine = [r for r in rows if r["mode"] == mode]
        ips = [r["images_per_s"] for r in mine]
        bars = ax.bar(range(len(mine)), [s["median"] for s in ips], 0.6,
                      yerr=[[s["median"] - s["q1"] for s in ips], [s["q3"] - s["median"] for s in ips]],
                      capsize=4, color="#1f77b4" if mode == "infer" else "#ff7f0e")
        ax.bar_label(bars, labels=[f"{s['median']:.3g}" for s in ips], label_type="center", color="white",
                     fontsize=9)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["model"].replace(":", ":\n") for r in mine])
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_gid(f"models:{mode}")
        ax.set_ylabel("images / s")
        ax.set_title(f"{mode}: throughput, batch {first['batch']} at {first['resolution']}px (median, IQR)")


def _log2_ticks(lo: float, hi: float) -> List[float]:
    """Powers of two covering ``[lo, hi]`` (every other one when there are more than nine), 1 among them."""
    a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = 1 if b - a <= 8 else 2
    return [2.0 ** k for k in range(a, b + 1) if k % step == 0]  # 1x (k = 0) is always a tick


def _power_of_two_label(v: float) -> str:
    return f"{v:g}x" if v >= 1 else f"1/{1 / v:g}x"


def _plot_sweep(subfig, rows: Sequence[dict]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    masks = list(dict.fromkeys(r["mask"] for r in rows))
    channels = sorted({r["channels"] for r in rows})
    ncols = min(3, len(masks))
    axes = subfig.subplots(math.ceil(len(masks) / ncols), ncols, squeeze=False, sharey=True).ravel()
    sizes = sorted({r["size"] for r in rows})
    ratios = [r["lowrank_speedup_over_fft"] for r in rows]
    lo, hi = min(min(q["q1"] for q in ratios), 1.0), max(max(q["q3"] for q in ratios), 1.0)
    yticks = _log2_ticks(lo, hi)
    wrong_total = 0
    for ax, mask in zip(axes, masks):
        wrong = []
        for c in channels:
            pts = sorted((r for r in rows if r["mask"] == mask and r["channels"] == c), key=lambda r: r["size"])
            if not pts:
                continue
            q = [r["lowrank_speedup_over_fft"] for r in pts]
            ax.errorbar([r["size"] for r in pts], [s["median"] for s in q],
                        yerr=[[s["median"] - s["q1"] for s in q], [s["q3"] - s["median"] for s in q]],
                        marker="o", markersize=4, capsize=3, label=f"C={c}")
            wrong += [(r["size"], r["lowrank_speedup_over_fft"]["median"]) for r in pts if not r["agree"]]
        if wrong:
            ax.plot(*zip(*wrong), gid="auto-wrong", label=WRONG_AUTO_LABEL, **WRONG_AUTO)
        wrong_total += len(wrong)
        ax.axhline(1.0, color="black", linewidth=0.9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_locator(FixedLocator(yticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _power_of_two_label(v)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
        ax.set_ylim(min(yticks[0], lo) / 1.25, max(yticks[-1], hi) * 1.25)
        ax.grid(alpha=0.3)
        n = sum(1 for r in rows if r["mask"] == mask)
        ax.set_gid(f"sweep:{mask}")
        ax.set_title(f"{mask}: auto wrong in {len(wrong)} of {n}")
        ax.set_xlabel("H = W")
    for ax in axes[len(masks):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes[:len(masks)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    subfig.legend(handles.values(), handles.keys(), loc="outside right upper")
    for ax in axes[::ncols]:
        ax.set_ylabel("lowrank speed-up\nover fft (forward)")
    subfig.suptitle(f"Scaling sweep, batch {rows[0]['batch']}: above 1x lowrank is faster, below fft is; "
                    f"red X: auto chose the slower ({wrong_total} of {len(rows)} cases)")
