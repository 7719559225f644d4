"""Config mistakes and --help answer before torch, torchvision or timm are imported (those take
seconds): the CLI validates the command and the recipe first and imports the rest lazily."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "torchvision", "timm")

# Each is a user mistake (exit 2, one line) or a --help (exit 0).
COMMANDS = [
    ["train", "fashoin_mnist"],
    ["train", "fashion_mnist", "optim.lrr=0.1"],
    ["train", "fashion_mnist", "--epochs", "-1"],
    ["train", "fashion_mnist", "--devices", "0"],
    ["train", "fashion_mnist", "train.amp=fp8"],
    ["train", "fashion_mnist", "task=dinoo"],
    ["bench", "fashion_mnist", "data.batch_size=abc"],
    ["recipes", "--show", "fashion_mnist", "data.nme=cifar10"],
    ["recipes", "--show", "fashion_mnist", "data.name=cifar"],  # the data source table answers too
    ["train", "fashion_mnist", "data.name=fashon_mnist"],
    ["bench", "fashion_mnist", "data.name=imagefolders"],
    ["eval", "--weights", "w.pth", "--recipe", "fashion_mnist", "data.name=x"],
    ["eval", "--weights", "w.pth", "--recipe", "fashion_mnist", "data.nme=x"],
    ["knn", "--weights", "w.pth", "--recipe", "dino_fashion_mnist", "dino.knn_kk=[5]"],
    ["linear", "--weights", "w.pth", "--recipe", "dino_fashion_mnist", "optim.lrr=1"],
]
HELPS = [[], ["train"], ["bench"], ["eval"], ["knn"], ["linear"], ["export"], ["infer"], ["data"], ["data", "pack"],
         ["runs"], ["recipes"]]

PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from visionzoo.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            codes.append([main(argv), err.getvalue()])
        except SystemExit as e:
            codes.append([e.code, err.getvalue()])
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"codes": codes, "heavy": heavy, "s": time.perf_counter() - t0}))
"""


def _probe(commands: list[list[str]]) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands), json.dumps(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_config_errors_and_help_do_not_import_torch():
    got = _probe(COMMANDS + [[*h, "--help"] for h in HELPS])
    codes = got["codes"]
    for argv, (code, err) in zip(COMMANDS, codes, strict=False):  # the --help codes follow
        assert code == 2 and err.count("\n") == 1 and err.startswith("visionzoo: error: "), (argv, code, err)
    assert all(code == 0 for code, _ in codes[len(COMMANDS):])
    assert got["heavy"] == []


def test_a_mistyped_recipe_answers_within_a_second_or_so():
    # Measured wall time of the whole process, as a user sees it (0.3-0.5 s on an idle 2-core
    # CPU; torch alone takes 2-10 s). The bound is generous for a loaded test machine.
    env = {**os.environ, "PYTHONPATH": SRC}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "visionzoo", "train", "fashoin_mnist"], env=env,
                         capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert out.returncode == 2 and "did you mean 'fashion_mnist'" in out.stderr
    assert wall < 5.0, f"{wall:.1f} s"
