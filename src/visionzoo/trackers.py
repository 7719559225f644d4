"""Experiment trackers, optional and never required: MLflow (log.mlflow=true) and Weights &
Biases (log.wandb=true). Rank 0 opens them where it writes metrics.jsonl; they receive the
flattened resolved recipe as parameters, every metrics.jsonl record as metrics (``step/<key>``
by optimizer step, ``epoch/<key>`` by epoch, the names TensorBoard gets) and, when the run
ends, results and files (results.json, curves.png, config.yaml, the report folder, the weights).

A tracker that is not installed or cannot be reached costs one warning and is then left out:
the run itself never fails or changes because of it. The tracker's run id is kept in the run
folder (trackers.json): a resumed run (a requeued job, ``--resume``) continues the same MLflow
run and the same W&B run, one curve over every session, instead of opening a new one each time.

A tracking URI may carry credentials (``https://user:token@host``): MLflow gets the URI without
them and the credentials as its MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, only while
it is called; whatever visionzoo writes or prints shows ``https://***@host``
(``redaction.redact_credentials``)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from visionzoo.redaction import REDACTED, redact_credentials

if TYPE_CHECKING:
    from visionzoo.config import RecipeConfig

MLFLOW_EXPERIMENT = "visionzoo"  # MLFLOW_EXPERIMENT_NAME overrides it
WANDB_PROJECT = "visionzoo"  # WANDB_PROJECT overrides it
ARTIFACTS = ("results.json", "results.md", "config.yaml", "curves.png", "model.safetensors")
REACH_TIMEOUT_S = 5.0
IDS = "trackers.json"  # in the run folder: the trackers' run ids, so a resumed run continues them


def saved_id(run_dir: Path, tracker: str) -> str | None:
    """The run id ``tracker`` ("mlflow", "wandb") had in an earlier session of this run folder."""
    try:
        return json.loads((Path(run_dir) / IDS).read_text()).get(tracker)
    except (OSError, ValueError, AttributeError):
        return None


def save_id(run_dir: Path, tracker: str, run_id: str) -> None:
    """Keep ``tracker``'s run id in the run folder (trackers.json)."""
    path = Path(run_dir) / IDS
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        ids = {}
    ids[tracker] = run_id
    path.write_text(json.dumps(ids, indent=2) + "\n")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys (lists and dicts-as-values kept as JSON text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and prefix.count(".") < 1:  # a section (data, model.kwargs stays one value)
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def numeric(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, without its bookkeeping keys."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step", "epoch", "kind")
            and math.isfinite(v)}


class Tracker:
    """One back-end; the first failure warns once and switches it off."""

    name = "tracker"

    def __init__(self) -> None:
        self.active = True

    def _fail(self, what: str, err: BaseException) -> None:
        from visionzoo.errors import first_line

        if self.active:
            why = redact_credentials(first_line(err))
            print(f"warning: {self.name}: {what} failed ({why}); the run goes on without {self.name}", flush=True)
        self.active = False

    def log(self, record: dict) -> None:
        if self.active:
            try:
                self._log(record)
            except Exception as err:  # noqa: BLE001 - a tracker never stops a run
                self._fail("logging metrics", err)

    def finish(self, run_dir: Path, results: dict | None, status: str) -> None:
        if self.active:
            try:
                self._finish(Path(run_dir), results or {}, status)
            except Exception as err:  # noqa: BLE001
                self._fail("uploading the results", err)
            self.active = False

    def _log(self, record: dict) -> None:
        raise NotImplementedError

    def _finish(self, run_dir: Path, results: dict, status: str) -> None:
        raise NotImplementedError


