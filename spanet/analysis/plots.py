"""The figures of ``spanet-analyze``: spectrum maps (Fig. 1), relative log amplitude (Fig. 2), context maps (Fig. 4)
and class activation maps.

Each function takes plain values (numpy arrays, lists, names) and writes one PNG.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["MAX_SPECTRUM_COLUMNS", "overlay", "plot_cams", "plot_context_maps", "plot_relative_log_amplitude",
           "plot_spectrum_maps"]

#: At most this many layers per model in spectrum_maps.png (evenly spaced, first and last included).
MAX_SPECTRUM_COLUMNS = 12
_DPI = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _evenly_spaced(count: int, most: int) -> List[int]:
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _short(name: str) -> str:
    # "network.4.11.token_mixer" -> "4.11": the stage/block indices say where the layer is.
    parts = [p for p in name.split(".") if p.isdigit()]
    return ".".join(parts) if parts else name


def plot_spectrum_maps(models: Sequence[Dict], path: str) -> None:
    """A grid, one row per model, one column per layer (up to :data:`MAX_SPECTRUM_COLUMNS`), of spectrum maps.

    ``models``: dicts with ``"label"`` and ``"layers"``, a list of ``{"name", "spectrum_map" (H, W array)}``.
    Layers whose maps are smaller than 3x3 (no frequency but the zero one on the diagonal) are shown
    only when a model has no other.
    """
    plt = _pyplot()
    rows = []
    for model in models:
        layers = [layer for layer in model["layers"] if min(np.asarray(layer["spectrum_map"]).shape) >= 3]
        layers = layers or list(model["layers"])
        shown = [layers[i] for i in _evenly_spaced(len(layers), MAX_SPECTRUM_COLUMNS)]
        rows.append((model["label"], shown, len(model["layers"])))
    columns = max(len(shown) for _, shown, _ in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 0.8, 1.3 * len(rows) + 0.5),
                             squeeze=False, dpi=_DPI)
    for row_axes, (label, shown, total) in zip(axes, rows):
        for ax in row_axes:
            ax.set_axis_off()
        for ax, layer in zip(row_axes, shown):
            ax.imshow(np.asarray(layer["spectrum_map"]), cmap="viridis", interpolation="nearest")
            ax.set_title(_short(layer["name"]), fontsize=7)
        row_axes[0].set_axis_on()
        row_axes[0].set_xticks([])
        row_axes[0].set_yticks([])
        row_axes[0].set_ylabel(f"{label}\n{len(shown)} of {total} layers", fontsize=7)
    fig.suptitle("Fourier spectrum maps of the token mixers' outputs (log amplitude, zero frequency centred)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_relative_log_amplitude(models: Sequence[Dict], path: str) -> None:
    """One panel per model (curves coloured by depth) and a last panel of Delta log amplitude at pi against depth.

    ``models``: dicts with ``"label"`` and ``"layers"``, a list of ``{"name", "depth", "frequency",
    "relative_log_amplitude", "delta_at_pi"}``; layers whose ``delta_at_pi`` is None (maps too small for a
    frequency axis) are left out.
    """
    plt = _pyplot()
    from matplotlib import cm
    from matplotlib.colors import Normalize

    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.0 * (len(models) + 1), 2.8), dpi=_DPI, squeeze=False)
    axes = axes[0]
    norm = Normalize(0.0, 1.0)
    for ax, model in zip(axes, models):
        for layer in model["layers"]:
            if layer["delta_at_pi"] is None:
                continue
            ax.plot(np.asarray(layer["frequency"]) / math.pi, layer["relative_log_amplitude"],
                    color=cm.plasma(norm(layer["depth"])), linewidth=1.2)
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1])
        ax.set_xticklabels(["0", "0.5π", "π"])
        ax.set_xlabel("frequency")
        ax.set_ylabel("Δ log amplitude")
        ax.set_title(model["label"], fontsize=8)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="plasma"), ax=axes[len(models) - 1], label="normalised depth")
    depth_ax = axes[-1]
    for model in models:
        points = [(layer["depth"], layer["delta_at_pi"]) for layer in model["layers"]
                  if layer["delta_at_pi"] is not None]
        if points:
            depth_ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2, label=model["label"])
    depth_ax.set_xlim(0, 1)
    depth_ax.set_xlabel("normalised depth")
    depth_ax.set_ylabel("Δ log amplitude at π")
    depth_ax.set_title("high-frequency amplitude", fontsize=8)
    depth_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` ``(H, W, 3)`` in [0, 1] blended with ``heat`` ``(H, W)`` (scaled to [0, 1]) in the jet colormap."""
    from matplotlib import cm

    span = float(heat.max() - heat.min())
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    return np.clip((1 - alpha) * image + alpha * cm.jet(scaled)[..., :3], 0.0, 1.0)


def _image_grid(rows: Sequence[Dict], title: str, path: str) -> None:
    # rows: {"label", "tiles": [(title, (H, W, 3) array)]}
    plt = _pyplot()
    columns = max(len(r["tiles"]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.25 * columns + 0.6, 1.4 * len(rows) + 0.4),
                             squeeze=False, dpi=_DPI)
    for row_axes, row in zip(axes, rows):
        for ax in row_axes:
            ax.set_axis_off()
        for ax, (tile_title, tile) in zip(row_axes, row["tiles"]):
            ax.imshow(tile, interpolation="nearest")
            ax.set_title(tile_title, fontsize=6)
        row_axes[0].set_axis_on()
        row_axes[0].set_xticks([])
        row_axes[0].set_yticks([])
        row_axes[0].set_ylabel(row["label"], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_context_maps(rows: Sequence[Dict], path: str) -> None:
    """Per row (a SPANet and an image): the image, then its context map of each chosen block overlaid on it.

    ``rows``: dicts with ``"label"``, ``"image"`` (H, W, 3 in [0, 1]) and ``"contexts"``, a list of
    ``(block name, (H, W) array)``.
    """
    tiles = [
        {"label": r["label"], "tiles": [("image", r["image"])]
         + [(_short(name), overlay(r["image"], ctx)) for name, ctx in r["contexts"]]}
        for r in rows
    ]
    _image_grid(tiles, "SPAM context maps (mean |ctx| over channels), last block of each stage", path)


def plot_cams(rows: Sequence[Dict], path: str) -> None:
    """One row per model: each image with its class activation map overlaid, titled with the explained class.

    ``rows``: dicts with ``"label"`` and ``"tiles"``, a list of ``(title, image (H, W, 3), cam (H, W))``.
    """
    tiles = [{"label": r["label"], "tiles": [(t, overlay(img, cam)) for t, img, cam in r["tiles"]]} for r in rows]
    _image_grid(tiles, "class activation maps", path)
