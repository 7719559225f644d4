"""CPU time per image of each step of the CPU data path (data.decode=cpu), before issue 17
(torchvision v2 pipelines, float32 normalised in the workers, ``fork_rng`` per sample) and now
(uint8 hand-over, draft decoding, no v2 dispatch), and of the reference pipelines of
benchmarks/loader_vs_peers.py (timm's transform, DINO's multi-crop), in one process on one thread. CPU time
(``time.process_time``), not wall time, so other processes on the machine hardly move it.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cpu_path_profile.py /tmp/jpegs --images 64

Rows are milliseconds per image, the least of ``--repeats`` passes run in alternating order;
"collate" is the batch-of-64 stack divided by 64; "normalise" in the new path runs batched on the
training device, and is shown here on the CPU."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF1

from visionzoo.config import load_config
from visionzoo.data.augment import multicrop, per_image, presets
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import timm_randaugment
from visionzoo.data.loading.collate import stack_images
from visionzoo.data.loading.samplers import seed_sample_rngs
from visionzoo.data.sources.folder import to_rgb

COST: dict[str, float] = defaultdict(float)
PATCHED: list[tuple[Any, str, Any]] = []


def patch(obj: Any, name: str, label: str) -> None:
    """Time every call of ``obj.name`` under ``label`` (undone by ``unpatch``)."""
    original = getattr(obj, name)
    PATCHED.append((obj, name, original))
    setattr(obj, name, timed(label, original))


def unpatch() -> None:
    while PATCHED:
        obj, name, original = PATCHED.pop()
        setattr(obj, name, original)


def timed(name: str, fn: Callable) -> Callable:
    def wrapper(*a, **k):
        t0 = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            COST[name] += time.process_time() - t0
    return wrapper


def old_seeding(s: int) -> None:
    """What SeededDataset did per sample before: fork_rng around torch.manual_seed, random saved."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        random.seed(s)
    random.setstate(state)


def old_views(recipe, cfg) -> list[tuple[str, Callable]]:
    """The v2 pipelines as data/augment/presets.py and data/augment/multicrop.py composed them before, as steps."""
    d = cfg.data
    interp = InterpolationMode(d.interpolation)
    normalise = ("to float + normalise", v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=False),
                                                     v2.Normalize(d.mean, d.std)]))
    if recipe != "dino":
        steps = [("crop + resize", v2.RandomResizedCrop(d.image_size, scale=tuple(d.crop_scale), interpolation=interp,
                                                        antialias=True)),
                 ("flip", v2.RandomHorizontalFlip(d.hflip))]
        if d.randaugment:
            steps.append(("RandAugment", timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)))
        return steps + [normalise]
    dc = cfg.dino
    b, c, s, h = dc.color_jitter
    k = lambda size: max(min(2 * math.ceil(3 * dc.blur_sigma[1]) + 1, size if size % 2 else size - 1), 1)  # noqa: E731

    def view(size, scale, blur_p, solarize):
        crop = v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True)
        steps = [("crop + resize", crop),
                 ("flip", v2.RandomHorizontalFlip(d.hflip)),
                 ("colour jitter", v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=dc.color_jitter_p)),
                 ("greyscale", v2.RandomGrayscale(dc.grayscale_p)),
                 ("blur", v2.RandomApply([v2.GaussianBlur(k(size), sigma=tuple(dc.blur_sigma))], p=blur_p))]
        if solarize:
            steps.append(("solarize", v2.RandomSolarize(128, p=dc.solarize_p)))
        return steps + [normalise]

    p1, p2, pl = dc.blur_p
    views = [view(d.image_size, dc.global_crops_scale, p1, False), view(d.image_size, dc.global_crops_scale, p2, True)]
    views += [view(dc.local_crop_size, dc.local_crops_scale, pl, False)] * dc.local_crops_number
    return [("views", views)]


def run_old(recipe: str, cfg, files: list[str]) -> list[Any]:
    steps = old_views(recipe, cfg)
    out = []
    for i, path in enumerate(files):
        timed("seeding per sample", old_seeding)(i)
        t0 = time.process_time()
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
            if rgb is img:
                rgb = img.copy()
        COST["open + decode"] += time.process_time() - t0
        if recipe == "dino":
            crops = []
            for view in steps[0][1]:
                x = rgb
                for name, op in view:
                    x = timed(name, op)(x)
                crops.append(x)
            out.append(crops)
        else:
            x = rgb
            for name, op in steps:
                x = timed(name, op)(x)
            out.append(x)
    return out


