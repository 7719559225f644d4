"""Same result on any number of devices (issue 23, docs/devices.md): a recipe run on fewer devices
than its reference computes what the reference's ranks compute. The expected values are written
from the references' rules: N ranks each run plain BatchNorm on their own batch and DDP averages
their gradients (each rank's gradient / N, summed in rank order); rank 0's running statistics are
kept; torchvision's CosineAnnealingLR is stepped once per epoch; the inputs are normalised by the
references' per-image transforms. Each comparison runs in NCHW (model.channels_last=false)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

from visionzoo.config import for_world_size, from_dict, load_config
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.loading.collate import stack_images
from visionzoo.data.loading.device_batches import DeviceBatches
from visionzoo.data.loading.in_memory import InMemoryLoader
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.engine.loop import LoopSettings, Position, RunHooks, train_epoch
from visionzoo.engine.tasks.base import RunEnv
from visionzoo.engine.tasks.classify import ClassifyTask, bn_group_of, build_network, reference_ranks, wrap_model
from visionzoo.models import create
from visionzoo.models.ghost_bn import grouped_layers, use_bn_groups
from visionzoo.optim import lr_schedule

CPU = torch.device("cpu")
RANKS, GROUP = 4, 2  # the reference: 4 ranks x 2 images; here: one process with 8 images


def _net(dtype: torch.dtype) -> nn.Module:
    """visionzoo's CIFAR ResNet (the resnet50_cifar100 family, BatchNorm + residuals), small."""
    torch.manual_seed(0)
    net = create({"name": "cifar_resnet18", "library": "visionzoo", "num_classes": 5, "in_chans": 3,
                  "drop_rate": 0.0, "drop_path_rate": 0.0, "kwargs": {}}).to(dtype)
    with torch.no_grad():  # non-trivial BN affine parameters (zero_init_residual zeroes some)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return net


def _batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(RANKS * GROUP, 3, 8, 8, generator=g, dtype=dtype)
    return x, torch.randint(0, 5, (RANKS * GROUP,), generator=g)


def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor, ranks: int = RANKS) -> tuple[list, nn.Module]:
    """DDP over ``ranks`` ranks with plain BatchNorm: rank r's own loss on the r-th slice of the
    batch; DDP divides each rank's gradient by the world size and sums them (in rank order here).
    Returns the averaged gradients and rank 0's network (whose BN statistics the reference keeps)."""
    grads, rank0, group = None, None, len(x) // ranks
    for r in range(ranks):
        replica = copy.deepcopy(net).train()
        sl = slice(r * group, (r + 1) * group)
        nn.functional.cross_entropy(replica(x[sl]), y[sl]).backward()
        mine = [p.grad / ranks for p in replica.parameters()]
        grads = mine if grads is None else [a + b for a, b in zip(grads, mine, strict=True)]
        rank0 = rank0 or replica
    return grads, rank0


def _one_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, accum: int) -> list[torch.Tensor]:
    """One optimizer step of visionzoo's training loop (engine/loop.py train_epoch with the
    classification task) on the global batch, in ``accum`` micro-batches; SGD lr 1 without
    momentum, so the update is the gradient. Returns the update of every parameter."""
    before = [p.detach().clone() for p in net.parameters()]
    cfg = for_world_size(from_dict({
        "recipe": "one_step", "data": {"batch_size": len(x), "in_chans": 3}, "model": {"channels_last": False},
        "optim": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}, "schedule": {"name": "constant"},
        "train": {"epochs": 1, "accum_steps": accum, "amp": "fp64" if x.dtype == torch.float64 else "none"}}), 1)
    task = ClassifyTask(cfg, RunEnv(CPU, None))
    micro = len(x) // accum
    task.train_loader = [(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro], 0) for i in range(accum)]
    task.classes, task.steps_per_epoch = [str(i) for i in range(5)], 1
    task.attach(net, {})
    settings = LoopSettings(accum_steps=accum, progress="off", show=False)
    assert train_epoch(task, Position(), settings, RunHooks(), max_steps=1).steps == 1
    return [b - p.detach() for b, p in zip(before, net.parameters(), strict=True)]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((u - v).double() ** 2).sum() for u, v in zip(a, b, strict=True))
    return float(num.sqrt() / sum((v.double() ** 2).sum() for v in b).sqrt())


