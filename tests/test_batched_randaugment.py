"""BatchedRandAugment against timm's per-image PIL RandAugment: each op's pixels, batching, and
the distribution of the random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from visionzoo.data.augment.batched_randaugment import BatchedRandAugment, level_to_arg
from visionzoo.errors import UserError

NFNET = "rand-m5-n4-mstd0.5-inc1"
MEAN = [124.2, 116.5, 104.0]


# Tiny tensors: OpenMP threads only add spin-wait overhead (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _names(config: str) -> list[str]:
    return [op.name for op in auto_augment.rand_augment_transform(config, {}).ops]


RAND_OPS = list(dict.fromkeys(_names("rand-m9-n1-mstd0-inc1") + _names("rand-m9-n1-mstd0")))
EXTRA_OPS = ["Desaturate", "TranslateX", "TranslateY", "PosterizeOriginal"]  # reachable or cheap
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
LUT_OPS = {"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
           "Solarize", "SolarizeIncreasing", "SolarizeAdd"}


def _image(channels: int = 3, h: int = 40, w: int = 48) -> np.ndarray:
    """Smooth gradients, a sine texture, a rectangle and a disc: uint8 [H, W, C] (or [H, W])."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([20 + 200 * xx / (w - 1), 30 + 180 * yy / (h - 1),
                    128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)], -1)
    img[10:18, 12:30] = [250, 10, 60]
    img[(xx - 34) ** 2 + (yy - 26) ** 2 < 36] = [5, 240, 200]
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img if channels == 3 else img[..., 1]


def _to_batch(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(img.astype(np.float32))
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1))[None].contiguous()


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    a = x[0].permute(1, 2, 0).numpy().astype(np.float64)
    return a[..., 0] if a.shape[-1] == 1 else a


def _timm_op(name: str, magnitude: float, negate: bool, hparams: dict, img: np.ndarray, monkeypatch):
    """timm's AugmentOp(prob=1) on a PIL image with its random sign forced (random() > 0.5 negates)."""
    with monkeypatch.context() as m:
        m.setattr(auto_augment.random, "random", lambda: 1.0 if negate else 0.0)
        return np.asarray(auto_augment.AugmentOp(name, 1.0, magnitude, hparams)(Image.fromarray(img)), np.float64)


def _ours(ra: BatchedRandAugment, name: str, magnitude: float, negate: bool, img: np.ndarray) -> np.ndarray:
    out = ra.apply_op(_to_batch(img), name, torch.tensor([magnitude], dtype=torch.float64), torch.tensor([negate]))
    return _to_hwc(out)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", RAND_OPS + EXTRA_OPS)
def test_op_matches_timm(name, channels, monkeypatch):
    mean = MEAN if channels == 3 else [128.0]  # Pillow takes a 1-value fill for greyscale
    ra = BatchedRandAugment("rand-m9-n1-mstd0", 40, mean, "bilinear")
    img = _image(channels)
    for magnitude in (0.0, 4.7, 10.0):
        for negate in (False, True):
            ours = _ours(ra, name, magnitude, negate, img)
            try:
                ref = _timm_op(name, magnitude, negate, ra.hparams, img, monkeypatch)
            except ValueError:  # Posterize to 0 bits: Pillow >= 10 refuses; we give black
                assert name.startswith("Posterize") and ours.max() == 0
                continue
            diff = ours - ref
            case = f"{name} m={magnitude} negate={negate}"
            if name in LUT_OPS:
                assert np.abs(diff).max() == 0, case
            elif name in GEOMETRIC:
                # Same geometry and edges; Pillow truncates the interpolated value to uint8.
                assert np.abs(diff).max() <= 1.01 and np.abs(diff).mean() < 0.6, case
            else:
                # Blends: Pillow truncates, we keep the float, so 0 <= ours - Pillow < 1.
                assert diff.min() >= -1e-3 and diff.max() < 1, case


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_other_interpolations(name, mode, monkeypatch):
    ra = BatchedRandAugment("rand-m9-n1-mstd0", 40, MEAN, mode)
    img = _image()
    for negate in (False, True):
        diff = np.abs(_ours(ra, name, 9.0, negate, img) - _timm_op(name, 9.0, negate, ra.hparams, img, monkeypatch))
        if mode == "nearest":
            assert (diff > 0).mean() < 0.002, name  # only exact ties of floor vs round may differ
        else:
            assert diff.mean() < 1.0, name  # torch's cubic a=-0.75 vs Pillow's a=-1


def test_level_to_arg_matches_timm(monkeypatch):
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    grid = [i / 8 for i in range(0, 81)] + [7.3, 9.99, 12.5]
    for name in RAND_OPS + EXTRA_OPS:
        level_fn = auto_augment.LEVEL_TO_ARG[name]
        for negate in (False, True):
            levels, negates = torch.tensor(grid, dtype=torch.float64), torch.tensor([negate] * len(grid))
            ours = level_to_arg(name, levels, negates, hparams)
            draw = 1.0 if negate else 0.0  # timm negates the level when random.random() > 0.5
            with monkeypatch.context() as m:
                m.setattr(auto_augment.random, "random", lambda draw=draw: draw)
                ref = [level_fn(g, hparams)[0] if level_fn else 0.0 for g in grid]
            if name == "Desaturate":  # timm turns the level into a Color factor inside the op
                ref = [min(1.0, max(0.0, 1.0 - r)) for r in ref]
            assert ours.tolist() == ref, name