def _mlflow_name(key: str) -> str:
    """MLflow metric names take letters, digits, _ - . / and space: Acc@1 becomes Acc_1."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``uri`` without its user info, and that user info as MLflow's credential variables
    (percent-escapes decoded). A redacted one (``***@``, as config.yaml keeps it) gives none:
    MLflow then takes MLFLOW_TRACKING_USERNAME / _PASSWORD from the environment, if set."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    clean = urlunsplit(parts._replace(netloc=host))
    if userinfo == REDACTED:
        return clean, {}
    user, _, password = userinfo.partition(":")
    return clean, {"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in os.environ while the block runs, the previous values back after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _redacted_argv() -> Iterator[None]:
    """sys.argv with credentials redacted while the block runs: W&B records the command line
    (its run metadata, a job's source) when a run starts and ends, and a tracking URI given as
    an override stands in it."""
    import sys

    before = sys.argv
    sys.argv = [redact_credentials(a) for a in before]
    try:
        yield
    finally:
        sys.argv = before


def _check_reachable(uri: str, creds: dict[str, str]) -> None:
    """For an HTTP tracking server, one GET of its /health page (MLflow's own client would
    retry for minutes before giving up), with ``creds`` as basic authentication."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    request = urllib.request.Request(uri.rstrip("/") + "/health")
    if creds:
        pair = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        with urllib.request.urlopen(request, timeout=REACH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:  # it answered (401, 404, ...): reachable; MLflow's client takes over
        pass


class MlflowTracker(Tracker):
    name = "MLflow"

    def __init__(self, cfg: RecipeConfig, run_dir: Path, uri: str | None):
        super().__init__()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from visionzoo.config import to_dict

        uri, self.creds = split_credentials(uri) if uri else (uri, {})
        if uri:
            _check_reachable(uri, self.creds)
        self.client = MlflowClient(tracking_uri=uri)  # None: MLFLOW_TRACKING_URI, else MLflow's local store
        self.uri = self.client.tracking_uri
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        with _environment(self.creds):
            self.run_id, self.resumed = self._continued(run_dir), True
            if self.run_id is None:  # a new run: parameters once (MLflow keeps them immutable)
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
                self.run_id, self.resumed = self.client.create_run(
                    exp_id, run_name=Path(run_dir).name,
                    tags={"visionzoo.recipe": cfg.recipe, "visionzoo.run_dir": str(run_dir)}).info.run_id, False
                params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
            save_id(run_dir, "mlflow", self.run_id)

    def _continued(self, run_dir: Path) -> str | None:
        """The MLflow run an earlier session of ``run_dir`` opened, marked running again; None
        when there was none or this tracking store does not have it."""
        run_id = saved_id(run_dir, "mlflow")
        if run_id is None:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - another store, or the run was deleted: a new one
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log(self, record: dict) -> None:
        with _environment(self.creds):
            super().log(record)

    def finish(self, run_dir: Path, results: dict | None, status: str) -> None:
        with _environment(self.creds):
            super().finish(run_dir, results, status)

    def _log(self, record: dict) -> None:
        from mlflow.entities import Metric

        kind = record.get("kind", "misc")
        step = int(record.get("step" if kind == "step" else "epoch", 0) or 0)
        ms = int(1000 * record.get("time", 0))
        metrics = [Metric(_mlflow_name(f"{kind}/{k}"), v, ms, step) for k, v in numeric(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _finish(self, run_dir: Path, results: dict, status: str) -> None:
        from mlflow.entities import Metric

        final = [Metric(_mlflow_name(f"results/{k}"), v, 0, 0) for k, v in numeric(results).items()]
        if final:
            self.client.log_batch(self.run_id, metrics=final)
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "report").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "report"), "report")
        self.client.set_terminated(self.run_id, status)


class WandbTracker(Tracker):
    name = "W&B"

    def __init__(self, cfg: RecipeConfig, run_dir: Path):
        super().__init__()
        import wandb

        from visionzoo.config import to_dict

        # WANDB_MODE=offline (or disabled), WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR: wandb reads them itself.
        # A resumed run continues the W&B run of its earlier sessions (resume="allow": W&B opens it
        # again, or starts it under that id if it never reached the server).
        run_id = saved_id(run_dir, "wandb")
        with _redacted_argv():
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=Path(run_dir).name,
                                  dir=os.environ.get("WANDB_DIR", str(run_dir)), config=flatten(to_dict(cfg)),
                                  settings=wandb.Settings(init_timeout=60, console="off"), reinit="create_new",
                                  **({"id": run_id, "resume": "allow"} if run_id else {}))
        save_id(run_dir, "wandb", self.run.id)
        self.last_step = 0

    def _log(self, record: dict) -> None:
        kind = record.get("kind", "misc")
        values = {f"{kind}/{k}": v for k, v in numeric(record).items()}
        if kind == "epoch":
            values["epoch"] = record.get("epoch")
        step = record.get("step")
        if isinstance(step, int) and step >= self.last_step:  # W&B steps only go forward
            self.last_step = step
            self.run.log(values, step=step)
        else:
            self.run.log(values)

    def finish(self, run_dir: Path, results: dict | None, status: str) -> None:
        with _redacted_argv():
            super().finish(run_dir, results, status)

    def _finish(self, run_dir: Path, results: dict, status: str) -> None:
        import wandb

        self.run.summary.update({f"results/{k}": v for k, v in numeric(results).items()})
        art = wandb.Artifact(f"run-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_dir.name)}", type="visionzoo-run")
        files = [run_dir / n for n in ARTIFACTS if (run_dir / n).is_file()]
        for f in files:
            art.add_file(str(f))
        if (run_dir / "report").is_dir():
            art.add_dir(str(run_dir / "report"), name="report")
        if files:
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        if wandb.run is None:  # no other run of this process is open: wait until the records are on disk
            wandb.teardown()


def open_trackers(cfg: RecipeConfig, run_dir: Path) -> list[Tracker]:
    """The trackers the config asks for (log.mlflow or log.mlflow_uri, log.wandb), opened; one warning for each
    that is not installed or cannot be reached."""
    from visionzoo.errors import first_line

    trackers: list[Tracker] = []
    wanted = []
    if cfg.log.mlflow or cfg.log.mlflow_uri:  # a URI alone also switches MLflow on
        uri = cfg.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        wanted.append(("MLflow", "mlflow", lambda: MlflowTracker(cfg, run_dir, uri), uri or "its default local store"))
    if cfg.log.wandb:
        wanted.append(("W&B", "wandb", lambda: WandbTracker(cfg, run_dir),
                       f"mode {os.environ.get('WANDB_MODE', 'online')}"))
    for name, package, make, where in wanted:
        where = redact_credentials(where)
        try:
            trackers.append(make())
        except ImportError:
            print(f"warning: log.{package}=true but the {package} package is not installed "
                  f"(pip install 'visionzoo[{package}]'); the run goes on without {name}", flush=True)
        except Exception as err:  # noqa: BLE001 - unreachable servers raise many kinds
            hint = (" (the run folder keeps no credentials: give log.mlflow_uri with them again, or set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)" if f"://{REDACTED}@" in where else "")
            print(f"warning: {name} ({where}) cannot be reached: {redact_credentials(first_line(err))}{hint}; "
                  f"the run goes on without it", flush=True)
        else:
            print(f"visionzoo: logging to {name} ({where})", flush=True)
    return trackers
