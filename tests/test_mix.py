"""PerSampleMixup (data/augment/mix.py): same results as timm's per-sample ("elem") Mixup for the same
NumPy seed, the right parameter distributions, and the mixing maths sample by sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from visionzoo.data.augment.mix import PerSampleMixup

NUM_CLASSES = 10

CASES = {  # name: PerSampleMixup / timm Mixup keyword arguments
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    "prob_half": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.5),
    "no_smoothing": dict(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.0),
    "no_correct_lam": dict(mixup_alpha=0.8, cutmix_alpha=1.0, correct_lam=False),
}


def batch(b: int = 16, c: int = 3, h: int = 12, w: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randint(0, NUM_CLASSES, (b,), generator=g)


def smoothed_onehot(label: int, smoothing: float) -> torch.Tensor:
    off = smoothing / NUM_CLASSES
    y = torch.full((NUM_CLASSES,), off)
    y[label] = 1 - smoothing + off
    return y


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_timm_elem_mode(name, seed):
    kw = dict(label_smoothing=0.1, num_classes=NUM_CLASSES) | CASES[name]
    x, t = batch(seed=seed)
    np.random.seed(seed)
    ref_x, ref_y = Mixup(mode="elem", **kw)(x.clone(), t)  # timm mixes in place
    ref_state = np.random.get_state()
    np.random.seed(seed)
    out_x, out_y = PerSampleMixup(**kw)(x, t)
    # Same draws in the same order: same pixels, same targets, and the RNG ends where timm's does.
    torch.testing.assert_close(out_x, ref_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_y, ref_y, rtol=0, atol=1e-6)
    state = np.random.get_state()
    assert np.array_equal(state[1], ref_state[1]) and state[2:] == ref_state[2:]


def test_distribution_mixup_and_cutmix():
    n, h, w, alpha = 20000, 32, 32, 0.8
    np.random.seed(0)
    p = PerSampleMixup(mixup_alpha=alpha, cutmix_alpha=1.0, switch_prob=0.3).sample_params(n, h, w)
    assert p.lam.dtype == np.float32 and p.lam.shape == (n,) and p.boxes.shape == (n, 4)
    assert abs(p.use_cutmix.mean() - 0.3) < 0.015

    lam_mix = p.lam[~p.use_cutmix].astype(np.float64)
    assert abs(lam_mix.mean() - 0.5) < 0.01  # Beta(a, a) is symmetric
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam_mix.var() - var) < 0.05 * var
    assert np.all(p.boxes[~p.use_cutmix] == 0)  # no box for a blended sample

    y1, y2, x1, x2 = p.boxes[p.use_cutmix].T
    assert np.all((0 <= y1) & (y1 <= y2) & (y2 <= h) & (0 <= x1) & (x1 <= x2) & (x2 <= w))
    area = (y2 - y1) * (x2 - x1) / (h * w)
    np.testing.assert_allclose(p.lam[p.use_cutmix], 1 - area, atol=1e-6)
    assert 0.4 < p.lam[p.use_cutmix].mean() < 0.8  # Beta(1, 1) lambdas, raised by border clipping


def test_distribution_mix_prob():
    np.random.seed(1)
    p = PerSampleMixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=0.5).sample_params(20000, 8, 8)
    assert abs((p.lam == 1.0).mean() - 0.5) < 0.015
    assert not p.use_cutmix.any()


def test_disabled_draws_nothing():
    mix = PerSampleMixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=NUM_CLASSES)
    mix.mixup_enabled = False
    np.random.seed(3)
    x, t = batch()
    out_x, out_y = mix(x, t)
    assert np.random.rand() == np.random.RandomState(3).rand()  # RNG untouched
    assert torch.equal(out_x, x)
    assert torch.equal(out_y, torch.stack([smoothed_onehot(int(k), 0.1) for k in t]))


def test_values_per_sample():
    smoothing = 0.1
    mix = PerSampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, label_smoothing=smoothing,
                         num_classes=NUM_CLASSES)
    x, t = batch(b=32, h=16, w=16, seed=5)
    x_before = x.clone()
    np.random.seed(7)
    p = mix.sample_params(32, 16, 16)
    np.random.seed(7)  # the call makes the same draws as sample_params
    out_x, out_y = mix(x, t)

    assert torch.equal(x, x_before)  # the caller's batch is not modified
    torch.testing.assert_close(out_y.sum(1), torch.ones(32))
    kinds = set()
    for i in range(32):
        j = 31 - i
        lam = float(p.lam[i])
        y = lam * smoothed_onehot(int(t[i]), smoothing) + (1 - lam) * smoothed_onehot(int(t[j]), smoothing)
        torch.testing.assert_close(out_y[i], y, rtol=0, atol=1e-6)
        if lam == 1.0 and not p.use_cutmix[i]:
            kinds.add("unmixed")
            assert torch.equal(out_x[i], x[i])
            assert torch.allclose(out_y[i], smoothed_onehot(int(t[i]), smoothing))
        elif p.use_cutmix[i]:
            kinds.add("cutmix")
            y1, y2, x1, x2 = p.boxes[i]
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert torch.equal(out_x[i][:, inside], x[j][:, inside])
            assert torch.equal(out_x[i][:, ~inside], x[i][:, ~inside])
        else:
            kinds.add("mixup")
            torch.testing.assert_close(out_x[i], lam * x[i] + (1 - lam) * x[j], rtol=0, atol=1e-6)
    assert kinds == {"unmixed", "cutmix", "mixup"}  # this seed exercises every branch


def test_odd_batch_and_bad_config():
    with pytest.raises(ValueError, match="even batch size"):
        PerSampleMixup(mixup_alpha=1.0, cutmix_alpha=0.0)(*batch(b=5))
    with pytest.raises(ValueError, match="alpha"):
        PerSampleMixup(mixup_alpha=0.0, cutmix_alpha=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_and_dtype(dtype):
    x, t = batch()
    x = x.to(dtype)
    out_x, out_y = PerSampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NUM_CLASSES)(x, t)
    assert out_x.dtype == dtype and out_x.device == x.device and out_x.shape == x.shape
    assert out_y.device == x.device and out_y.shape == (16, NUM_CLASSES)
    assert out_y.dtype == torch.promote_types(torch.float32, dtype)


def test_keeps_channels_last():
    # The engine moves images to the device as channels_last before mixing.
    x, t = batch()
    x = x.to(memory_format=torch.channels_last)
    out_x, _ = PerSampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NUM_CLASSES)(x, t)
    assert out_x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mix = PerSampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, num_classes=NUM_CLASSES)
    x, t = batch(b=64)
    np.random.seed(0)
    cpu_x, cpu_y = mix(x, t)
    np.random.seed(0)
    gpu_x, gpu_y = mix(x.cuda(), t.cuda())
    assert gpu_x.is_cuda and gpu_y.is_cuda
    torch.testing.assert_close(gpu_x.cpu(), cpu_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(gpu_y.cpu(), cpu_y, rtol=0, atol=1e-6)
