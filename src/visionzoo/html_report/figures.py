"""The report's pictures, drawn with matplotlib (Agg) into PNG files beside index.html."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visionzoo.curves import TEXT_ONLY

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CLS_ATTENTION = "[CLS] self-attention"  # the attention figure's default subject (DINO's visualisation)

DPI = 100
GRID_COLUMNS = 8
ANNOTATE_UP_TO = 30  # classes: more, and the matrix is drawn without numbers (plus a top-pairs table)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _text_labels(draw: Callable[..., str]) -> Callable[..., str]:
    """Draw a figure with every label as plain text: class names such as "price $5" or "$x^$"
    are not matplotlib mathtext (which would fail to parse them, or render them as math)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs) -> str:
        with _plt().rc_context(TEXT_ONLY):
            return draw(*args, **kwargs)

    return drawn


def cell_font_size(n: int, side: float) -> float:
    """Points for the numbers in an n x n matrix drawn ``side`` inches wide: about a third of a
    cell's height (72 points per inch; the axes take ~80% of the figure), 6 to 12 points."""
    return float(np.clip(0.8 * side / max(n, 1) * 72 / 3, 6.0, 12.0))


def _save(fig: Figure, path: Path) -> str:
    plt = _plt()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _show(ax: Axes, img: np.ndarray) -> None:
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest" if img.shape[0] <= 64 else "antialiased")
    ax.set_xticks([]), ax.set_yticks([])


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


@_text_labels
def confusion_figure(cm_norm: np.ndarray, classes: list[str], path: Path) -> str:
    """Row-normalised confusion matrix, in % of the true class; the numbers (and class names on
    the axes) up to ANNOTATE_UP_TO classes, in a font that grows as the classes get fewer."""
    plt = _plt()
    n = len(classes)
    side = min(max(5.0, 0.45 * n + 2), 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(100 * cm_norm, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if n <= ANNOTATE_UP_TO:
        font = cell_font_size(n, side)
        labels = min(max(font, 7.0), 10.0)
        ax.set_xticks(range(n), [_short(c) for c in classes], rotation=60, ha="right", fontsize=labels)
        ax.set_yticks(range(n), [_short(c) for c in classes], fontsize=labels)
        for i in range(n):
            for j in range(n):
                v = 100 * cm_norm[i, j]
                if v >= 0.5:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=font,
                            color="white" if v > 50 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (% of each true class)")
    return _save(fig, path)


@_text_labels
def per_class_figure(acc: np.ndarray, classes: list[str], path: Path, show: int = 40) -> str:
    """Horizontal bars of per-class accuracy, worst first (at most ``show`` classes drawn)."""
    plt = _plt()
    order = [i for i in np.argsort(np.nan_to_num(acc, nan=np.inf), kind="stable")][:show]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.2))
    ax.barh(range(len(order)), [acc[i] for i in order], color="tab:blue")
    ax.set_yticks(range(len(order)), [_short(classes[i], 24) for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="accuracy (%)",
           title="Per-class accuracy, worst first" + (f" ({len(order)} of {len(acc)})" if len(acc) > show else ""))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


@_text_labels
def grid_figure(images: np.ndarray, target: np.ndarray, pred: np.ndarray, prob: np.ndarray, classes: list[str],
                title: str, path: Path) -> str:
    """Thumbnails with true / predicted label and the predicted class's probability."""
    plt = _plt()
    n = len(images)
    cols = min(GRID_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.85 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        _show(ax, images[i])
        ax.axis("on")
        ok = target[i] == pred[i]
        ax.set_title(f"true {_short(classes[target[i]], 11)}\npred {_short(classes[pred[i]], 11)} {prob[i]:.2f}",
                     fontsize=7, color="black" if ok else "tab:red")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@_text_labels
def reliability_figure(cal: dict, path: Path) -> str:
    """Reliability diagram: accuracy per confidence bin against the diagonal, plus bin counts."""
    plt = _plt()
    edges, acc, count = cal["edges"], cal["accuracy"], cal["count"]
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 5.6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centres, np.nan_to_num(acc), width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap = np.nan_to_num(cal["confidence"] - acc)
    ax.bar(centres, gap, bottom=np.nan_to_num(acc), width=width, color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability diagram (ECE {cal['ece']:.2f}%)")
    ax.legend(fontsize=8, loc="upper left")
    ax2.bar(centres, count, width=width, color="tab:gray")
    ax2.set(xlim=(0, 1), xlabel="confidence (probability of the predicted class)", ylabel="images")
    return _save(fig, path)


@_text_labels
def attention_figure(images: np.ndarray, maps: np.ndarray, masks: np.ndarray, path: Path,
                     of: str = CLS_ATTENTION) -> str:
    """One row per image: the image, then each head's attention map (``of``: whose) with its
    60%-mass outline."""
    plt = _plt()
    n, heads = maps.shape[0], maps.shape[1]
    fig, axes = plt.subplots(n, heads + 1, figsize=(1.7 * (heads + 1), 1.8 * n), squeeze=False)
    for r in range(n):
        _show(axes[r, 0], images[r])
        axes[r, 0].set_title("image" if r == 0 else "", fontsize=8)
        size = images[r].shape[:2]
        for h in range(heads):
            ax = axes[r, h + 1]
            ax.imshow(maps[r, h], cmap="inferno", interpolation="nearest", extent=(0, size[1], size[0], 0))
            ax.contour(np.kron(masks[r, h], np.ones((8, 8))), levels=[0.5], colors="cyan", linewidths=0.8,
                       extent=(0, size[1], 0, size[0]), origin="upper")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
    fig.suptitle(f"{of} in the last block (cyan: patches holding 60% of it)", fontsize=9)
    return _save(fig, path)


@_text_labels
def neighbours_figure(queries: np.ndarray, query_labels: np.ndarray, neighbours: np.ndarray, sims: np.ndarray,
                      labels: np.ndarray, classes: list[str], path: Path) -> str:
    """One row per query: the validation image and its nearest training images (cosine)."""
    plt = _plt()
    n, k = neighbours.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.8 * n), squeeze=False)
    for r in range(n):
        _show(axes[r, 0], queries[r])
        axes[r, 0].set_title(f"query: {_short(classes[query_labels[r]], 12)}", fontsize=7)
        for j in range(k):
            _show(axes[r, j + 1], neighbours[r, j])
            same = labels[r, j] == query_labels[r]
            axes[r, j + 1].set_title(f"{_short(classes[labels[r, j]], 12)}\ncos {sims[r, j]:.3f}", fontsize=7,
                                     color="black" if same else "tab:red")
    fig.suptitle("Nearest training images in the frozen feature space (red: another class)", fontsize=9)
    return _save(fig, path)
