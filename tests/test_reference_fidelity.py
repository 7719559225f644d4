"""Each recipe computes what its reference implementation computes: the expected values below come
from the reference's own rule, written out here (each test names the reference file and function)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T

from visionzoo.cli import main
from visionzoo.config import load_config
from visionzoo.engine.evaluation.knn import knn_classify, probe_splits
from visionzoo.models import build_model, create
from visionzoo.optim import build_optimizer

# ----------------------------------------------------------------------------- resnet50_cifar100 / mmcls v0.24.0

def test_cifar_resnet_is_initialised_as_mmcls() -> None:
    """mmcls v0.24.0, mmcls/models/backbones/resnet.py ``ResNet``: init_cfg Kaiming on every Conv2d
    (mmcv's KaimingInit: normal, fan_out, relu) and Constant 1 on every BatchNorm; ``init_weights``
    with zero_init_residual (default True) then sets norm3 of every Bottleneck (norm2 of every
    BasicBlock) to 0, weight and bias. mmcls/models/heads/linear_head.py ``LinearClsHead``: init_cfg
    Normal(std=0.01) on the Linear, bias 0."""
    torch.manual_seed(0)
    model, _ = build_model(load_config("resnet50_cifar100").model, 100, 3)
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    for b in blocks:
        assert torch.all(b.bn3.weight == 0) and torch.all(b.bn3.bias == 0)
        for bn in (b.bn1, b.bn2):
            assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.bn1.weight == 1)
    # Conv2d weights ~ N(0, 2 / fan_out), fan_out = out_channels * kh * kw: pooled over all convolutions.
    z = torch.cat([(m.weight / math.sqrt(2.0 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1]))).flatten()
                   for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert z.numel() > 2e7 and abs(z.mean().item()) < 1e-3 and z.std().item() == pytest.approx(1.0, abs=2e-3)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.01) and abs(model.fc.weight.mean().item()) < 1e-4
    assert torch.all(model.fc.bias == 0)

    basic = create({"name": "cifar_resnet18", "library": "visionzoo", "num_classes": 10, "in_chans": 3,
                    "drop_rate": 0.0, "drop_path_rate": 0.0, "kwargs": {}})
    for b in (m for m in basic.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)):
        assert torch.all(b.bn2.weight == 0) and torch.all(b.bn1.weight == 1)
    # A zeroed last norm makes every block the identity on its input's shortcut at initialisation.
    block = basic.layer1[0].eval()
    x = torch.randn(2, 64, 8, 8).relu()
    assert torch.equal(block(x), x)


# ----------------------------------------------------------------------------- nfnet_f0_imagenet / DeepMind nfnets

def test_nfnet_weight_decay_exempts_gains_and_biases_by_name() -> None:
    """deepmind-research nfnets/experiment_nfnets.py ``Experiment._make_opt``: a parameter whose
    (Haiku) name is scale, offset or b, or contains 'gain' or 'bias', goes to the group with
    weight_decay None; every other parameter is decayed. Here the name is the part of timm's
    parameter name after the last dot."""
    cfg = load_config("nfnet_f0_imagenet")
    model, _ = build_model(cfg.model, 1000, 3)
    leaf = {n: n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    exempt = {n for n, last in leaf.items() if last in ("scale", "offset", "b") or "gain" in last or "bias" in last}
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_optimizer(model, cfg.optim, "cpu").param_groups
    assert {name_of[id(p)] for p in no_decay["params"]} == exempt and no_decay["weight_decay"] == 0.0
    assert {name_of[id(p)] for p in decay["params"]} == set(leaf) - exempt and decay["weight_decay"] == 2e-5
    shaped_gains = [p for n, p in model.named_parameters() if n in exempt and p.ndim == 4]
    assert len(shaped_gains) == 57 and sum(p.numel() for p in shaped_gains) == 44912  # (out, 1, 1, 1) conv gains


# ----------------------------------------------------------------------------- dino_* / facebookresearch/dino cb71140

def _reference_cosine_scheduler(base: float, final: float, epochs: int, iters_per_epoch: int,
                                warmup_epochs: float, start_warmup: float) -> np.ndarray:
    """dino utils.py ``cosine_scheduler``: the warm-up is numpy.linspace(start, base) over the
    warm-up iterations (its last value is the base value), then final + (base - final) / 2 *
    (1 + cos(pi * i / n)) for the n remaining iterations i = 0..n-1."""
    warm_iters = int(warmup_epochs * iters_per_epoch)
    warm = np.linspace(start_warmup, base, warm_iters) if warm_iters > 0 else np.zeros(0)
    n = epochs * iters_per_epoch - warm_iters
    rest = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    return np.concatenate([warm, rest])


TINY_DINO = [
    "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[5]", "dino.knn_report_k=5",
    "train.device=cpu", "train.amp=none", "train.log_every=1", "log.progress=off",
]


def test_dino_lr_warms_up_to_the_peak_on_the_last_warmup_step(fmnist_dir: Path, tmp_path: Path) -> None:
    # 640 images / batch 64: 10 steps; 5 warm-up steps from 1e-4 to the peak 2e-3 x 64 / 256.
    out = tmp_path / "run"
    assert main(["train", "dino_fashion_mnist", "--data", str(fmnist_dir), "--output", str(out), "--epochs", "1",
                 "data.batch_size=64", "optim.lr=2e-3", "schedule.warmup_epochs=0.5", "schedule.warmup_lr=1e-4",
                 "schedule.min_lr=1e-5", *TINY_DINO]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if r.get("kind") == "step"]
    expected = _reference_cosine_scheduler(2e-3 * 64 / 256, 1e-5, 1, 10, 0.5, 1e-4)
    assert len(lrs) == 10 and lrs[4] == pytest.approx(5e-4, rel=1e-12)
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=0)


def _reference_pos_embed(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """dino vision_transformer.py (cb71140) ``VisionTransformer.interpolate_pos_encoding``: kept as
    it is for a square image of the native patch count; otherwise the [CLS] entry is kept and the
    sqrt(N) x sqrt(N) patch grid is resized by F.interpolate(mode='bicubic') with scale factors
    (height // patch + 0.1) / sqrt(N) and (width // patch + 0.1) / sqrt(N), no antialias."""
    n = pos_embed.shape[1] - 1
    rows, cols = height // patch, width // patch
    if rows * cols == n and height == width:
        return pos_embed
    side, dim = math.sqrt(n), pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(int(side), int(side), dim).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([pos_embed[:, :1], grid[0].permute(1, 2, 0).reshape(1, rows * cols, dim)], dim=1)


@pytest.mark.parametrize("size", [(96, 96), (96, 64), (224, 224)])
def test_dino_vit_interpolates_position_embeddings_as_the_reference(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model, _ = build_model(load_config("dino_vits16_imagenet").model, 0, 3)
    model.eval()
    with torch.no_grad():
        model.pos_embed.normal_()  # far from smooth: interpolation differences show
        x = torch.randn(1, 3, *size)
        pos = _reference_pos_embed(model.pos_embed, *size, patch=16)
        tokens = model.patch_embed(x)  # [1, rows, cols, 384] (dynamic_img_size)
        tokens = torch.cat([model.cls_token, tokens.flatten(1, 2)], dim=1) + pos
        expected = model.norm(model.blocks(tokens))[:, 0]  # the reference's forward: final-norm [CLS]
        got = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if size != (224, 224):  # timm's own (antialiased) resample is measurably different
            from timm.layers import resample_abs_pos_embed

            timm_pos = resample_abs_pos_embed(model.pos_embed, [size[0] // 16, size[1] // 16], [14, 14])
            assert (timm_pos - pos).abs().max() > 0.05


def _reference_knn(train_f, train_y, test_f, test_y, k: int, temp: float, num_classes: int):
    """dino eval_knn.py ``knn_classifier``: the k most similar training features vote for their
    labels through a one-hot [B, k, C] tensor weighted by exp(similarity / T) and summed over k;
    classes are ranked with ``probs.sort(1, True)`` (torch.sort, descending); top-1 is the first,
    top-5 a hit among the first min(5, k). Per query: (top1 hit, top5 hit)."""
    sim, idx = (test_f @ train_f.T).topk(k, largest=True, sorted=True)
    one_hot = torch.zeros(test_f.shape[0] * k, num_classes).scatter_(1, train_y[idx].reshape(-1, 1), 1)
    probs = (one_hot.view(test_f.shape[0], k, num_classes) * (sim / temp).exp().view(-1, k, 1)).sum(1)
    ranked = probs.sort(1, True).indices
    hit = ranked == test_y.view(-1, 1)
    return hit[:, 0], hit[:, :min(5, k)].any(1)


def test_knn_top5_with_fewer_voted_classes_than_5_follows_the_reference_sort() -> None:
    # 100 classes; every training image is of class 3 or 50, so only those two get votes and the
    # other 3 of the top 5 are zero-vote classes: which ones is the sort's order of ties.
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    train_y = torch.tensor([3, 50] * 6)
    test_f = F.normalize(torch.randn(100, 8, generator=g), dim=1)
    test_y = torch.arange(100)  # one query per class
    for k in (1, 3, 5, 10):
        ref1, ref5 = _reference_knn(train_f, train_y, test_f, test_y, k, 0.07, 100)
        for i in range(100):  # query by query: the same classes in the top 5
            (top1, top5), = knn_classify(train_f, train_y, test_f[i:i + 1], test_y[i:i + 1], [k], 0.07, 100).values()
            assert (top1, top5) == (100.0 * ref1[i].item(), 100.0 * ref5[i].item()), (k, i)
        (top1, top5), = knn_classify(train_f, train_y, test_f, test_y, [k], 0.07, 100).values()
        assert (top1, top5) == (100.0 * int(ref1.sum()) / 100, 100.0 * int(ref5.sum()) / 100)


def test_linear_probe_crops_as_eval_linear(imagefolder_dir: Path) -> None:
    """dino eval_linear.py: training RandomResizedCrop(224) (torchvision's default bilinear) +
    RandomHorizontalFlip(), evaluation Resize(256, interpolation=3: bicubic) + CenterCrop(224),
    both ToTensor + Normalize(ImageNet mean, std); whatever interpolation the recipe's
    pre-training crops use (bicubic in dino_vits16_imagenet)."""
    d = load_config("dino_vits16_imagenet", [f"data.path={imagefolder_dir}"]).data
    assert d.interpolation == "bicubic"
    train_ds, val_ds, _ = probe_splits(d)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ref_train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    ref_val = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                         norm])
    for ds, ref in ((train_ds, ref_train), (val_ds, ref_val)):
        for i in range(0, len(ds), 5):
            with Image.open(ds.samples[i][0]) as img:
                rgb = img.convert("RGB")
            torch.manual_seed(i)
            expected = ref(rgb)
            torch.manual_seed(i)
            got = ds.transform.normalize(ds[i][0])  # items are uint8; loaders normalise each batch
            assert torch.equal(got, expected)  # the same float32 operations (data.normalize=unit)
