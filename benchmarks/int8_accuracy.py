"""int8 against fp32 on trained weights: train a recipe's model on real images, export it with
``visionzoo export --precision int8`` and measure the int8 model's Acc@1 next to the fp32
model's on the same test images with ``visionzoo infer`` (which also times both in ONNX Runtime).

    PYTHONPATH=src python benchmarks/int8_accuracy.py --recipe fashion_mnist --epochs 8
    PYTHONPATH=src python benchmarks/int8_accuracy.py --recipe resnet50_cifar100 --train 5000 --test 2000 --epochs 3
    PYTHONPATH=src python benchmarks/int8_accuracy.py --recipe resnet50_cifar100 --reuse --calibration entropy

The only real images on a machine without downloads are Debian's Fashion-MNIST, so
``resnet50_cifar100`` trains on a CIFAR-100-format folder written from them (28 px grey images
zero-padded to 32 px and repeated over 3 channels, the 10 classes as CIFAR-100 fine labels 0-9):
the recipe's own reader, augmentation, normalisation and ResNet-50, on images a few epochs can
learn, so that Acc@1 and the int8 model's loss on it mean something (random-pattern fixtures
would not). Everything else (calibration on training images with the eval transform, the
agreement check) is what a user's ``visionzoo export --precision int8`` does.
Prints one Markdown row per run and writes ``int8_accuracy.json`` in ``--out``."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from visionzoo.cli import main as visionzoo
from visionzoo.commands.quantize import CALIBRATION_METHODS, DEFAULT_CALIBRATION
from visionzoo.data.sources.idx import FASHION_MNIST_CLASSES, load_idx_split
from visionzoo.data.sources.table import SOURCES


def write_cifar100(fmnist: str, root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A ``cifar-100-python`` folder (train, test, meta pickles as distributed) holding ``n_train``
    / ``n_test`` Fashion-MNIST images drawn in a seeded order, padded to 32x32 RGB."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for split, n, train in (("train", n_train, True), ("test", n_test, False)):
        images, labels = load_idx_split(fmnist, train)
        pick = g.permutation(len(labels))[:n]
        grey = np.pad(images[pick], ((0, 0), (2, 2), (2, 2)))  # 28 -> 32, as CIFAR's size
        rows = np.repeat(grey[:, None], 3, axis=1).reshape(len(pick), 3 * 32 * 32)  # R, G, B planes
        labels = labels[pick].astype(int).tolist()
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f, protocol=2)
    names = [c.encode() for c in FASHION_MNIST_CLASSES] + [f"unused_{i}".encode() for i in range(10, 100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"all"] * 20}, f, protocol=2)
    return folder


def _run(*argv: str) -> None:
    print("$ visionzoo " + " ".join(argv), flush=True)
    code = visionzoo(list(argv))
    if code != 0:
        sys.exit(f"visionzoo {argv[0]} exited with {code}")


def measure(recipe: str, data: str, out: Path, epochs: int, calibration_images: int, method: str,
            extra: list[str], reuse: bool = False) -> dict:
    """Train (unless ``reuse`` and a finished run is in ``out``), export fp32 + int8, infer both
    on the test split; the row's figures."""
    run = out / f"{recipe}-run"
    t0 = time.perf_counter()
    if not (reuse and (run / "results.json").is_file()):
        _run("train", recipe, "--data", data, "--epochs", str(epochs), "--output", str(run), *extra)
    train_s = time.perf_counter() - t0
    trained = json.loads((run / "results.json").read_text())
    _run("export", str(run), "--precision", "int8", "--calibration-images", str(calibration_images),
         "--calibration", method)
    _run("infer", str(run / "model.int8.onnx"), "--data", data)
    infer = json.loads((run / "model.int8.infer.json").read_text())
    side = json.loads((run / "model.int8.json").read_text())
    return {
        "recipe": recipe, "epochs": trained["epochs"], "train_s": round(train_s, 1),
        "pytorch_acc1": trained["Acc@1"], "pytorch_precision": trained["precision"],
        "test_images": infer["samples"], "fp32_acc1": infer["fp32_acc1"], "int8_acc1": infer["acc1"],
        "loss_pt": infer["acc1"] - infer["fp32_acc1"], "agreement": side["parity"]["top1_agreement"],
        "calibration": method, "calibration_images": calibration_images,
        "int8_ms_per_image": infer["ms_per_image"], "fp32_ms_per_image": infer.get("fp32_ms_per_image"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fashion_mnist", choices=["fashion_mnist", "resnet50_cifar100"])
    p.add_argument("--fmnist", default=SOURCES["fashion_mnist"].default_path, help="Fashion-MNIST IDX folder")
    p.add_argument("--train", type=int, default=5000, help="CIFAR-format training images (resnet50_cifar100)")
    p.add_argument("--test", type=int, default=2000, help="CIFAR-format test images (resnet50_cifar100)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION, choices=list(CALIBRATION_METHODS))
    p.add_argument("--out", default="/tmp/int8_accuracy")
    p.add_argument("--reuse", action="store_true",
                   help="quantise the run a previous call trained in --out again (another --calibration)")
    p.add_argument("overrides", nargs="*", help="config overrides for the training run (key=value)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = a.fmnist
    if a.recipe == "resnet50_cifar100":
        folder = out / "data" / "cifar-100-python"
        data = str(folder if a.reuse and folder.is_dir() else write_cifar100(a.fmnist, out / "data", a.train, a.test))
    row = measure(a.recipe, data, out, a.epochs, a.calibration_images, a.calibration, a.overrides, a.reuse)
    (out / "int8_accuracy.json").write_text(json.dumps(row, indent=2) + "\n")
    speed = (f"{row['fp32_ms_per_image'] / row['int8_ms_per_image']:.2f}x"
             if row["fp32_ms_per_image"] else "n/a")
    print("| recipe | epochs | calibration | test images | fp32 ONNX Acc@1 | int8 Acc@1 | loss (pt) | "
          "top-1 agreement | int8 speed-up over fp32 ONNX |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['recipe']} | {row['epochs']} | {row['calibration']}, {row['calibration_images']} images | "
          f"{row['test_images']} | {row['fp32_acc1']:.2f} | {row['int8_acc1']:.2f} | {row['loss_pt']:+.2f} | "
          f"{100 * row['agreement']:.1f}% | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
