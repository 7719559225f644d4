"""What a user sees around a run: log lines, the results table, curves.png, run listing,
comparison, TensorBoard."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from visionzoo.cli import main
from visionzoo.commands.runs import compare, list_runs
from visionzoo.run_folder import format_table, read_metrics

SHORT = ["--epochs", "2", "--device", "cpu", "--amp", "none", "data.batch_size=64", "train.log_every=2"]


@pytest.fixture(scope="module")
def two_runs(fmnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(root / "a"), *SHORT,
                 "log.progress=lines", "log.tensorboard=true"]) == 0
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(root / "b"), *SHORT,
                 "optim.lr=0.05", "train.seed=3"]) == 0
    return root


def test_plain_log_lines_when_not_a_terminal(fmnist_dir, tmp_path, capsys):
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(tmp_path / "r"), *SHORT]) == 0
    out = capsys.readouterr().out
    line = r"^epoch (\d) step (\d+)/(\d+) loss [\d.]+ lr [\d.e-]+( img/s [\d.]+)? \| [\d.e+]+ it/s \| ETA \d\d:\d\d$"
    steps = re.findall(line, out, re.M)
    assert len(steps) == 1 + 2 * (10 // 2)  # 640/64 = 10 steps per epoch, logged every 2, and the first
    assert steps[0][:3] == ("1", "1", "10") and steps[1][:3] == ("1", "2", "10")
    assert "\r" not in out  # no progress-bar redraws in a log file


def test_results_table_format():
    row = {"recipe": "x", "Acc@1": 91.234, "FPS": 2300.0, "devices": 8, "BN group": 16, "epochs": 90,
           "precision": "bf16", "torch": "2.11.0"}
    assert format_table([row]).splitlines() == [
        "| recipe | Acc@1 | FPS | devices | BN group | epochs | precision | torch |",
        "|---|---|---|---|---|---|---|---|",
        "| x | 91.23 | 2300.00 | 8 | 16 | 90 | bf16 | 2.11.0 |",
    ]
    assert format_table([{"recipe": "y", "Acc@1": None}]).splitlines()[-1] == "| y | - | - | - | - | - | - | - |"


def test_run_folder_has_results_and_curves(two_runs):
    run = two_runs / "a"
    results = json.loads((run / "results.json").read_text())
    table = (run / "results.md").read_text()
    row = f"| fashion_mnist | {results['Acc@1']:.2f} | {results['FPS']:.2f} | 1 | {results['BN group']} | 2 | fp32 |"
    assert row in table
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with Image.open(png) as im:
        assert im.size[0] >= 800 and im.size[1] >= 600
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_tensorboard_has_the_metrics_jsonl_scalars(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_runs / "a" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/lr", "epoch/acc1", "epoch/train_loss"} <= tags
    epochs = [r for r in read_metrics(two_runs / "a" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [e.value for e in acc.Scalars("epoch/acc1")] == pytest.approx([r["acc1"] for r in epochs])


def test_runs_lists_finished_and_failed(two_runs, fmnist_dir, monkeypatch, capsys):
    # A run that raised mid-training...
    import visionzoo.engine.tasks.classify as sup

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sup, "evaluate", broken)
    with pytest.raises(RuntimeError):
        main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(two_runs / "c"), *SHORT])
    monkeypatch.undo()
    # ...and one whose process was killed (status says running, the process is gone).
    (two_runs / "d").mkdir()
    (two_runs / "d" / "config.yaml").write_text((two_runs / "a" / "config.yaml").read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    status = {"status": "running", "pid": dead.pid, "host": socket.gethostname()}
    (two_runs / "d" / "status.json").write_text(json.dumps(status))

    rows = {r["run"]: r for r in list_runs(two_runs)}
    assert rows["a"]["status"] == rows["b"]["status"] == "finished"
    assert rows["c"]["status"] == "failed" and rows["d"]["status"] == "failed"
    assert rows["a"]["epochs"] == "2/2" and rows["c"]["epochs"] == "0/2"
    best = max(r["acc1"] for r in read_metrics(two_runs / "a" / "metrics.jsonl") if r["kind"] == "epoch")
    assert rows["a"]["best Acc@1"] == best
    assert main(["runs", str(two_runs)]) == 0
    assert "| a | fashion_mnist | finished | 2/2 |" in capsys.readouterr().out


def test_compare_shows_exactly_the_changed_keys(two_runs, capsys):
    diffs, rows = compare(two_runs / "a", two_runs / "b")
    assert {k for k, _, _ in diffs} == {"optim.lr", "train.seed", "log.progress", "log.tensorboard"}
    assert ("optim.lr", 0.2, 0.05) in diffs
    assert main(["runs", "--compare", str(two_runs / "a"), str(two_runs / "b")]) == 0
    assert "| optim.lr | 0.2 | 0.05 |" in capsys.readouterr().out


def test_runs_on_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "no runs folder" in capsys.readouterr().err


def test_runs_of_one_run_folder_shows_it(two_runs, capsys):
    run = two_runs / "a"
    results = json.loads((run / "results.json").read_text())
    assert main(["runs", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no runs under" not in out
    rows = [line for line in out.splitlines() if line.startswith("| a |")]
    assert len(rows) == 1 and "| finished | 2/2 |" in rows[0]
    row = f"| fashion_mnist | {results['Acc@1']:.2f} | {results['FPS']:.2f} | 1 | {results['BN group']} | 2 | fp32 |"
    assert row in out


def test_runs_without_a_runs_folder_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 0
    assert "visionzoo train fashion_mnist" in capsys.readouterr().out


def _metrics(losses: list[float], epochs: int = 2, steps_per_epoch: int = 20, every: int = 5) -> list[dict]:
    """metrics.jsonl records of a run that logs step 1, then every ``every`` steps."""
    records = []
    for step in [1] + list(range(every, epochs * steps_per_epoch + 1, every)):
        records.append({"kind": "step", "epoch": (step - 1) // steps_per_epoch + 1, "step": step,
                        "loss": losses[min(len(records), len(losses) - 1)], "lr": 0.01 + 0.001 * step})
    for e in range(1, epochs + 1):
        records.append({"kind": "epoch", "epoch": e, "step": e * steps_per_epoch, "train_loss": losses[-1],
                        "val_loss": losses[-1], "acc1": 50.0 + e, "acc5": 90.0, "train_acc1": 40.0 + e,
                        "lr": 0.01, "img_s": 100.0})
    return records


def test_curves_integer_epochs_log_loss_best_in_legend_and_per_step_lr():
    import matplotlib.pyplot as plt

    from visionzoo.curves import curves_figure, step_to_epoch

    assert list(step_to_epoch([0, 10, 20, 30, 50], [{"epoch": 1, "step": 20}, {"epoch": 2, "step": 40}])) == \
        [0.0, 0.5, 1.0, 1.5, 2.5]  # a step after the last epoch end continues at the epoch length
    calm = curves_figure(_metrics([2.3, 1.5, 0.9, 0.5]), "calm")
    loss_ax, acc_ax, lr_ax, _ = calm.axes
    assert loss_ax.get_yscale() == "linear"
    for ax in calm.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert any("best 52.00% at epoch 2" in t.get_text() for t in acc_ax.get_legend().get_texts())
    x, y = lr_ax.lines[0].get_data()
    assert x[0] == pytest.approx(1 / 20) and y[0] == pytest.approx(0.011)  # the first step's LR is drawn
    assert len(x) == 1 + 40 // 5
    plt.close(calm)
    diverged = curves_figure(_metrics([2.3, 5.0, 2e10, float("nan"), float("inf")]), "diverged")
    assert diverged.axes[0].get_yscale() == "log"
    plt.close(diverged)


def test_a_long_phase_says_where_it_is_in_lines_mode(monkeypatch, capsys):
    """Without a terminal a long phase (a k-NN feature pass took 4 minutes silently) prints a line
    at least every LINE_EVERY_S seconds: done/total, rate and ETA; with a bar it prints nothing."""
    from visionzoo import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # every item is "30 s later"
    assert list(progress.Progress(range(3), 3, "features", "lines")) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and re.fullmatch(r"features step 2/3 \| [\d.e+]+ it/s \| ETA \d\d:\d\d", lines[1])
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    list(progress.Progress(range(3), 3, "features", "lines"))
    assert capsys.readouterr().out == ""  # a short phase says nothing


def test_a_notebook_gets_a_bar(monkeypatch):
    """In a Jupyter kernel (IPython's ZMQ shell) log.progress=auto is a bar (tqdm.auto: a widget there)."""
    import types

    from visionzoo import progress

    class ZMQInteractiveShell:
        pass

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: ZMQInteractiveShell()))
    assert progress.in_notebook() and progress.use_bar("auto") and not progress.use_bar("lines")
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not progress.in_notebook()
