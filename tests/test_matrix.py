"""The combination matrix (issue 32): every feature in every task and launcher it claims to
support, each cell asserting the invariants those features promise together:

- the same step on every rank: the results' step count is the schedule's, and ``ranks_in_sync``
  (weights, EMA and every buffer equal over the ranks);
- the reported property is the one in force: the BatchNorm group and the number of layers
  grouped, the EMA as the evaluated weights, the unreadable images counted once;
- the run folder's model is the measured one: ``visionzoo eval`` / ``knn`` of the run folder
  gives the results' Acc@1;
- a stop and ``--resume`` end where an uninterrupted run ends; trackers keep one run; nothing is
  left running after the launcher exits.

Launchers: one process (in this process), ``--devices 2`` (visionzoo's launcher), and two ranks
started with torchrun's / srun's environment (RANK, WORLD_SIZE, MASTER_ADDR). Signals: SIGTERM,
SIGUSR1 (the launcher's forwarding is tests/test_faults_signals.py's; here: what a stopped run of
each combination resumes to). A zero-weight step is made on purpose: rank 1's first batch is all
unreadable files. SyncBatchNorm has no CPU kernel: ``model.sync_bn`` on CPU ranks is refused
(REFUSED below) and its placeholder mode switch is tested directly (test_combination.py item 1).
Cells that are not supported are refused at start with one line (REFUSED)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_FOLDER_RECIPE, StopAfter, start_ranks, write_jpeg_tree
from test_dino import TINY_OVERRIDES
from visionzoo.cli import main
from visionzoo.config import for_world_size, load_config
from visionzoo.data.loading.samplers import train_indices
from visionzoo.data.sources.folder import ImageFolderDataset, find_classes
from visionzoo.engine.tasks.classify import reference_ranks

SRC = str(Path(__file__).resolve().parents[1] / "src")
# The supervised cells: timm's test_efficientnet (BatchNormAct2d layers), BatchNorm over the
# reference's 2 images per device, its EMA, mixup: 48 images, batch 8, 2 epochs.
SUPERVISED = ["data.image_size=32", "data.test_resize=36",
              "data.test_size=32", "data.batch_size=8", "model.bn_group=2", "train.ema_decay=0.5",
              "train.mixup=0.2", "train.epochs=2", "log.progress=off", "train.dist_timeout=60"]
DINO = [*TINY_OVERRIDES, "data.name=imagefolder", "data.in_chans=3", "data.mean=[128,128,128]",
        "data.std=[64,64,64]", "data.image_size=27", "data.test_size=27", "data.test_resize=27", "dino.knn_k=[5]",
        "dino.knn_report_k=5", "data.workers=0", "train.epochs=2", "log.progress=off", "train.dist_timeout=60",
        "train.device=cpu"]


@dataclass
class Cell:
    task: str  # supervised | dino
    launcher: str  # "1 process" | "--devices 2" | "torchrun env"
    features: tuple[str, ...]


CELLS = [
    Cell("supervised", "1 process", ("EMA", "grouped BN (timm BatchNormAct2d)", "mixup", "SIGTERM + resume", "MLflow")),
    Cell("supervised", "--devices 2", ("EMA", "grouped BN (timm BatchNormAct2d)", "mixup", "zero-weight step")),
    Cell("supervised", "torchrun env", ("EMA", "grouped BN (torchvision BatchNorm2d)", "zero-weight step",
                                        "SIGUSR1 + resume")),
    Cell("dino", "1 process", ("SIGTERM + resume", "W&B")),
    Cell("dino", "--devices 2", ("BatchNorm head", "zero-weight step", "SIGTERM + resume")),
    Cell("dino", "torchrun env", ("zero-weight step", "MLflow")),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """48 train / 14 val JPEGs of 4 classes, 32 px, and the tiny recipe file."""
    root = tmp_path_factory.mktemp("matrix")
    write_jpeg_tree(root / "data", n_train=48, n_val=14, size=32)
    (root / "tiny.yaml").write_text(TINY_FOLDER_RECIPE.replace(
        "model: {name: small_cnn, library: visionzoo, kwargs: {width: 4}, channels_last: false}",
        "model: {name: test_efficientnet, library: timm, channels_last: false}"))
    return root


def with_empty_first_batch(src: Path, dst: Path, recipe: str, overrides: list[str]) -> int:
    """A copy of the ImageFolder ``src`` in which rank 1's first training batch of 2 is all
    unreadable files (its order from the sampler the run uses): rank 1 then takes a zero-weight
    step while rank 0 trains. Returns how many files were broken."""
    import shutil

    shutil.copytree(src, dst)
    cfg = for_world_size(load_config(recipe, [o for o in overrides if "=" in o and not o.startswith("-")]), 2)
    ds = ImageFolderDataset(dst / "train", find_classes(dst / "train"))
    groups = reference_ranks(cfg, 2) if cfg.task == "supervised" else (1, 0)
    first = train_indices(len(ds), cfg.train.seed, 0, 1, 2, groups)[:cfg.data.batch_size_per_device]
    for i in first.tolist():
        Path(ds.samples[i][0]).write_bytes(b"not a jpeg\n")
    return len(first)


def _argv(task: str, folder: Path, data: Path, run: Path, *extra: str) -> list[str]:
    recipe = str(folder / "tiny.yaml") if task == "supervised" else "dino_fashion_mnist"
    return ["train", recipe, "--data", str(data), "--output", str(run),
            *(SUPERVISED if task == "supervised" else DINO), *extra]


def _launch(launcher: str, argv: list[str], cwd: Path) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "visionzoo", *argv]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    if launcher == "--devices 2":
        return [subprocess.Popen([*cmd, "--devices", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True, cwd=cwd)]
    return start_ranks(lambda rank: cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        out.append((p.returncode, err))
    return out


def _wait_for_steps(run: Path, procs: list, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if sum('"kind": "step"' in line for line in (run / "metrics.jsonl").read_text().splitlines()) >= steps:
                return
        except FileNotFoundError:
            pass
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-1500:] for p in procs]
        time.sleep(0.1)
    raise AssertionError("training never started")


def _no_orphans(run: Path) -> None:
    """No process is left training ``run``."""
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = stat.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert str(run) not in cmdline or "pytest" in cmdline, f"left running: {cmdline}"


def _measured(task: str, run: Path, data: Path, results: dict, capsys) -> None:
    """The run folder's model is the one results.json measured (eval / k-NN of the folder)."""
    capsys.readouterr()
    if task == "supervised":
        assert main(["eval", str(run), "--data", str(data), "--workers", "0"]) == 0
        assert f"Acc@1 {results['Acc@1']:.2f}%" in capsys.readouterr().out
    else:
        assert main(["knn", str(run), "--data", str(data), "dino.knn_k=[5]", "data.workers=0"]) == 0
        assert f"5-NN: Top1 {results['Acc@1']:.2f}%" in capsys.readouterr().out


