"""Resuming a run that has already finished changes nothing; resuming one whose training
finished but whose results were never written (killed after the last checkpoint) completes
them; a new run never overwrites an existing one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_dino import TINY_OVERRIDES, idx_dir  # noqa: F401  (idx_dir is a fixture)
from visionzoo.cli import main
from visionzoo.run_folder import read_metrics

SUPERVISED = ["fashion_mnist", "--epochs", "2", "--device", "cpu", "--workers", "0", "data.batch_size=64",
              "train.log_every=2"]
RECIPES = {
    "supervised": lambda data: [*SUPERVISED, "--data", str(data)],
    "dino": lambda data: ["dino_fashion_mnist", "--data", str(data), *TINY_OVERRIDES],
}


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run folder with its modification time and bytes."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file()]
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.fixture(params=sorted(RECIPES))
def finished(request, fmnist_dir, idx_dir, tmp_path) -> tuple[list[str], Path]:
    """(train arguments, folder) of a run that has finished."""
    args = RECIPES[request.param](fmnist_dir if request.param == "supervised" else idx_dir)
    run = tmp_path / "run"
    assert main(["train", *args, "--output", str(run)]) == 0
    return args, run


@pytest.mark.parametrize("how", ["by_name", "auto_output"])
def test_resuming_a_finished_run_changes_nothing(finished, how, capsys):
    args, run = finished
    before = _snapshot(run)
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    resume = ["--resume", str(run)] if how == "by_name" else ["--resume", "auto", "--output", str(run)]
    assert main(["train", *args, *resume]) == 0
    out = capsys.readouterr().out
    assert f"{run} has finished; nothing to resume" in out
    assert f"| {results['Acc@1']:.2f} |" in out  # its results row
    assert _snapshot(run) == before


def test_resume_after_the_last_checkpoint_writes_complete_results(finished, capsys):
    """Killed between the last checkpoint and the results: --resume evaluates the final weights
    and writes the results the uninterrupted run wrote (throughput and loss from the checkpoint)."""
    args, run = finished
    original = json.loads((run / "results.json").read_text())
    metrics = read_metrics(run / "metrics.jsonl")
    for name in ("results.json", "results.md", "curves.png"):
        (run / name).unlink()
    assert main(["train", *args, "--resume", str(run)]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = json.loads((run / "results.json").read_text())
    for key in ("Acc@1", "Acc@5", "steps", "epochs", "ActualLoss", "TrainAccuracy", "FPS", "devices"):
        assert resumed[key] == original[key], key
    assert resumed["E2ETrainingTime"] >= original["E2ETrainingTime"] * 0.5
    after = read_metrics(run / "metrics.jsonl")
    assert after[:-1] == metrics  # no epoch trained or logged twice; where the session began is marked
    assert after[-1]["kind"] == "resume" and after[-1]["step"] == original["steps"]
    assert (run / "results.md").is_file() and (run / "curves.png").is_file()


def test_a_new_run_never_overwrites_an_existing_one(finished, capsys):
    args, run = finished
    before = _snapshot(run)
    assert main(["train", *args, "--output", str(run)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    (run / "results.json").unlink()  # now an unfinished run with checkpoints
    assert main(["train", *args, "--output", str(run)]) == 2
    assert f"--resume {run}" in capsys.readouterr().err
    assert {k: v for k, v in _snapshot(run).items() if k != "results.json"} == {
        k: v for k, v in before.items() if k != "results.json"}


def test_auto_resume_into_a_folder_without_checkpoints_starts_clean(fmnist_dir, tmp_path, capsys):
    """An attempt that died before its first checkpoint leaves config and metrics behind: the
    next --resume auto --output starts over and its metrics hold each epoch once."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: fashion_mnist\n")
    (run / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1, "train_loss": 9.0}\n')
    args = RECIPES["supervised"](fmnist_dir)
    assert main(["train", *args, "--resume", "auto", "--output", str(run)]) == 0
    assert "to resume; starting a new one" in capsys.readouterr().out
    epochs = [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2]
