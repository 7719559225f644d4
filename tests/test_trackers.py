"""Experiment trackers: MLflow (its local store, a real `mlflow server` on 127.0.0.1, an
unreachable URI) and W&B offline, each fed by a short fashion_mnist run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from visionzoo.cli import main

FAST = ["--epochs", "1", "--device", "cpu", "--amp", "none", "log.progress=off", "data.batch_size=32",
        "train.max_steps_per_epoch=3", "train.log_every=1"]


def _train(fmnist_dir: Path, run: Path, *extra: str) -> dict:
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *FAST, *extra]) == 0
    return json.loads((run / "results.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_mlflow_run(uri: str, run: Path, results: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("visionzoo")
    (found,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run.name}'")
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["recipe"] == "fashion_mnist" and float(params["optim.lr"]) == 0.2
    assert params["train.max_steps_per_epoch"] == "3" and params["data.mean"] == "[72.94]"
    losses = client.get_metric_history(found.info.run_id, "step/loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert found.data.metrics["epoch/acc1"] == pytest.approx(results["Acc@1"])
    assert found.data.metrics["results/Acc_1"] == pytest.approx(results["Acc@1"])
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "config.yaml", "curves.png", "model.safetensors", "report"} <= names
    assert "report/index.html" in {a.path for a in client.list_artifacts(found.info.run_id, "report")}


def test_mlflow_local_store_and_tracking_uri(fmnist_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store lives in the working folder
    run = tmp_path / "runs" / "local"
    results = _train(fmnist_dir, run, "log.mlflow=true")
    import mlflow

    default = mlflow.get_tracking_uri()
    assert str(tmp_path) in default or not default.startswith(("http", "databricks"))
    _check_mlflow_run(default, run, results)

    # MLFLOW_TRACKING_URI, the standard variable, is followed.
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run2 = tmp_path / "runs" / "by-env"
    _check_mlflow_run(uri, run2, _train(fmnist_dir, run2, "log.mlflow=true"))


def test_mlflow_server_on_localhost(fmnist_dir, tmp_path):
    pytest.importorskip("mlflow")
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server writes to it until the finally block
    server = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
                time.sleep(1)
        run = tmp_path / "served"
        results = _train(fmnist_dir, run, "log.mlflow=true", f"log.mlflow_uri={uri}")
        _check_mlflow_run(uri, run, results)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_unreachable_mlflow_is_one_warning(fmnist_dir, tmp_path, capsys):
    pytest.importorskip("mlflow")
    run = tmp_path / "unreachable"
    t0 = time.monotonic()
    results = _train(fmnist_dir, run, f"log.mlflow_uri=http://127.0.0.1:{_free_port()}")  # the URI alone turns it on
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if "MLflow" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow") and "goes on" in warnings[0]
    assert results["steps"] == 3 and json.loads((run / "status.json").read_text())["status"] == "finished"
    assert time.monotonic() - t0 < 120


def test_wandb_offline_writes_its_run_folder(fmnist_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "visionzoo-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "wb"
    _train(fmnist_dir, run, "log.wandb=true")
    (offline,) = list((run / "wandb").glob("offline-run-*"))
    (records,) = list(offline.glob("run-*.wandb"))  # W&B's record stream; `wandb sync` uploads it later
    data = records.read_bytes()
    for text in (b"optim.lr", b"step/loss", b"epoch/acc1", b"results/Acc@1", b"report/index.html"):
        assert text in data, text
