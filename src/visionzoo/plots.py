"""curves.png: how a run went, drawn from its metrics.jsonl with matplotlib."""

from __future__ import annotations

from pathlib import Path

from visionzoo.report import read_metrics


def plot_curves(run_dir: Path, title: str | None = None) -> Path:
    """Draw training loss, validation accuracy, learning rate and throughput against epochs
    into ``run_dir/curves.png``; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    # Steps are placed on the epoch axis: step s of epoch e sits between e-1 and e.
    steps_per_epoch = max((r["step"] for r in steps), default=0) / max(len(epochs), 1) or 1

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(title or run_dir.name, fontsize=13)
    ax = axes[0, 0]
    if steps:
        ax.plot([r["step"] / steps_per_epoch for r in steps], [r["loss"] for r in steps],
                color="tab:blue", alpha=0.35, lw=0.8, label="per logged step")
    if epochs:
        ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train (epoch mean)")
        val = [r for r in epochs if r.get("val_loss") is not None]
        if val:
            ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "s-", color="tab:orange", label="validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    val = [r for r in epochs if r.get("acc1") is not None]
    if val:
        ax.plot([r["epoch"] for r in val], [r["acc1"] for r in val], "o-", color="tab:green", label="val Acc@1")
        if val[0].get("acc5") is not None:
            ax.plot([r["epoch"] for r in val], [r["acc5"] for r in val], "s--", color="tab:olive", label="val Acc@5")
        best = max(val, key=lambda r: r["acc1"])
        ax.annotate(f"best {best['acc1']:.2f}%", (best["epoch"], best["acc1"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    if epochs and epochs[0].get("train_acc1") is not None:
        ax.plot([r["epoch"] for r in epochs], [r["train_acc1"] for r in epochs], "^:", color="tab:gray", label="train Acc@1")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    if steps:
        ax.plot([r["step"] / steps_per_epoch for r in steps], [r["lr"] for r in steps], color="tab:purple")
    elif epochs:
        ax.plot([r["epoch"] for r in epochs], [r["lr"] for r in epochs], "o-", color="tab:purple")
    ax.set(title="Learning rate", xlabel="epoch", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    ax = axes[1, 1]
    tput = [r for r in epochs if r.get("img_s") is not None]
    if tput:
        ax.bar([r["epoch"] for r in tput], [r["img_s"] for r in tput], color="tab:cyan", width=0.6)
    ax.set(title="Training throughput", xlabel="epoch", ylabel="images / s (all devices)")

    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