def _reported(task: str, results: dict, run: Path) -> None:
    """The reported properties are the ones in force."""
    if task == "supervised":
        from visionzoo.checkpoint import read_metadata

        assert results["BN group"] == 2 and results["BN layers grouped"] > 0
        assert results["weights"] == "ema (train.ema_decay=0.5)"
        assert read_metadata(run / "model.safetensors")["weights"] == "ema"
    else:
        assert results["eval"] == "k-NN k=5"


def _same(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.launcher == "1 process"], ids=lambda c: f"{c.task}-1process")
def test_one_process_cell(cell: Cell, folder, tmp_path, monkeypatch, capsys):
    import visionzoo.engine.run as run_engine

    data = folder / "data"
    monkeypatch.chdir(tmp_path)  # a sqlite MLflow store puts its artifacts in ./mlruns of where it was made
    tracker = ["log.mlflow_uri=sqlite:///" + str(tmp_path / "mlflow.db")] if "MLflow" in cell.features else []
    if "W&B" in cell.features:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        tracker = ["log.wandb=true"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_argv(cell.task, folder, data, ref)) == 0
    with monkeypatch.context() as m:
        m.setattr(run_engine, "StopSignal", StopAfter(4))
        assert main(_argv(cell.task, folder, data, run, *tracker)) == 128 + signal.SIGTERM
    recipe = _argv(cell.task, folder, data, run)[1]
    assert main(["train", recipe, "--resume", str(run), *tracker]) == 0
    results, uninterrupted = (json.loads((r / "results.json").read_text()) for r in (run, ref))
    _same(ref, run)  # the stop and resume changed nothing
    assert results["steps"] == uninterrupted["steps"] == 2 * 48 // 8 and results["Acc@1"] == uninterrupted["Acc@1"]
    _reported(cell.task, results, run)
    _measured(cell.task, run, data, results, capsys)
    ids = json.loads((run / "trackers.json").read_text())
    assert len(ids) == 1  # one tracker run over both sessions (test_combination.py item 10 checks its metrics)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.launcher != "1 process"],
                         ids=lambda c: f"{c.task}-{c.launcher.replace(' ', '').replace('-', '')}")
