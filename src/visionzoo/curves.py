"""curves.png: how a run went, drawn from its metrics.jsonl with matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from visionzoo.run_folder import read_metrics

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
    xs, ys = zip(*([(0, 0)] + ends))
    per_epoch = xs[-1] / ys[-1] if ys[-1] else 1.0
    # Steps logged after the last epoch end (a run still going, or one killed mid-epoch) continue
    # at the average epoch length.
    return np.where(at <= xs[-1], np.interp(at, xs, ys), ys[-1] + (at - xs[-1]) / max(per_epoch, 1e-9))


def _finite(xs: list, ys: list) -> tuple[list, list]:
    keep = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [x for x, _ in keep], [y for _, y in keep]


def plot_curves(run_dir: Path, title: str | None = None) -> Path:
    """Draw ``curves_figure`` of a run's metrics.jsonl into ``run_dir/curves.png``; return its path."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig = curves_figure(read_metrics(run_dir / "metrics.jsonl"), title or run_dir.name)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curves_figure(records: list[dict], title: str):
    """Loss (per logged step and per epoch; log scale when it spans decades), accuracy with the
    best epoch marked, learning rate per logged step, and throughput, against epochs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    step_x = list(step_to_epoch([r["step"] for r in steps], epochs)) if steps else []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(title, fontsize=13)
    ax = axes[0, 0]
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    ax = axes[0, 1]
    val = [r for r in epochs if r.get("acc1") is not None]
    if val:
        best = max(val, key=lambda r: r["acc1"])
        ax.plot([r["epoch"] for r in val], [r["acc1"] for r in val], "o-", color="tab:green", ms=4,
                label=f"val Acc@1 (best {best['acc1']:.2f}% at epoch {best['epoch']})")
        ax.plot([best["epoch"]], [best["acc1"]], "*", color="tab:red", ms=12, zorder=5)
        if val[0].get("acc5") is not None:
            ax.plot([r["epoch"] for r in val], [r["acc5"] for r in val], "s--", color="tab:olive", ms=4, label="val Acc@5")
    if epochs and epochs[0].get("train_acc1") is not None:
        ax.plot([r["epoch"] for r in epochs], [r["train_acc1"] for r in epochs], "^:", color="tab:gray", ms=4,
                label="train Acc@1")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")

    ax = axes[1, 0]
    if steps and any(r.get("lr") is not None for r in steps):
        ax.plot(step_x, [r.get("lr") for r in steps], ".-", color="tab:purple", ms=3, label="per logged step")
    elif epochs:
        ax.plot([r["epoch"] for r in epochs], [r["lr"] for r in epochs], "o-", color="tab:purple", ms=4)
    ax.set(title="Learning rate", xlabel="epoch", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    ax = axes[1, 1]
    tput = [r for r in epochs if r.get("img_s") is not None and math.isfinite(r["img_s"])]
    if tput:
        ax.bar([r["epoch"] for r in tput], [r["img_s"] for r in tput], color="tab:cyan", width=0.6)
    ax.set(title="Training throughput", xlabel="epoch", ylabel="images / s (all devices)")

    for a in axes.flat:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        a.margins(y=0.08)
    fig.tight_layout()
    return fig
