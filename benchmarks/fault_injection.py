"""Faults a cluster job meets, injected end to end on the CPU; one line per fault with what was
lost. Not a test (the tests cover each fault in pieces); a check that the pieces add up.

    python benchmarks/fault_injection.py /tmp/faults            # every fault, a few minutes
    python benchmarks/fault_injection.py /tmp/faults --only shard sigterm

Faults (``--only`` names):
  shard    a tar shard cut off mid-way, 2 gloo ranks: every global step taken on both ranks,
           replicas equal, only the unreadable samples lost (counted, over both ranks)
  sigterm  SIGTERM to both workers of a ``--devices 2`` run, then to the launcher (Slurm, then
           the launcher forwarding its own): checkpoint kept, one line, resumed to the end
  usr1     Slurm's early-warning SIGUSR1 with a fake ``scontrol`` on PATH: checkpoint, requeue
  ckpt     the newest checkpoint truncated: resumed from the one before, said, run completed
  parquet  a parquet file whose image ``bytes`` is a string naming a local file, and a row
           whose ``path`` points outside the data folder: refused / counted, the file never read
  photo    one 4000x3000 photo among 63 500x375 ones in a device-decode batch: the crop
           buffer's peak bytes with size groups vs one padded buffer (CPU tensors)
  knn      k-NN features on 2 ranks where one rank has no readable image: no hang
  numpy1   a training checkpoint pickled under NumPy 1.x (numpy.core.* names): loads; the same
           file naming a numpy.core function instead: refused with one line
  cifar    CIFAR batches whose pickle calls a builder with a bad argument, or holds object data:
           one line naming the file, exit 2, no traceback
  manifest a pack manifest naming ../secret.tar: `data verify` refuses with one line, the file
           outside the folder never opened
Each line starts with ``ok`` or ``LOST``; the exit code is the number of LOST lines."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
sys.path.insert(0, SRC)

TINY = """\
recipe: tiny_faults
description: a width-4 CNN on 16 px crops, for fault injection
data: {name: imagefolder, batch_size: 8, workers: 0, in_chans: 3, augment: imagenet, image_size: 16,
       crop_scale: [0.5, 1.0], test_resize: 18, test_size: 16, mean: [128, 128, 128], std: [64, 64, 64]}