@pytest.mark.parametrize("distinct", [False, True])
def test_batch_equals_one_by_one(distinct):
    ra = BatchedRandAugment("rand-m9-n3-mstd1-p0.8-inc1", 40, MEAN, "bilinear")
    base = _to_batch(_image())
    b = 16
    x = base.repeat(b, 1, 1, 1)
    if distinct:
        x = torch.cat([torch.roll(base, shifts=(3 * i, 5 * i), dims=(2, 3)) for i in range(b)])
        x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(1))  # non-integer levels
    params = ra.sample_params(b, torch.Generator().manual_seed(3))
    batched = ra.apply(x, params)
    for i in range(b):
        single = ra.apply(x[i:i + 1], params.select(slice(i, i + 1)))
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-4, rtol=0)
    assert len({tuple(t.flatten()[:64].tolist()) for t in batched}) > b // 2  # different draws, different images


def test_nfnet_draw_distribution():
    ra = BatchedRandAugment(NFNET, 8, MEAN, "bicubic")
    assert ra.num_layers == 4 and ra.op_names == _names(NFNET) and len(ra.op_names) == 15
    b = 4000
    p = ra.sample_params(b, torch.Generator().manual_seed(0))
    assert p.op_index.shape == (4, b)
    counts = torch.bincount(p.op_index.flatten(), minlength=15).double()
    expected = 4 * b / 15
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 36.1  # chi-square, 14 degrees of freedom, p = 0.001
    assert abs(p.apply.double().mean().item() - 0.5) < 0.015
    assert abs(p.negate.double().mean().item() - 0.5) < 0.015
    m = p.magnitude
    assert abs(m.mean().item() - 5.0) < 0.02 and abs(m.std().item() - 0.5) < 0.02
    assert m.min().item() >= 0 and m.max().item() <= 10

    x = torch.rand(1000, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255
    out1 = ra(x, torch.Generator().manual_seed(7))
    out2 = ra(x, torch.Generator().manual_seed(7))
    out3 = ra(x, torch.Generator().manual_seed(8))
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    assert torch.equal(out1, ra.apply(x, ra.sample_params(1000, torch.Generator().manual_seed(7))))
    changed = (out1 != x).flatten(1).any(1).double().mean().item()
    assert 0.85 < changed < 0.97  # 1 - 0.5**4 of the images take at least one op (some are no-ops)


@pytest.mark.parametrize("config, mean, std, clipped_at_max", [
    ("rand-m9-mstd0", 9.0, 0.0, 0.0),
    ("rand-m8-mstd101", 4.0, 8 / 12 ** 0.5, 0.0),  # mstd > 100: uniform on [0, m]
    ("rand-m9-mstd3", None, None, 0.369),  # N(9, 3) clipped at 10: P(z > 1/3)
    ("rand-m9-mstd3-mmax20", 9.0, 3.0, 0.0),
])
def test_magnitude_sampling(config, mean, std, clipped_at_max):
    ra = BatchedRandAugment(config, 8, MEAN, "bilinear")
    m = ra.sample_params(20000, torch.Generator().manual_seed(0)).magnitude
    if mean is not None:
        assert abs(m.mean().item() - mean) < 0.06 and abs(m.std().item() - std) < 0.05
    assert abs((m == ra.magnitude_max[0]).double().mean().item() - clipped_at_max) < 0.015
    assert m.min().item() >= 0


def test_weighted_choice_without_replacement():
    ra = BatchedRandAugment("rand-m9-n3-tweights", 8, MEAN, "bilinear")
    p = ra.sample_params(20000, torch.Generator().manual_seed(0))
    picks = p.op_index.T
    assert all(len(set(row)) == 3 for row in picks[:2000].tolist())  # no repeats within an image
    first = torch.bincount(picks[:, 0], minlength=len(ra.op_names)).double() / len(picks)
    assert torch.allclose(first, ra.choice_weights, atol=0.015)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_range_shape_and_no_host_reads(channels, mode):
    mean = MEAN[:channels] if channels == 3 else [100.0]
    ra = BatchedRandAugment("rand-m9-n4-mstd0.5-p0.9-inc1", 16, mean, mode)
    x = torch.rand(64, channels, 16, 20, generator=torch.Generator().manual_seed(0)) * 255
    x_before = x.clone()
    out = ra(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, x_before)
    assert out.min().item() >= 0 and out.max().item() <= 255
    # On the meta device any .item()/.tolist()/bool() of a device tensor raises: nothing is read back.
    meta = ra(torch.empty(64, channels, 16, 20, device="meta"), torch.Generator().manual_seed(1))
    assert meta.device.type == "meta" and meta.shape == x.shape


def test_unsupported_configs_raise_user_error():
    with pytest.raises(UserError, match=r"GaussianBlur.*rand-m9-n2-t3a"):
        BatchedRandAugment("rand-m9-n2-t3a", 16, MEAN, "bilinear")
    with pytest.raises(UserError, match="rand-m9-bogus3"):
        BatchedRandAugment("rand-m9-bogus3", 16, MEAN, "bilinear")
    with pytest.raises(UserError, match="lanczos"):
        BatchedRandAugment(NFNET, 16, MEAN, "lanczos")
    with pytest.raises(UserError, match="channels"):
        BatchedRandAugment(NFNET, 16, MEAN, "bilinear")(torch.zeros(2, 1, 8, 8), torch.Generator())