def run_new(recipe: str, cfg, files: list[str]) -> list[Any]:
    d = cfg.data
    if recipe == "dino":
        transform = multicrop.MultiCropTransform(d, cfg.dino)
        mod = multicrop
        for fn in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
            patch(TF1, fn, "colour jitter")
        patch(mod, "blur_uint8", "blur")
    else:
        transform = presets.train_transform(d)
        mod = per_image
        if transform.randaugment is not None:
            transform.randaugment = timed("RandAugment", transform.randaugment)
    patch(mod, "random_resized_crop", "draw crop (before decode)")
    patch(mod, "draft", "draft request")
    patch(mod, "resized_crop", "crop + resize")
    patch(mod, "pil_to_uint8", "to uint8 tensor")
    out = []
    for i, path in enumerate(files):
        timed("seeding per sample", seed_sample_rngs)(i)
        t0 = time.process_time()
        img = Image.open(path)
        COST["open + decode"] += time.process_time() - t0
        with img:
            prepared = transform.prepare(img)
            t0 = time.process_time()
            img.load()
            rgb = to_rgb(img)
            COST["open + decode"] += time.process_time() - t0
        t0, before = time.process_time(), dict(COST)
        x = transform(rgb, prepared)
        inner = sum(COST[k] - before.get(k, 0.0) for k in COST)
        COST["other (flip, greyscale, solarize, ...)"] += time.process_time() - t0 - inner
        out.append(x)
    unpatch()
    return out


def run_peer(recipe: str, cfg, files: list[str]) -> list[Any]:
    """The reference pipeline of benchmarks/loader_vs_peers.py: timm's create_transform (no
    prefetcher) on ``Image.open(f).convert("RGB")`` as timm's ImageDataset reads, or DINO's
    multi-crop on torchvision's ImageFolder loader."""
    from loader_vs_peers import DinoAugmentation, timm_settings

    if recipe == "dino":
        transform = DinoAugmentation(cfg.dino.local_crops_number)
    else:
        from timm.data import create_transform

        settings = timm_settings(recipe)
        transform = create_transform(settings.pop("input_size"), use_prefetcher=False, **settings)
    out = []
    for path in files:
        t0 = time.process_time()
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        COST["open + decode"] += time.process_time() - t0
        out.append(timed("augment + to float + normalise (the peer's transform)", transform)(img))
    return out


def collate_and_normalise(old: bool, items: list, cfg) -> None:
    d = cfg.data
    norm = Normalize(tuple(d.mean), tuple(d.std))
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        positions = [[c[i] for c in chunk] for i in range(len(chunk[0]))] if isinstance(chunk[0], list) else [chunk]
        for pos in positions:
            t0 = time.process_time()
            batch = torch.stack(pos) if old else stack_images(pos)
            COST["collate"] += time.process_time() - t0
            if not old:
                t0 = time.process_time()
                norm(batch)
                COST["normalise (batched, on the device)"] += time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="an ImageFolder root (train/ is read)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--recipes", default="nfnet,alexnet,dino")
    p.add_argument("--repeats", type=int, default=2, help="passes of each path, in alternating order")
    args = p.parse_args()
    torch.set_num_threads(1)
    files = sorted(str(f) for f in (Path(args.root) / "train").rglob("*") if f.is_file())[:args.images]
    recipes = {"nfnet": "nfnet_f0_imagenet", "alexnet": "alexnet_imagenet", "dino": "dino_vits16_imagenet"}
    for key in args.recipes.split(","):
        cfg = load_config(recipes[key])
        results: dict[str, dict[str, float]] = {"before": {}, "now": {}, "peer": {}}
        paths = [("before", run_old, True), ("now", run_new, False), ("peer", run_peer, True)]
        for r in range(args.repeats):  # alternating order; the least time of each step is kept
            for label, fn, old in (paths if r % 2 == 0 else paths[::-1]):
                COST.clear()
                items = fn(key, cfg, files)
                collate_and_normalise(old, items, cfg)
                for k, v in COST.items():
                    results[label][k] = min(results[label].get(k, math.inf), 1000 * v / len(files))
        labels = ("before", "now", "peer")
        names = list(dict.fromkeys(n for r in labels for n in results[r]))
        peer = "DINO main_dino.py" if key == "dino" else "timm, no prefetcher"
        print(f"\n{recipes[key]} ({len(files)} images from {args.root}), ms of CPU per image")
        print(f"| step | visionzoo before | visionzoo now | {peer} |")
        print("|---|---|---|---|")
        for n in names:
            cells = [f"{results[r][n]:.2f}" if n in results[r] else "–" for r in labels]
            print(f"| {n} | {' | '.join(cells)} |")
        worker = {r: sum(v for k, v in results[r].items() if not k.startswith("normalise")) for r in labels}
        print(f"| **in the workers** | **{worker['before']:.2f}** | **{worker['now']:.2f}** "
              f"| **{worker['peer']:.2f}** |")
        print(f"| peer / now, per core | | | **{worker['peer'] / worker['now']:.2f}** |")


if __name__ == "__main__":
    main()
