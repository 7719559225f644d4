"""The table of augmentation presets (data/augment/registry.py) holds: every preset, on every
batched path the table says runs it, gives what the per-image path gives when both are fed the
same random draws — bit for bit where the table says exact, within its stated grey levels
otherwise (and further apart with other draws, so the bound tells a mismatch). The per-image
path itself draws as the torchvision v2 transforms it replaced. The table in docs/data-path.md,
config.AUGMENTS and the loaders' refusals follow the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from torchvision.transforms import v2

from visionzoo import config
from visionzoo.config import DataConfig, load_config
from visionzoo.data.augment import registry
from visionzoo.data.augment.multicrop import MultiCropTransform
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import as_uint8, pil_to_uint8
from visionzoo.data.augment.registry import DEVICE_DECODE, IN_MEMORY, PER_IMAGE, PRESETS
from visionzoo.data.loading.build import Splits, build_loaders, multicrop_train_loader, training_path
from visionzoo.data.loading.in_memory import InMemoryLoader, InMemoryMultiCropLoader
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MEAN, STD = [124.0, 116.0, 104.0], [58.0, 57.0, 57.5]


# Tiny tensors: OpenMP threads only add spin-wait overhead (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(seed: int, w: int, h: int, channels: int = 3) -> np.ndarray:
    """A smooth colour field with mild noise (what a photo's crop looks like to a resampler),
    uint8 [H, W, C], or [H, W] for one channel."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + g.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    return img if channels == 3 else img[..., 1]


def _chw(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t[None].contiguous() if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _data(channels: int = 3, **kw) -> DataConfig:
    base = dict(image_size=24, crop_scale=[0.08, 1.0], crop_padding=3, hflip=0.5, draft=False, in_chans=channels,
                mean=MEAN[:channels] if channels == 3 else [128.0], std=STD[:channels] if channels == 3 else [64.0])
    return DataConfig(**(base | kw))


def _levels(d: DataConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised batch → grey levels (0-255), to state the differences in the table's units."""
    mean, std = torch.tensor(d.mean).view(1, -1, 1, 1), torch.tensor(d.std).view(1, -1, 1, 1)
    return lambda x: x * std + mean


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_size_batch(channels: int, n: int = 12, size: int = 30) -> torch.Tensor:
    return torch.stack([_chw(_photo(i, size, size, channels)) for i in range(n)])


# ----------------------------------------------------------------------------- crops and flips
# Each comparison returns (batched output, per-image output, to grey levels) triples; ``other``
# replays other draws on the per-image side (the control: the bound must then fail).

Pairs = list[tuple[torch.Tensor, torch.Tensor, Callable]]


def _imagenet(path: str, other: bool) -> Pairs:
    out = []
    # Device decode: photos of many sizes, the per-image path on PIL images (ImageFolder, full
    # decode). In memory: one size, the per-image path on uint8 tensors (CIFAR / MNIST workers),
    # where nearest is compared too (Pillow's nearest picks other pixels: see the table's note).
    modes = ("bilinear", "bicubic") if path == DEVICE_DECODE else ("bilinear", "bicubic", "nearest")
    for channels in (3,) if path == DEVICE_DECODE else (3, 1):
        for interp in modes:
            d = _data(channels, augment="imagenet", interpolation=interp)
            if path == DEVICE_DECODE:
                arrays = [_photo(i, 40 + 7 * i, 60 - 3 * i) for i in range(10)]
                images, per_image_inputs = [_chw(a) for a in arrays], [Image.fromarray(a) for a in arrays]
            else:
                images = _same_size_batch(channels)
                per_image_inputs = list(images)
            batch = registry.batched(d, path, CPU)
            draws = batch.draw(images, _generator(0))
            boxes, flips = batch.draw(images, _generator(1))[0] if other else draws[0]
            per = registry.per_image(d).crop
            ref = torch.stack([as_uint8(per.apply(img, box, bool(f)))
                               for img, box, f in zip(per_image_inputs, boxes, flips, strict=True)])
            out.append((batch.apply(images, draws), Normalize.of(d)(ref), _levels(d)))
    return out


def _cifar(path: str, other: bool) -> Pairs:
    out = []
    for channels in (3, 1):
        d = _data(channels, augment="cifar", image_size=28)
        x = _same_size_batch(channels, size=28)
        batch = registry.batched(d, path, CPU)
        draws = batch.draw(x, _generator(0))
        tops, lefts, flips = batch.draw(x, _generator(1))[0] if other else draws[0]
        per = registry.per_image(d).crop
        ref = torch.stack([as_uint8(per.apply(img, int(t), int(le), bool(f)))
                           for img, t, le, f in zip(x, tops, lefts, flips, strict=True)])
        out.append((batch.apply(x, draws), Normalize.of(d)(ref), _levels(d)))
    return out


def _none(path: str, other: bool) -> Pairs:
    d = _data(3, augment="none")  # hflip 0.5: "none" flips nothing, on either path
    x = _same_size_batch(3)
    batch = registry.batched(d, path, CPU)
    ref = torch.stack([as_uint8(registry.per_image(d).crop(img)) for img in x])
    return [(batch.apply(x, batch.draw(x, _generator(0))), Normalize.of(d)(ref), _levels(d))]


# ----------------------------------------------------------------------------- RandAugment

def _timm_replay(ops: list, img: Image.Image, op_index: list[int], apply: list[bool], magnitude: list[float],
                 negate: list[bool], monkeypatch) -> Image.Image:
    """timm's RandAugment with its draws given: each layer's op (AugmentOp), whether it applies,
    its magnitude, and the sign timm draws with random.random() > 0.5."""
    for k, on, m, neg in zip(op_index, apply, magnitude, negate, strict=True):
        if not on:
            continue
        op = ops[k]
        with monkeypatch.context() as patch:
            patch.setattr(auto_augment.random, "random", lambda neg=neg: 1.0 if neg else 0.0)
            args = op.level_fn(m, op.hparams) if op.level_fn is not None else ()
        img = op.aug_fn(img, *args, **op.kwargs)
    return img


def _randaugment(path: str, other: bool, monkeypatch=None) -> Pairs:
    # One op per image on the same uint8 crops (the step after every preset's crop): the table's
    # bound is per op. Both interpolations of the recipes (NFNet's bicubic), every op of the set.
    out = []
    for interp, config_str in (("bilinear", "rand-m9-n1-mstd0.5"), ("bicubic", "rand-m9-n1-mstd0.5-inc1")):
        d = _data(3, augment="cifar" if path == IN_MEMORY else "imagenet", randaugment=config_str,
                  interpolation=interp, image_size=30)
        x = _same_size_batch(3, n=48)
        batched = registry.BY_NAME["randaugment"].paths[path].build(d)
        timm = registry.BY_NAME["randaugment"].paths[PER_IMAGE].build(d)
        params = batched.sample_params(len(x), _generator(0))
        replayed = batched.sample_params(len(x), _generator(1)) if other else params
        ref = [pil_to_uint8(_timm_replay(timm.ops, Image.fromarray(img.permute(1, 2, 0).numpy()),
                                         *(t[:, i].tolist() for t in (replayed.op_index, replayed.apply,
                                                                      replayed.magnitude, replayed.negate)),
                                         monkeypatch=monkeypatch))
               for i, img in enumerate(x)]
        out.append((batched.apply(x.float(), params), torch.stack(ref).float(), lambda t: t))
    return out


# ----------------------------------------------------------------------------- DINO's views

def _batched_draws(views: list[list], channels: int, multicrop) -> list[dict]:
    """The draws of ``BatchedMultiCrop.draw`` that reproduce per-image draws (``MultiCropTransform.draw``,
    one list of views per image)."""
    spreads, out = tuple(multicrop.dino.color_jitter), []
    for j, (_, _, _, solarize_p) in enumerate(multicrop.specs()):
        vs = [v[j] for v in views]
        boxes = [[le, t, le + w, t + h] for t, le, h, w in (v.box for v in vs)]  # (x1, y1, x2, y2)
        p = {"boxes": torch.tensor(boxes, dtype=torch.float32), "flip": torch.tensor([v.flip for v in vs])}
        on = torch.tensor([v.jitter is not None for v in vs])
        factors = [[(v.jitter[1][op] if on_ and v.jitter[1][op] is not None else float(op != 3))
                    for v, on_ in zip(vs, on.tolist(), strict=True)] for op in range(4)]
        if channels == 1:  # brightness and contrast only, in the order the permutation gives them
            p["factors"] = torch.tensor(factors[:2])
            p["order"] = torch.tensor([on_ and v.jitter[0].index(0) < v.jitter[0].index(1)
                                       for v, on_ in zip(vs, on.tolist(), strict=True)])
            p["jitter"] = on
        else:
            p["factors"] = torch.tensor(factors)
            order = torch.tensor([v.jitter[0] if v.jitter is not None else [0, 1, 2, 3] for v in vs])
            p["groups"] = [(slot, op, torch.nonzero(on & (order[:, slot] == op))[:, 0])
                           for slot in range(4) for op in range(4) if spreads[op] != 0]
            p["grey"] = torch.tensor([v.grey for v in vs])
        p["sigma"] = torch.tensor([v.sigma or 0.0 for v in vs])
        if solarize_p > 0:
            p["solarize"] = torch.tensor([v.solarize for v in vs])
        out.append(p)
    return out


def _multicrop(path: str, other: bool) -> Pairs:
    out = []
    small = ["data.image_size=32", "dino.local_crop_size=16", "dino.local_crops_number=3", "dino.solarize_p=0.5"]
    cases = [("dino_vits16_imagenet", 3)] + ([("dino_fashion_mnist", 1)] if path == IN_MEMORY else [])
    for recipe, channels in cases:
        cfg = load_config(recipe, small)
        d, dino = cfg.data, cfg.dino
        per, batched = registry.multicrop(d, dino, PER_IMAGE), registry.multicrop(d, dino, path)
        if path == DEVICE_DECODE:  # photos of many sizes; the per-image path on PIL images
            arrays = [_photo(i, 40 + i, 48 - i // 2) for i in range(16)]
            images, per_image_inputs = [_chw(a) for a in arrays], [Image.fromarray(a) for a in arrays]
        else:  # one size; the per-image path on uint8 tensors
            images = _same_size_batch(channels, n=16, size=40)
            per_image_inputs = list(images)
        torch.manual_seed(0)
        views = [per.draw(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        replayed = [per.draw(int(img.shape[-2]), int(img.shape[-1])) for img in images] if other else views
        crops = batched.apply(images, _batched_draws(views, channels, getattr(batched, "multicrop", batched)))
        refs = [per.apply(img, v) for img, v in zip(per_image_inputs, replayed, strict=True)]
        norm, levels = Normalize.of(d), _levels(d)
        for j, crop in enumerate(crops):
            out.append((crop, norm(torch.stack([r[j] for r in refs])), levels))
    return out


COMPARE: dict[tuple[str, str], Callable[..., Pairs]] = {
    ("imagenet", DEVICE_DECODE): _imagenet, ("imagenet", IN_MEMORY): _imagenet,
    ("cifar", IN_MEMORY): _cifar, ("none", IN_MEMORY): _none,
    ("randaugment", DEVICE_DECODE): _randaugment, ("randaugment", IN_MEMORY): _randaugment,
    ("multicrop", DEVICE_DECODE): _multicrop, ("multicrop", IN_MEMORY): _multicrop,
}
CLAIMS = [(p.name, path) for p in PRESETS for path in p.paths if path != PER_IMAGE]


def _pairs(preset: str, path: str, other: bool, monkeypatch) -> Pairs:
    compare = COMPARE[preset, path]
    return compare(path, other, monkeypatch) if compare is _randaugment else compare(path, other)


def _worst(impl: registry.Impl, pairs: Pairs) -> float:
    """The measure the table's bound is on: the largest difference, or the largest mean difference
    over an image (a crop), in grey levels."""
    diffs = [(levels(ours) - levels(ref)).abs() for ours, ref, levels in pairs]
    if impl.mean is not None:
        return max(float(d.flatten(1).mean(1).max()) for d in diffs)
    return max(float(d.max()) for d in diffs)


def test_every_claim_of_the_table_has_a_comparison() -> None:
    assert sorted(COMPARE) == sorted(CLAIMS)
    assert all(PER_IMAGE in p.paths for p in PRESETS)  # the reference path runs every preset


@pytest.mark.parametrize("preset, path", CLAIMS)
def test_batched_path_reproduces_the_per_image_path(preset: str, path: str, monkeypatch) -> None:
    impl = registry.BY_NAME[preset].paths[path]
    pairs = _pairs(preset, path, False, monkeypatch)
    if impl.tolerance == 0 and impl.mean is None:  # exact: the normalised batches, bit for bit
        for ours, ref, _ in pairs:
            assert ours.dtype == ref.dtype == torch.float32 and torch.equal(ours, ref)
        return
    bound = impl.mean if impl.mean is not None else impl.tolerance
    assert _worst(impl, pairs) <= bound, impl.reason
    # Other draws on the per-image side: the bound no longer holds, so it would catch a path that
    # drew or applied its crops, flips or ops differently.
    assert _worst(impl, _pairs(preset, path, True, monkeypatch)) > 2 * bound


def test_randaugment_with_bilinear_is_within_a_level_per_pixel(monkeypatch) -> None:
    # The table's note [2]: per op, with bilinear resampling, every pixel within 1 level of timm's.
    ours, ref, _ = _randaugment(IN_MEMORY, False, monkeypatch)[0]
    assert (ours - ref).abs().max() <= 1.0 + 1e-3


# ----------------------------------------------------------------------------- the per-image path draws as v2

def test_pad_crop_flip_draws_and_crops_as_the_v2_transforms() -> None:
    d = _data(3, augment="cifar", image_size=28, crop_padding=4)
    old = v2.Compose([v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(0.5)])
    ours = registry.per_image(d)
    for seed, img in enumerate([_chw(_photo(0, 28, 28)), _chw(_photo(1, 26, 30)), Image.fromarray(_photo(2, 28, 28))]):
        torch.manual_seed(seed)
        want, after = as_uint8(old(img)), torch.rand(1)
        torch.manual_seed(seed)
        assert torch.equal(ours(img), want) and torch.equal(torch.rand(1), after)  # the same numbers drawn


def test_multicrop_on_tensors_draws_and_computes_as_the_v2_pipeline() -> None:
    cfg = load_config("dino_vits16_imagenet", ["data.image_size=32", "dino.local_crop_size=16",
                                               "dino.local_crops_number=2", "dino.solarize_p=0.5"])
    d, dino = cfg.data, cfg.dino
    b, c, s, h = dino.color_jitter
    interp = v2.InterpolationMode(d.interpolation)

    def view(size: int, scale: list[float], blur_p: float, solarize: bool) -> v2.Compose:
        k = min(2 * int(np.ceil(3 * dino.blur_sigma[1])) + 1, size if size % 2 else size - 1)
        return v2.Compose([v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True),
                           v2.RandomHorizontalFlip(d.hflip),
                           v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=dino.color_jitter_p),
                           v2.RandomGrayscale(dino.grayscale_p),
                           v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(dino.blur_sigma))], p=blur_p)]
                          + ([v2.RandomSolarize(128, p=dino.solarize_p)] if solarize else []))

    p1, p2, pl = dino.blur_p
    views = ([view(32, dino.global_crops_scale, p1, False), view(32, dino.global_crops_scale, p2, True)]
             + [view(16, dino.local_crops_scale, pl, False)] * 2)
    ours = registry.multicrop(d, dino, PER_IMAGE)
    for seed in range(8):
        img = _chw(_photo(seed, 48, 40))
        torch.manual_seed(seed)
        want = [v(img) for v in views]
        torch.manual_seed(seed)
        got = ours(img)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# ----------------------------------------------------------------------------- the table, config and refusals

def test_config_checks_the_registry_presets() -> None:
    assert config.AUGMENTS == registry.AUGMENTS == ("imagenet", "cifar", "none")


def test_docs_show_the_registry_table() -> None:
    text = (ROOT / "docs" / "data-path.md").read_text()
    start = "<!-- generated by visionzoo.data.augment.registry.markdown_table(); tests/test_augment_registry.py -->\n"
    assert start in text
    shown = text.split(start, 1)[1].split("<!-- end of the generated table -->", 1)[0]
    assert shown.strip() == registry.markdown_table().strip()


def test_a_path_that_does_not_run_a_preset_is_refused_in_one_line() -> None:
    with pytest.raises(UserError) as refused:
        registry.check(_data(augment="none"), DEVICE_DECODE)
    assert str(refused.value) == ("data.augment=none has no device decode version (data.decode=device); the paths "
                                  "that run it: per image (data.decode=cpu, data.device_resident=false), in memory "
                                  "(data.device_resident=true)")
    registry.check(_data(augment="imagenet", randaugment="rand-m9-n2"), DEVICE_DECODE)  # runs there
    assert [p.name for p in registry.pipeline(_data(augment="cifar", randaugment="rand-m9-n2"))] == [
        "cifar", "randaugment"]
    assert [p.name for p in registry.pipeline(_data(randaugment="rand-m9-n2"), views=True)] == ["multicrop"]


def test_dino_loader_follows_the_path_of_its_data() -> None:
    cfg = load_config("dino_fashion_mnist",
                      ["data.image_size=28", "dino.local_crops_number=1", "dino.local_crop_size=14"])
    images = TensorImageDataset(np.stack([_photo(i, 28, 28, 1) for i in range(8)]), np.zeros(8, int), ["a"])
    loader = multicrop_train_loader(images, cfg.data, cfg.dino, 4, CPU, 0)
    assert isinstance(loader, InMemoryMultiCropLoader) and training_path(cfg.data, images) == IN_MEMORY
    loader.set_epoch(0)
    crops, labels, _ = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(4, 1, 28, 28)] * 2 + [(4, 1, 14, 14)] and labels.shape == (4,)
    d = replace(cfg.data, device_resident=False)
    per_image = multicrop_train_loader(images, d, cfg.dino, 4, CPU, 0)
    assert training_path(d, images) == PER_IMAGE and isinstance(images.transform, MultiCropTransform)
    per_image.set_epoch(0)
    assert [tuple(c.shape) for c in next(iter(per_image))[0]] == [(4, 1, 28, 28)] * 2 + [(4, 1, 14, 14)]
    with pytest.raises(UserError, match="data.decode=device reads image files"):
        multicrop_train_loader(images, replace(cfg.data, decode="device"), cfg.dino, 4, CPU, 0)


def test_in_memory_data_runs_every_preset_there_and_evaluates_there_at_its_stored_size() -> None:
    images = np.stack([_photo(i, 30, 30) for i in range(8)])
    ds = TensorImageDataset(images, np.arange(8) % 2, ["a", "b"])
    for augment in registry.AUGMENTS:
        d = _data(3, augment=augment, image_size=24 if augment != "none" else 30, test_resize=0, test_size=30)
        train, val = build_loaders(Splits(ds, ds, ["a", "b"]), d, 4, CPU)
        assert isinstance(train, InMemoryLoader) and isinstance(val, InMemoryLoader)
        x, y, _ = next(iter(train))
        assert x.shape == (4, 3, d.image_size, d.image_size) and y.shape == (4,)
    # An eval resize the in-memory loader does not do: validation goes through the per-image path.
    _, val = build_loaders(Splits(ds, ds, ["a", "b"]), replace(d, test_resize=34, test_size=30), 4, CPU)
    assert not isinstance(val, InMemoryLoader) and next(iter(val))[0].shape == (4, 3, 30, 30)

