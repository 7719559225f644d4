"""Every recipe builds its network, optimizer and schedule with the seed's values; the step
helper scales, clips and skips as stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from visionzoo.config import load_config
from visionzoo.engine.step import Clipping, GradStep
from visionzoo.models import build_model, create
from visionzoo.optim import build_optimizer, clip_parameters, lr_schedule

# (recipe, input size used for the forward/backward check, classes the seed data has)
RECIPES = [
    ("alexnet_imagenet", 64, 1000),
    ("densenet201_imagenet", 32, 1000),
    ("nfnet_f0_imagenet", 64, 1000),
    ("resnet50_cifar100", 32, 100),
    ("fashion_mnist", 28, 10),
]


@pytest.mark.parametrize("name, size, classes", RECIPES)
def test_recipe_model_forward_backward(name, size, classes):
    cfg = load_config(name)
    model, args = build_model(cfg.model, classes, cfg.data.in_chans)
    x = torch.randn(2, cfg.data.in_chans, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    rebuilt = create(args)  # checkpoints rebuild from the stored arguments alone
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_cifar_stem_keeps_resolution():
    cfg = load_config("resnet50_cifar100")
    model, _ = build_model(cfg.model, 100, 3)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32))))).shape[-1] == 32


def test_small_cnn_without_classes_is_a_backbone_of_its_pooled_features():
    torch.manual_seed(0)
    full = create({"name": "small_cnn", "library": "visionzoo", "num_classes": 10, "in_chans": 1, "drop_rate": 0.0,
                   "kwargs": {"width": 8}})
    backbone = create({"name": "small_cnn", "library": "visionzoo", "num_classes": 0, "in_chans": 1,
                       "drop_rate": 0.0, "kwargs": {"width": 8}})
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(3, 1, 28, 28)
    feats = backbone.eval()(x)
    assert backbone.num_features == 32 and feats.shape == (3, 32)
    assert torch.equal(full.eval().fc(feats), full(x))  # the classifier's input, as timm's num_classes=0


def test_nfnet_optimizer_and_agc_exclusions():
    cfg = load_config("nfnet_f0_imagenet")
    model, _ = build_model(cfg.model, 10, 3)
    opt = build_optimizer(model, cfg.optim, "cpu")
    assert isinstance(opt, torch.optim.SGD)
    g_decay, g_no = opt.param_groups
    assert g_decay["nesterov"] and g_decay["momentum"] == 0.9 and g_decay["weight_decay"] == 2e-5
    # No decay by name, as DeepMind's NFNets (the exact rule: tests/test_reference_fidelity.py).
    leaf = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    assert g_no["weight_decay"] == 0.0 and all("gain" in leaf[id(p)] or "bias" in leaf[id(p)] for p in g_no["params"])
    clipped = {id(p) for p in clip_parameters(model, cfg.optim)}
    assert id(model.head.fc.weight) not in clipped and id(model.stem.conv1.weight) in clipped
    assert model.drop_rate == 0.2


def test_densenet_and_alexnet_optimizers():
    for name, lr in (("densenet201_imagenet", 0.8), ("alexnet_imagenet", 0.04)):
        cfg = load_config(name)
        opt = build_optimizer(nn.Linear(4, 2), cfg.optim, "cpu")
        assert len(opt.param_groups) == 1
        g = opt.param_groups[0]
        assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (lr, 0.9, 1e-4, False)


def test_step_schedule_resnet50_cifar100():
    s = load_config("resnet50_cifar100").schedule
    lrs = lr_schedule(s, 0.1, 200, 10)
    for epoch, lr in ((0, 0.1), (59, 0.1), (60, 0.02), (120, 0.004), (160, 0.0008), (199, 0.0008)):
        assert lrs[epoch * 10] == pytest.approx(lr)


def test_warmup_cosine_nfnet():
    s = load_config("nfnet_f0_imagenet").schedule
    lrs = lr_schedule(s, 0.1, 360, 100)
    assert len(lrs) == 36000
    assert lrs[0] == pytest.approx(7e-7)
    assert lrs[250] == pytest.approx(7e-7 + (0.1 - 7e-7) * 0.5)  # half-way through warm-up
    assert lrs[500] == pytest.approx(0.1)  # warm-up over: the peak
    assert lrs[-1] == pytest.approx(6e-7, abs=1e-7)
    assert np.all(np.diff(lrs[500:]) <= 1e-12)  # cosine only decreases


def test_cosine_by_epoch_holds_within_an_epoch():
    s = load_config("alexnet_imagenet").schedule
    lrs = lr_schedule(s, 0.04, 90, 5)
    assert lrs[0] == lrs[4] == pytest.approx(0.04)
    assert lrs[5] < lrs[4] and lrs[5] == lrs[9]
    assert lrs[45 * 5] == pytest.approx(0.02)


def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


def test_gradstep_norm_clipping():
    model, opt = _tiny()
    step = GradStep(opt, torch.device("cpu"), None, "dynamic", 2**16, Clipping("norm", 1.0, list(model.parameters())))
    w0 = model.weight.detach().clone()
    loss = (model(torch.full((4, 3), 100.0)) ** 2).sum()
    step(loss)
    delta = torch.cat([(model.weight - w0).flatten()])
    # With clipping the whole update has norm <= lr * max_norm.
    assert delta.norm() <= 0.1 * 1.0 + 1e-6


def test_gradstep_fp16_skips_non_finite_and_keeps_static_scale():
    model, opt = _tiny()
    step = GradStep(opt, torch.device("cpu"), torch.float16, "1024", 2**16)
    assert step.scaler.get_scale() == 1024
    w0 = model.weight.detach().clone()
    step(model(torch.ones(1, 3)).sum() * float("inf"))
    assert step.skipped == 1 and torch.equal(model.weight, w0)
    assert step.scaler.get_scale() == 1024  # static: no back-off
    step(model(torch.ones(1, 3)).sum())
    assert step.skipped == 1 and not torch.equal(model.weight, w0)


def test_gradstep_accumulation_steps_once():
    model, opt = _tiny()
    step = GradStep(opt, torch.device("cpu"), None, "dynamic", 2**16)
    w0 = model.weight.detach().clone()
    step(model(torch.ones(1, 3)).sum(), update=False)
    assert torch.equal(model.weight, w0) and model.weight.grad is not None
    step(model(torch.ones(1, 3)).sum(), update=True)
    # Two accumulated gradients of ones: w -= lr * 2.
    assert torch.allclose(model.weight, w0 - 0.2)
