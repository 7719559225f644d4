"""Stopping on signals: repeated SIGTERMs never cut the checkpoint short, a second Ctrl-C stops
at once, Slurm's SIGUSR1 checkpoints and requeues the job (a fake ``scontrol`` on PATH), and a
``--devices 2`` run stopped under torch's launcher ends like a one-process run: one line, exit
128 + signal, status.json "interrupted" without an error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionzoo.checkpoint import checkpoint_pairs, load_latest
from visionzoo.engine.stopping import requeue_slurm_job
from visionzoo.runtime import REQUEUE, STOP, StopSignal

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}


def test_repeated_sigterm_only_sets_the_flag():
    # Before: the second SIGTERM (torchrun forwarding Slurm's) raised KeyboardInterrupt mid-checkpoint.
    with StopSignal() as stop:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.code == STOP and stop.signum == signal.SIGTERM


def test_a_second_ctrl_c_stops_at_once_except_under_the_launcher(monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        with StopSignal():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torch's agent forwards the terminal's Ctrl-C itself
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.code == STOP


def test_sigusr1_asks_for_a_requeue():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm's SIGTERM at the limit does not undo it
        assert stop.code == REQUEUE


def fake_scontrol(folder: Path, code: int = 0) -> Path:
    """An ``scontrol`` that records its arguments in folder/scontrol.log."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "scontrol"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'scontrol.log'}\n"
                   + (f"echo 'slurm_requeue error: Access denied' >&2\nexit {code}\n" if code else "exit 0\n"))
    exe.chmod(0o755)
    return folder


def test_requeue_calls_scontrol_only_under_slurm(tmp_path, monkeypatch):
    bin_dir = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_slurm_job() is None and not (bin_dir / "scontrol.log").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() == "Slurm job 4242 requeued"
    assert (bin_dir / "scontrol.log").read_text() == "requeue 4242\n"
    fake_scontrol(bin_dir, code=1)
    assert requeue_slurm_job() == "could not requeue Slurm job 4242: scontrol said slurm_requeue error: Access denied"


def _wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
            if len([line for line in lines if '"kind": "step"' in line]) >= steps:
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "training never started"
        time.sleep(0.1)


def _train_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", "synthetic", "--device", "cpu",
            "--epochs", "2", "--output", str(run), "data.synthetic_samples=20000", "data.batch_size=16",
            "train.log_every=1", "log.progress=off", *extra]


