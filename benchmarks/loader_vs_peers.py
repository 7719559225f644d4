"""Images per second of visionzoo's CPU training loaders (data.decode=cpu) against the
reference pipelines built with the same libraries and settings, in one run, on the same files,
workers and batch size:

- NFNet-F0: RandomResizedCrop 192 bicubic + flip + RandAugment rand-m5-n4-mstd0.5-inc1, against
  timm's ``create_loader`` (ImageDataset, is_training, no colour jitter);
- AlexNet / DenseNet-201: RandomResizedCrop 224 bilinear + flip, against timm's ``create_loader``;
- DINO: 2 x 224 + 8 x 96 multi-crop, against the augmentation DINO's main_dino.py composes from
  torchvision transforms on PIL images (flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2,
  PIL Gaussian blur with radius U(0.1, 2) p 1.0 / 0.1 / 0.5, PIL solarize p 0.2 on the second
  global crop, ToTensor + Normalize) in a torchvision ImageFolder, written here from that
  description.

What is timed is what the DataLoader workers hand to the training process: visionzoo's uint8
batches (their float conversion and normalisation run on the training device, batched), timm
without its prefetcher (``use_prefetcher=False``: float batches normalised in the workers, the
comparison of issue 17) and, with ``--timm-prefetcher``, the DataLoader inside timm's
PrefetchLoader (uint8 batches, normalised on the device like visionzoo's). Each measurement
builds a fresh loader, discards ``--warmup`` batches (worker start-up) and times the next
``--batches``; pipelines alternate in order over ``--repeats`` rounds, and every round gives
one visionzoo/peer ratio, so load from other processes on the machine hits both sides.

    python benchmarks/make_jpeg_tree.py /tmp/jpegs --train 1024 --val 64
    python benchmarks/make_jpeg_tree.py /tmp/jpegs_large --train 448 --val 16 --size 3000 2000
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/loader_vs_peers.py \\
        --tree 500x375=/tmp/jpegs --tree 3000x2000=/tmp/jpegs_large:4
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps

RECIPES = {"nfnet": "nfnet_f0_imagenet", "alexnet": "alexnet_imagenet", "dino": "dino_vits16_imagenet"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- visionzoo

def visionzoo_loader(recipe: str, root: Path, batch: int, workers: int, epoch: int, draft: bool = True) -> Iterable:
    """The DataLoader the engines iterate (data/loading/build.py, data/augment/multicrop.py), without the
    batched device step (on a GPU machine it runs on the GPU)."""
    from visionzoo.config import load_config
    from visionzoo.data.augment.multicrop import MultiCropTransform
    from visionzoo.data.loading.build import build_datasets, build_loader, multicrop_loader
    from visionzoo.data.loading.samplers import SampleOrder

    cfg = load_config(RECIPES[recipe], [f"data.path={root}", f"data.draft={str(draft).lower()}"])
    ds = build_datasets(cfg.data, train=True).train
    if recipe == "dino":
        ds.transform = MultiCropTransform(cfg.data, cfg.dino)
        loader = multicrop_loader(ds, batch, workers, SampleOrder(cfg.train.seed))
    else:
        loader = build_loader(ds, batch, workers, True, SampleOrder(cfg.train.seed))
    loader.set_epoch(epoch)
    return loader.loader  # the DataLoader: uint8 batches as the workers hand them over


# ----------------------------------------------------------------------------- peers

def timm_settings(recipe: str) -> dict:
    """create_loader / create_transform arguments of the recipe's training augmentation."""
    size = {"nfnet": dict(input_size=(3, 192, 192), interpolation="bicubic", auto_augment="rand-m5-n4-mstd0.5-inc1"),
            "alexnet": dict(input_size=(3, 224, 224), interpolation="bilinear", auto_augment=None)}[recipe]
    return dict(is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, **size)


def timm_loader(recipe: str, root: Path, batch: int, workers: int, prefetcher: bool) -> Iterable:
    """timm's create_loader with the recipe's augmentation (the inner DataLoader when
    ``prefetcher``: uint8 batches; otherwise float batches normalised in the workers)."""
    from timm.data import ImageDataset, create_loader

    loader = create_loader(ImageDataset(str(root / "train")), batch_size=batch, num_workers=workers,
                           use_prefetcher=prefetcher, device=torch.device("cpu"), **timm_settings(recipe))
    return loader.loader if prefetcher else loader


