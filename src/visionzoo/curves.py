"""curves.png: how a run went, drawn from its metrics.jsonl with matplotlib."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visionzoo.run_folder import read_metrics

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TOPK = 5
# Labels are text: a class or run name with "$" must not be read as mathtext (matplotlib would
# render "$x^$" as math or fail to parse "price $5"). Figures are drawn inside this rc context.
TEXT_ONLY = {"text.parse_math": False}
# A loss whose finite values span more than this factor is drawn on a log axis (a diverging
# run's 1e10 would otherwise flatten the rest of the curve onto zero).
LOG_SCALE_SPAN = 100.0


def step_to_epoch(steps: list[float], epochs: list[dict]) -> np.ndarray:
    """Positions on the epoch axis of optimizer steps: epoch records carry the global step at
    their end, so step s between the ends of epochs e-1 and e maps linearly into (e-1, e].
    Older metrics without it assume equal epochs."""
    at = np.asarray(steps, dtype=float)
    ends = [(r["step"], r["epoch"]) for r in epochs if r.get("step") is not None]
    if not ends:
        return at / (max(steps, default=0) / max(len(epochs), 1) or 1)
    xs, ys = zip(*([(0, 0)] + ends), strict=True)  # (step, epoch) pairs
    per_epoch = xs[-1] / ys[-1] if ys[-1] else 1.0
    # Steps logged after the last epoch end (a run still going, or one killed mid-epoch) continue
    # at the average epoch length.
    return np.where(at <= xs[-1], np.interp(at, xs, ys), ys[-1] + (at - xs[-1]) / max(per_epoch, 1e-9))


def _finite(xs: list, ys: list) -> tuple[list, list]:
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    return [x for x, _ in keep], [y for _, y in keep]


def curves_title(recipe: str, precision: str, devices: int, task: str = "supervised") -> str:
    """The title of a run's curves: ``fashion_mnist (bf16, 1 device)``, ``dino_fashion_mnist
    (DINO, k-NN accuracy; fp32, 2 devices)``."""
    where = f"{precision}, {devices} device{'' if devices == 1 else 's'}"
    return f"{recipe} ({'DINO, k-NN accuracy; ' if task == 'dino' else ''}{where})"


def topk_of(run_dir: Path) -> int:
    """The k of the run's "Acc@5": top-5, or top-N with fewer than 5 classes (from the classes
    model.safetensors names; 5 when the run has none yet)."""
    from visionzoo.checkpoint import WEIGHTS, read_metadata
    from visionzoo.errors import UserError

    if not (Path(run_dir) / WEIGHTS).is_file():
        return TOPK
    try:
        classes = read_metadata(run_dir).get("classes") or []
    except UserError:
        return TOPK
    return min(TOPK, len(classes)) if classes else TOPK


def plot_curves(run_dir: Path, title: str | None = None, topk: int | None = None) -> Path:
    """Draw ``curves_figure`` of a run's metrics.jsonl into ``run_dir/curves.png``; return its path.
    ``topk``: the k of the run's Acc@5 records (default: from the run's class count)."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    with plt.rc_context(TEXT_ONLY):
        fig = curves_figure(read_metrics(run_dir / "metrics.jsonl"), title or run_dir.name,
                            topk if topk is not None else topk_of(run_dir))
        out = run_dir / "curves.png"
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _restarts(axes: np.ndarray, records: list[dict], epochs: list[dict]) -> None:
    """A dashed line on every panel where a session of a resumed run starts (its resume records),
    named in the loss panel's legend."""
    steps = sorted({r["step"] for r in records if r.get("kind") == "resume" and isinstance(r.get("step"), int)})
    if not steps:
        return
    xs = step_to_epoch(steps, epochs)
    for a in axes.flat:
        # The throughput bars stand at whole epochs, bar e for epoch e: a point x of the epoch
        # axis (x = 2: the end of epoch 2) lies between bars at x + 0.5.
        shift = 0.5 if a is axes[1, 1] else 0.0
        for i, (x, step) in enumerate(zip(xs, steps, strict=True)):
            label = (f"resumed at step {step}" if len(steps) == 1 else f"restart {i + 1}: step {step}") \
                if a is axes[0, 0] else None
            a.axvline(x + shift, color="tab:red", ls="--", lw=1, alpha=0.6, label=label)