def test_sigusr1_checkpoints_and_requeues_the_slurm_job(tmp_path):
    bin_dir = fake_scontrol(tmp_path / "bin")
    run = tmp_path / "run"
    env = _env(SLURM_JOB_ID="777", PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen(_train_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    step = int(err.split("stopped at step ")[1].split(";")[0])
    assert err.strip() == (f"visionzoo: stopped at step {step}; checkpoint saved; continue with: visionzoo train "
                           f"fashion_mnist --resume {run} (Slurm job 777 requeued)")
    assert (bin_dir / "scontrol.log").read_text() == "requeue 777\n"
    assert checkpoint_pairs(run)[0][0].name == f"step-{step:09d}.safetensors"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and "error" not in status


def test_double_sigterm_under_the_launcher_keeps_the_checkpoint(tmp_path):
    """Slurm's SIGTERM to the workers, then (0.3 s later) to the launcher, which forwards its own:
    before, both workers died with 'interrupted' and no checkpoint; and a launcher stop printed
    torch's tracebacks and exited 1 with status.json "error": "Interrupted: "."""
    run = tmp_path / "fm2"
    proc = subprocess.Popen(_train_cmd(run, "--devices", "2"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_steps(run, proc, 3)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(c) for c in f.read().split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err  # as a one-process run stopped by SIGTERM
    step = int(err.split("stopped at step ")[1].split(";")[0])
    assert err.strip() == (f"visionzoo: stopped at step {step}; checkpoint saved; continue with: "
                           f"visionzoo train fashion_mnist --resume {run} --devices 2")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and "error" not in status and status["step"] == step
    _, state, weights = load_latest(run)
    assert weights.name == f"step-{step:09d}.safetensors" and len(state["ranks"]) == 2


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_the_devices_launcher_passes_its_signal_on(tmp_path, sig):
    """A signal to the ``--devices 2`` launcher alone (Slurm's SIGUSR1 to an ``srun -n 1`` task,
    kill -TERM, the terminal's Ctrl-C to its foreground group) reaches the workers: they
    checkpoint and exit before the launcher, which exits 128 + signal. Before, SIGUSR1 killed the
    launcher (exit -10) and its workers trained on to the end without it: no checkpoint at the
    stop, no requeue, status "finished"."""
    from conftest import write_fmnist

    (tmp_path / "fm").mkdir()
    data = write_fmnist(tmp_path / "fm", 3000, 100)  # 94 steps an epoch on 2 ranks of 16
    bin_dir = fake_scontrol(tmp_path / "bin")
    run = tmp_path / "fm2"
    cmd = [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), "--device", "cpu",
           "--devices", "2", "--epochs", "2", "--output", str(run), "data.batch_size=16", "train.log_every=1",
           "log.progress=off"]
    env = _env(SLURM_JOB_ID="777", PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_steps(run, proc, 3)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(c) for c in f.read().split()]
        assert len(workers) == 2
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal does; the workers have sessions of their own
        else:
            proc.send_signal(sig)
        proc.wait(timeout=90)
        orphans = [pid for pid in workers if _alive(pid)]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert orphans == [] and proc.returncode == 128 + sig, err[-2000:]
    step = int(err.split("stopped at step ")[1].split(";")[0])
    requeued = " (Slurm job 777 requeued)" if sig == signal.SIGUSR1 else ""
    assert err.strip() == (f"visionzoo: stopped at step {step}; checkpoint saved; continue with: "
                           f"visionzoo train fashion_mnist --resume {run} --devices 2{requeued}")
    assert (bin_dir / "scontrol.log").exists() == (sig == signal.SIGUSR1)
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "status": "interrupted", "step": step, "signal": sig.name} and "error" not in status
    _, state, weights = load_latest(run)
    assert weights.name == f"step-{step:09d}.safetensors" and len(state["ranks"]) == 2


@pytest.mark.parametrize("end", ["stop", "divergence"])
def test_a_run_every_rank_ends_together_leaves_the_process_group_once_recorded(tmp_path, monkeypatch, end):
    """A stop, or an error every rank met together (an all-reduced NaN flag), goes through
    distributed.shutdown (a barrier, then destroy_process_group) after rank 0 has recorded it.
    Before, a rank that went straight on to exit could abort in interpreter shutdown while gloo's
    threads still held the last collective ("terminate called without an active exception" after
    the stop line: the SIGUSR1 case of the test above, 1 of 3 in a CI run), or, exiting first,
    have the launcher stop rank 0 before it wrote status.json and said why."""
    import visionzoo
    import visionzoo.engine.run as run_engine
    from conftest import StopAfter
    from visionzoo.errors import Stopped, UserError

    run = tmp_path / "run"
    left = []  # status.json's status when the group is left
    monkeypatch.setattr(run_engine.distributed, "shutdown",
                        lambda: left.append(json.loads((run / "status.json").read_text())["status"]))
    kw = dict(data="synthetic", output=str(run), epochs=1, device="cpu", amp="none", data__synthetic_samples=256,
              data__batch_size=32, log__progress="off")
    if end == "stop":
        monkeypatch.setattr(run_engine, "StopSignal", StopAfter(2))
        with pytest.raises(Stopped) as err:
            visionzoo.train("fashion_mnist", **kw)
        assert left == ["interrupted"] and err.value.exit_code == 128 + signal.SIGTERM
    else:
        with pytest.raises(UserError, match="the loss became NaN/inf") as err:
            visionzoo.train("fashion_mnist", optim__lr=1e30, train__log_every=1, **kw)
        assert left == ["failed"] and err.value.agreed and not err.value.quiet


FAKE_SRUN = """#!/bin/bash
# srun for one node: drops srun's own options, starts SLURM_NTASKS tasks with Slurm's variables.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
echo "${pids[*]}" > "$FAKE_SRUN_PIDS"
code=0
for p in "${pids[@]}"; do wait "$p" || code=$?; done
exit $code
"""


def _sbatch_script(run: Path) -> str:
    """The sbatch example of docs/faults.md, on tiny synthetic data on the CPU in ``run``."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "faults.md").read_text()
    script = next(block for block in doc.split("```bash\n")[1:] if block.startswith("#!/bin/bash")).split("```")[0]
    assert "#SBATCH --signal=USR1@" in script and "srun --kill-on-bad-exit=1" in script
    small = ("fashion_mnist --data synthetic --device cpu --epochs 1 data.synthetic_samples=2000 data.batch_size=16 "
             "train.log_every=1 log.progress=off")
    assert "resnet50_cifar100 --data /data/cifar100" in script and "runs/r50-cifar100" in script
    return script.replace("resnet50_cifar100 --data /data/cifar100", small).replace("runs/r50-cifar100", str(run))


def test_the_documented_sbatch_script_checkpoints_requeues_and_resumes(tmp_path):
    import socket

    bin_dir = fake_scontrol(tmp_path / "bin")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the script's `python`: this one
    (bin_dir / "python").chmod(0o755)
    run = tmp_path / "r50"
    script = tmp_path / "train.sbatch"
    script.write_text(_sbatch_script(run))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="31", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=port, FAKE_SRUN_PIDS=str(tmp_path / "pids"))
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _wait_for_steps(run, job, 3)
        for pid in (tmp_path / "pids").read_text().split():  # Slurm signals every task of the step
            os.kill(int(pid), signal.SIGUSR1)
        _, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert "checkpoint saved" in err and "(Slurm job 31 requeued)" in err
    assert (bin_dir / "scontrol.log").read_text() == "requeue 31\n"  # rank 0 only
    # The requeued job runs the same script: it resumes and finishes; a start after that only reports.
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 2000 // 16
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "has finished; nothing to resume" in done.stdout


def test_ctrl_c_twice_is_recorded_as_interrupted(tmp_path):
    # (The second Ctrl-C itself: test_a_second_ctrl_c_stops_at_once_except_under_the_launcher.)
    from visionzoo.engine.stopping import end_failed_run

    class Log:
        def close(self):
            pass

        def finish(self, run_dir, results, status):  # the trackers' end (MetricsLog.finish)
            self.status = status

    log = Log()
    with pytest.raises(KeyboardInterrupt):
        end_failed_run(KeyboardInterrupt(), True, tmp_path, log, 12)
    assert log.status == "KILLED"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 12 and "error" not in status