def _bn_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_grouped_bn_gives_the_n_rank_gradients_and_rank0_statistics():
    """model.bn_group on one process: the gradients of the RANKS-rank reference (float64: equal to
    1e-10, summation order only), and the running statistics of its rank 0."""
    net = _net(torch.float64)
    x, y = _batch(torch.float64)
    want, rank0 = _reference(net, x, y)
    assert use_bn_groups(net, GROUP) == 20 and len(grouped_layers(net)) == 20
    got = _one_step(net, x, y, accum=1)
    assert _rel(got, want) < 1e-10
    ref_bn = _bn_state(rank0)
    for k, v in _bn_state(net).items():
        torch.testing.assert_close(v, ref_bn[k], rtol=1e-12, atol=1e-14)
    # Plain BatchNorm over all 8 images is another function: far from the reference.
    plain = _net(torch.float64)
    assert _rel(_one_step(plain, x, y, accum=1), want) > 1e-2


def test_grouped_bn_in_float32_is_the_reference_to_round_off():
    """The same in float32: differences of summation order only, far below plain BatchNorm's."""
    net = _net(torch.float32)
    x, y = _batch(torch.float32)
    want, _ = _reference(net, x, y)
    use_bn_groups(net, GROUP)
    assert _rel(_one_step(net, x, y, accum=1), want) < 1e-4


@pytest.mark.parametrize("recipe, size", [("resnet50_cifar100", 8), ("densenet201_imagenet", 32)])
def test_the_recipes_models_with_grouped_bn_compute_the_two_rank_gradients(recipe, size):
    """The recipes' own networks (mmcls CIFAR ResNet-50, torchvision DenseNet-201; small images),
    float32: 2 ranks x 4 images vs one process with model.bn_group=4. Measured: 2e-7 and 3e-7
    relative (summation order); plain BatchNorm over the 8 images: 0.84 and 1.0."""
    from visionzoo.models import build_model

    torch.manual_seed(0)
    net = build_model(load_config(recipe).model, 10, 3)[0]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g)
    want, _ = _reference(net, x, y, ranks=2)
    plain = copy.deepcopy(net)
    use_bn_groups(net, 4)
    assert _rel(_one_step(net, x, y, accum=1), want) < 1e-4
    assert _rel(_one_step(plain, x, y, accum=1), want) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_micro_batches_give_the_n_rank_gradients_bit_for_bit(dtype):
    """train.accum_steps=RANKS with model.bn_group=GROUP: each micro-batch is one rank's batch, its
    loss / RANKS backpropagates to that rank's gradient / RANKS exactly (a power of two), summed in
    rank order: the update equals the reference's bit for bit; only the first micro-batch updates
    the running statistics, as only rank 0's are kept."""
    net = _net(dtype)
    x, y = _batch(dtype)
    want, rank0 = _reference(net, x, y)
    use_bn_groups(net, GROUP)
    before = [p.detach().clone() for p in net.parameters()]
    _one_step(net, x, y, accum=RANKS)
    # SGD lr 1: p - g, rounded as the reference's optimizer rounds it.
    assert all(torch.equal(p, b.add(g, alpha=-1.0)) for p, b, g in zip(net.parameters(), before, want, strict=True))
    ref_bn = _bn_state(rank0)
    assert all(torch.equal(v, ref_bn[k]) for k, v in _bn_state(net).items())


