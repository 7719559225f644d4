"""CPU threads beside DataLoader workers and beside other ranks: training img/s of a performance
run (``visionzoo train --perf``) under PyTorch's default (a thread per core in every process),
visionzoo's rule (runtime.cpu_threads: a thread per core on an idle machine; beside other
processes' load, the cores less the busy ones and the loader workers; with several ranks, each its
share less its workers) and one thread, alone and beside a competing load (a process spinning one
core), in alternating rounds; the rule's choice, as the run header says it, is recorded.

    PYTHONPATH=src python benchmarks/cpu_threads.py --rounds 3 --out /tmp/cpu_threads

Cases: the issue's timm resnet18 on 64 px JPEGs (batch 32, 2 loader workers; the workers mostly
wait), the same from 256 px JPEGs (the workers decode and resize 16x the pixels: busy), the demo
(fashion_mnist, in memory: no workers), and the demo on ``--devices 2``. PyTorch's default is
obtained by OMP_NUM_THREADS = the core count (visionzoo keeps a value the user set), one thread by
OMP_NUM_THREADS=1, the rule by leaving OMP_NUM_THREADS unset. Prints a Markdown table of medians
(and every round) and writes cpu_threads.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SRC = str(Path(__file__).resolve().parents[1] / "src")


def jpeg_folder(root: Path, n_train: int = 640, size: int = 96) -> Path:
    """An ImageFolder of Fashion-MNIST images as RGB JPEGs (10 classes), n_train / 4 for val."""
    from PIL import Image

    from visionzoo.data.sources.idx import FASHION_MNIST_CLASSES, load_idx_split
    from visionzoo.data.sources.table import data_source

    images, labels = load_idx_split(data_source("fashion_mnist").default_path, True)
    for split, n in (("train", n_train), ("val", n_train // 4)):
        for i in range(n):
            k = int(labels[i])
            d = root / split / FASHION_MNIST_CLASSES[k].replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((size, size)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def cases(data: Path) -> dict[str, list[str]]:
    folder = ["--data", str(data), "model.library=timm", "model.name=resnet18", "model.kwargs={}",
              "data.name=imagefolder", "data.in_chans=3", "data.image_size=64", "data.test_size=64",
              "data.test_resize=72", "data.augment=imagenet", "data.mean=[123.675,116.28,103.53]",
              "data.std=[58.395,57.12,57.375]", "data.batch_size=32", "--workers", "2"]
    return {"timm resnet18, 64 px JPEGs, batch 32, 2 workers": ["fashion_mnist", *folder],
            "timm resnet18, 256 px JPEGs to 64 px, batch 32, 2 busy workers":
                ["fashion_mnist", *folder, "--data", str(data.with_name("jpegs256"))],
            "demo (fashion_mnist, in memory)": ["fashion_mnist"],
            "demo, --devices 2": ["fashion_mnist", "--devices", "2"]}


def one_run(argv: list[str], threads: str, out: Path, steps: int) -> tuple[float, str]:
    """img/s of a --perf run with ``threads`` (default | rule | 1), and the threads its header gave."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = SRC
    if threads == "default":
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    elif threads == "1":
        env["OMP_NUM_THREADS"] = "1"
    run = Path(tempfile.mkdtemp(dir=out))
    cmd = [sys.executable, "-m", "visionzoo", "train", *argv, "--perf", "--steps", str(steps), "--device", "cpu",
           "--output", str(run), "train.perf_warmup_steps=3", "log.progress=off"]
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)
    said = re.search(r", (\d+ threads? \([^)]*\))", proc.stdout)
    return json.loads((run / "results.json").read_text())["FPS"], said.group(1) if said else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="/tmp/cpu_threads")
    p.add_argument("--cases", nargs="*", help="substrings of the case names to run (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "jpegs"
    if not (data / "train").is_dir():
        jpeg_folder(data)
    if not (out / "jpegs256" / "train").is_dir():
        jpeg_folder(out / "jpegs256", size=256)
    rows = []
    for load in ("alone", "beside a process spinning one core"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "alone" else None
        try:
            for name, argv_ in cases(data).items():
                if a.cases and not any(c in name for c in a.cases):
                    continue
                got: dict[str, list[float]] = {"default": [], "rule": [], "1": []}
                chosen = set()
                for r in range(a.rounds):
                    order = list(got)[r % 3:] + list(got)[:r % 3]  # each setting first in turn
                    for threads in order:
                        fps, said = one_run(argv_, threads, out, a.steps)
                        got[threads].append(fps)
                        if threads == "rule":
                            chosen.add(said)
                rows.append({"case": name, "load": load, "rule_chose": sorted(chosen), **{k: v for k, v in got.items()},
                             **{f"{k}_median": statistics.median(v) for k, v in got.items()}})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
    (out / "cpu_threads.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| case | load | rule chose | PyTorch default img/s | visionzoo's rule | 1 thread | rule / default |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        d, rule, one = r["default_median"], r["rule_median"], r["1_median"]
        print(f"| {r['case']} | {r['load']} | {'; '.join(r['rule_chose'])} "
              f"| {d:.0f} ({', '.join(f'{v:.0f}' for v in r['default'])}) | "
              f"{rule:.0f} ({', '.join(f'{v:.0f}' for v in r['rule'])}) | {one:.0f} | {rule / d:.2f} |")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
