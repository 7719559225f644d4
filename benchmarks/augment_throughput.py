"""Images per second of the training augmentations alone, per-image (the CPU worker path) vs
batched (the device path), on the device given — no model, no file reading.

    PYTHONPATH=src python3 benchmarks/augment_throughput.py --device cpu
    PYTHONPATH=src python3 benchmarks/augment_throughput.py --device cuda --batch 256

Rows: NFNet's RandomResizedCrop 192 + flip + RandAugment rand-m5-n4-mstd0.5-inc1 on 500x375
images (timm + Pillow per image vs data/augment/batched.py's crop + data/augment/batched_randaugment.py),
DINO's 2 x 224 + 8 x 96 multi-crop (torchvision per image vs data/augment/multicrop_batched.py),
and mixup/cutmix per sample (timm's elem mode loop vs data/augment/mix.py). The per-image rows run in
this one process: divide by nothing, they are per CPU core."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from visionzoo.config import load_config
from visionzoo.data.augment import registry
from visionzoo.data.augment.batched import MultiCropAugment
from visionzoo.data.augment.mix import PerSampleMixup
from visionzoo.data.augment.multicrop import MultiCropTransform
from visionzoo.data.augment.presets import train_transform
from visionzoo.runtime import synchronize


def _rate(fn, n_images: int, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, caches)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return n_images * repeats / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64, help="images per batched call")
    p.add_argument("--per-image", type=int, default=32, help="images timed on the per-image path")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(8)]
    decoded = [torch.from_numpy(np.array(im)).permute(2, 0, 1).to(device) for im in pil]
    batch_images = [decoded[i % len(decoded)] for i in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    rows = []

    nfnet = load_config("nfnet_f0_imagenet")
    per_image = train_transform(nfnet.data)
    rows.append(("NFNet RRC 192 + flip + RandAugment", "per image (timm, Pillow)",
                 _rate(lambda: [per_image(pil[i % 8]) for i in range(args.per_image)], args.per_image,
                       torch.device("cpu"), args.repeats)))
    batched = registry.batched(nfnet.data, registry.DEVICE_DECODE, device)
    rows.append(("NFNet RRC 192 + flip + RandAugment", f"batched ({args.device})",
                 _rate(lambda: batched(batch_images, g), args.batch, device, args.repeats)))

    dino = load_config("dino_vits16_imagenet")
    multicrop = MultiCropTransform(dino.data, dino.dino)
    n_dino = max(args.per_image // 4, 1)
    rows.append(("DINO 2 x 224 + 8 x 96 crops", "per image (torchvision)",
                 _rate(lambda: [multicrop(pil[i % 8]) for i in range(n_dino)], n_dino,
                       torch.device("cpu"), args.repeats)))
    batched_mc = MultiCropAugment(dino.data, dino.dino)
    rows.append(("DINO 2 x 224 + 8 x 96 crops", f"batched ({args.device})",
                 _rate(lambda: batched_mc(batch_images, g), args.batch, device, args.repeats)))

    from timm.data import Mixup

    x = torch.rand(args.batch, 3, 192, 192, device=device) * 255
    y = torch.randint(0, 1000, (args.batch,), device=device)
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    timm_elem = Mixup(mode="elem", **kw)
    rows.append(("mixup 0.8 / cutmix 1.0 per sample, 192 px", f"timm elem mode ({args.device})",
                 _rate(lambda: timm_elem(x.clone(), y), args.batch, device, args.repeats)))
    ours = PerSampleMixup(**kw)
    rows.append(("mixup 0.8 / cutmix 1.0 per sample, 192 px", f"batched ({args.device})",
                 _rate(lambda: ours(x, y), args.batch, device, args.repeats)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"batch {args.batch}\n")
    print("| augmentation | path | img/s |\n|---|---|---|")
    for what, path, rate in rows:
        print(f"| {what} | {path} | {rate:.1f} |")


if __name__ == "__main__":
    main()
