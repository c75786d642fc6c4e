"""Output: terminal tables, Markdown (appended to benchmarks/RESULTS.md), JSON and a PNG plot."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .measure import machine_line

#: The RESULTS.md section this tool writes under.
RESULTS_SECTION = "## spanet-bench (issue 7)"

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


def plot(path: str, results: dict) -> List[str]:
    """Write a PNG with one panel per level present; returns the panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("operators", "modules", "models", "sweep") if results.get(name)]
    if not panels:
        raise ValueError("nothing to plot: the results hold no level")
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.2 * len(panels)), squeeze=False)
    titles = []
    for ax, panel in zip(axes[:, 0], panels):
        titles.append({"operators": _plot_speedups, "modules": _plot_speedups, "models": _plot_models,
                       "sweep": _plot_sweep}[panel](ax, results[panel], panel))
    fig.suptitle(f"spanet-bench — {machine_line(results['machine'])}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # leave the top strip to the machine line
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return titles


def _plot_speedups(ax, rows: Sequence[dict], level: str) -> str:
    names = [n for n in rows[0]["speedup"]]
    series = [(n, "fp32") for n in names] + [(n, "bf16") for n in names if n in ("auto", "fused")]
    groups = []
    for r in rows:
        key = (r.get("op", r.get("module")), "x".join(map(str, r["shape"][1:])), r["mode"])
        if key not in groups:
            groups.append(key)
    width = 0.8 / max(len(series), 1)
    for i, (name, dtype) in enumerate(series):
        values = []
        for g in groups:
            match = [r for r in rows if (r.get("op", r.get("module")), "x".join(map(str, r["shape"][1:])), r["mode"]) == g
                     and r["dtype"] == dtype]
            values.append(match[0]["speedup"][name]["median"] if match else math.nan)
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=f"{name} {dtype}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g[0].replace('spectral_mask_filter', 'filter').replace('spg_aggregate', 'spg')}\n{g[1]}\n{g[2]}"
                        for g in groups], fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over reference (fp32)")
    title = "operators" if level == "operators" else "SPAM module"
    ax.set_title(f"{title}: speed-up per shape (median of paired ratios)")
    ax.legend(fontsize=7, ncol=len(series))
    return title


def _plot_models(ax, rows: Sequence[dict], level: str) -> str:
    modes = sorted({r["mode"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = []
        for name in names:
            match = [r for r in rows if r["model"] == name and r["mode"] == mode]
            values.append(match[0]["images_per_s"]["median"] if match else math.nan)
        ax.bar([j + i * width for j in range(len(names))], values, width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("images / s")
    first = rows[0]
    ax.set_title(f"models: throughput, batch {first['batch']} at {first['resolution']}px")
    ax.legend(fontsize=8)
    return "models"


def _plot_sweep(ax, rows: Sequence[dict], level: str) -> str:
    # The paired ratio, not absolute times: it is what decides, and load from other
    # processes cancels in it. A line crossing 1 is a crossover between the algorithms.
    channels = sorted({r["channels"] for r in rows})
    masks = list(dict.fromkeys(r["mask"] for r in rows))
    colors = {}
    for mask in masks:
        for c, style in zip(reversed(channels), ("-", "--", ":", "-.")):
            pts = sorted((r for r in rows if r["mask"] == mask and r["channels"] == c), key=lambda r: r["size"])
            if not pts:
                continue
            xs = [r["size"] for r in pts]
            ys = [r["lowrank_speedup_over_fft"]["median"] for r in pts]
            line, = ax.plot(xs, ys, style, color=colors.get(mask), label=f"{mask}, C={c}")
            colors[mask] = line.get_color()
            for x, y, r in zip(xs, ys, pts):  # o: auto picked the faster one; x: it did not
                ax.plot(x, y, "o" if r["agree"] else "x", color=line.get_color())
    ax.axhline(1.0, color="black", linewidth=1.2)
    sizes = sorted({r["size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("H = W")
    ax.set_ylabel("lowrank speed-up over fft (forward)")
    ax.set_title("scaling: above 1 lowrank wins, below fft wins (o: auto chose the faster, x: it did not)")
    ax.legend(fontsize=6, ncol=4)
    return "sweep"
