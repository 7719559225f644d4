"""``visionzoo bench``: how fast one recipe trains on this machine, and how much of that speed
the data path keeps.

For each precision (and, opt-in, torch.compile) setting, one fresh model is timed twice:

- model-only: a synthetic batch already on the device, stepped over and over: forward,
  loss, backward and optimizer step through the training loop itself (engine/loop.py with the
  recipe's task: its model, optimizer, GradStep, autocast, channels_last, loss, mixup, EMA);
- end-to-end: the same loop fed by the recipe's real loader and augmentations, from the
  data folder or from a decode-free synthetic source.

Both run ``train.perf_warmup_steps`` untimed steps, then ``train.perf_steps`` timed ones,
with the device synchronised before each clock reading, exactly as ``train --perf`` times them.
Their ratio says how much of the hardware's speed survives the data path.

The same code times every task: DINO recipes (task=dino) time DINO's own step (engine/tasks/dino.py:
teacher on the global crops, student on every crop) on synthetic multi-crop batches, then on the
recipe's multi-crop loader; img/s counts original images (each gives 2 + local_crops_number
crops). Device and process group are set up as a training run sets them (engine/run.py)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visionzoo import distributed
from visionzoo.config import DataConfig, RecipeConfig, to_dict
from visionzoo.data.augment.presets import eval_transform, train_transform
from visionzoo.data.loading.build import (
    Loader,
    Splits,
    build_datasets,
    cpu_fallbacks,
    loader_kind,
    set_loader_epoch,
)
from visionzoo.data.sources.table import data_source
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.engine.loop import LoopSettings, Position, RunHooks, Timer, timed_steps, train_epoch
from visionzoo.engine.run import start_env
from visionzoo.engine.tasks import make_task
from visionzoo.engine.tasks.base import RunEnv, Task
from visionzoo.errors import UserError
from visionzoo.run_folder import format_table, new_run_dir
from visionzoo.runtime import precision_name, resolve_amp, seed_everything, synchronize

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Stored image size (height, width) of the decode-free synthetic source for sources of image
# files: ImageNet's typical 500x375 photo. In-memory sources keep their own (data/sources/table.py).
IMAGEFOLDER_SOURCE = (375, 500)
COLUMNS = ("setting", "model-only img/s", "end-to-end img/s", "ratio", "first step s")


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a precision, eager or compiled."""

    precision: str  # fp32 | bf16 | fp16
    compile: bool = False

    @property
    def name(self) -> str:
        return self.precision + (" compile" if self.compile else "")