def test_grouped_bn_is_batchnorm_in_eval_and_keeps_its_state_dict_and_layout():
    net = _net(torch.float32)
    plain = copy.deepcopy(net)
    use_bn_groups(net, GROUP)
    assert net.state_dict().keys() == plain.state_dict().keys()
    x, _ = _batch(torch.float32)
    assert torch.equal(net.eval()(x), plain.eval()(x))
    bn = grouped_layers(net.train())[0]
    out = bn(torch.randn(8, 64, 4, 4).contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the groups' outputs keep NHWC


@pytest.mark.parametrize("recipe, devices, overrides, group", [
    ("resnet50_cifar100", 1, [], 16), ("resnet50_cifar100", 8, [], 16), ("resnet50_cifar100", 2, [], 16),
    ("resnet50_cifar100", 1, ["model.bn_group=0"], 128), ("resnet50_cifar100", 1, ["train.accum_steps=8"], 16),
    ("densenet201_imagenet", 1, [], 128), ("densenet201_imagenet", 8, [], 128),
    ("densenet201_imagenet", 1, ["model.bn_group=0"], 1024),
])
def test_the_results_row_says_the_bn_group(recipe, devices, overrides, group):
    """Global batch and devices stay as typed; BatchNorm takes the reference's images per device."""
    cfg = for_world_size(load_config(recipe, overrides), devices)
    assert cfg.data.batch_size == load_config(recipe).data.batch_size
    assert bn_group_of(cfg, nn.BatchNorm2d(3), devices) == group
    assert bn_group_of(cfg, nn.Linear(2, 2), devices) is None


def test_build_network_groups_batchnorm_unless_syncbn():
    cfg = for_world_size(load_config("fashion_mnist", ["model.bn_group=16", "train.device=cpu"]), 1)
    net = build_network(cfg, 10, CPU, torch.contiguous_format, ddp=False)[0]
    assert len(grouped_layers(net)) > 0 and all(m.group == 16 for m in grouped_layers(net))
    assert not grouped_layers(build_network(load_config("fashion_mnist"), 10, CPU, torch.contiguous_format,
                                            ddp=False)[0])


# The references' choices for BatchNorm buffers across ranks (mmcls v0.24.0 apis/train.py:
# MMDistributedDataParallel(broadcast_buffers=False), no averaging; torchvision references
# train.py: DistributedDataParallel with its default broadcast_buffers=True, no averaging).
BUFFERS = {"resnet50_cifar100": (False, False), "densenet201_imagenet": (True, False)}


@pytest.mark.parametrize("recipe", list(BUFFERS))
def test_buffers_follow_the_reference(recipe, monkeypatch):
    import torch.distributed as dist

    cfg = load_config(recipe)
    assert (cfg.model.bn_broadcast, cfg.model.bn_average) == BUFFERS[recipe]
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = wrap_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), CPU, True, False, cfg.model.bn_broadcast)
        assert ddp.broadcast_buffers is BUFFERS[recipe][0]
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- LR granularity

def test_densenet_lr_is_cosine_annealing_stepped_per_epoch():
    """torchvision references/classification train.py: CosineAnnealingLR(T_max=epochs - warmup,
    eta_min=lr_min), ``lr_scheduler.step()`` once after each epoch's train_one_epoch."""
    cfg = load_config("densenet201_imagenet")
    spe = 7
    lrs = lr_schedule(cfg.schedule, cfg.optim.lr, cfg.train.epochs, spe).reshape(cfg.train.epochs, spe)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs, eta_min=0.0)
    for epoch in range(cfg.train.epochs):
        assert np.all(lrs[epoch] == lrs[epoch, 0])  # constant within the epoch
        assert lrs[epoch, 0] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_an_epoch_warmup_is_torchvisions_linear_lr_stepped_per_epoch():
    """torchvision references/classification train.py with --lr-warmup-method linear:
    SequentialLR([LinearLR(start_factor=lr_warmup_decay, total_iters=lr_warmup_epochs),
    CosineAnnealingLR(T_max=epochs - lr_warmup_epochs)], milestones=[lr_warmup_epochs]), stepped
    once after each epoch. Before: the warm-up ramped every step (epoch 0 went from 0.001 to 0.229)."""
    cfg = load_config("densenet201_imagenet", ["schedule.warmup_epochs=3", "schedule.warmup_lr=0.001",
                                               "train.epochs=8"])
    lr, epochs, warmup, spe = cfg.optim.lr, cfg.train.epochs, 3, 7
    lrs = lr_schedule(cfg.schedule, lr, epochs, spe).reshape(epochs, spe)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.001 / lr, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=cfg.schedule.min_lr),
    ], milestones=[warmup])
    want = []
    for _ in range(epochs):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.all(lrs == lrs[:, :1])  # constant within each epoch, the warm-up's too
    assert lrs[:, 0] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[:4] == pytest.approx([0.001, 0.001 + (lr - 0.001) / 3, 0.001 + 2 * (lr - 0.001) / 3, lr])


