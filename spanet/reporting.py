"""Progress bars, logs, plots and the end-of-run summary for spanet-train.

Everything here runs on rank 0 only. Files land in the run folder:
``args.yaml`` (the run's flags, as timm's ``train.py`` writes them; ``-c``
reads it back), ``metrics.csv`` and ``metrics.json`` (one row per epoch,
rewritten atomically from the full history each epoch, so a resumed run never
duplicates rows), TensorBoard event files (:class:`RunLoggers`, when
``tensorboard`` is installed), ``loss.png``, ``accuracy.png`` and ``lr.png``
(matplotlib, Agg backend, titled with the run name) and ``summary.json``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .checkpoint import atomic_write

__all__ = [
    "METRICS_CSV",
    "METRICS_JSON",
    "printer",
    "progress",
    "write_metrics",
    "write_json",
    "write_yaml",
    "RunLoggers",
    "write_plots",
    "epoch_line",
    "summary_table",
    "finish_epoch_plot",
    "format_table",
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
    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps on stderr; ``bar.disable`` is true when it shows nothing.

    Shows nothing when not ``enabled`` (e.g. on ranks > 0) or when stderr is
    not a terminal, where each redraw would add a line to the log.
    """
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)


def _write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_yaml(path: str, values: Mapping[str, Any]) -> None:
    """Atomically write ``values`` as block-style YAML (``yaml.safe_dump``, as timm writes ``args.yaml``)."""
    import yaml

    _write_text_atomic(path, yaml.safe_dump(dict(values), default_flow_style=False))


class RunLoggers:
    """TensorBoard (and optionally Weights & Biases) logging of one run; every method is a no-op when disabled.

    Args:
        run_dir: the run folder; TensorBoard event files are written into it.
        enabled: false on ranks > 0.
        tensorboard: True/False, or None for "on when ``tensorboard`` is installed".
        wandb: log to Weights & Biases too (a message, and no-op, when ``wandb`` is not installed).
        run_name: the run's name (the W&B run name).
        config: the run's flags (the W&B config).
        purge_step: on resume, the global step to continue from: TensorBoard drops what a killed run logged
            beyond it, so the curves do not double back.
    """

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: Optional[bool], wandb: bool, run_name: str,
                 config: Mapping[str, Any], purge_step: Optional[int] = None):
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    print("spanet-train: --tensorboard: the tensorboard package is not installed "
                          "(pip install tensorboard); no event files are written", file=sys.stderr)
            else:
                self.tensorboard = SummaryWriter(log_dir=run_dir, purge_step=purge_step)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                print("spanet-train: --log-wandb: wandb is not installed (pip install wandb); not logging to "
                      "Weights & Biases", file=sys.stderr)
            else:
                self.wandb = wandb_lib
                wandb_lib.init(project="spanet", name=run_name, config=dict(config), dir=run_dir)

    @property
    def event_files(self) -> bool:
        """Whether TensorBoard event files are being written."""
        return self.tensorboard is not None

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Scalars at an optimizer step (every ``--log-interval``), x axis: the global step."""
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """One epoch's row of metrics, under ``epoch/`` (x axis: the epoch)."""
        numbers = {k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"epoch/{key}", value, epoch)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({"epoch": epoch, **numbers})

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


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


def write_plots(run_dir: str, history: Sequence[Dict[str, Any]], *, run_name: str = "",
                lr_curve: Sequence[Tuple[float, float]] = ()) -> List[str]:
    """Write ``loss.png`` (train/val loss), ``accuracy.png`` (val top-1/top-5) and ``lr.png`` (the schedule).

    ``lr_curve`` is the learning rate over the run as ``(epoch, lr)`` points
    (fractional epochs for a per-step schedule); the lr logged at each epoch's
    end is marked on it. Every title carries ``run_name``. Returns the paths.
    """
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    suffix = f" — {run_name}" if run_name else ""
    paths = []
    for filename, title, ylabel, series in (
        ("loss.png", "loss", "loss",
         (("train_loss", "train (training objective)"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)"))),
        ("accuracy.png", "validation accuracy", "accuracy (%)",
         (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)"))),
        ("lr.png", "learning rate", "lr", (("lr", "at the end of each epoch"),)),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        if filename == "lr.png" and lr_curve:
            ax.plot([p[0] for p in lr_curve], [p[1] for p in lr_curve], label="schedule")
        for key, label in series:
            if key in history[0]:
                style = dict(marker="o", linestyle="none") if filename == "lr.png" else dict(marker="o")
                ax.plot(epochs, [row[key] for row in history], label=label, **style)
        paths.append(finish_epoch_plot(fig, ax, os.path.join(run_dir, filename), ylabel, title + suffix, fontsize=10))
    return paths


def finish_epoch_plot(fig, ax, path: str, ylabel: str, title: str, **title_kwargs) -> str:
    """Label a per-epoch plot (integer epoch ticks, grid, legend where lines are drawn), save it at ``path``
    and close it; returns ``path``."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: one tick, not fractions
    ax.set_ylabel(ylabel)
    ax.set_title(title, **title_kwargs)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    return format_table(history, cols)


def format_table(history: Sequence[Dict[str, Any]], cols: Sequence[Tuple[str, str, str]]) -> str:
    """Rows of ``history`` as a right-aligned fixed-width table; ``cols`` are ``(key, title, format)``, "-" where a row lacks a value."""
    rows = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in cols] for row in history]
    widths = [max([len(title)] + [len(r[i]) for r in rows]) for i, (_, title, _) in enumerate(cols)]
    out = ["  ".join(title.rjust(w) for (_, title, _), w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary_footer(summary: Dict[str, Any]) -> str:
    """Final results and where the run's files are."""
    lines = [
        f"final validation top-1 {summary['final_val_top1']:.2f}% (best {summary['best_val_top1']:.2f}% "
        f"at epoch {summary['best_epoch']}), top-5 {summary['final_val_top5']:.2f}%",
        f"checkpoint: {summary['last_checkpoint']} (best: {summary['best_checkpoint']})",
        f"weights:    {summary['best_weights']} (the best epoch's, safetensors)",
        f"log:        {summary['metrics_csv']} and {summary['metrics_json']}"
        + (f"; TensorBoard: tensorboard --logdir {summary['run_dir']}" if summary.get("tensorboard") else ""),
        f"flags:      {summary['args_yaml']}",
        f"plots:      {', '.join(summary['plots'])}",
    ]
    if summary["world_size"] > 1:
        lines.append(f"ranks hold identical weights: {'yes' if summary['ranks_identical'] else 'NO'}")
    return "\n".join(lines)
