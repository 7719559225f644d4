"""Run ``visionzoo bench`` for every seed recipe, on synthetic data and on a JPEG tree, and
collect the JSON files plus one Markdown table (BENCHMARKS.md explains the figures).

On the GPU machine (no network; run from the repository root):

    python3 benchmarks/make_jpeg_tree.py /tmp/jpegs --train 4096 --val 256
    PYTHONPATH=src python3 benchmarks/run_all.py --jpegs /tmp/jpegs --out benchmarks/results/h100
    PYTHONPATH=src python3 benchmarks/run_all.py --jpegs /tmp/jpegs --compile --precision bf16 \\
        --out benchmarks/results/h100-compile        # DenseNet-201 alone compiles for ~6 min

Per-device batch sizes are those of DESIGN.md's model-only H100 table, so the model-only column
can be compared with it (DINO: the reference's 64 images per GPU, each 2 x 224 + 8 x 96 crops).
ImageFolder recipes run three times: decode-free synthetic images, the JPEG tree decoded by
Pillow in the workers (data.decode=cpu) and the JPEG tree decoded and augmented on the device
(data.decode=device). ``resnet50_cifar100`` reads CIFAR pickles, not JPEGs: it runs on synthetic
data only (its loader is the device-resident one either way)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# recipe -> per-device batch of DESIGN.md's H100 table, and whether it reads an ImageFolder.
RECIPES = {
    "alexnet_imagenet": (256, True),
    "densenet201_imagenet": (128, True),
    "resnet50_cifar100": (512, False),
    "nfnet_f0_imagenet": (128, True),
    "dino_vits16_imagenet": (64, True),
}


def run(recipe: str, data: str, decode: str, out: Path, args: argparse.Namespace, batch: int) -> dict | None:
    """One ``visionzoo bench`` call; its JSON, or None if it failed (the failure is printed)."""
    file = out / f"{recipe}-{'synthetic' if data == 'synthetic' else 'jpeg-' + decode}.json"
    cmd = [sys.executable, "-m", "visionzoo", "bench", recipe, "--data", data, "--output", str(file),
           "--devices", str(args.devices), f"data.batch_size={batch * args.devices}", f"data.decode={decode}"]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--workers", str(args.workers)] if args.workers else []
    cmd += args.overrides
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode != 0:
        print(f"  {recipe} on {data}: failed (exit {done.returncode})", flush=True)
        return None
    result = json.loads(file.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def _cell(column: str, value: object) -> str:
    """One cell of summary.md: ratios to 2 decimals, other numbers to 1, missing values as "-"."""
    if isinstance(value, float):
        return f"{value:.2f}" if column == "ratio" else f"{value:.1f}"
    return "-" if value is None else str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpegs", help="ImageFolder tree from make_jpeg_tree.py (without it: synthetic data only)")
    p.add_argument("--out", default="benchmarks/results/latest", help="folder for the JSON files and summary.md")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="default: all seed recipes")
    p.add_argument("--steps", type=int,
                   help="timed steps per measurement (default: the recipe's train.perf_steps, 100)")
    p.add_argument("--precision", help="e.g. fp32,bf16 (default: visionzoo bench's)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes per model)")
    p.add_argument("--devices", type=int, default=1, help="GPUs per run; batches scale with them")
    p.add_argument("--workers", type=int, help="DataLoader workers per device (default: the recipe's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every bench run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for recipe in args.recipes:
        batch, folder = RECIPES[recipe]
        sources = [("synthetic", "cpu")]
        if folder and args.jpegs:
            sources += [(args.jpegs, "cpu"), (args.jpegs, "device")]
        for data, decode in sources:
            result = run(recipe, data, decode, out, args, batch)
            for r in (result or {}).get("results", []):
                rows.append({"recipe": recipe, "data": "synthetic" if data == "synthetic" else f"JPEG, {decode} decode",
                             "batch/device": result["batch_size_per_device"], "loader": result["loader"],
                             "setting": r["setting"], "model-only img/s": r["model_only_img_s"],
                             "end-to-end img/s": r["end_to_end_img_s"], "ratio": r["ratio"],
                             "compile s": r["compile_s"]})
    cols = ("recipe", "data", "batch/device", "loader", "setting", "model-only img/s", "end-to-end img/s",
            "ratio", "compile s")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [_cell(c, row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + table + f"\n\nwritten to {out}/")


if __name__ == "__main__":
    main()