def test_an_epoch_warmup_of_part_of_an_epoch_is_refused():
    from visionzoo.errors import UserError

    with pytest.raises(UserError) as err:
        load_config("densenet201_imagenet", ["schedule.warmup_epochs=0.5"])
    assert str(err.value) == ("schedule.warmup_epochs=0.5 with schedule.by=epoch: the LR changes once per epoch, "
                              "so the warm-up needs a whole number of epochs")


@pytest.mark.parametrize("recipe, by", [("alexnet_imagenet", "epoch"), ("densenet201_imagenet", "epoch"),
                                        ("resnet50_cifar100", "epoch"), ("nfnet_f0_imagenet", "step")])
def test_lr_granularity_is_the_references(recipe, by):
    """pytorch/examples and torchvision per epoch, mmcv's LR hook by epoch, DeepMind NFNets per
    step; each recipe's header says so."""
    from importlib import resources

    assert load_config(recipe).schedule.by == by
    header = resources.files("visionzoo.recipes").joinpath(f"{recipe}.yaml").read_text().split("\nrecipe:")[0]
    assert ("per epoch" if by == "epoch" else "per step") in header and "BatchNorm" in header


# ----------------------------------------------------------------------------- input normalisation

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the references' constants


def _images(n: int = 3, size: int = 9) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)) for _ in range(n)]


def _uint8_batch(images: list[Image.Image]) -> torch.Tensor:
    """What the loader workers hand over: uint8 [B, C, H, W] in [B, H, W, C] memory."""
    return stack_images([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


@pytest.mark.parametrize("recipe", ["alexnet_imagenet", "densenet201_imagenet", "dino_vits16_imagenet"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unit_normalisation_is_totensor_normalize_bit_for_bit(recipe, layout):
    """pytorch/examples and DINO: ToTensor() + Normalize(mean, std); torchvision references:
    PILToTensor + ConvertImageDtype(float) + Normalize: per image, float32."""
    images = _images()
    ref = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(i)) for i in images])
    ref_tv = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ConvertImageDtype(torch.float)(T.PILToTensor()(i)))
                          for i in images])
    assert torch.equal(ref, ref_tv)
    d = load_config(recipe).data
    batches = DeviceBatches([], CPU, Normalize.of(d), layout)
    got = batches.images(_uint8_batch(images))
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert got.is_contiguous(memory_format=layout)  # model.channels_last=false: NCHW


def test_pixel_normalisation_is_timm_prefetch_loader():
    """timm data/loader.py PrefetchLoader: mean = [x * 255 for x in mean] as float32 on the device,
    ``x.float().sub_(mean).div_(std)``."""
    images = _uint8_batch(_images())
    mean = torch.tensor([x * 255 for x in IMAGENET_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in IMAGENET_STD]).view(1, 3, 1, 1)
    ref = images.contiguous().float().sub_(mean).div_(std)
    got = DeviceBatches([], CPU, Normalize.of(load_config("nfnet_f0_imagenet").data)).images(images)
    assert torch.equal(got, ref)


