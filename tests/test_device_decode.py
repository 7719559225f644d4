"""data.decode=device: workers read bytes, the batch is decoded, cropped, flipped and normalised
on the training device (here the CPU, through the same decode_jpeg call nvJPEG serves on CUDA)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import TINY_FOLDER_RECIPE
from visionzoo.cli import main
from visionzoo.config import DataConfig
from visionzoo.data.augment.batched import crop_params, random_resized_crop
from visionzoo.data.loading import device_decode
from visionzoo.data.loading.build import Splits, build_loaders
from visionzoo.data.loading.device_decode import DeviceDecodeLoader, collate_bytes
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.data.sources.encoded import FileBytes, device_jpeg, pil_decode
from visionzoo.data.sources.folder import ImageFolderDataset, find_classes
from visionzoo.errors import UserError

MEAN, STD = 128.0, 64.0
FALLBACKS_IN_TWO_BATCHES = 1  # the 2 batches of 4 read 8 of 9 files: one of the PNG and the CMYK JPEG


def _rgb(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tree(root: Path) -> dict[str, Path]:
    """train/a: 3 RGB JPEGs + a greyscale JPEG; train/b: 2 RGB JPEGs, an RGB PNG, a CMYK JPEG and a
    truncated JPEG (9 files, 1 broken); val/{a,b}: 2 PNGs each."""
    sizes = {"a0": (40, 30), "a1": (30, 40), "a2": (48, 48), "b0": (36, 28), "b1": (32, 32)}
    files = {k: root / f"train/{k[0]}/{k[1]}.jpg" for k in sizes}
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in sizes.items():
        files[k].write_bytes(_jpeg_bytes(_rgb(list(sizes).index(k), w, h)))
    files["grey"] = root / "train/a/grey.jpg"
    Image.new("L", (24, 20), 90).save(files["grey"], quality=95)
    files["png"] = root / "train/b/rgb.png"
    _rgb(5, 26, 22).save(files["png"])
    files["cmyk"] = root / "train/b/cmyk.jpg"
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(files["cmyk"])  # pure red once converted
    files["cut"] = root / "train/b/cut.jpg"
    data = _jpeg_bytes(_rgb(7, 64, 48))
    files["cut"].write_bytes(data[: len(data) // 2])
    for cls in ("a", "b"):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(2):
            _rgb(100 + i, 20, 16).save(root / "val" / cls / f"{i}.png")
    return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("devdecode")
    return root, _write_tree(root)


def _cfg(**kw) -> DataConfig:
    base = dict(name="imagefolder", image_size=16, crop_scale=[1.0, 1.0], hflip=0.0, workers=0,
                mean=[MEAN] * 3, std=[STD] * 3, decode="device")
    return DataConfig(**(base | kw))


def _dataset(root: Path) -> ImageFolderDataset:
    return ImageFolderDataset(root / "train", find_classes(root / "train"))


def _batch_of(ds: ImageFolderDataset, paths: list[Path]) -> dict:
    index = {p: i for i, (p, _) in enumerate(ds.samples)}
    return collate_bytes([FileBytes(ds.samples)[(index[str(p)], 0)] for p in paths])


def test_which_files_go_to_the_device_decoder(tree) -> None:
    _, f = tree
    verdict = {k: device_jpeg(p.read_bytes()) for k, p in f.items()}
    assert verdict == {"a0": True, "a1": True, "a2": True, "b0": True, "b1": True, "grey": True,
                       "png": False, "cmyk": False, "cut": False}
    assert device_jpeg(b"") is False and pil_decode(f["cut"].read_bytes()) is None


def test_batch_values_fallbacks_and_labels(tree) -> None:
    root, f = tree
    ds = _dataset(root)
    loader = DeviceDecodeLoader(ds, 4, 0, torch.device("cpu"), _cfg())
    order = ["png", "cmyk", "grey", "cut", "a0", "b1"]
    images, targets, n_bad = loader.assemble(_batch_of(ds, [f[k] for k in order]), torch.Generator().manual_seed(0))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    assert targets.tolist() == [1, 1, 0, 0, 1]  # PNG and CMYK (class b) kept, in order; the cut file dropped
    assert n_bad == 1 and loader.cpu_fallbacks == 2
    # CMYK (0, 255, 255, 0) is pure red after Pillow's conversion; greyscale 90 stays 90 in all channels.
    red = torch.tensor([(255 - MEAN) / STD, (0 - MEAN) / STD, (0 - MEAN) / STD]).view(3, 1, 1)
    torch.testing.assert_close(images[1], red.expand(3, 16, 16), atol=0.02, rtol=0)
    torch.testing.assert_close(images[2], torch.full((3, 16, 16), (90 - MEAN) / STD), atol=0.02, rtol=0)
    # The PNG went through Pillow and a whole-image resize: compare with torchvision on its pixels.
    png = torch.from_numpy(np.array(Image.open(f["png"]).convert("RGB"))).permute(2, 0, 1)
    expect = (TF.resize(png, [16, 16], antialias=True).float() - MEAN) / STD
    assert (images[0] - expect).abs().max() <= 1.0 / STD + 1e-4


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_full_crop_is_a_plain_resize(tree, interp: str) -> None:
    _, f = tree
    img = torch.from_numpy(np.array(Image.open(f["a0"]))).permute(2, 0, 1)  # 40 x 30
    g = torch.Generator().manual_seed(1)
    out = random_resized_crop([img], 16, (1.0, 1.0), (40 / 30, 40 / 30), 0.0, g, interp)
    mode = InterpolationMode.BICUBIC if interp == "bicubic" else InterpolationMode.BILINEAR
    ref = TF.resize(img, [16, 16], interpolation=mode, antialias=True).float()
    assert out.shape == (1, 3, 16, 16)
    assert (out[0] - ref).abs().max() <= 1.0  # torchvision rounds to uint8
    assert (out[0] - ref).abs().mean() < 0.3


def test_crop_boxes_follow_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    draws = torch.rand(500, 10, 4, generator=g, dtype=torch.float64).tolist()
    for u in draws:
        top, left, h, w = crop_params(60, 80, (0.25, 0.5), (3 / 4, 4 / 3), u)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.2 <= h * w / 4800 <= 0.55 and 0.7 <= w / h <= 1.45
    # No draw fits (scale above the whole image): the central crop at the nearest allowed ratio.
    assert crop_params(10, 40, (1.0, 1.0), (3 / 4, 4 / 3), [[0.5] * 4] * 10) == (0, 13, 10, 13)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_flip_rate(p: float) -> None:
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    img[:, :, 4:] = 255  # dark left half, bright right half
    g = torch.Generator().manual_seed(3)
    out = random_resized_crop([img] * 2000, 8, (1.0, 1.0), (1.0, 1.0), p, g)
    flipped = (out[:, 0, 0, 0] > 128).float().mean().item()
    assert abs(flipped - p) < 0.04
    assert ((out[:, 0, 0, 0] > 128) != (out[:, 0, 0, -1] > 128)).all()  # every image is one or the other


def _epoch(loader, epoch: int, skip: int = 0) -> list:
    loader.set_epoch(epoch, skip)
    return list(loader)


def test_same_seed_same_batches_and_resume(tree) -> None:
    root, _ = tree
    d = _cfg(crop_scale=[0.3, 1.0], hflip=0.5)
    def make(workers: int = 0, seed: int = 0) -> DeviceDecodeLoader:
        return DeviceDecodeLoader(_dataset(root), 3, workers, torch.device("cpu"), d, SampleOrder(seed))

    a, b = make(), make(workers=2)
    assert len(a) == 3  # 9 files, batch 3, last partial batch dropped
    e0, e0_again = _epoch(a, 0), _epoch(b, 0)
    assert sum(n for _, _, n in e0) == 1  # the cut file, wherever the order put it
    for (x, y, n), (x2, y2, n2) in zip(e0, e0_again, strict=True):  # workers do not change anything
        assert torch.equal(x, x2) and torch.equal(y, y2) and n == n2
    e1 = _epoch(a, 1)
    assert any(x.shape != x1.shape or not torch.equal(x, x1) for (x, *_), (x1, *_) in zip(e0, e1, strict=True))
    other_seed = _epoch(make(seed=1), 0)
    assert any(x.shape != x1.shape or not torch.equal(x, x1) for (x, *_), (x1, *_) in zip(e0, other_seed, strict=True))
    resumed = _epoch(a, 0, skip=1)  # mid-epoch resume draws what the uninterrupted epoch drew
    assert len(resumed) == 2
    for (x, y, n), (x2, y2, n2) in zip(e0[1:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and n == n2


def test_ranks_split_the_epoch(tree) -> None:
    root, _ = tree
    seen = []
    for rank in range(2):
        loader = DeviceDecodeLoader(_dataset(root), 4, 0, torch.device("cpu"), _cfg(), SampleOrder(0, rank, 2))
        assert len(loader) == 1
        seen.append(_epoch(loader, 0)[0])
    assert sum(len(y) + n for _, y, n in seen) == 8  # 9 files: 4 per rank, one left out


def test_device_decoder_refusal_falls_back_to_pillow(tree, monkeypatch) -> None:
    root, f = tree
    real = device_decode.decode_jpeg
    refused = len(f["a1"].read_bytes())

    def picky(data, **kw):  # a batch call fails as a whole, like decode_jpeg does; one file is refused
        chunks = data if isinstance(data, list) else [data]
        if any(len(c) == refused for c in chunks):
            raise RuntimeError("unsupported JPEG")
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    ds = _dataset(root)
    loader = DeviceDecodeLoader(ds, 3, 0, torch.device("cpu"), _cfg())
    images, targets, n_bad = loader.assemble(_batch_of(ds, [f["a0"], f["a1"], f["b0"]]), torch.Generator())
    assert images.shape[0] == 3 and targets.tolist() == [0, 0, 1] and n_bad == 0 and loader.cpu_fallbacks == 1


def test_randaugment_runs_on_the_decoded_batch(tree) -> None:
    root, f = tree
    ds = _dataset(root)
    plain = DeviceDecodeLoader(ds, 4, 0, torch.device("cpu"), _cfg())
    heavy = DeviceDecodeLoader(ds, 4, 0, torch.device("cpu"), _cfg(randaugment="rand-m9-n3-mstd0"))
    batch = _batch_of(ds, [f[k] for k in ("a0", "a1", "a2", "b0", "b1", "grey")])
    x0, t0, _ = plain.assemble(batch, torch.Generator().manual_seed(0))
    x1, t1, _ = heavy.assemble(batch, torch.Generator().manual_seed(0))
    assert torch.equal(t0, t1) and x1.shape == x0.shape
    # Same crops (drawn first from the same seed), then 3 ops per image, each applied with p=0.5.
    changed = (x1 - x0).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert changed.sum() >= 4  # the chance that 3 images draw no op at all is 6 x 1/8
    pixels = x1 * STD + MEAN
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_unsupported_settings_are_user_errors(tree) -> None:
    root, _ = tree
    splits = Splits(_dataset(root), _dataset(root), ["a", "b"])
    with pytest.raises(UserError, match=r"RandAugment op GaussianBlur.* has no batched version"):
        build_loaders(splits, _cfg(randaugment="rand-m9-n2-t3a"), 2, torch.device("cpu"))
    with pytest.raises(UserError) as refused:
        build_loaders(splits, _cfg(augment="cifar"), 2, torch.device("cpu"))
    assert str(refused.value) == ("data.augment=cifar has no device decode version (data.decode=device); the paths "
                                  "that run it: per image (data.decode=cpu, data.device_resident=false), in memory "
                                  "(data.device_resident=true)")
    with pytest.raises(UserError, match="data.decode"):
        _cfg(decode="gpu")
    train, val = build_loaders(splits, _cfg(), 2, torch.device("cpu"))
    assert isinstance(train, DeviceDecodeLoader) and not isinstance(val, DeviceDecodeLoader)


def test_cli_trains_an_epoch_with_device_decode(tmp_path: Path, capsys) -> None:
    _write_tree(tmp_path / "data")
    recipe = tmp_path / "tiny_folder.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    code = main(["train", str(recipe), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                 "--workers", "0", "data.decode=device"])
    out, err = capsys.readouterr()
    assert code == 0, err
    header = re.search(r"(\d+) train / (\d+) val images, (\d+) classes", out)
    assert header and header.groups() == ("9", "4", "2"), out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bad_images"] == 1 and results["steps"] == 2
    assert results["cpu_fallbacks"] == FALLBACKS_IN_TWO_BATCHES
    assert "warning: 1 unreadable image(s) were skipped" in out

    code = main(["train", str(recipe), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run2"),
                 "--workers", "0", "data.decode=device", "data.randaugment=rand-m9-n2", "train.mixup=0.8",
                 "train.cutmix=1.0", "train.mixup_mode=elem"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["loader"].startswith("device decode") and results["steps"] == 2
    assert results["cpu_fallbacks"] == FALLBACKS_IN_TWO_BATCHES and results["ActualLoss"] == results["ActualLoss"]

# ----------------------------------------------------------------------------- the batch at once, on CUDA

def _per_image_reference(images, size, scale, ratio, hflip, g, mode):
    """The per-image resize this module had before the batched one: F.interpolate per crop."""
    import torch.nn.functional as F

    u = torch.rand(len(images), 10, 4, generator=g, dtype=torch.float64).tolist()
    flip = (torch.rand(len(images), generator=g) < hflip).tolist()
    aa = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    out = []
    for img, draws, f in zip(images, u, flip, strict=True):
        top, left, h, w = crop_params(img.shape[-2], img.shape[-1], scale, ratio, draws)
        crop = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(size, size), mode=mode, **aa)
        out.append(crop.flip(-1) if f else crop)
    x = torch.cat(out)
    return x.clamp(0, 255) if mode == "bicubic" else x


class _Kernels:
    """Counts the aten ops that launch work (views and dtype bookkeeping left out)."""

    SKIP = {"slice", "select", "unsqueeze", "view", "alias", "as_strided", "expand", "detach", "_unsafe_view",
            "t", "transpose", "permute", "squeeze", "lift_fresh", "unbind", "split", "split_with_sizes"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ not in _Kernels.SKIP:
                    names.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def _kernels_per_image(fn) -> float:
    counts = []
    for b in (4, 12):
        g = torch.Generator().manual_seed(0)
        images = [(torch.rand(3, 20 + 3 * i, 30 - i, generator=g) * 255).to(torch.uint8) for i in range(b)]
        k = _Kernels()
        with k.mode:
            fn(images)
        counts.append(len(k.names))
    return (counts[1] - counts[0]) / 8


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_batched_crop_equals_the_per_image_resize(mode: str) -> None:
    """The whole batch is cropped and resized at once, with the crop boxes and flips drawn as
    before (same seed, same crops) and torch's antialiased weights: equal to F.interpolate per
    image within float32 rounding, down- and upsampling, images of many sizes."""
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 20 + 7 * i, 50 - 3 * i, generator=g) * 255).to(torch.uint8) for i in range(10)]
    for size in (8, 24, 64):
        args = (images, size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
        out = random_resized_crop(*args, torch.Generator().manual_seed(3), mode)
        ref = _per_image_reference(*args, torch.Generator().manual_seed(3), mode)
        assert out.shape == ref.shape == (10, 3, size, size)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


def test_per_image_work_is_one_copy(monkeypatch) -> None:
    """Crop + resize (supervised) and padding (DINO) launch one kernel per image — the copy of the
    decoded image into the batch — and a fixed number for the batch (was 2-3 per image)."""
    from visionzoo.data.augment import multicrop_batched

    crop = lambda images: random_resized_crop(images, 8, (0.3, 1.0), (3 / 4, 4 / 3), 0.5,  # noqa: E731
                                              torch.Generator().manual_seed(0), "bicubic")
    assert _kernels_per_image(crop) == 1
    assert _kernels_per_image(multicrop_batched.pad_batch) == 1
    monkeypatch.setattr(multicrop_batched, "CHUNK_BYTES", 1)  # one image per float32 chunk: still equal
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 20 + 3 * i, 30 - i, generator=g) * 255).to(torch.uint8) for i in range(5)]
    chunked = random_resized_crop(images, 8, (0.3, 1.0), (3 / 4, 4 / 3), 0.5, torch.Generator().manual_seed(1))
    monkeypatch.setattr(multicrop_batched, "CHUNK_BYTES", 1 << 30)
    whole = random_resized_crop(images, 8, (0.3, 1.0), (3 / 4, 4 / 3), 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)


def test_a_rejected_file_alone_goes_to_pillow(tree, monkeypatch) -> None:
    """decode_jpeg fails a whole batch for one bad file: the batch is halved until that file is
    found; the others stay in batched calls (at most 2 log2(n) + 1 calls, not one per image)."""
    root, f = tree
    real, calls = device_decode.decode_jpeg, []
    refused = len(f["b0"].read_bytes())

    def picky(data, **kw):
        chunks = data if isinstance(data, list) else [data]
        calls.append(len(chunks))
        if any(len(c) == refused for c in chunks):
            raise RuntimeError("unsupported JPEG")
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    ds = _dataset(root)
    order = ["a0", "a1", "a2", "grey", "b1", "b0", "a0", "a1", "a2", "grey", "b1", "a0", "a1", "a2", "grey", "b1"]
    loader = DeviceDecodeLoader(ds, 16, 0, torch.device("cpu"), _cfg())
    images, targets, n_bad = loader.assemble(_batch_of(ds, [f[k] for k in order]), torch.Generator().manual_seed(0))
    assert images.shape[0] == 16 and n_bad == 0 and loader.cpu_fallbacks == 1
    assert targets.tolist() == [1 if k.startswith("b") else 0 for k in order]
    assert len(calls) <= 2 * 4 + 1 and sum(1 for n in calls if n == 1) <= 4
    decoded = device_decode.decode_batch([torch.frombuffer(bytearray(f[k].read_bytes()), dtype=torch.uint8)
                                          for k in order], torch.device("cpu"))
    assert [d is None for d in decoded] == [k == "b0" for k in order]


def test_cuda_decoding_runs_on_a_side_stream(monkeypatch) -> None:
    """nvJPEG writes on its own stream (pytorch/vision#9606): decoding runs on a side stream that
    waits for the current one, the current stream waits for it, and every image is recorded on
    the current stream. CUDA streams and the decoder are fakes that log what happens."""
    from contextlib import contextmanager

    log, active, made = [], [], []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    class Image:
        def __init__(self):
            self.recorded = []

        def record_stream(self, stream):
            self.recorded.append(stream.name)
            log.append(("record", stream.name))

    current = Stream("current")

    def new_stream(device=None):
        made.append(Stream(f"side{len(made)}"))
        return made[-1]

    @contextmanager
    def use(stream):
        active.append(stream.name)
        yield
        active.pop()

    def decode(data, device, mode):
        log.append(("decode", active[-1] if active else "current", str(device), len(data)))
        return [Image() for _ in data]

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(device_decode, "decode_jpeg", decode)
    monkeypatch.setattr(device_decode, "_SIDE_STREAMS", {})
    chunks = [torch.zeros(4, dtype=torch.uint8)] * 3
    out = device_decode.decode_on_device(chunks, torch.device("cuda", 1))
    assert log == [("wait", "side0", "current"), ("decode", "side0", "cuda:1", 3), ("wait", "current", "side0"),
                   ("record", "current"), ("record", "current"), ("record", "current")]
    assert [img.recorded for img in out] == [["current"]] * 3
    device_decode.decode_on_device(chunks, torch.device("cuda", 1))
    assert len(made) == 1  # one side stream per device, kept
