"""DINO's multi-crop a batch at a time on the device: colour ops against torchvision's, the
per-image draw frequencies, images of many sizes in one padded batch, and DINO trained and
benchmarked from JPEGs decoded on the device (here the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from visionzoo.cli import main
from visionzoo.config import load_config
from visionzoo.data.augment.multicrop_batched import (
    BatchedMultiCrop,
    _jitter_op,
    adjust_hue,
    pad_batch,
    random_resized_boxes,
)

# A ViT small enough for a CPU test, 32 px global and 16 px local crops of RGB images.
TINY_RGB_DINO = [
    "data.image_size=32", "dino.local_crop_size=16", "dino.local_crops_number=2", "data.batch_size=4",
    "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[2]", "dino.knn_report_k=2",
    "data.test_resize=36", "data.test_size=32", "train.epochs=1", "train.log_every=1",
]


def _images(b: int, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_hue_matches_torchvision_per_image() -> None:
    x = _images(6)
    shifts = torch.tensor([-0.5, -0.3, -0.05, 0.0, 0.2, 0.45])
    ours = adjust_hue(x * 255, shifts) / 255
    for i, s in enumerate(shifts.tolist()):
        assert torch.allclose(ours[i], TF.adjust_hue(x[i], s), atol=1e-5), s


@pytest.mark.parametrize("op, reference", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                           (2, TF.adjust_saturation)])
def test_jitter_ops_match_torchvision_per_image(op, reference) -> None:
    x = _images(4, seed=1)
    factors = torch.tensor([0.6, 0.9, 1.1, 1.4])
    ours = _jitter_op(op, x * 255, factors) / 255
    for i, f in enumerate(factors.tolist()):
        assert torch.allclose(ours[i], reference(x[i], f), atol=1e-5)


def test_rgb_draw_frequencies_follow_the_recipe() -> None:
    # Saturated colour images: a crop is exactly grey only when greyscale was drawn (p=0.2), and the
    # second global crop is solarized with p=0.2 (pixels >= 128 flip: red 200 turns 55; the grey of
    # this red, 71.5, stays).
    cfg = load_config("dino_vits16_imagenet", ["data.image_size=8", "dino.local_crop_size=4",
                                               "dino.local_crops_number=1", "dino.color_jitter_p=0",
                                               "dino.blur_p=[0,0,0]"])
    n = 4000
    x = torch.zeros(n, 3, 12, 12)
    x[:, 0], x[:, 1] = 200.0, 20.0  # red
    crops = BatchedMultiCrop(cfg.data, cfg.dino)(x, torch.Generator().manual_seed(0))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    pixels = [c * std + mean for c in crops]
    for p in pixels:
        is_grey = (p[:, 0] - p[:, 1]).abs().amax(dim=(1, 2)) < 1e-3
        assert abs(is_grey.float().mean().item() - cfg.dino.grayscale_p) < 0.03
    solarized = ((pixels[1][:, 0] - 55).abs() < 1e-3).all(dim=(1, 2))
    assert abs(solarized.float().mean().item() - cfg.dino.solarize_p * (1 - cfg.dino.grayscale_p)) < 0.03
    assert not ((pixels[0][:, 0] - 55).abs() < 1e-3).any()  # the first global crop is never solarized


def test_jitter_applies_with_its_probability_and_keeps_the_range() -> None:
    cfg = load_config("dino_vits16_imagenet", ["data.image_size=8", "dino.local_crops_number=0", "dino.grayscale_p=0",
                                               "dino.blur_p=[0,0,0]", "dino.solarize_p=0", "data.hflip=0"])
    x = torch.full((3000, 3, 8, 8), 100.0)
    x[:, 2] = 180.0
    crops = BatchedMultiCrop(cfg.data, cfg.dino)(x, torch.Generator().manual_seed(1))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    pixels = crops[0] * torch.tensor(cfg.data.std).view(1, 3, 1, 1) + mean
    changed = (pixels - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert abs(changed.float().mean().item() - cfg.dino.color_jitter_p) < 0.03
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_images_of_many_sizes_share_one_padded_batch() -> None:
    small = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)[0]
    big = torch.rand(3, 9, 11) * 255
    x, hs, ws = pad_batch([small, big.to(torch.uint8)])
    # One pixel beyond the largest image; the last column and row of each image repeated once.
    assert x.shape == (2, 3, 10, 12) and hs.tolist() == [5, 9] and ws.tolist() == [4, 11]
    assert torch.equal(x[0, :, :5, :4], small) and torch.equal(x[0, :, 5, 4], small[:, 4, 3])
    assert torch.equal(x[0, :, :5, 4], small[:, :, 3]) and torch.equal(x[0, :, 5, :4], small[:, 4, :])
    assert torch.equal(x[1, :, 9, :11], x[1, :, 8, :11]) and (x[0, :, 6:, :] == 0).all()
    # A crop of the whole small image reads the same values padded or not, even when upsampled.
    box = torch.tensor([[0.0, 0.0, 0.0, 4.0, 5.0]])
    alone = roi_align(small[None], box, output_size=16, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    padded = roi_align(x[:1], box, output_size=16, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    assert torch.allclose(alone, padded)
    # Boxes are drawn inside each image's own size.
    boxes = random_resized_boxes(2000, hs.repeat(1000), ws.repeat(1000), [0.3, 1.0], torch.Generator().manual_seed(0))
    assert (boxes[:, 2] <= ws.repeat(1000)).all() and (boxes[:, 3] <= hs.repeat(1000)).all()
    assert (boxes[:, :2] >= 0).all()


def test_decoded_images_stay_uint8_until_cropped(monkeypatch) -> None:
    """The padded batch of decoded JPEGs is uint8 (a quarter of float32), and crops are cut from
    float copies of chunks of it; they equal the crops of the whole batch padded in float32."""
    import visionzoo.data.augment.multicrop_batched as multicrop

    cfg = load_config("dino_vits16_imagenet", TINY_RGB_DINO + ["dino.local_crops_number=3", "dino.solarize_p=0.5"])
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 20 + 3 * i, 31 - 2 * i, generator=g) * 255).to(torch.uint8) for i in range(6)]
    x, hs, ws = pad_batch(images)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 36, 32)
    augment = BatchedMultiCrop(cfg.data, cfg.dino)
    crops = augment(x, torch.Generator().manual_seed(1), (hs, ws))
    # The float32 path: every image edge-padded to the largest size as float32.
    hmax, wmax = int(hs.max()), int(ws.max())
    full = torch.cat([torch.nn.functional.pad(i[None].float(), (0, wmax - i.shape[-1], 0, hmax - i.shape[-2]),
                                              mode="replicate") for i in images])
    reference = augment(full, torch.Generator().manual_seed(1), (hs, ws))
    assert [c.shape for c in crops] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3
    for c, r in zip(crops, reference, strict=True):
        torch.testing.assert_close(c, r, rtol=0, atol=1e-4)
    monkeypatch.setattr(multicrop, "CHUNK_BYTES", 3 * 36 * 32 * 4 * 2)  # two images per float chunk
    chunked = augment(x, torch.Generator().manual_seed(1), (hs, ws))
    assert all(torch.equal(a, b) for a, b in zip(crops, chunked, strict=True))


def _jpeg_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8))
                img.save(folder / f"{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / "train/a/extra.png")


def test_dino_trains_from_jpegs_decoded_on_the_device(tmp_path: Path) -> None:
    _jpeg_tree(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "dino_vits16_imagenet", "--data", str(tmp_path / "data"), "--output", str(out),
                 "--device", "cpu", "--workers", "0", "data.decode=device", *TINY_RGB_DINO])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["loader"].startswith("device decode") and results["steps"] == 2  # 11 images, batch 4
    assert results["cpu_fallbacks"] == 1  # the PNG is among the 8 images the two seeded batches take
    assert 0 <= results["Acc@1"] <= 100 and results["ActualLoss"] == results["ActualLoss"]


def test_bench_times_dino_model_only_and_end_to_end(tmp_path: Path, capsys) -> None:
    _jpeg_tree(tmp_path / "data")
    out = tmp_path / "bench.json"
    code = main(["bench", "dino_vits16_imagenet", "--data", str(tmp_path / "data"), "--output", str(out),
                 "--device", "cpu", "--workers", "0", "--precision", "fp32", "--steps", "2",
                 "train.perf_warmup_steps=1", "data.decode=device", *TINY_RGB_DINO])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["task"] == "dino" and result["loader"].startswith("device decode")
    assert result["input_shape"] == [[4, 3, 32, 32]] * 2 + [[4, 3, 16, 16]] * 2
    row = result["results"][0]
    assert row["model_only"]["images"] == row["end_to_end"]["images"] == 8
    assert row["ratio"] == pytest.approx(row["end_to_end_img_s"] / row["model_only_img_s"])
    assert np.isfinite(row["final_loss"])