model: {name: small_cnn, library: visionzoo, kwargs: {width: 4}, channels_last: false}
optim: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0}
schedule: {name: cosine, warmup_epochs: 0}
train: {epochs: 2, amp: none, device: cpu, seed: 0, log_every: 1, dist_timeout: 60}
log: {progress: "off"}
"""


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}


def _visionzoo(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionzoo", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _jpegs(root: Path, n_train: int, n_val: int, size: int = 20) -> Path:
    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")
    return root


def _steps_logged(run: Path) -> int:
    try:
        return sum('"kind": "step"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _line(ok: bool, name: str, text: str) -> str:
    return f"{'ok  ' if ok else 'LOST'} {name:8s} {text}"


def fault_shard(work: Path) -> str:
    from visionzoo.cli import main

    tree = _jpegs(work / "jpegs", 96, 14)
    shards = work / "shards"
    with open(os.devnull, "w") as quiet:
        sys.stdout, old = quiet, sys.stdout
        try:
            main(["data", "pack", str(tree), str(shards), "--shard-samples", "24"])
        finally:
            sys.stdout = old
    broken = shards / "train-000001.tar"
    broken.write_bytes(broken.read_bytes()[:6000])
    (work / "tiny.yaml").write_text(TINY)
    t0 = time.time()
    p = _visionzoo("train", str(work / "tiny.yaml"), "--data", str(shards), "data.name=webdataset", "--devices", "2",
                   "--output", str(work / "run"))
    if p.returncode != 0:
        return _line(False, "shard", f"run failed after {time.time() - t0:.0f} s: {p.stderr.strip().splitlines()[-1]}")
    res = json.loads((work / "run" / "results.json").read_text())
    ok = res["steps"] == 24 and res["ranks_in_sync"]
    return _line(ok, "shard", f"{res['steps']}/24 global steps on both ranks, replicas equal: {res['ranks_in_sync']}; "
                              f"lost: {res['bad_images']} unreadable samples of {broken.name} (counted), nothing else")


def _launch_and_signal(run: Path, extra: list[str], env: dict, signal_workers: bool, sig: int) -> tuple:
    argv = [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", "synthetic", "--device", "cpu",
            "--epochs", "1", "--output", str(run), "data.synthetic_samples=4000", "data.batch_size=16",
            "train.log_every=1", "log.progress=off", "train.deterministic=true", *extra]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        while _steps_logged(run) < 5:
            if p.poll() is not None:
                return p.returncode, p.communicate()[1]
            time.sleep(0.1)
        if signal_workers:
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                for pid in f.read().split():
                    os.kill(int(pid), sig)
            time.sleep(0.3)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, err


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def _reference(work: Path, extra: list[str]) -> Path:
    """The same run, never stopped."""
    ref = work / "uninterrupted"
    p = _visionzoo("train", "fashion_mnist", "--data", "synthetic", "--device", "cpu", "--epochs", "1", "--output",
                   str(ref), "data.synthetic_samples=4000", "data.batch_size=16", "train.log_every=1",
                   "log.progress=off", "train.deterministic=true", *extra)
    if p.returncode:
        raise RuntimeError(p.stderr.strip()[-300:])
    return ref


def _finish(run: Path, extra: list[str]) -> dict | str:
    p = _visionzoo("train", "fashion_mnist", "--resume", str(run), *extra)
    if p.returncode != 0:
        return p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
    return json.loads((run / "results.json").read_text())


def fault_sigterm(work: Path) -> str:
    run = work / "fm2"
    code, err = _launch_and_signal(run, ["--devices", "2"], _env(), True, signal.SIGTERM)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if code != 128 + signal.SIGTERM or len(lines) != 1 or "checkpoint saved" not in lines[0]:
        return _line(False, "sigterm", f"exit {code}, stderr: {err.strip()[-300:]}")
    step = int(lines[0].split("stopped at step ")[1].split(";")[0])
    res = _finish(run, ["--devices", "2"])
    if isinstance(res, str):
        return _line(False, "sigterm", f"stopped at step {step}, resume failed: {res}")
    same = _same_weights(run, _reference(work, ["--devices", "2"]))
    return _line(res["steps"] == 250 and same, "sigterm", f"double SIGTERM at step {step}: one line, exit {code}; "
                 f"resumed to {res['steps']}/250 steps, weights bit-identical to the run never stopped: {same}")


def fault_usr1(work: Path) -> str:
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir / 'calls'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = work / "usr1"
    env = _env(SLURM_JOB_ID="4321", PATH=f"{bin_dir}:{os.environ['PATH']}")
    code, err = _launch_and_signal(run, [], env, False, signal.SIGUSR1)
    calls = (bin_dir / "calls").read_text().split("\n")[0] if (bin_dir / "calls").exists() else "(none)"
    ok = code == 128 + signal.SIGUSR1 and calls == "requeue 4321" and "requeued" in err
    res = _finish(run, []) if ok else "not resumed"
    same = ok and isinstance(res, dict) and _same_weights(run, _reference(work, []))
    ok = ok and isinstance(res, dict) and res["steps"] == 250 and same
    return _line(ok, "usr1", f"SIGUSR1: checkpoint, `scontrol {calls}`, exit {code}; the requeued job resumed to "
                             f"{res['steps'] if isinstance(res, dict) else res}/250 steps, bit-identical: {same}")


def fault_ckpt(work: Path) -> str:
    from visionzoo.checkpoint import checkpoint_pairs

    run = work / "ckpt"
    common = ["--data", "synthetic", "--device", "cpu", "data.synthetic_samples=640", "data.batch_size=16",
              "train.deterministic=true", "log.progress=off", "train.checkpoint_every_steps=10",
              "train.keep_checkpoints=3"]
    ref = _visionzoo("train", "fashion_mnist", "--epochs", "2", "--output", str(work / "ref"), *common)
    if ref.returncode:
        return _line(False, "ckpt", ref.stderr.strip()[-300:])
    shutil.copytree(work / "ref", run)
    (run / "results.json").unlink()  # as if killed while its last checkpoint was being written
    newest = checkpoint_pairs(run)[0][1]
    newest.write_bytes(newest.read_bytes()[:100])
    (run / "checkpoints" / ".step-000000099.pt.k1ll3d").write_bytes(b"partial")
    r = _visionzoo("train", "fashion_mnist", "--resume", str(run), *common)
    said = next((line for line in r.stdout.splitlines() if line.startswith("warning: checkpoint")), "(nothing said)")
    a, b = (json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
            for d in (work / "ref", run))
    ok = r.returncode == 0 and a.get("ActualLoss") == b.get("ActualLoss") and "unusable" in said and \
        not list((run / "checkpoints").glob(".step-*"))
    return _line(ok, "ckpt", f"{said[:90]}...; final loss {b.get('ActualLoss')} vs uninterrupted "
                             f"{a.get('ActualLoss')}; temp files removed; lost: nothing")


def fault_parquet(work: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visionzoo.data.sources.hfds import ParquetReader
    from visionzoo.data.sources.shards import Shard

    secret = work / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(secret)
    ds = work / "hostile" / "data"
    ds.mkdir(parents=True, exist_ok=True)
    kind = pa.struct([("bytes", pa.string()), ("path", pa.string())])
    for split in ("train", "validation"):
        pq.write_table(pa.table({"image": pa.array([{"bytes": str(secret), "path": None}] * 4, type=kind),
                                 "label": [0, 1, 0, 1]}), ds / f"{split}-00000-of-00001.parquet")
    (work / "tiny.yaml").write_text(TINY)
    p = _visionzoo("train", str(work / "tiny.yaml"), "--data", str(ds.parent), "data.name=hfds",
                   "--output", str(work / "pq"))
    refused = p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    shard = ds / "paths.parquet"
    image = pa.array([{"bytes": None, "path": str(secret)}], type=kind)
    pq.write_table(pa.table({"image": image, "label": [0]}), shard)
    (row,) = list(ParquetReader().read(Shard(str(shard), 1), 0))
    shard.unlink()
    ok = refused and row[1] is None
    return _line(ok, "parquet", f"string bytes: {'one line, exit 2' if refused else p.stderr.strip()[-200:]}; "
                                f"path outside the data folder: bad sample ({row[3][:40]}...); lost: nothing read")


def fault_photo(work: Path) -> str:
    import torch

    import visionzoo.data.augment.batched as dd

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=g) for _ in range(63)]
    images.insert(17, torch.randint(0, 256, (3, 3000, 4000), dtype=torch.uint8, generator=g))
    sizes, seen, real_zeros, real_groups = [], [], torch.zeros, dd.crop_groups

    def zeros(*shape, **kw):
        t = real_zeros(*shape, **kw)
        if kw.get("dtype") == torch.uint8:
            sizes.append(t.numel())
        return t

    def groups(boxes, size):
        seen.append(boxes)
        return real_groups(boxes, size)

    dd.torch.zeros, dd.crop_groups = zeros, groups
    try:
        out = dd.random_resized_crop(images, 224, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, torch.Generator().manual_seed(1))
    finally:
        dd.torch.zeros, dd.crop_groups = real_zeros, real_groups
    boxes = seen[0]
    padded = len(boxes) * 3 * max(b[2] for b in boxes) * max(b[3] for b in boxes)  # one buffer for all, as before
    decoded = sum(i.numel() for i in images)
    ok = tuple(out.shape) == (64, 3, 224, 224) and sum(sizes) <= 1.5 * decoded + 16 * 64 * 3 * 224 * 224
    return _line(ok, "photo", f"uint8 crop buffers of a batch of 64: {sum(sizes) / 2**20:.0f} MiB in size groups vs "
                              f"{padded / 2**20:.0f} MiB padded to the largest crop (the decoded images: "
                              f"{decoded / 2**20:.0f} MiB); lost: nothing")


_KNN = """
import sys, torch, torch.distributed as dist
from torch.utils.data import Dataset
from visionzoo.engine.evaluation.knn import extract_features
dist.init_process_group("gloo")
class D(Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return (torch.full((3, 4, 4), float(i)), 0) if i % 2 == 0 else None
f, y = extract_features(torch.nn.Identity(), D(), 2, 0, torch.device("cpu"), fn=lambda m, x: x.flatten(1))
print(len(f))
dist.barrier(); dist.destroy_process_group()
"""


def fault_knn(work: Path) -> str:
    script = work / "knn.py"
    script.write_text(_KNN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return _line(False, "knn", "hung for 60 s")
    ok = outs == ["4", "4"]
    return _line(ok, "knn", f"rank 1 without a readable image: both ranks got the 4 features in "
                            f"{time.time() - t0:.0f} s; lost: nothing")


def fault_numpy1(work: Path) -> str:
    import io

    import torch

    from visionzoo.errors import UserError
    from visionzoo.models.weights import read_file

    buf = io.BytesIO()  # torch.save's legacy pickle, with the module names NumPy 1.x wrote
    torch.save({"meta": {"epoch": np.int64(200), "best": np.float64(80.1), "dt": np.dtype("float32")},
                "state_dict": {"w": torch.ones(2)}}, buf, _use_new_zipfile_serialization=False, pickle_protocol=2)
    old = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    (work / "np1.pth").write_bytes(old)
    obj, _ = read_file(work / "np1.pth")
    loaded = obj["meta"]["epoch"] == 200 and torch.equal(obj["state_dict"]["w"], torch.ones(2))
    (work / "evil.pth").write_bytes(old.replace(b"numpy.core.multiarray\nscalar\n",
                                                b"numpy.core.multiarray\nset_string_function\n"))
    try:
        read_file(work / "evil.pth")
        refused = "loaded"
    except UserError as err:
        refused = str(err)
    ok = loaded and "set_string_function" in refused
    return _line(ok, "numpy1", f"NumPy-1.x checkpoint loaded (epoch 200, weights equal); a numpy.core function "
                               f"refused: {refused[:70]}...; lost: nothing")


class _CodecTrick:
    """Pickles as _codecs.encode('a', 'nonexistent'): an allowed builder with a bad argument."""

    def __reduce__(self):
        import _codecs

        return (_codecs.encode, ("a", "nonexistent"))


def fault_cifar(work: Path) -> str:
    import pickle

    lines = []
    for kind, data in (("bad builder argument", _CodecTrick()),
                       ("object data", np.array([["x"] * 3072], dtype=object))):
        folder = work / kind.replace(" ", "_") / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        meta = {b"label_names": [b"c%d" % i for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0]}, protocol=2))
        r = _visionzoo("train", "resnet50_cifar100", "--data", str(folder), "data.name=cifar10", "--device", "cpu",
                       "--epochs", "1", "train.max_steps_per_epoch=1", timeout=300)
        err = r.stderr.strip()
        lines.append((r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
                      and ("data_batch" in err or "test_batch" in err), kind, err))
    ok = all(good for good, _, _ in lines)
    return _line(ok, "cifar", "; ".join(f"{kind}: {err[:80]}" for _, kind, err in lines) + "; lost: nothing")


def fault_manifest(work: Path) -> str:
    shards = work / "shards"
    _jpegs(work / "tree", 8, 4)
    r = _visionzoo("data", "pack", str(work / "tree"), str(shards), "--shard-samples", "4")
    if r.returncode:
        return _line(False, "manifest", r.stderr.strip()[-200:])
    secret = work / "secret.tar"
    secret.write_bytes(b"not yours")
    before = secret.stat().st_atime_ns
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "../secret.tar"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    r = _visionzoo("data", "verify", str(shards), "--deep")
    err = r.stderr.strip()
    ok = r.returncode == 2 and len(err.splitlines()) == 1 and "outside the folder" in err \
        and secret.stat().st_atime_ns == before
    return _line(ok, "manifest", f"`data verify`: {err[:110]}; refused before any shard is opened; lost: nothing")


FAULTS = {"shard": fault_shard, "sigterm": fault_sigterm, "usr1": fault_usr1, "ckpt": fault_ckpt,
          "parquet": fault_parquet, "photo": fault_photo, "knn": fault_knn, "numpy1": fault_numpy1,
          "cifar": fault_cifar, "manifest": fault_manifest}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", help="scratch folder (emptied first)")
    p.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="run these faults only")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    lost = 0
    for name in args.only or FAULTS:
        folder = work / name
        folder.mkdir(parents=True)
        t0 = time.time()
        try:
            line = FAULTS[name](folder)
        except Exception as err:  # noqa: BLE001 - a fault script reports, it does not stop at the first failure
            line = _line(False, name, f"{type(err).__name__}: {err}")
        lost += line.startswith("LOST")
        print(f"{line}  [{time.time() - t0:.0f} s]", flush=True)
    return lost


if __name__ == "__main__":
    sys.exit(main())
