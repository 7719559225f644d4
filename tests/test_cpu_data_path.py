"""data.decode=cpu: workers hand over uint8, the batch is normalised on the device, JPEGs are
decoded at a reduced size when the crop allows (draft). With data.draft=false every batch must
equal what the torchvision v2 pipelines of before produced per image, for the same sample,
epoch and seed; the reference pipelines are written out below as they were."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2

from visionzoo.config import load_config
from visionzoo.data.augment import per_image, presets
from visionzoo.data.augment.multicrop import MultiCropTransform, blur_uint8
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import timm_randaugment
from visionzoo.data.loading.build import build_datasets, build_loader, build_loaders, multicrop_loader
from visionzoo.data.loading.collate import stack_images
from visionzoo.data.loading.device_batches import DeviceBatches
from visionzoo.data.loading.samplers import SampleOrder, SeededDataset, sample_seed
from visionzoo.data.sources.folder import to_rgb

SEED, EPOCH = 3, 1
SIZES = [(120, 90), (90, 120), (200, 150), (64, 64), (150, 100)]


def _photo(seed: int, w: int, h: int) -> Image.Image:
    """Smooth colour field with mild noise: content JPEG's scaled decode handles like a photo's."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(img + g.integers(-4, 5, img.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/{a,b} and val/{a,b}: RGB JPEGs of several sizes, a PNG, a greyscale and a CMYK JPEG."""
    root = tmp_path_factory.mktemp("cpu_path")
    for split in ("train", "val"):
        for i, (w, h) in enumerate(SIZES):
            p = root / split / "ab"[i % 2] / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            _photo(i, w, h).save(p, quality=92)
        _photo(9, 80, 60).save(root / split / "a" / "png.png")
        _photo(10, 70, 50).convert("L").save(root / split / "b" / "grey.jpg", quality=92)
        _photo(11, 60, 70).convert("CMYK").save(root / split / "b" / "cmyk.jpg", quality=92)
    return root


def _cfg(recipe: str, root: Path, *overrides: str):
    return load_config(recipe, [f"data.path={root}", "data.draft=false", *overrides])


# ----------------------------------------------------------------------------- the pipelines of before

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _old_normalise(d) -> list:
    if d.normalize == "unit":  # torchvision's ConvertImageDtype (x / 255) + Normalize in 0-1 units
        return [v2.ToImage(), T.ConvertImageDtype(torch.float32), v2.Normalize([m / 255 for m in d.mean],
                                                                               [s / 255 for s in d.std])]
    assert d.normalize == "pixel"
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=False), v2.Normalize(d.mean, d.std)]


def old_train_transform(d):
    ops = [v2.RandomResizedCrop(d.image_size, scale=tuple(d.crop_scale), interpolation=_INTERP[d.interpolation],
                                antialias=True)]
    if d.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(d.hflip))
    if d.randaugment:
        ops += [v2.ToPILImage(), timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)]
    return v2.Compose(ops + _old_normalise(d))


def old_eval_transform(d):
    return v2.Compose([v2.Resize(d.test_resize, interpolation=_INTERP[d.interpolation], antialias=True),
                       v2.CenterCrop(d.test_size), *_old_normalise(d)])


def old_multicrop(d, dino):
    interp = InterpolationMode(d.interpolation)
    b, c, s, h = dino.color_jitter

    def jitter():
        return [v2.RandomHorizontalFlip(d.hflip), v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=dino.color_jitter_p),
                v2.RandomGrayscale(dino.grayscale_p)]

    def blur(size, p):
        k = min(2 * math.ceil(3 * dino.blur_sigma[1]) + 1, size if size % 2 else size - 1)
        return v2.RandomApply([v2.GaussianBlur(max(k, 1), sigma=tuple(dino.blur_sigma))], p=p)

    def crop(size, scale):
        return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True)

    gs, ls, (p1, p2, pl) = d.image_size, dino.local_crop_size, dino.blur_p
    views = [v2.Compose([crop(gs, dino.global_crops_scale), *jitter(), blur(gs, p1), *_old_normalise(d)]),
             v2.Compose([crop(gs, dino.global_crops_scale), *jitter(), blur(gs, p2),
                         v2.RandomSolarize(128, p=dino.solarize_p), *_old_normalise(d)])]
    local = v2.Compose([crop(ls, dino.local_crops_scale), *jitter(), blur(ls, pl), *_old_normalise(d)])
    views += [local] * dino.local_crops_number
    return lambda img: [v(img) for v in views]


def _old_decode(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img).copy()


def _seeded(index: int, fn):
    """``fn()`` under the per-sample seeds (NumPy's too: timm's RandAugment picks ops with it)."""
    s = sample_seed(SEED, EPOCH, index)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return fn()


def _epoch_order(loader) -> list[int]:
    return [i for i, _ in loader.sampler]


# ----------------------------------------------------------------------------- equal to the v2 pipelines