class RepeatBatch:
    """The model-only source: one batch already on the device, yielded ``n`` times (a loader
    as ``train_one_epoch`` expects one: ``(images, targets, n_bad)`` items and ``len``)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, n: int):
        self.images, self.targets, self.n = images, targets, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return ((self.images, self.targets, 0) for _ in range(self.n))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        pass


class DecodedPool(Dataset):
    """``n`` training items cycling over a few already-decoded PIL images: an ImageFolder
    without the JPEG decode, so the recipe's per-image transforms run in DataLoader workers
    exactly as on real files."""

    def __init__(self, images: list, labels: np.ndarray, classes: list[str], transform: Callable):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform
        self.targets = [int(t) for t in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index % len(self.images)]), int(self.labels[index])


def synthetic_source(d: DataConfig, n: int, seed: int = 0) -> Splits:
    """Random images shaped like the recipe's stored data (no files, no decode), wrapped so that
    ``build_loaders`` picks the loader the real data would get: the device-resident loader with
    its batch augmentation for CIFAR/MNIST-style recipes, DataLoader workers running the
    per-image train transform (RandomResizedCrop, RandAugment, ...) for ImageFolder recipes.
    Sizes and class counts are the data source's where it fixes them (data/sources/table.py)."""
    g = np.random.default_rng(seed)
    source = data_source(d.name)
    num_classes = source.num_classes or d.num_classes
    classes = [str(i) for i in range(num_classes)]
    labels = g.integers(0, num_classes, n)
    if source.in_memory:
        h, w = source.stored_size or (d.image_size, d.image_size)
        images = g.integers(0, 256, (n, h, w, d.in_chans), dtype=np.uint8)
        val = images[: max(n // 8, 1)]
        return Splits(TensorImageDataset(images, labels, classes, train_transform(d)),
                      TensorImageDataset(val, labels[: len(val)], classes, eval_transform(d)), classes)
    if d.in_chans != 3:  # ImageFolder images are always converted to RGB
        raise UserError(f"ImageFolder recipes read 3-channel images (data.in_chans={d.in_chans})")
    from PIL import Image

    h, w = IMAGEFOLDER_SOURCE
    pool = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(16)]
    return Splits(DecodedPool(pool, labels, classes, train_transform(d)),
                  DecodedPool(pool, labels[:16], classes, eval_transform(d)), classes)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pass
    except (RuntimeError, AssertionError):
        return False
    return True


def bench_settings(cfg: RecipeConfig, device: torch.device, precisions: str | None) -> list[Setting]:
    """The settings to time: ``precisions`` (comma-separated) or fp32, bf16 where the device has
    bf16 autocast, and the recipe's own precision; each also compiled when train.compile is set."""
    if precisions:
        names = [p.strip() for p in precisions.split(",") if p.strip()]
        bad = [p for p in names if p not in PRECISIONS]
        if bad or not names:
            raise UserError(f"--precision {precisions!r}: use a comma-separated list of {', '.join(PRECISIONS)}")
        if "bf16" in names and not _bf16_supported(device):
            raise UserError(f"{device} has no bf16 autocast; leave bf16 out of --precision")
    else:
        names = ["fp32"] + (["bf16"] if _bf16_supported(device) else [])
        names.append(precision_name(resolve_amp(cfg.train.amp, device)))
    names = list(dict.fromkeys(names))  # unique, in order
    return [Setting(p, c) for p in names for c in ((False, True) if cfg.train.compile else (False,))]


def _timed(task: Task, pos: Position, s: LoopSettings, loader: Loader | RepeatBatch, warmup: int, steps: int) -> dict:
    """``warmup`` untimed then ``steps`` timed optimizer steps of ``loader``, as ``train --perf``."""
    task.train_loader, pos.timer, start = loader, Timer(), pos.global_step
    timed_steps(task, pos, s, RunHooks(), start + warmup + steps, start + warmup, set_loader_epoch)
    images, seconds = pos.timer.total()
    return {"images": images, "seconds": seconds, "steps": pos.global_step - start - warmup,
            "img_s": images / seconds if seconds > 0 else None, "final_loss": pos.last_loss}


Batch = torch.Tensor | list[torch.Tensor]  # a loader's images: one tensor, or DINO's list of crop batches


def _synthetic_batch(template: Batch, device: torch.device, memory_format: torch.memory_format,
                     num_classes: int) -> tuple:
    """Random values shaped, typed and laid out (strides) like the loader's batches on the device."""
    if isinstance(template, list):  # multi-crop: a list of crops
        return [torch.randn_like(c.to(device)) for c in template], torch.zeros(len(template[0]), dtype=torch.long)
    images = torch.randn_like(template.to(device, memory_format=memory_format))
    return images, torch.randint(0, num_classes, (len(images),), device=device)


def bench_setting(cfg: RecipeConfig, setting: Setting, env: RunEnv, classes: list[str], train_loader: Loader,
                  steps_per_epoch: int, template: Batch) -> dict:
    """Build the recipe's task for ``setting`` as a training run does, then time its first step
    (it includes compilation), model-only steps and end-to-end steps."""
    seed_everything(cfg.train.seed + env.rank)
    task = make_task(replace(cfg, train=replace(cfg.train, compile=setting.compile)),
                     replace(env, amp_dtype=PRECISIONS[setting.precision]))
    task.classes, task.train_loader, task.steps_per_epoch = classes, train_loader, steps_per_epoch
    task.build()
    task.wrap(resumed=False)
    s = LoopSettings(accum_steps=cfg.train.accum_steps, log_every=0, progress="off", show=False)
    accum, warmup, steps = cfg.train.accum_steps, cfg.train.perf_warmup_steps, cfg.train.perf_steps
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    inputs, targets = _synthetic_batch(template, env.device, fmt, max(len(classes), 1))

    pos = Position()
    synchronize(env.device)
    t0 = time.perf_counter()
    task.train_loader = RepeatBatch(inputs, targets, accum)
    train_epoch(task, pos, s, RunHooks(), max_steps=1)  # synchronises at its end
    first_step_s = time.perf_counter() - t0
    model_only = _timed(task, pos, s, RepeatBatch(inputs, targets, (warmup + steps) * accum), warmup, steps)
    end_to_end = _timed(task, pos, s, train_loader, warmup, steps)
    ratio = (end_to_end["img_s"] / model_only["img_s"]) if model_only["img_s"] and end_to_end["img_s"] else None
    return {
        "setting": setting.name, "precision": setting.precision, "compile": setting.compile,
        "model_only_img_s": model_only["img_s"], "end_to_end_img_s": end_to_end["img_s"], "ratio": ratio,
        "first_step_s": first_step_s,  # includes compilation when compile is on
        "compile_s": first_step_s if setting.compile else None,
        "model_only": model_only, "end_to_end": end_to_end,
        "bad_images": pos.bad.count, "skipped_steps": task.step.skipped,
        "final_loss": pos.last_loss,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "host": platform.node(), "cpu": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0], "python": platform.python_version()}