class RandomPILBlur:
    """PIL Gaussian blur, radius (= sigma) uniform in [0.1, 2], with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class RandomPILSolarize:
    """PIL solarize (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DinoAugmentation:
    """DINO's multi-crop as main_dino.py composes it: torchvision (v1) transforms on PIL."""

    def __init__(self, local_crops_number: int = 8):
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose([T.RandomHorizontalFlip(p=0.5),
                                 T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                 T.RandomGrayscale(p=0.2)])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter,
                                  RandomPILBlur(1.0), normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter,
                                  RandomPILBlur(0.1), RandomPILSolarize(0.2), normalize])
        self.local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic), flip_jitter,
                                RandomPILBlur(0.5), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops_number)]


def dino_loader(root: Path, batch: int, workers: int) -> Iterable:
    from torchvision import datasets

    ds = datasets.ImageFolder(str(root / "train"), transform=DinoAugmentation())
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


# ----------------------------------------------------------------------------- timing

def _pipelines(recipe: str, root: Path, b: int, w: int, args: argparse.Namespace) -> dict[str, Callable]:
    """The loaders measured for ``recipe``: name -> a function of the round that builds one."""
    pipelines: dict[str, Callable[[int], Iterable]] = {}
    pipelines["visionzoo"] = lambda r: visionzoo_loader(recipe, root, b, w, r)
    if args.no_draft:
        pipelines["visionzoo, draft off"] = lambda r: visionzoo_loader(recipe, root, b, w, r, False)
    if recipe == "dino":
        pipelines["DINO main_dino.py augmentation"] = lambda r: dino_loader(root, b, w)
    else:
        pipelines["timm create_loader, no prefetcher"] = lambda r: timm_loader(recipe, root, b, w, False)
        if args.timm_prefetcher:
            pipelines["timm create_loader, prefetcher (uint8)"] = lambda r: timm_loader(recipe, root, b, w, True)
    return pipelines


def rate(make: Callable[[], Iterable], batch: int, warmup: int, batches: int) -> float:
    """Images per second over ``batches`` batches after ``warmup`` of a freshly built loader."""
    loader = make()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it, loader
    gc.collect()  # shut the workers down before the next measurement
    return batches * batch / seconds


def span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=DIR[:BATCHES]",
                   help="an ImageFolder root made by make_jpeg_tree.py (train/ is read); BATCHES overrides --batches")
    p.add_argument("--recipes", default="nfnet,alexnet,dino")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="batches discarded per measurement")
    p.add_argument("--batches", type=int, default=8, help="batches timed per measurement")
    p.add_argument("--dino-batches", type=int, help="batches timed for DINO (default: as the others)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the order of the pipelines alternates")
    p.add_argument("--timm-prefetcher", action="store_true", help="also time timm's prefetcher DataLoader (uint8)")
    p.add_argument("--no-draft", action="store_true", help="also time visionzoo with data.draft=false")
    p.add_argument("--output", help="write every measurement as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    import PIL
    import timm
    import torchvision

    print(f"# {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} | torchvision "
          f"{torchvision.__version__} | timm {timm.__version__} | Pillow {PIL.__version__} | workers {args.workers} | "
          f"batch {args.batch} | {args.warmup} warm-up batches per measurement | {args.repeats} rounds")
    print("| recipe | images, timed batches | visionzoo img/s | peer | peer img/s | ratio (per round) |")
    print("|---|---|---|---|---|---|")
    records = []
    for spec in args.tree:
        name, _, rest = spec.partition("=")
        root, _, n = rest.partition(":")
        root, batches = Path(root), int(n) if n else args.batches
        for recipe in args.recipes.split(","):
            b, w = args.batch, args.workers
            n_timed = min(batches, args.dino_batches) if recipe == "dino" and args.dino_batches else batches
            pipelines = _pipelines(recipe, root, b, w, args)
            rates: dict[str, list[float]] = {k: [] for k in pipelines}
            for r in range(args.repeats):
                order = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
                for key in order:
                    rates[key].append(rate(partial(pipelines[key], r), b, args.warmup, n_timed))
            vz = rates["visionzoo"]
            for key, values in rates.items():
                ratios = [a / c for a, c in zip(vz, values, strict=True)]  # one rate per round each
                records.append({"tree": name, "recipe": recipe, "pipeline": key, "img_s": values, "vz_ratio": ratios,
                                "batches": n_timed})
                if key == "visionzoo":
                    continue
                print(f"| {RECIPES[recipe]} | {name}, {n_timed} | {span(vz)} | {key} | {span(values)} | "
                      f"{span(ratios, '{:.2f}')} (median {statistics.median(ratios):.2f}) |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