def imnormalize(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """mmcv v1.6 ``imnormalize`` as mmcls v0.24.0 Normalize calls it (mean, std: float32 arrays),
    written out in NumPy: ``img = img.copy().astype(np.float32); mean = np.float64(mean.reshape(1,
    -1)); stdinv = 1 / np.float64(std.reshape(1, -1)); cv2.subtract(img, mean, img);
    cv2.multiply(img, stdinv, img)``. OpenCV 4 (mmcv 1.6's) takes a float64 1xC array as a
    per-channel scalar and computes in the wider depth, float64, rounding each result once to the
    float32 destination (checked against cv2 4.6.0 and 4.10.0: OpenCV 5 multiplies in float32)."""
    img = img.copy().astype(np.float32)
    mean = np.float64(mean.reshape(1, -1))
    stdinv = 1 / np.float64(std.reshape(1, -1))
    img[...] = img.astype(np.float64) - mean  # cv2.subtract(img, mean, img)
    img[...] = img.astype(np.float64) * stdinv  # cv2.multiply(img, stdinv, img)
    return img


def test_mmcv_normalisation_is_imnormalize_for_every_value_on_every_path():
    """Every 0-255 value in every channel, through each path that normalises (the device-resident
    loader, DeviceBatches in both layouts, DINO's batched multi-crop), equals mmcv.imnormalize.
    Before: 1/std was rounded to float32 and the product taken in float32, 1 ulp off on 63 of the
    768 values with resnet50_cifar100's mean and std."""
    from visionzoo.data.augment.multicrop_batched import BatchedMultiCrop

    cfg = load_config("resnet50_cifar100", ["data.augment=none", "data.hflip=0"])
    hwc = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(4, 8, 8, 3)
    ref = torch.from_numpy(imnormalize(hwc, np.float32(cfg.data.mean), np.float32(cfg.data.std))).permute(0, 3, 1, 2)
    ds = TensorImageDataset(hwc, [0, 1, 2, 3], ["a", "b", "c", "d"])
    got = next(iter(InMemoryLoader(ds, 4, False, CPU, cfg.data)))[0]
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, ref)
    for layout in (torch.contiguous_format, torch.channels_last):
        batch = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # [B, H, W, C] memory, as the loader workers stack it
        got = DeviceBatches([], CPU, Normalize.of(cfg.data), layout).images(batch)
        assert got.dtype == torch.float32 and torch.equal(got, ref) and got.is_contiguous(memory_format=layout)
    # DINO's batched multi-crop: the same draws with an identity normalisation give the crops' pixels.
    dino = load_config("dino_vits16_imagenet", ["data.image_size=8", "dino.local_crop_size=4",
                                                "dino.local_crops_number=1"])
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).float()
    mmcv = copy.deepcopy(dino.data)
    mmcv.mean, mmcv.std, mmcv.normalize = cfg.data.mean, cfg.data.std, "mmcv"
    plain = copy.deepcopy(dino.data)
    plain.mean, plain.std, plain.normalize = [0.0] * 3, [1.0] * 3, "pixel"
    crops = BatchedMultiCrop(mmcv, dino.dino)(images, torch.Generator().manual_seed(0))
    pixels = BatchedMultiCrop(plain, dino.dino)(images, torch.Generator().manual_seed(0))
    for crop, pix in zip(crops, pixels, strict=True):
        want = imnormalize(pix.permute(0, 2, 3, 1).numpy(), np.float32(cfg.data.mean), np.float32(cfg.data.std))
        assert torch.equal(crop, torch.from_numpy(want).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- which images form a group

@pytest.mark.parametrize("world, k", [(1, 8), (2, 4), (4, 2)])
def test_a_group_holds_the_images_of_its_reference_rank(world, k):
    """PyTorch's DistributedSampler (and visionzoo's on the reference's 8 ranks) gives rank q every
    8th sample of the epoch's permutation; on ``world`` devices each device stands for k ranks and
    its batch of k x 2 images lists them rank after rank."""
    from visionzoo.data.loading.samplers import ShardSampler, train_count, train_indices

    n, size, ranks = 103, 2, world * k
    ref = [train_indices(n, 5, 3, q, ranks) for q in range(ranks)]
    steps = len(ref[0]) // size
    for d in range(world):
        mine = train_indices(n, 5, 3, d, world, (k, size))
        assert len(mine) == train_count(n, world, (k, size)) == steps * k * size
        assert len(ShardSampler(n, True, 5, d, world, (k, size))) == len(mine)
        for i in range(steps):
            for j in range(k):
                got = mine[(i * k + j) * size:(i * k + j + 1) * size]
                assert torch.equal(got, ref[d * k + j][i * size:(i + 1) * size])
    assert torch.equal(train_indices(n, 5, 3, 1, 2, (1, 0)), train_indices(n, 5, 3, 1, 2))  # plain order


@pytest.mark.parametrize("recipe, devices, overrides, want", [
    ("resnet50_cifar100", 1, [], (8, 16)), ("resnet50_cifar100", 2, [], (4, 16)), ("resnet50_cifar100", 8, [], (1, 0)),
    ("resnet50_cifar100", 1, ["train.accum_steps=8"], (8, 16)), ("resnet50_cifar100", 1, ["model.bn_group=0"], (1, 0)),
    ("densenet201_imagenet", 1, [], (8, 128)), ("alexnet_imagenet", 1, [], (1, 0)),
])
def test_loaders_stand_for_the_reference_ranks(recipe, devices, overrides, want):
    assert reference_ranks(for_world_size(load_config(recipe, overrides), devices), devices) == want


def test_device_resident_loader_follows_the_reference_ranks():
    """CIFAR's device-resident loader: micro-batch j of a step = reference rank j's batch."""
    from visionzoo.data.loading.samplers import train_indices

    cfg = load_config("resnet50_cifar100", ["data.augment=none", "data.hflip=0"])
    labels = np.arange(40)  # the label is the sample index
    ds = TensorImageDataset(np.zeros((40, 2, 2, 3), dtype=np.uint8), labels, [str(i) for i in labels])
    loader = InMemoryLoader(ds, 2, True, CPU, cfg.data, SampleOrder(seed=7, rank_groups=(4, 2)))
    loader.set_epoch(1)
    batches = [y for _, y, _ in loader]
    assert len(batches) == len(loader) == 20
    ref = [train_indices(40, 7, 1, q, 4) for q in range(4)]
    for b, y in enumerate(batches):
        step, q = divmod(b, 4)
        assert torch.equal(y, ref[q][step * 2:(step + 1) * 2])


# ----------------------------------------------------------------------------- end to end, through the CLI

def test_one_process_trains_what_two_ranks_train(tmp_path):
    """fashion_mnist's CNN with BatchNorm, global batch 32: 2 gloo ranks x 16 with plain BatchNorm
    (DDP broadcasting rank 0's buffers, no averaging), and 1 process with model.bn_group=16. After
    the first step the weights and rank 0's running statistics agree to float32 round-off."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from conftest import write_fmnist

    data = write_fmnist(tmp_path, 96, 20)
    common = ["--epochs", "1", "--device", "cpu", "--amp", "none", "--workers", "0", "data.batch_size=32",
              "data.augment=none", "data.hflip=0", "model.channels_last=false", "model.bn_group=16",
              "model.bn_average=false",
              "train.log_every=0", "train.checkpoint_every_steps=1", "train.max_steps_per_epoch=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, extra in (("one", []), ("two", ["--devices", "2"])):
        argv = ["train", "fashion_mnist", "--data", str(data), "--output", str(tmp_path / name), *common, *extra]
        proc = subprocess.run([sys.executable, "-m", "visionzoo", *argv], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["one"]["BN group"] == runs["two"]["BN group"] == 16 and runs["two"]["ranks_in_sync"] is True
    first = "checkpoints/step-000000001.safetensors"
    w1, w2 = load_file(tmp_path / "one" / first), load_file(tmp_path / "two" / first)
    assert any("running_mean" in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6, msg=k)