@pytest.mark.parametrize("recipe, overrides", [
    ("nfnet_f0_imagenet", ["data.image_size=48"]),  # RandomResizedCrop bicubic + flip + RandAugment
    ("alexnet_imagenet", ["data.image_size=40"]),  # RandomResizedCrop bilinear + flip
])
def test_training_batches_equal_the_v2_pipeline(tree, recipe, overrides) -> None:
    d = _cfg(recipe, tree, *overrides).data
    splits = build_datasets(d)
    loader = build_loader(splits.train, 4, 0, True, SampleOrder(SEED))
    loader.set_epoch(EPOCH)
    order = _epoch_order(loader)
    old = old_train_transform(d)
    reference = [_seeded(i, lambda i=i: old(_old_decode(splits.train.samples[i][0]))) for i in order]
    got = torch.cat([images for images, _, _ in loader])
    assert got.dtype == torch.float32 and got.shape == (len(got), 3, d.image_size, d.image_size)
    assert torch.equal(got, torch.stack(reference[:len(got)]))


def test_eval_batches_equal_the_v2_pipeline(tree) -> None:
    d = _cfg("alexnet_imagenet", tree, "data.test_resize=72", "data.test_size=64").data
    splits = build_datasets(d)
    _, val = build_loaders(splits, d, 3, torch.device("cpu"))
    got = torch.cat([images for images, _, _ in val])
    old = old_eval_transform(d)
    assert torch.equal(got, torch.stack([old(_old_decode(p)) for p, _ in splits.val.samples]))


def test_multicrop_equals_the_v2_pipeline_up_to_the_separable_blur(tree) -> None:
    cfg = _cfg("dino_vits16_imagenet", tree, "data.image_size=48", "dino.local_crop_size=24",
               "dino.local_crops_number=3", "dino.blur_p=[1.0,0.5,0.5]", "dino.solarize_p=0.5")
    d, dc = cfg.data, cfg.dino
    ds = build_datasets(d).train
    ds.transform = MultiCropTransform(d, dc)
    loader = multicrop_loader(ds, 4, 0, SampleOrder(SEED))
    loader.set_epoch(EPOCH)
    order = _epoch_order(loader)
    old = old_multicrop(d, dc)
    reference = [_seeded(i, lambda i=i: old(_old_decode(ds.samples[i][0]))) for i in order]
    differing = total = 0
    for b, (crops, _, _) in enumerate(loader):
        for pos, got in enumerate(crops):
            want = torch.stack([r[pos] for r in reference[4 * b:4 * b + len(got)]])
            # One grey level (1/std in normalised units) where the separable blur rounds the other way.
            torch.testing.assert_close(got, want, rtol=0, atol=1.01 / min(d.std))
            differing += int((got != want).sum())
            total += want.numel()
    assert differing / total < 1e-3


def test_separable_blur_matches_torchvision() -> None:
    x = torch.from_numpy(np.array(_photo(0, 56, 40))).permute(2, 0, 1)
    for sigma in (0.1, 0.7, 2.0):
        want = v2.functional.gaussian_blur(x, [13, 13], [sigma, sigma])
        diff = (blur_uint8(x, sigma, 13).int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_the_same_sample_gives_the_same_batch_with_any_worker_count(tree) -> None:
    # RandAugment's op choice (NumPy) included: seeded per sample, not per worker.
    d = _cfg("nfnet_f0_imagenet", tree, "data.image_size=32").data
    splits = build_datasets(d)
    batches = []
    for workers in (0, 2):
        loader = build_loader(splits.train, 3, workers, True, SampleOrder(SEED))
        loader.set_epoch(EPOCH)
        batches.append(torch.cat([images for images, _, _ in loader]))
    assert torch.equal(batches[0], batches[1])


def test_seeded_dataset_leaves_the_callers_streams_alone(tree) -> None:
    d = _cfg("nfnet_f0_imagenet", tree, "data.image_size=32").data
    ds = SeededDataset(build_datasets(d).train, SEED)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    first = ds[(2, EPOCH)][0]
    after = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    assert torch.equal(ds[(2, EPOCH)][0], first)
    assert (torch.rand(1), random.random(), np.random.rand()) == after


# ----------------------------------------------------------------------------- draft decoding

@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("large") / "big.jpg"
    _photo(3, 1200, 900).save(p, quality=92)
    return p


def _prepared(transform, path: Path, seed: int):
    torch.manual_seed(seed)
    with Image.open(path) as img:
        prepared = transform.prepare(img)
        img.load()
        size = img.size
        return prepared, size, transform(to_rgb(img), prepared)


def test_draft_draws_the_same_crop_and_shrinks_the_decode_by_the_crop(large_jpeg) -> None:
    d = load_config("alexnet_imagenet", ["data.image_size=64"]).data
    on, off = presets.train_transform(replace(d, draft=True)), presets.train_transform(replace(d, draft=False))
    for seed in range(6):
        (box, scale), size, out = _prepared(on, large_jpeg, seed)
        (box_full, one), full_size, want = _prepared(off, large_jpeg, seed)
        assert box == box_full and one == 1 and full_size == (1200, 900)
        # The largest of 8, 4, 2 that the crop is shrunk by (both sides), or none.
        expected = next((k for k in (8, 4, 2) if min(box[2], box[3]) / 64 >= k), 1)
        assert scale == expected and size == (math.ceil(1200 / scale), math.ceil(900 / scale))
        # What the decoder's downscaling changes: a little, on average.
        assert (out.float() - want.float()).abs().mean() < 3


def test_draft_leaves_small_and_non_jpeg_images_alone(tree) -> None:
    d = load_config("alexnet_imagenet", ["data.image_size=48"]).data
    t = presets.train_transform(replace(d, draft=True))
    for name in ("train/a/png.png", "train/a/0.jpg"):
        (_, scale), size, _ = _prepared(t, tree / name, 0)
        assert scale == 1 and size == Image.open(tree / name).size


def test_eval_draft_decodes_towards_the_resize_target(large_jpeg) -> None:
    d = load_config("alexnet_imagenet", ["data.test_resize=128", "data.test_size=112"]).data
    with Image.open(large_jpeg) as img:
        t = per_image.ResizeCenterCrop(d, True)
        target = t.prepare(img)
        img.load()
        assert target == (170, 128) and img.size == (300, 225)  # 900 / 128 >= 4: decoded at 1/4
        out = t(to_rgb(img), target)
    want = per_image.ResizeCenterCrop(d, False)(_old_decode(str(large_jpeg)))
    assert out.shape == want.shape == (3, 112, 112) and (out.float() - want.float()).abs().mean() < 3


def test_eval_decodes_in_full_unless_eval_draft(large_jpeg) -> None:
    # Acc@1 is a measurement compared with the references': by default the eval resize starts from
    # the fully decoded image, whatever data.draft says for training.
    for overrides, want_size in (([], (1200, 900)), (["data.eval_draft=true"], (300, 225))):
        d = load_config("alexnet_imagenet", ["data.test_resize=128", "data.test_size=112", *overrides]).data
        assert d.draft
        with Image.open(large_jpeg) as img:
            presets.eval_transform(d).prepare(img)
            img.load()
            assert img.size == want_size


def test_multicrop_draft_follows_the_smallest_shrink(large_jpeg) -> None:
    cfg = load_config("dino_vits16_imagenet", ["data.image_size=64", "dino.local_crop_size=32"])
    t = MultiCropTransform(cfg.data, cfg.dino)
    (views, scale), size, crops = _prepared(t, large_jpeg, 0)
    sizes = [64, 64] + [32] * cfg.dino.local_crops_number
    shrink = min(min(v.box[2], v.box[3]) / s for v, s in zip(views, sizes, strict=True))
    assert scale == next((k for k in (8, 4, 2) if shrink >= k), 1) and scale > 1
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in sizes] and all(c.dtype == torch.uint8 for c in crops)