def _output_file(cfg: RecipeConfig, output: str | None) -> Path:
    """``--output`` as a .json file, or bench.json in ``--output`` (a folder), or in
    runs/<recipe>-bench-<time>/ (no config.yaml: ``visionzoo runs`` lists training runs only)."""
    if output and output.endswith(".json"):
        path = Path(output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    return new_run_dir(f"{cfg.recipe}-bench", output) / "bench.json"


def run_bench(cfg: RecipeConfig, synthetic: bool = False, precisions: str | None = None,
              output: str | None = None) -> dict:
    """Time ``cfg`` model-only and end-to-end for each setting; print the table (rank 0) and
    write the JSON file. ``synthetic``: decode-free random images through the recipe's loader."""
    if cfg.train.perf_steps < 1 or cfg.train.perf_warmup_steps < 0:
        raise UserError("bench needs --steps (train.perf_steps) >= 1 and train.perf_warmup_steps >= 0")
    if cfg.train.amp == "fp64":
        raise UserError("bench times fp32, bf16 and fp16 (--precision); train.amp=fp64 is for numerical checks")
    cfg, env = start_env(cfg, amp_dtype=None)  # each setting brings its own precision
    settings = bench_settings(cfg, env.device, precisions)
    d = cfg.data
    if synthetic:
        if d.decode == "device":
            raise UserError("--data synthetic feeds decoded images; data.decode=device needs JPEG files (--data PATH)")
        splits = synthetic_source(d, max(d.synthetic_samples, 2 * d.batch_size_per_device * env.world_size),
                                  cfg.train.seed)
        source = "synthetic (decode-free)"
    else:
        splits = build_datasets(d, train=True)
        generated = data_source(d.name).generated
        source = f"{d.name} (device-resident, no augmentation)" if generated else str(d.path or d.name)
    data = make_task(cfg, env)  # the task's own loaders, as a training run builds them
    data.setup_data(splits)
    train_loader = data.train_loader
    set_loader_epoch(train_loader, 0, 0)
    template = next(iter(train_loader))[0]  # one batch: the model-only input's shape and layout
    if len(template) == 0:
        raise UserError("the first training batch held no readable image")
    loader_name = loader_kind(train_loader)
    if env.is_main:
        print(f"visionzoo: bench {cfg.recipe} | {cfg.model.library} {cfg.model.name} | "
              f"{env.world_size} × {env.device} | batch {d.batch_size} ({d.batch_size_per_device} per device) | "
              f"data {source}, {loader_name} | "
              f"{cfg.train.perf_warmup_steps} warm-up + {cfg.train.perf_steps} timed steps | "
              f"{', '.join(s.name for s in settings)}", flush=True)

    rows = []
    for setting in settings:
        row = bench_setting(cfg, setting, env, data.classes, train_loader, data.steps_per_epoch, template)
        rows.append(row)
        if env.is_main:
            extra = f", compile {row['compile_s']:.1f} s" if setting.compile else ""
            print(f"  {setting.name}: model-only {row['model_only_img_s']:.1f} img/s, end-to-end "
                  f"{row['end_to_end_img_s']:.1f} img/s{extra}", flush=True)
    result = {
        "recipe": cfg.recipe, "model": f"{cfg.model.library} {cfg.model.name}", "devices": env.world_size,
        "batch_size": d.batch_size, "batch_size_per_device": d.batch_size_per_device,
        "input_shape": [list(c.shape) for c in template] if isinstance(template, list) else list(template.shape),
        "task": cfg.task, "cpu_fallbacks": cpu_fallbacks(train_loader, env.device),
        "channels_last": cfg.model.channels_last, "data": source, "loader": loader_name,
        "warmup_steps": cfg.train.perf_warmup_steps, "steps": cfg.train.perf_steps,
        "settings": [r["setting"] for r in rows], "results": rows,
        "machine": _machine(env.device), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": to_dict(cfg),
    }
    if env.is_main:
        path = _output_file(cfg, output)
        path.write_text(json.dumps(result, indent=2) + "\n")
        table = format_table([{"setting": r["setting"], "model-only img/s": r["model_only_img_s"],
                               "end-to-end img/s": r["end_to_end_img_s"], "ratio": r["ratio"],
                               "first step s": r["first_step_s"]} for r in rows], COLUMNS)
        where = "one device" if env.world_size == 1 else f"all {env.world_size} devices together"
        print(f"\n{table}\n\nimg/s of {where}; ratio = end-to-end / model-only; "
              f"written to {path}", flush=True)
        result["path"] = str(path)
    distributed.shutdown()
    return result
