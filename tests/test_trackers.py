"""Experiment trackers: MLflow (its local store, a real `mlflow server` on 127.0.0.1, an
unreachable URI) and W&B offline, each fed by a short fashion_mnist run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def _mlflow_server(tmp_path: Path, *extra: str, env: dict | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (its stores in tmp_path): yields its URI."""
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    uri = f"http://127.0.0.1:{_free_port()}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server writes to it until the finally block
    server = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), *extra],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
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
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_mlflow_server_on_localhost(fmnist_dir, tmp_path):
    pytest.importorskip("mlflow")
    with _mlflow_server(tmp_path) as uri:
        run = tmp_path / "served"
        results = _train(fmnist_dir, run, "log.mlflow=true", f"log.mlflow_uri={uri}")
        _check_mlflow_run(uri, run, results)


@pytest.mark.parametrize("text, redacted", [
    ("https://user:tok3n@mlflow.example.org", "https://***@mlflow.example.org"),
    ("http://admin:p%40ss:w@rd@127.0.0.1:5000/x?y=1", "http://***@127.0.0.1:5000/x?y=1"),  # an unescaped @ too
    ("https://tok3n@host/api", "https://***@host/api"),
    ("warning: MLflow (http://u:p@h:1) failed; see http://u2:p2@h2/x", "warning: MLflow (http://***@h:1) failed; "
                                                                       "see http://***@h2/x"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////data/mlflow@home.db", "sqlite:////data/mlflow@home.db"),
    ("file:///runs/a@b", "file:///runs/a@b"),
])
def test_credentials_in_urls_are_redacted(text, redacted):
    from visionzoo.redaction import redact_credentials

    assert redact_credentials(text) == redacted


def test_credentials_are_split_off_for_mlflow():
    from visionzoo.trackers import split_credentials

    assert split_credentials("https://us%3Aer:p%40ss@h:5000/m") == (
        "https://h:5000/m", {"MLFLOW_TRACKING_USERNAME": "us:er", "MLFLOW_TRACKING_PASSWORD": "p@ss"})
    assert split_credentials("https://***@h:5000") == ("https://h:5000", {})  # as config.yaml keeps it
    assert split_credentials("http://h:5000") == ("http://h:5000", {})


def test_mlflow_server_behind_credentials(fmnist_dir, tmp_path, monkeypatch, capfd):
    """MLflow's basic-auth app on 127.0.0.1, its URI with the admin's credentials: the run is
    tracked, and the password is nowhere visionzoo writes or prints (config.yaml, checkpoints,
    the report, the MLflow parameters, the W&B config, the log lines). Before: the reachability
    check could not parse the user info ("Name or service not known"), tracking was off, and the
    password stood in the warning, config.yaml, the report and the weights' metadata."""
    pytest.importorskip("mlflow")
    pytest.importorskip("flask_wtf")  # mlflow[auth]
    secret = "s3cret-Tok3n"
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\nadmin_password = {secret}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n")  # one password hash per test, not one per request
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(var, value)
    for var in ("WANDB_DIR", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    with _mlflow_server(tmp_path / "server", "--app-name", "basic-auth", env=env) as uri:
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the server does check
            urllib.request.urlopen(uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        run = tmp_path / "behind"
        host = uri.split("://")[1]
        extra = (f"log.mlflow_uri=http://admin:{secret}@{host}", "log.wandb=true")
        monkeypatch.setattr(sys, "argv", ["visionzoo", "train", "fashion_mnist", *extra])  # as the CLI has it
        results = _train(fmnist_dir, run, *extra)
        printed = capfd.readouterr()
        assert f"visionzoo: logging to MLflow (http://***@{host})" in printed.out.splitlines()
        assert secret not in printed.out + printed.err
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # how the test's own client logs in
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        _check_mlflow_run(uri, run, results)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("visionzoo").experiment_id],
                                      f"attributes.run_name = '{run.name}'")
        assert found.data.params["log.mlflow_uri"] == f"http://***@{host}"
        assert not [k for k, v in found.data.params.items() if secret in v]
        assert f"mlflow_uri: http://***@{host}\n" in (run / "config.yaml").read_text()
        leaks = [f for f in run.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
        assert leaks == []  # config.yaml, checkpoints and weights (their config), report/, wandb/ (config, argv)
        assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B did record the run
        assert b"***@127.0.0.1" in next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()

        # Resuming reads config.yaml, which keeps no credentials: without them, one warning that says so.
        from visionzoo.config import load_config
        from visionzoo.trackers import open_trackers

        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        cfg = load_config(str(run / "config.yaml"), ["log.wandb=false"])
        assert open_trackers(cfg, run) == []
        (line,) = [ln for ln in capfd.readouterr().out.splitlines() if "MLflow" in ln]
        assert line.startswith(f"warning: MLflow (http://***@{host}) cannot be reached: ") and secret not in line
        assert line.endswith("(the run folder keeps no credentials: give log.mlflow_uri with them again, or set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD); the run goes on without it")


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
