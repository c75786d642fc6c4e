"""Progress bars, per-epoch metric logs, plots and the end-of-run summary for spanet-train.

Everything here runs on rank 0 only. Files land in the run folder:
``metrics.csv`` and ``metrics.json`` (one row per epoch, rewritten atomically
from the full history each epoch, so a resumed run never duplicates rows),
``loss.png`` and ``accuracy.png`` (matplotlib, Agg backend) and ``summary.json``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Sequence

from .checkpoint import atomic_write

__all__ = [
    "METRICS_CSV",
    "METRICS_JSON",
    "printer",
    "progress",
    "write_metrics",
    "write_json",
    "write_plots",
    "epoch_line",
    "summary_table",
    "summary_footer",
]

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"


def printer(enabled: bool):
    """A ``print`` that only speaks when ``enabled`` (rank 0) and always flushes."""

    def say(message: str) -> None:
        if enabled:
            print(message, flush=True)

    return say


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps (a no-op object when disabled, e.g. on ranks > 0)."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def _write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_metrics(run_dir: str, history: Sequence[Dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` and ``metrics.json`` from the whole per-epoch history."""
    columns: List[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    _write_text_atomic(os.path.join(run_dir, METRICS_CSV), buf.getvalue())
    write_json(os.path.join(run_dir, METRICS_JSON), list(history))


def write_plots(run_dir: str, history: Sequence[Dict[str, Any]]) -> List[str]:
    """Write ``loss.png`` (train/val loss) and ``accuracy.png`` (val top-1/top-5) per epoch; returns the paths."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    paths = []
    for filename, title, ylabel, series in (
        ("loss.png", "loss", "loss", (("train_loss", "train (training objective)"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)"))),
        ("accuracy.png", "validation accuracy", "accuracy (%)",
         (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)"))),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(run_dir, filename)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def epoch_line(metrics: Dict[str, Any], ema: bool = False) -> str:
    """One log line per epoch."""
    line = (f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
            f"top-1 {metrics['val_top1']:.2f}%, top-5 {metrics['val_top5']:.2f}%, lr {metrics['lr']:.2e}, "
            f"{metrics['train_images_per_sec']:.0f} img/s, {metrics['epoch_time']:.1f}s")
    if ema:
        line += f", EMA top-1 {metrics['ema_val_top1']:.2f}%"
    return line


def summary_table(history: Sequence[Dict[str, Any]], ema: bool = False) -> str:
    """A fixed-width table of the per-epoch metrics."""
    cols = [("epoch", "epoch", "{:d}"), ("train_loss", "train loss", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
            ("val_top1", "top-1 %", "{:.2f}"), ("val_top5", "top-5 %", "{:.2f}")]
    if ema:
        cols.append(("ema_val_top1", "EMA top-1 %", "{:.2f}"))
    cols += [("lr", "lr", "{:.2e}"), ("train_images_per_sec", "img/s", "{:.0f}"), ("epoch_time", "time s", "{:.1f}")]
    rows = [[fmt.format(row[key]) for key, _, fmt in cols] for row in history]
    widths = [max([len(title)] + [len(r[i]) for r in rows]) for i, (_, title, _) in enumerate(cols)]
    out = ["  ".join(title.rjust(w) for (_, title, _), w in zip(cols, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary_footer(summary: Dict[str, Any]) -> str:
    """Final results and where the run's files are."""
    lines = [
        f"final validation top-1 {summary['final_val_top1']:.2f}% (best {summary['best_val_top1']:.2f}% "
        f"at epoch {summary['best_epoch']}), top-5 {summary['final_val_top5']:.2f}%",
        f"checkpoint: {summary['last_checkpoint']} (best: {summary['best_checkpoint']})",
        f"log:        {summary['metrics_csv']} and {summary['metrics_json']}",
        f"plots:      {', '.join(summary['plots'])}",
    ]
    if summary["world_size"] > 1:
        lines.append(f"ranks hold identical weights: {'yes' if summary['ranks_identical'] else 'NO'}")
    return "\n".join(lines)
