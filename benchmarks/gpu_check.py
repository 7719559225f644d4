"""One command that checks every CUDA path of visionzoo on a GPU machine: no network, no data
set, no installation; sized for at most 8 minutes on one H100/H200 (not yet run on a GPU: the
dry run is). From the repository root:

    PYTHONPATH=src python3 benchmarks/gpu_check.py                    # on cuda; gpu_check.json
    PYTHONPATH=src python3 benchmarks/gpu_check.py --device cuda:1 --output /tmp/check.json
    PYTHONPATH=src python3 benchmarks/gpu_check.py --dry-run          # the same on the CPU, tiny (CI)

It writes its own data (an ImageFolder of JPEGs with greyscale, progressive, 4:4:4, CMYK, PNG and
corrupt files; CIFAR-100 pickles), then for every seed recipe, shrunk by overrides (small
batches, 2-3 steps per epoch) through visionzoo's own functions (``visionzoo.cli.main``, the
engines):

- train fp32 (data.decode=cpu, 2 epochs, deterministic), bf16 and fp16 (data.decode=device for
  ImageFolder recipes; fp16 runs the loss scaler), and bf16 + torch.compile for AlexNet: the run
  finishes, its loss is finite, the ranks agree;
- eval (``visionzoo eval``; DINO: ``visionzoo knn``) of the fp32 run's checkpoint;
- export to ONNX, checked against PyTorch in ONNX Runtime (``visionzoo export``);
- resume on the device: the fp32 run with its last checkpoint removed, resumed, must give the
  uninterrupted run's epoch-2 loss (relative difference <= 1e-3);
- host syncs in the steady state (``torch.cuda.set_sync_debug_mode``): counted over N and 2N
  training steps (the recipe's task through engine/loop.py) on one batch kept on the device,
  and end to end from the recipe's loader (data.decode=device for ImageFolder recipes); the
  difference divided by N is the syncs per step (epoch-end syncs cancel). PASS at zero; the
  places that synchronised are listed;
- peak device memory per recipe (in the summary table and the JSON).

And once: nvJPEG against Pillow on every JPEG the device decoder is given (mean absolute pixel
difference <= 3 grey levels per image; which files go to Pillow instead), and a
train.deterministic=true run in a fresh process without CUBLAS_WORKSPACE_CONFIG (it must not
raise). One PASS/FAIL table on stdout, the details in the JSON (``--output``), each check's own
output in ``<workdir>/logs``.

``--dry-run`` does all of it on the CPU with tiny images and tiny networks of the same kind
(small CNNs for the torchvision models, timm's test NFNet, a 1-block ViT): what needs CUDA (sync
counting, peak memory, the deterministic run's cuBLAS setting) is reported SKIP, torch.compile
uses the eager backend (inductor's C++ build takes minutes on a small CPU) and no curve plots
are drawn. tests/test_gpu_check.py runs it in CI.

Needs (imported, not installed): torch, torchvision, timm, omegaconf, safetensors, numpy,
pillow, pyyaml, matplotlib, tqdm, onnx, onnxruntime. A missing one is named with how to bring it
to a machine without network, before anything runs."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
RECIPES = ("alexnet_imagenet", "densenet201_imagenet", "resnet50_cifar100", "nfnet_f0_imagenet", "dino_vits16_imagenet")
COMPILED = "alexnet_imagenet"
# import name -> what pip installs
NEEDED = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "omegaconf": "omegaconf",
          "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml",
          "matplotlib": "matplotlib", "tqdm": "tqdm", "onnx": "onnx", "onnxruntime": "onnxruntime"}
RESUME_RTOL = 1e-3
DECODE_MAX_MEAN_DIFF = 3.0  # grey levels; nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg's

# Per mode: JPEG size, train/val images per class (4 classes), batch sizes, steps per epoch.
SIZES = {
    "gpu": dict(jpeg=(500, 375), train=24, val=4, batch=16, dino_batch=8, cifar=(256, 100), cifar_batch=32, workers=4,
                steps=3, sync_steps=3),
    "dry": dict(jpeg=(48, 40), train=6, val=2, batch=4, dino_batch=4, cifar=(32, 20), cifar_batch=4, workers=0,
                steps=1, sync_steps=1),
}
# The dry run checks this script and the recipes' data paths, precisions, steps, schedules and
# checkpoints on a small CPU in CI, not the networks (tests/test_train_cli.py runs every recipe's
# own): tiny images, and tiny networks of the same kind in place of 20-70M-parameter ones.
_TINY_CNN = ["model.library=visionzoo", "model.name=small_cnn", "model.kwargs={width: 4}"]
_TINY_IMAGES = ["data.image_size=32", "data.test_resize=36", "data.test_size=32"]
DRY_RECIPE = {
    "alexnet_imagenet": _TINY_IMAGES + _TINY_CNN,
    "densenet201_imagenet": _TINY_IMAGES + _TINY_CNN,
    "resnet50_cifar100": _TINY_CNN,
    "nfnet_f0_imagenet": _TINY_IMAGES + ["model.name=test_nfnet"],  # timm's small NFNet: ScaledStdConv, AGC
    "dino_vits16_imagenet": _TINY_IMAGES + [
        "dino.local_crop_size=16", "dino.local_crops_number=2", "dino.out_dim=64", "dino.hidden_dim=32",
        "dino.bottleneck_dim=16",
        "model.kwargs={dynamic_img_size: true, img_size: 32, embed_dim: 24, depth: 1, num_heads: 3}"],
}


def missing_packages() -> list[str]:
    """pip names of the packages this check (and visionzoo) needs that do not import here."""
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def explain_missing(missing: list[str]) -> str:
    names = " ".join(missing)
    return (f"gpu_check: cannot run: missing Python package(s): {', '.join(missing)}.\n"
            + ("  visionzoo's config layer imports omegaconf (src/visionzoo/config.py); omegaconf 2.3 also needs "
               "antlr4-python3-runtime 4.9.* (2.4 bundles it).\n" if "omegaconf" in missing else "")
            + f"  Without network here: on a machine with the same Python version run\n"
              f"      pip download {names} -d wheels\n"
              f"  copy wheels/ here, then\n"
              f"      pip install --no-index --no-build-isolation --no-deps wheels/*\n"
              f"  (or unzip the .whl files into a folder and add it to PYTHONPATH), and run this again.")


# ----------------------------------------------------------------------------- data

def write_jpeg_tree(root: Path, size: tuple[int, int], per_class: int, val_per_class: int) -> dict[str, list[Path]]:
    """ImageFolder train/ and val/ of 4 classes (benchmarks/make_jpeg_tree.py's images) plus the
    files real data sets contain: greyscale, progressive and 4:4:4 JPEGs (device-decodable), a
    CMYK JPEG and a PNG (decoded by Pillow), and a truncated JPEG, an empty file and a text file
    named .JPEG (skipped as bad). Returns the paths by kind."""
    sys.path.insert(0, str(HERE))
    import numpy as np

    from make_jpeg_tree import make_image

    g = np.random.default_rng(0)
    kinds: dict[str, list[Path]] = {k: [] for k in ("rgb", "grey", "progressive", "444", "cmyk", "png", "corrupt")}

    def save(path: Path, img, kind: str, **kw) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        kinds[kind].append(path)

    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(4):
            d = root / split / f"class_{c}"
            for i in range(n):
                save(d / f"{i:04d}.JPEG", make_image(g, *size), "rgb", format="JPEG", quality=90)
            img = make_image(g, *size)
            save(d / "grey.JPEG", img.convert("L"), "grey", format="JPEG", quality=90)
            if split == "train":
                save(d / "progressive.JPEG", img, "progressive", format="JPEG", quality=90, progressive=True)
                save(d / "full_chroma.JPEG", img, "444", format="JPEG", quality=90, subsampling=0)
            save(d / "cmyk.JPEG", img.convert("CMYK"), "cmyk", format="JPEG", quality=90)
            save(d / "image.png", img, "png", format="PNG")
    bad = root / "train" / "class_0"
    buf = io.BytesIO()
    make_image(g, *size).save(buf, format="JPEG", quality=90)
    (bad / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "empty.JPEG").write_bytes(b"")
    (bad / "text.JPEG").write_text("not an image\n")
    kinds["corrupt"] += [bad / "truncated.JPEG", bad / "empty.JPEG", bad / "text.JPEG"]
    return kinds


def write_cifar100(root: Path, n_train: int = 256, n_test: int = 100) -> Path:
    """A cifar-100-python folder (train, test, meta pickles in the distributed format)."""
    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        rows = g.integers(0, 256, (n, 3072), dtype=np.uint8)  # R plane, G plane, B plane per row
        with open(folder / split, "wb") as f:
            batch = {b"data": rows, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()}
            pickle.dump(batch, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)
    return folder


# ----------------------------------------------------------------------------- running checks

class Checker:
    """Runs checks, records a row (recipe, check, status, seconds, detail) for each, and writes
    each check's output to logs/."""

    def __init__(self, workdir: Path):
        self.rows: list[dict] = []
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, recipe: str, name: str, fn, *args, **kwargs):
        """``fn`` returns (status, detail, data) or raises (FAIL with the error's last line)."""
        log = self.logs / re.sub(r"[^\w.-]+", "_", f"{recipe}-{name}").strip("_")
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        data = None
        log_file = log.with_suffix(".log")
        with open(log_file, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                status, detail, data = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL row
                traceback.print_exc()
                last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
                status, detail = "FAIL", f"{type(err).__name__}: {last}"
        if status == "FAIL":  # the package's own one-line error says most
            errors = [line for line in log_file.read_text().splitlines() if line.startswith("visionzoo: error:")]
            detail = (f"{detail} | {errors[-1]}" if errors else detail)[:400]
        row = {"recipe": recipe, "check": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(_cpu_seconds() - cpu0, 1), "detail": detail, "data": data, "log": str(log_file)}
        self.rows.append(row)
        print(f"  {status:4}  {recipe:22} {name:32} {row['seconds']:6.1f} s  {detail}", flush=True)
        gc.collect()
        return data


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the dry run's budget is CPU-bound)."""
    import resource

    return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime


def train(recipe: str, data: str, run: Path, args: list[str]) -> dict:
    """``visionzoo train`` in this process; results.json of the finished run."""
    from visionzoo.cli import main

    code = main(["train", recipe, "--data", data, "--output", str(run), *args])
    if code != 0:
        raise RuntimeError(f"visionzoo train exited with {code} (see the log)")
    return json.loads((run / "results.json").read_text())


def train_check(recipe, data, run, args, expect_device_decode: bool):
    res = train(recipe, data, run, args)
    loss = res["ActualLoss"]
    problems = []
    if loss is None or not math.isfinite(loss):
        problems.append(f"loss {loss}")
    if res.get("ranks_in_sync") is not True:
        problems.append("ranks not in sync")
    if res.get("Acc@1") is None:
        problems.append("no evaluation")
    if expect_device_decode and "device decode" not in str(res.get("loader")):
        problems.append(f"loader {res.get('loader')}")
    detail = (f"loss {loss:.4g}, Acc@1 {res['Acc@1']:.1f}, {res['steps']} steps, {res['precision']}, "
              f"{res['loader']}, cpu_fallbacks {res.get('cpu_fallbacks')}, bad {res.get('bad_images')}, "
              f"skipped {res.get('skipped_steps')}") if not problems else "; ".join(problems)
    return ("FAIL" if problems else "PASS"), detail, res


def epoch_losses(run: Path) -> list[float]:
    from visionzoo.run_folder import read_metrics

    return [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "epoch"]


def resume_check(recipe, data, reference: Path, work: Path, args: list[str]):
    """Copy the 2-epoch reference run, drop its last checkpoint (the run as if killed in epoch 2),
    resume it and compare the epoch-2 loss with the uninterrupted run's."""
    from visionzoo.checkpoint import checkpoint_pairs
    from visionzoo.cli import main
    from visionzoo.run_folder import mark_status

    run = work / "resumed"
    shutil.copytree(reference, run)
    pairs = checkpoint_pairs(run)
    if len(pairs) < 2:
        raise RuntimeError(f"the reference run kept {len(pairs)} checkpoint(s); 2 are needed")
    weights, _ = pairs[0]
    for p in weights.parent.glob(weights.name.replace(".safetensors", ".*")):  # weights, state, EMA weights
        p.unlink()
    (run / "results.json").unlink(missing_ok=True)
    mark_status(run, "interrupted")
    code = main(["train", recipe, "--data", data, "--resume", str(run), *args])
    if code != 0:
        raise RuntimeError(f"visionzoo train --resume exited with {code}")
    want, got = epoch_losses(reference), epoch_losses(run)
    if len(want) != 2 or len(got) != 2:
        return "FAIL", f"epoch records: {len(want)} uninterrupted, {len(got)} resumed", None
    rel = abs(got[1] - want[1]) / max(abs(want[1]), 1e-12)
    detail = f"epoch-2 loss {got[1]:.6g} resumed vs {want[1]:.6g} (rel. diff {rel:.1e}, limit {RESUME_RTOL:g})"
    return ("PASS" if rel <= RESUME_RTOL else "FAIL"), detail, {"uninterrupted": want, "resumed": got, "rel_diff": rel}


def eval_check(recipe, reference: Path, data: str, device: str):
    """``visionzoo eval`` (``visionzoo knn`` for DINO) of the reference run, on ``device``."""
    if recipe.startswith("dino"):
        from visionzoo.commands.evaluate import knn_checkpoint

        res = knn_checkpoint(str(reference), [f"data.path={data}", f"train.device={device}"])
        top1 = max(v["top1"] for v in res.values())
        return ("PASS" if 0 <= top1 <= 100 else "FAIL"), "k-NN top-1 " + ", ".join(
            f"k={k} {v['top1']:.1f}" for k, v in res.items()), res
    from visionzoo.commands.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(str(reference), [f"data.path={data}", f"train.device={device}"])
    ok = 0 <= res["acc1"] <= 100 and math.isfinite(res["loss"])
    return ("PASS" if ok else "FAIL"), f"Acc@1 {res['acc1']:.1f}, loss {res['loss']:.4g}, {res['samples']} images", res


def export_check(reference: Path):
    from visionzoo.commands.export import export_checkpoint

    side = export_checkpoint(str(reference))
    p = side["parity"]
    return "PASS", f"ONNX Runtime vs PyTorch: max abs diff {p['max_abs_diff']:.2e} (limit {p['limit']:.2e})", side


# ----------------------------------------------------------------------------- host syncs

@contextlib.contextmanager
def sync_counter(device, enabled: bool):
    """Record the synchronising CUDA calls made inside (set_sync_debug_mode warn), by place."""
    import torch

    seen: Counter = Counter()
    if not enabled:
        yield seen
        return
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for r in records:
        if "synchroniz" in str(r.message):
            seen[f"{Path(r.filename).name}:{r.lineno}"] += 1


def _per_step(run_n, steps: int, device, enabled: bool) -> tuple[float | None, dict]:
    """Syncs per step from runs of N and 2N steps (what both share, epoch start and end, cancels)."""
    if not enabled:  # nothing to count: run the steps once
        run_n(steps)
        return None, {}
    counts = []
    for n in (steps, 2 * steps):
        with sync_counter(device, enabled) as seen:
            run_n(n)
        counts.append(seen)
    extra = counts[1] - counts[0]  # Counter difference: places that synchronised more in 2N steps
    return (sum(counts[1].values()) - sum(counts[0].values())) / steps, dict(extra.most_common(8))


def sync_check(recipe: str, data: str, overrides: list[str], device_name: str, cuda: bool, steps: int):
    """Steady-state host syncs per training step: one batch kept on the device (the step alone),
    then end to end from the recipe's loader."""
    from visionzoo.config import for_world_size, load_config
    from visionzoo.data.loading.build import build_datasets
    from visionzoo.runtime import resolve_amp, resolve_device, seed_everything, select_device

    cfg = for_world_size(load_config(recipe, [f"data.path={data}", *overrides]), 1)
    device = resolve_device(device_name)
    select_device(device)
    seed_everything(0)
    amp = resolve_amp(cfg.train.amp, device)
    splits = build_datasets(cfg.data, train=True)
    run_model, run_e2e = _steppers(cfg, splits, device, amp)
    run_model(steps)  # warm-up: allocator, cuDNN, lazy state
    model_rate, model_places = _per_step(run_model, steps, device, cuda)
    run_e2e(steps)
    e2e_rate, e2e_places = _per_step(run_e2e, steps, device, cuda)
    if not cuda:
        return "SKIP", f"no CUDA: {4 * steps} steps ran, syncs not counted", None
    ok = model_rate == 0 and e2e_rate == 0
    places = {**model_places, **e2e_places}
    detail = (f"per step: {model_rate:g} (batch on the device), {e2e_rate:g} (from the loader)"
              + (f"; at {', '.join(f'{k} x{v}' for k, v in places.items())}" if places else ""))
    return ("PASS" if ok else "FAIL"), detail, {"model_only_per_step": model_rate, "end_to_end_per_step": e2e_rate,
                                                 "places_model_only": model_places, "places_end_to_end": e2e_places}


def _steppers(cfg, splits, device, amp):
    """(run n model-only steps, run n end-to-end steps) of the recipe's task through the training
    loop (engine/loop.py), as ``visionzoo bench`` times them."""
    from visionzoo.commands.bench import RepeatBatch
    from visionzoo.data.loading.build import set_loader_epoch
    from visionzoo.engine.loop import LoopSettings, Position, RunHooks, train_epoch
    from visionzoo.engine.tasks import make_task
    from visionzoo.engine.tasks.base import RunEnv

    task = make_task(cfg, RunEnv(device, amp))
    task.setup_data(splits)
    task.build()
    task.wrap(resumed=False)
    loader, accum = task.train_loader, cfg.train.accum_steps
    set_loader_epoch(loader, 0, 0)
    inputs, targets, _ = next(iter(loader))
    inputs = [c.to(device) for c in inputs] if isinstance(inputs, list) else inputs.to(device)
    pos, hooks = Position(), RunHooks()
    settings = LoopSettings(accum_steps=accum, log_every=0, progress="off", show=False)
    epoch = [0]

    def run(source, n: int) -> None:
        pos.batches_in_epoch, pos.epoch_sums = 0, None
        task.train_loader = source
        train_epoch(task, pos, settings, hooks, max_steps=n)

    def run_model(n: int) -> None:
        run(RepeatBatch(inputs, targets.to(device), n * accum), n)

    def run_e2e(n: int) -> None:
        if len(loader) < n * accum:
            raise RuntimeError(f"the loader has {len(loader)} batches; {n * accum} needed")
        epoch[0] += 1
        set_loader_epoch(loader, epoch[0], 0)
        run(loader, n)

    return run_model, run_e2e


def decode_check(kinds: dict[str, list[Path]], device_name: str):
    """nvJPEG (decode_jpeg on the device, batched as the loader calls it) against Pillow, on every
    file ``device_jpeg`` gives the device decoder; and the others must go to Pillow."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from visionzoo.data.sources.encoded import device_jpeg, pil_decode

    device_kinds, pillow_kinds = ("rgb", "grey", "progressive", "444"), ("cmyk", "png", "corrupt")
    routed = {k: [device_jpeg(p.read_bytes()) for p in paths] for k, paths in kinds.items()}
    misrouted = [k for k in device_kinds if not all(routed[k])] + [k for k in pillow_kinds if any(routed[k])]
    files = [(k, p) for k in device_kinds for p in kinds[k]]
    tensors = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for _, p in files]
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = list(decode_jpeg(tensors, device=device_name, mode=ImageReadMode.RGB))
        except RuntimeError as err:  # the batched call: find which files it cannot take
            problems.append(f"batched decode failed ({str(err).splitlines()[0][:120]})")
            decoded = []
            for (k, p), t in zip(files, tensors, strict=True):  # one tensor per file
                try:
                    decoded.append(decode_jpeg(t, device=device_name, mode=ImageReadMode.RGB))
                except RuntimeError:
                    problems.append(f"{p.name} ({k}) not decoded")
                    decoded.append(None)
    diffs: dict[str, list[float]] = {}
    for (kind, p), t, img in zip(files, tensors, decoded, strict=True):  # one decoded image (or None) per file
        ref = pil_decode(t.numpy().tobytes())
        if img is None:
            continue
        if ref is None or tuple(img.shape) != tuple(ref.shape):
            pillow = None if ref is None else tuple(ref.shape)
            problems.append(f"{p.name} ({kind}): shape {tuple(img.shape)} vs Pillow's {pillow}")
            continue
        diffs.setdefault(kind, []).append(float((img.cpu().float() - ref.float()).abs().mean()))
    worst = {k: max(v) for k, v in diffs.items()}
    problems += [f"{k}: mean abs diff {v:.2f} > {DECODE_MAX_MEAN_DIFF}"
                 for k, v in worst.items() if v > DECODE_MAX_MEAN_DIFF]
    problems += [f"{k} files routed to the wrong decoder" for k in misrouted]
    detail = (f"{len(files)} JPEGs, worst mean abs diff per kind: "
              + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
              + ("; " + "; ".join(problems[:6]) if problems else "; CMYK/PNG/corrupt files go to Pillow"))
    return ("FAIL" if problems else "PASS"), detail, {"mean_abs_diff": diffs, "limit": DECODE_MAX_MEAN_DIFF,
                                                      "problems": problems}


def deterministic_check(data: str, work: Path, overrides: list[str]):
    """train.deterministic=true in a fresh process whose environment has no CUBLAS_WORKSPACE_CONFIG:
    visionzoo must set it before CUDA starts (else the first cuBLAS call raises)."""
    if "train.device=cpu" in overrides:
        return "SKIP", "no CUDA: no cuBLAS to check", None
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "visionzoo", "train", "alexnet_imagenet", "--data", data,
           "--output", str(work / "det"), *overrides, "train.epochs=1", "train.deterministic=true"]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout + done.stderr, flush=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return "FAIL", f"exit {done.returncode}: {lines[-1] if lines else ''}"[:300], None
    return "PASS", "finished without CUBLAS_WORKSPACE_CONFIG in its environment", None


# ----------------------------------------------------------------------------- main

def recipe_overrides(recipe: str, mode: str, device: str) -> list[str]:
    """Shrunk settings: small batches, a few steps, logs every step, no progress bar."""
    s = SIZES[mode]
    batch = s["dino_batch"] if recipe.startswith("dino") else s["cifar_batch"] if "cifar" in recipe else s["batch"]
    out = [f"train.device={device}", f"data.workers={s['workers']}", f"data.batch_size={batch}",
           *([] if recipe.startswith("dino") else ["optim.lr=0.01"]),  # the recipes' LRs are for batches of 128-1024
           f"train.max_steps_per_epoch={s['steps']}", "train.log_every=1", "log.progress=off",
           "train.cudnn_benchmark=false", "train.perf_warmup_steps=0"]
    if recipe.startswith("dino"):
        out += ["dino.knn_k=[5,10]", "dino.knn_report_k=10", "train.eval_every=0"]
    return out + (DRY_RECIPE[recipe] if mode == "dry" else [])


def check_recipe(ck: Checker, recipe: str, data: str, mode: str, device: str, work: Path, cuda: bool) -> dict:
    import torch

    args = recipe_overrides(recipe, mode, device)
    folder = recipe != "resnet50_cifar100"
    decode = (lambda d: [f"data.decode={d}"]) if folder else (lambda d: [])
    tag = (lambda d: f" (decode={d})") if folder else (lambda d: "")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wd = work / recipe
    reference = wd / "fp32"
    ck.run(recipe, "train fp32" + tag("cpu"), train_check, recipe, data, reference,
           [*args, "train.epochs=2", "train.amp=none", "train.deterministic=true", *decode("cpu")], False)
    for amp in ("bf16", "fp16"):
        ck.run(recipe, f"train {amp}" + tag("device"), train_check, recipe, data, wd / amp,
               [*args, "train.epochs=1", f"train.amp={amp}", *decode("device")], folder)
    if recipe == COMPILED:
        ck.run(recipe, "train bf16 compile" + tag("device"), train_check, recipe, data, wd / "compiled",
               [*args, "train.epochs=1", "train.amp=bf16", "train.compile=true", *decode("device")], folder)
    if (reference / "results.json").exists():
        ck.run(recipe, "eval", eval_check, recipe, reference, data, device)
        ck.run(recipe, "export onnx", export_check, reference)
        ck.run(recipe, "resume", resume_check, recipe, data, reference, wd,
               ["train.epochs=2", "train.amp=none", "train.deterministic=true", *decode("cpu")])
    else:
        for name in ("eval", "export onnx", "resume"):
            ck.rows.append({"recipe": recipe, "check": name, "status": "FAIL", "seconds": 0.0, "cpu_seconds": 0.0,
                            "detail": "the fp32 run failed: nothing to check", "data": None, "log": None})
    ck.run(recipe, "host syncs", sync_check, recipe, data, [*args, "train.amp=bf16", *decode("device")],
           device, cuda, SIZES[mode]["sync_steps"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"peak_memory_gib": peak}


def versions(device: str) -> dict:
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
         "timm": timm.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}
    for pkg in ("onnx", "onnxruntime", "omegaconf"):
        v[pkg] = getattr(__import__(pkg), "__version__", "?")
    if device.startswith("cuda"):
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(device),
                 gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="everything on the CPU with tiny sizes (no CUDA call)")
    p.add_argument("--device", help="default: cuda (cpu with --dry-run)")
    p.add_argument("--output", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    p.add_argument("--workdir", help="where data and runs go (default: a temporary folder, deleted at the end)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of the seed recipes")
    args = p.parse_args(argv)

    missing = missing_packages()
    if missing:
        print(explain_missing(missing), file=sys.stderr)
        return 2
    # Before anything touches CUDA: this process's deterministic runs (fp32, resume) need it; the
    # deterministic check runs in a fresh process without it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    mode = "dry" if args.dry_run else "gpu"
    device = args.device or ("cpu" if args.dry_run else "cuda")
    cuda = device.startswith("cuda")
    if args.dry_run == cuda:
        print("gpu_check: --dry-run runs on the CPU (drop --device); without it, on CUDA", file=sys.stderr)
        return 2
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry-run runs the checks on the CPU", file=sys.stderr)
        return 2
    if cuda:
        device = str(torch.device(device if ":" in device else f"cuda:{torch.cuda.current_device()}"))
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        print(f"gpu_check: not a seed recipe: {', '.join(unknown)}", file=sys.stderr)
        return 2
    with dry_run_shortcuts(args.dry_run):
        return run_checks(args, mode, device, cuda, recipes)


@contextlib.contextmanager
def dry_run_shortcuts(enabled: bool):
    """What the dry run leaves out, for the time it runs: inductor's C++ build (minutes on a small
    CPU; dynamo traces, the eager backend runs) and the curve plots (matplotlib is half of a tiny
    run's CPU time; tests/test_reporting.py checks them)."""
    if not enabled:
        yield
        return
    import functools

    import torch

    import visionzoo.engine.run as run

    saved = torch.compile, run.plot_curves
    torch.compile = functools.partial(torch.compile, backend="eager")
    run.plot_curves = lambda *a, **k: None
    try:
        yield
    finally:
        torch.compile, run.plot_curves = saved


def run_checks(args: argparse.Namespace, mode: str, device: str, cuda: bool, recipes: list[str]) -> int:
    """Every check; the table on stdout, the report in ``args.output``; 0 when none failed."""
    import torch

    t0 = time.perf_counter()
    info = versions(device)
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in info.items()) + f" | device {device}"
          + (" | DRY RUN (CPU, tiny sizes)" if args.dry_run else ""), flush=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = SIZES[mode]
    kinds = write_jpeg_tree(work / "jpegs", s["jpeg"], s["train"], s["val"])
    cifar = write_cifar100(work / "cifar", *s["cifar"])
    print(f"gpu_check: data in {work}; each check's output in {work / 'logs'}", flush=True)

    ck = Checker(work)
    ck.run("-", "nvJPEG vs Pillow" if cuda else "decode_jpeg vs Pillow", decode_check, kinds, device)
    if "alexnet_imagenet" in recipes:
        ck.run("alexnet_imagenet", "deterministic, fresh process", deterministic_check, str(work / "jpegs"), work,
               recipe_overrides("alexnet_imagenet", mode, device))
    summary = {}
    for recipe in recipes:
        data = str(cifar) if recipe == "resnet50_cifar100" else str(work / "jpegs")
        summary[recipe] = check_recipe(ck, recipe, data, mode, device, work, cuda)
        if cuda:
            torch.cuda.empty_cache()
        syncs = next((r["data"] for r in ck.rows if r["recipe"] == recipe and r["check"] == "host syncs"), None) or {}
        summary[recipe].update(syncs_per_step_model_only=syncs.get("model_only_per_step"),
                               syncs_per_step_end_to_end=syncs.get("end_to_end_per_step"))

    from visionzoo.run_folder import format_table

    table = format_table([{k: r[k] for k in ("recipe", "check", "status", "seconds", "detail")} for r in ck.rows],
                         ("recipe", "check", "status", "seconds", "detail"))
    mem = format_table([{"recipe": k, "peak GiB": v["peak_memory_gib"], "syncs/step (batch on device)":
                         v["syncs_per_step_model_only"], "syncs/step (from loader)": v["syncs_per_step_end_to_end"]}
                        for k, v in summary.items()],
                       ("recipe", "peak GiB", "syncs/step (batch on device)", "syncs/step (from loader)"))
    failed = [r for r in ck.rows if r["status"] == "FAIL"]
    verdict = "PASS" if not failed else f"FAIL ({len(failed)} of {len(ck.rows)} checks)"
    print(f"\n{table}\n\n{mem}\n\ngpu_check: {verdict} in {time.perf_counter() - t0:.0f} s", flush=True)
    report = {"verdict": "PASS" if not failed else "FAIL", "dry_run": args.dry_run, "device": device, "versions": info,
              "seconds": time.perf_counter() - t0, "checks": ck.rows, "recipes": summary, "workdir": str(work)}
    Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: report written to {args.output}", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