def curves_figure(records: list[dict], title: str, topk: int = TOPK) -> Figure:
    """Loss (per logged step and per epoch; log scale when it spans decades), accuracy with the
    best epoch marked (the "acc5" records named top-``topk``), learning rate per logged step, and
    throughput, against epochs; a dashed line where each restart of a resumed run begins."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    step_x = list(step_to_epoch([r["step"] for r in steps], epochs)) if steps else []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(title, fontsize=13)
    _loss_panel(axes[0, 0], steps, step_x, epochs)
    _accuracy_panel(axes[0, 1], epochs, topk)
    _lr_panel(axes[1, 0], steps, step_x, epochs)
    ax = axes[1, 1]
    tput = [r for r in epochs if r.get("img_s") is not None and math.isfinite(r["img_s"])]
    if tput:
        ax.bar([r["epoch"] for r in tput], [r["img_s"] for r in tput], color="tab:cyan", width=0.6)
    ax.set(title="Training throughput", xlabel="epoch", ylabel="images / s (all devices)")

    _restarts(axes, records, epochs)
    if axes[0, 0].get_legend_handles_labels()[0]:  # the loss panel's, with the restarts
        axes[0, 0].legend(fontsize=8)
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        a.margins(y=0.08)
    fig.tight_layout()
    return fig


def _loss_panel(ax: Axes, steps: list[dict], step_x: list[float], epochs: list[dict]) -> None:
    losses: list[float] = []
    if steps:
        xs, ys = _finite(step_x, [r.get("loss") for r in steps])
        ax.plot(xs, ys, color="tab:blue", alpha=0.4, lw=0.9, label="per logged step")
        losses += ys
    for key, style, color, label in (("train_loss", "o-", "tab:blue", "train (epoch mean)"),
                                     ("val_loss", "s-", "tab:orange", "validation")):
        xs, ys = _finite([r["epoch"] for r in epochs], [r.get(key) for r in epochs])
        if ys:
            ax.plot(xs, ys, style, color=color, label=label, ms=4)
            losses += ys
    positive = [v for v in losses if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_SPAN:
        ax.set_yscale("log")
    ax.set(title="Loss", xlabel="epoch", ylabel="loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))


def _accuracy_panel(ax: Axes, epochs: list[dict], topk: int) -> None:
    val = [r for r in epochs if r.get("acc1") is not None]
    if val:
        best = max(val, key=lambda r: r["acc1"])
        ax.plot([r["epoch"] for r in val], [r["acc1"] for r in val], "o-", color="tab:green", ms=4,
                label=f"val Acc@1 (best {best['acc1']:.2f}% at epoch {best['epoch']})")
        ax.plot([best["epoch"]], [best["acc1"]], "*", color="tab:red", ms=12, zorder=5)
        if val[0].get("acc5") is not None:
            ax.plot([r["epoch"] for r in val], [r["acc5"] for r in val], "s--", color="tab:olive", ms=4,
                    label=f"val Acc@{topk}")
    if epochs and epochs[0].get("train_acc1") is not None:
        ax.plot([r["epoch"] for r in epochs], [r["train_acc1"] for r in epochs], "^:", color="tab:gray", ms=4,
                label="train Acc@1")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")


def _lr_panel(ax: Axes, steps: list[dict], step_x: list[float], epochs: list[dict]) -> None:
    if steps and any(r.get("lr") is not None for r in steps):
        ax.plot(step_x, [r.get("lr") for r in steps], ".-", color="tab:purple", ms=3, label="per logged step")
    elif epochs:
        ax.plot([r["epoch"] for r in epochs], [r["lr"] for r in epochs], "o-", color="tab:purple", ms=4)
    ax.set(title="Learning rate", xlabel="epoch", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
