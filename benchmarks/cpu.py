"""The CPU as a device: training and inference img/s of each recipe's model in every precision
this CPU offers, side by side, and each as a fraction of the CPU's own measured peak.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu.py
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu.py --recipes resnet50_cifar100 --batch 64 --no-compile

Rows (per recipe model, on random inputs of the recipe's sizes: no data loading):
- training img/s, fp32 and bf16 autocast, eager and torch.compile'd, for visionzoo's step
  (engine/loop.py with the classification task: the recipe's optimizer, GradStep, loss, channels_last)
  and for a step written as timm's train.py writes it (autocast forward, loss, zero_grad,
  backward, optimizer.step, with timm's create_optimizer_v2) on the same model (the recipe's
  grouped BatchNorm too) and batch;
- inference img/s: PyTorch eager fp32 and bf16 autocast (inference_mode, channels_last), ONNX
  Runtime fp32 and int8 (visionzoo's export: static QDQ, per-channel weights; calibrated here on
  random inputs, which changes its accuracy but not its speed).
Every row is measured ``--repeats`` times in alternating order (one round of every row, then
the next round) and the median is printed, so load from other processes hits all rows alike.
Each measurement reads the wall clock (img/s) and this process's CPU time (img per CPU-second:
on a machine shared with other jobs the wall clock counts their time too, CPU time does not;
with one thread, img per CPU-second is what an unloaded core gives). "% peak" is the row's
FLOP per CPU-second (forward FLOPs from torch's FlopCounterMode; training counts 3x
forward) over that of a large matrix product in that precision on the same threads:
torch.mm for fp32 and bf16, ONNX Runtime's MatMulInteger (uint8 x int8, the kernel its int8
convolutions use) for int8."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from visionzoo.commands.bench import RepeatBatch, _cpu_name
from visionzoo.commands.export import _export_onnx, input_size
from visionzoo.commands.quantize import quantize_int8
from visionzoo.config import load_config
from visionzoo.data.sources.table import data_source
from visionzoo.engine.loop import LoopSettings, Position, RunHooks, train_epoch
from visionzoo.engine.tasks.base import RunEnv
from visionzoo.engine.tasks.classify import ClassifyTask
from visionzoo.models import build_model
from visionzoo.models.ghost_bn import use_bn_groups
from visionzoo.runtime import cpu_bf16_isa, seed_everything

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PEAK_CALLS, PEAK_SECONDS = 3, 0.3  # each peak measurement: at least this many products and CPU-seconds


def _ort_options(threads: int):
    """ONNX Runtime session options for ``threads`` threads that do not spin after a run: spinning
    pool threads would take the cores from the next row's measurement (and count as its CPU time)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def matmul_peaks(n: int, threads: int) -> dict[str, Callable[[], None]]:
    """Callables doing an n x n x n matrix product (2 n^3 FLOP or int8 op): torch.mm in fp32 and
    bf16, ONNX Runtime's MatMul in fp32 (MLAS: on AMD CPUs faster than the BLAS torch.mm calls)
    and MatMulInteger in uint8 x int8. They are timed in the same alternating rounds as the
    rows, so that load from other processes hits the peak as it hits the rows; a precision's
    peak is its fastest library's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        peaks[name] = lambda a=a, b=b: torch.mm(a, b)
    node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                                             helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = _ort_options(threads)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8),
            "b": np.random.randint(-127, 127, (n, n), dtype=np.int8)}
    peaks["int8"] = lambda: sess.run(None, feed)
    graph32 = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm32",
                                [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
                                [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    sess32 = ort.InferenceSession(helper.make_model(graph32, opset_imports=[helper.make_opsetid("", 17)])
                                  .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed32 = {k: np.random.randn(n, n).astype(np.float32) for k in "ab"}
    peaks["fp32 ort"] = lambda: sess32.run(None, feed32)
    return peaks


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass per image (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() / len(x)


def visionzoo_step(cfg, num_classes: int, x: torch.Tensor, y: torch.Tensor, precision: str, compiled: bool):
    """``n`` optimizer steps of visionzoo's training loop (engine/loop.py with the recipe's task, as
    ``visionzoo bench`` times them)."""
    seed_everything(0)
    device, amp = torch.device("cpu"), DTYPES[precision]
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    task = ClassifyTask(replace(cfg, train=replace(cfg.train, compile=compiled)), RunEnv(device, amp))
    task.classes, task.steps_per_epoch = [str(i) for i in range(num_classes)], 1000
    task.build()
    task.wrap(resumed=False)
    pos, settings = Position(), LoopSettings(log_every=0, progress="off", show=False)
    xb = x.contiguous(memory_format=fmt)

    def steps(n: int) -> None:
        task.train_loader = RepeatBatch(xb, y, n)
        train_epoch(task, pos, settings, RunHooks(), max_steps=n)  # synchronises at its end
        pos.epoch, pos.batches_in_epoch, pos.epoch_sums = pos.epoch + 1, 0, None  # as timed_steps does
    return steps


def timm_step(cfg, num_classes: int, x: torch.Tensor, y: torch.Tensor, precision: str, compiled: bool):
    """``n`` steps as timm's train.py takes them (its train_one_epoch without mixup/EMA/clipping)."""
    from timm.optim import create_optimizer_v2

    seed_everything(0)
    net, _ = build_model(cfg.model, num_classes, cfg.data.in_chans)
    if cfg.model.bn_group > 0:  # the network visionzoo's step trains: the loops are compared, not BN kinds
        use_bn_groups(net, cfg.model.bn_group)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format  # --channels-last
    net = net.to(memory_format=fmt).train()
    o = cfg.optim
    optimizer = create_optimizer_v2(net, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    model = torch.compile(net) if compiled else net
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    xb = x.contiguous(memory_format=fmt)

    def steps(n: int) -> None:
        for _ in range(n):
            with autocast():
                loss = loss_fn(model(xb), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return steps


def torch_infer(net: nn.Module, x: torch.Tensor, precision: str, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net, xb = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def run(n: int) -> None:
        with torch.inference_mode(), autocast():
            for _ in range(n):
                net(xb)
    return run


def ort_infer(path: str, x: np.ndarray, threads: int):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, _ort_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda n: [sess.run(None, {name: x}) for _ in range(n)]


def bench_recipe(recipe: str, batch: int, steps: int, repeats: int, compiled: bool, threads: int,
                 matmul: int, tmp: Path) -> tuple[list[dict], dict[str, float]]:
    """The rows of one recipe's model (see the module docstring) and the matmul peaks (FLOP/s)
    measured in the same rounds."""
    cfg = load_config(recipe, [f"data.batch_size={batch}", "train.device=cpu"])
    d = cfg.data
    nc = data_source(d.name).num_classes or d.num_classes
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(batch, d.in_chans, d.image_size, d.image_size, generator=g)
    y = torch.randint(0, nc, (batch,), generator=g)
    size = input_size(d)
    x_eval = torch.randn(batch, d.in_chans, size, size, generator=g)
    net, _ = build_model(cfg.model, nc, d.in_chans)
    net.eval()
    flops = forward_flops(net, x_eval[:1])

    rows: list[tuple[str, str, str, Callable, float]] = []  # (kind, name, peak precision, fn, flops/img)
    for precision in DTYPES:
        for comp in ((False, True) if compiled else (False,)):
            tag = f"{precision} {'compiled' if comp else 'eager'}"
            rows.append(("train", f"visionzoo step {tag}", precision,
                         visionzoo_step(cfg, nc, x_train, y, precision, comp), 3 * flops))
            rows.append(("train", f"timm train.py step {tag}", precision,
                         timm_step(cfg, nc, x_train, y, precision, comp), 3 * flops))
    for precision in DTYPES:
        rows.append(("infer", f"PyTorch eager {precision}", precision,
                     torch_infer(net, x_eval, precision, cfg.model.channels_last), flops))
    fp32_path, int8_path = str(tmp / f"{recipe}.onnx"), str(tmp / f"{recipe}.int8.onnx")
    with torch.no_grad():
        _export_onnx(net.to(memory_format=torch.contiguous_format), x_eval[:2], fp32_path, 17)
    quantize_int8(fp32_path, int8_path, torch.randn(64, *x_eval.shape[1:], generator=g).numpy(), "minmax")
    rows.append(("infer", "ONNX Runtime fp32", "fp32", ort_infer(fp32_path, x_eval.numpy(), threads), flops))
    rows.append(("infer", "ONNX Runtime int8 (QDQ)", "int8", ort_infer(int8_path, x_eval.numpy(), threads), flops))

    mm = matmul_peaks(matmul, threads)
    for fn in mm.values():
        fn()
    for _, name, _, fn, _ in rows:  # warm-up (and compilation), untimed
        t = time.perf_counter()
        fn(2)
        print(f"  warm-up {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {r[1]: [] for r in rows}
    cpu_times: dict[str, list[float]] = {r[1]: [] for r in rows}
    peak_runs: dict[str, list[float]] = {k: [] for k in mm}
    for r in range(repeats):  # alternating: one round of every row and every peak, then the next
        # each round starts at another row, so that no row always follows the peaks' large products
        shift = r * len(rows) // repeats
        for name, fn in mm.items():
            c, n = time.process_time(), 0
            while n < PEAK_CALLS or time.process_time() - c < PEAK_SECONDS:  # long enough to time
                fn()
                n += 1
            peak_runs[name].append(2 * matmul**3 * n / (time.process_time() - c))
        for _, name, _, fn, _ in rows[shift:] + rows[:shift]:
            t, c = time.perf_counter(), time.process_time()
            fn(steps)
            times[name].append(steps * batch / (time.perf_counter() - t))
            cpu_times[name].append(steps * batch / (time.process_time() - c))
    peaks = {k: statistics.median(v) for k, v in peak_runs.items()}  # FLOP per CPU-second
    peaks["fp32"] = max(peaks["fp32"], peaks.pop("fp32 ort"))
    out = []
    for kind, name, peak_precision, _, f in rows:
        img_s, img_cpu_s = statistics.median(times[name]), statistics.median(cpu_times[name])
        out.append({"recipe": recipe, "model": cfg.model.name, "kind": kind, "row": name, "img_s": img_s,
                    "img_per_cpu_s": img_cpu_s, "runs_img_s": times[name], "runs_img_per_cpu_s": cpu_times[name],
                    "flops_per_img": f, "peak": peak_precision,
                    "fraction_of_peak": img_cpu_s * f / peaks[peak_precision]})
    return out, peaks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="fashion_mnist,resnet50_cifar100")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="training steps / inference batches per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is printed (>= 3)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (minutes to compile)")
    p.add_argument("--matmul", type=int, default=1024, help="side of the peak-measuring matrix product")
    p.add_argument("--output", help="JSON file for every measurement")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    if a.repeats < 3:
        p.error("--repeats must be >= 3 (medians of at least 3 alternating rounds)")
    print(f"# {_cpu_name()}, {threads} threads, torch {torch.__version__}, native bf16: {cpu_bf16_isa() or 'no'}")
    results, all_peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes.split(","):
            rows, peaks = bench_recipe(recipe, a.batch, a.steps, a.repeats, not a.no_compile, threads, a.matmul,
                                       Path(tmp))
            results, all_peaks[recipe] = results + rows, peaks
            key = "img_per_cpu_s"
            fp32 = {r["kind"]: r[key] for r in rows if r["row"] in ("visionzoo step fp32 eager", "PyTorch eager fp32")}
            timm = {r["row"].replace("timm train.py", "visionzoo"): r[key] for r in rows if r["row"].startswith("timm")}
            print(f"\n| {recipe} ({rows[0]['model']}, batch {a.batch}) | img/s | img/CPU-s | x fp32 eager | x timm "
                  "| % peak |")
            print("|---|---:|---:|---:|---:|---:|")
            print("| matmul peak per CPU-s (same rounds) | | | | | " + ", ".join(
                f"{k} {v / 1e9:.1f} G{'op' if k == 'int8' else 'FLOP'}" for k, v in peaks.items()) + " |")
            for r in rows:
                vs_timm = f"{r[key] / timm[r['row']]:.2f}" if r["row"] in timm else ""
                print(f"| {r['row']} | {r['img_s']:.1f} | {r[key]:.1f} | {r[key] / fp32[r['kind']]:.2f} | {vs_timm} | "
                      f"{100 * r['fraction_of_peak']:.1f}% ({r['peak']}) |", flush=True)
    if a.output:
        summary = {"peaks": all_peaks, "threads": threads, "rows": results}
        Path(a.output).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
