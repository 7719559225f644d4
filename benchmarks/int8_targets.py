"""int8 quantisation settings against the CPU that runs the model: the same trained model
quantised three ways (uint8 activations with int8 weights, full 8 bits or 7 bits
``reduce_range``; uint8 weights), each measured in ONNX Runtime on the 10,000 Fashion-MNIST test
images — Acc@1, top-1 agreement with the fp32 model, ms per image — on the CPU the ``measure``
step runs on.

    PYTHONPATH=src python -m visionzoo train fashion_mnist --epochs 1 --output /tmp/i8/run
    PYTHONPATH=src python benchmarks/int8_targets.py prepare /tmp/i8/run --out /tmp/i8
    python benchmarks/int8_targets.py measure /tmp/i8 --label "AVX512-VNNI"
    qemu-x86_64 -cpu max .venv/bin/python benchmarks/int8_targets.py measure /tmp/i8 --label "AVX2 (qemu)"

``prepare`` writes the fp32 and int8 models and the preprocessed test images (.npy); ``measure``
needs only NumPy and ONNX Runtime, so it also runs under ``qemu-x86_64 -cpu max`` (Debian's
qemu-user), which emulates an x86-64 CPU with AVX2 and without AVX512 or VNNI: ONNX Runtime then
takes its AVX2 kernels, the ones that add u8×s8 products in int16. The emulator executes those
instructions exactly (saturation included), so accuracies measured under it are the AVX2
machine's; its timings are the emulator's, not a CPU's, and are not reported."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> (activations, weights, reduce_range)
    "u8s8": ("uint8", "int8", False),
    "u8s8-reduce_range": ("uint8", "int8", True),
    "u8u8": ("uint8", "uint8", False),
}


def prepare(run: Path, out: Path, data: str | None, calibration_images: int, method: str) -> None:
    """The fp32 ONNX model of ``run``, its int8 variants and the test split as arrays in ``out``."""
    from visionzoo.cli import main as visionzoo
    from visionzoo.commands import quantize
    from visionzoo.config import from_dict
    from visionzoo.data.augment.presets import eval_transform
    from visionzoo.data.loading.build import build_datasets

    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "fp32.onnx"
    if visionzoo(["export", str(run), "--output", str(fp32)]) != 0:
        sys.exit("export failed")
    meta = json.loads((out / "fp32.json").read_text())
    d = from_dict({"recipe": meta["recipe"], "data": meta["data"]}).data
    calib, check = quantize.calibration_sets(d, calibration_images, data)
    np.save(out / "check_x.npy", check)
    for name, (acts, weights, reduce_range) in VARIANTS.items():
        target = quantize.Int8Target(name, name, acts, weights, reduce_range, "measured")
        quantize.quantize_int8(fp32, out / f"{name}.onnx", calib, method, target)
    if data:
        from dataclasses import replace

        d = replace(d, path=data)
    val = build_datasets(d, train=True).val
    x = quantize.eval_images(val, range(len(val)), eval_transform(d))
    np.save(out / "test_x.npy", x)
    targets = val.targets if hasattr(val, "targets") else [val[i][1] for i in range(len(val))]
    np.save(out / "test_y.npy", np.asarray(targets))
    print(f"{out}: fp32.onnx, {', '.join(f'{n}.onnx' for n in VARIANTS)}; {len(x)} test images")


def _logits(session, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    out = np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return out, 1000 * (time.perf_counter() - t0) / len(x)


def measure(folder: Path, label: str, timings: bool) -> list[dict]:
    """Acc@1, agreement with fp32 and (``timings``) ms per image of every model in ``folder``."""
    import onnxruntime as ort

    x, y, check = (np.load(folder / f) for f in ("test_x.npy", "test_y.npy", "check_x.npy"))
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def session(name: str):
        return ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])

    fp32 = session("fp32")
    ref, fp32_ms = _logits(fp32, x)
    ref_check = _logits(fp32, check)[0].argmax(1)
    rows = [{"cpu": label, "model": "fp32", "acc1": 100 * float((ref.argmax(1) == y).mean()), "ms": fp32_ms}]
    for name in VARIANTS:
        s = session(name)
        got, ms = _logits(s, x)
        rows.append({"cpu": label, "model": name, "acc1": 100 * float((got.argmax(1) == y).mean()),
                     "agreement_test": float((got.argmax(1) == ref.argmax(1)).mean()),
                     "agreement_check": float((_logits(s, check)[0].argmax(1) == ref_check).mean()), "ms": ms})
    print(f"| CPU | model | Acc@1 ({len(y)} test images) | vs fp32 | top-1 agreement (test) "
          f"| export check ({len(check)})" + (" | ms/image |" if timings else " |"))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if timings else ""))
    for r in rows:
        print(f"| {label} | {r['model']} | {r['acc1']:.2f} | {r['acc1'] - rows[0]['acc1']:+.2f} | "
              + (f"{100 * r['agreement_test']:.1f}% | {100 * r['agreement_check']:.1f}%" if "agreement_test" in r
                 else "— | —") + (f" | {r['ms']:.4f} |" if timings else " |"))
    (folder / f"measure-{label.split()[0].lower()}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("run", help="a trained run folder (fashion_mnist)")
    q.add_argument("--out", required=True)
    q.add_argument("--data", help="the run's data folder if it moved")
    q.add_argument("--calibration-images", type=int, default=512)
    q.add_argument("--calibration", default="percentile")
    q = sub.add_parser("measure")
    q.add_argument("folder")
    q.add_argument("--label", required=True, help="the CPU, e.g. 'AVX512-VNNI' or 'AVX2 (qemu)'")
    q.add_argument("--no-timings", action="store_true", help="leave ms/image out (under an emulator)")
    a = p.parse_args(argv)
    if a.step == "prepare":
        prepare(Path(a.run), Path(a.out), a.data, a.calibration_images, a.calibration)
    else:
        measure(Path(a.folder), a.label, not a.no_timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