# ----------------------------------------------------------------------------- batches on the device

def test_device_batches_normalise_uint8_and_keep_the_layout_asked_for(tree) -> None:
    norm = Normalize((100.0, 110.0, 120.0), (50.0, 55.0, 60.0), "pixel")  # (x - mean) / std, as v2.Normalize below
    images = [torch.from_numpy(np.array(_photo(i, 8, 6))).permute(2, 0, 1) for i in range(3)]
    batch = stack_images(images)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, torch.stack(images))
    want = torch.stack([v2.Normalize(norm.mean, norm.std)(i.float()) for i in images])

    class Loader(list):
        sampler, batch_size, num_workers, dataset = None, 3, 0, None

    src = Loader([(batch, torch.tensor([0, 1, 1]), 1), ([batch, batch[:, :, :4, :4]], torch.tensor([2]), 0),
                  (want, torch.tensor([0]), 0), (torch.empty(0), torch.empty(0, dtype=torch.int64), 3)])
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = list(DeviceBatches(src, torch.device("cpu"), norm, fmt))
        assert torch.equal(out[0][0], want) and out[0][0].is_contiguous(memory_format=fmt) and out[0][2] == 1
        assert torch.equal(out[1][0][0], want) and torch.equal(out[1][0][1], want[:, :, :4, :4])
        assert out[2][0] is want or torch.equal(out[2][0], want)  # float batches are only moved
        assert out[3][0].numel() == 0 and out[3][2] == 3


def test_stack_images_refuses_mixed_sizes() -> None:
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        stack_images([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 1, 4, dtype=torch.uint8)])


def test_loaders_resume_mid_epoch(tree) -> None:
    d = _cfg("alexnet_imagenet", tree, "data.image_size=32").data
    splits = build_datasets(d)
    loader = build_loader(splits.train, 2, 0, True, SampleOrder(SEED))
    loader.set_epoch(EPOCH)
    full = [images for images, _, _ in loader]
    loader.set_epoch(EPOCH, skip_batches=2)
    rest = [images for images, _, _ in loader]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


def test_per_sample_seeding_leaves_accelerator_generators_alone(tree, monkeypatch) -> None:
    # torch.manual_seed also reseeds every CUDA generator (dropout on the GPU, in a workers=0 run);
    # the transforms draw from the CPU generator only, which is all that is seeded.
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch, "manual_seed", lambda s: calls.append(s))
    d = _cfg("alexnet_imagenet", tree, "data.image_size=32").data
    ds = SeededDataset(build_datasets(d).train, SEED)
    ds[(0, EPOCH)]
    assert calls == []
