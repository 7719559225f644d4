"""Write an ImageFolder tree of JPEGs shaped like ImageNet's (500x375, ~80 KB at quality 90)
for end-to-end benchmarks on machines without the real data set (the GPU machine has no network).

    python benchmarks/make_jpeg_tree.py /tmp/jpegs --train 2048 --val 256 --classes 16

Images are smooth random colour fields plus noise: they decode and resize like photographs
(JPEG decode cost depends on size and entropy, not on content)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(g: np.random.Generator, width: int, height: int) -> Image.Image:
    """A low-frequency colour field upsampled to width x height, with pixel noise."""
    coarse = g.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + g.integers(-20, 21, img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output folder; gets train/<class>/*.JPEG and val/<class>/*.JPEG")
    p.add_argument("--train", type=int, default=2048, help="training images in all (default 2048)")
    p.add_argument("--val", type=int, default=256, help="validation images in all (default 256)")
    p.add_argument("--classes", type=int, default=16, help="class folders per split (default 16)")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"), help="default 500 375")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = np.random.default_rng(args.seed)
    root = Path(args.root)
    total = 0
    for split, n in (("train", args.train), ("val", args.val)):
        for i in range(n):
            d = root / split / f"class_{i % args.classes:04d}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{split}_{i:07d}.JPEG"
            make_image(g, *args.size).save(path, quality=args.quality)
            total += path.stat().st_size
    n = args.train + args.val
    print(f"wrote {n} JPEGs ({args.size[0]}x{args.size[1]}, {total / max(n, 1) / 1024:.0f} KB each on average) "
          f"under {root}")


if __name__ == "__main__":
    main()