def test_two_rank_cell(cell: Cell, folder, tmp_path, capsys):
    recipe = str(folder / "tiny.yaml") if cell.task == "supervised" else "dino_fashion_mnist"
    base = SUPERVISED if cell.task == "supervised" else DINO
    extra = []
    if "grouped BN (torchvision BatchNorm2d)" in cell.features:  # the tiny recipe's own CNN
        extra = ["model.library=visionzoo", "model.name=small_cnn", "model.kwargs={width: 4}"]
    if "BatchNorm head" in cell.features:
        extra = ["dino.use_bn_in_head=true"]
    if "MLflow" in cell.features:
        extra.append("log.mlflow_uri=sqlite:///" + str(tmp_path / "mlflow.db"))
    broken = with_empty_first_batch(folder / "data", tmp_path / "data", recipe, [*base, *extra])
    run, data = tmp_path / "run", tmp_path / "data"
    stop = next((f for f in cell.features if "+ resume" in f), None)
    # Two ranks agree on a stop at every 10th step (engine/loop.py): a stopped cell runs 5 epochs of 6 steps.
    epochs = 5 if stop else 2
    argv = _argv(cell.task, folder, data, run, *extra, "train.log_every=1", f"train.epochs={epochs}")
    procs = _launch(cell.launcher, argv, tmp_path)
    if stop is not None:
        sig = signal.SIGUSR1 if stop.startswith("SIGUSR1") else signal.SIGTERM
        _wait_for_steps(run, procs, 2)
        for p in procs:  # srun signals every task; the launcher forwards its own to its workers
            p.send_signal(sig)
        codes = _finish(procs)
        assert all(c == 128 + sig for c, _ in codes), codes
        assert json.loads((run / "status.json").read_text())["signal"] == sig.name
        procs = _launch(cell.launcher, ["train", argv[1], "--resume", str(run), *extra], tmp_path)
    codes = _finish(procs)
    assert all(c == 0 for c, _ in codes), [e[-2000:] for _, e in codes]
    _no_orphans(run)
    results = json.loads((run / "results.json").read_text())
    assert results["devices"] == 2 and results["ranks_in_sync"] is True
    assert results["steps"] == epochs * 48 // 8  # every global step on both ranks, the zero-weight one included
    assert results["bad_images_per_split"]["train"] == broken  # each unreadable file once, over both ranks
    _reported(cell.task, results, run)
    _measured(cell.task, run, data, results, capsys)
    if "MLflow" in cell.features:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
        (only,) = client.search_runs([client.get_experiment_by_name("visionzoo").experiment_id])
        assert only.info.status == "FINISHED"


# Combinations visionzoo does not support: refused at start with one line, never ignored.
REFUSED = [
    (["dino_fashion_mnist", "train.mixup=0.2"], "task=dino does not use train.mixup=0.2"),
    (["dino_fashion_mnist", "train.ema_decay=0.9"], "task=dino does not use train.ema_decay=0.9"),
    (["dino_fashion_mnist", "model.bn_group=4"], "task=dino does not use model.bn_group=4"),
    (["dino_fashion_mnist", "train.label_smoothing=0.1"], "task=dino does not use train.label_smoothing=0.1"),
    (["dino_fashion_mnist", "train.accum_steps=2"], "task=dino does not support train.accum_steps"),
    (["dino_fashion_mnist", "train.amp=fp64"], "train.amp=fp64 is for supervised runs"),
    (["fashion_mnist", "data.batch_size=24", "model.bn_group=16"], "model.bn_group=16 does not divide"),
    (["fashion_mnist", "train.mixup=0.2", "data.batch_size=15"], "mixup/cutmix pair the images of a batch"),
    (["fashion_mnist", "data.decode=device"], "data.decode=device reads image files or shards"),
]


@pytest.mark.parametrize("argv, line", REFUSED, ids=[" ".join(a[1:]) for a, _ in REFUSED])
def test_unsupported_combinations_are_refused_in_one_line(argv, line, fmnist_dir, tmp_path, capsys):
    code = main(["train", argv[0], "--data", str(fmnist_dir), "--device", "cpu", "--output", str(tmp_path / "r"),
                 *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and line in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_syncbn_on_cpu_ranks_is_refused_in_one_line(tmp_path):
    """PyTorch's SyncBatchNorm has no CPU kernel: on gloo ranks it is refused before training."""
    (tmp_path / "fm").mkdir()
    from conftest import write_fmnist

    data = write_fmnist(tmp_path / "fm", 64, 20)
    procs = start_ranks(lambda rank: [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data),
                                      "--device", "cpu", "model.sync_bn=true", "--output", str(tmp_path / "r")],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for code, err in _finish(procs, timeout=120):
        assert code == 2 and "model.sync_bn=true needs an accelerator" in err and err.count("\n") == 1, err
