"""Which device a rank computes on, and what is set before CUDA starts: checked on the CPU with a
fake accelerator (torch.accelerator and torch.distributed monkeypatched, calls recorded)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from visionzoo import distributed
from visionzoo.config import load_config
from visionzoo.distributed import DistInfo
from visionzoo.errors import UserError
from visionzoo.runtime import resolve_device


class Stop(Exception):
    """Raised by the fake set_device_index: the set-up got that far; nothing after it runs."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with ``fake_cuda.count`` CUDA devices; records accelerator calls (and the value of
    CUBLAS_WORKSPACE_CONFIG at each) and process-group creation, in order."""
    import os

    class Fake:
        count = 8
        calls: list = []
        stop_at_set_device = False

    def record(name, *args):
        Fake.calls.append((name, *args, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))

    def set_device_index(index):
        record("set_device", index)
        if Fake.stop_at_set_device:
            raise Stop

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: record("is_available") or True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: Fake.count)
    monkeypatch.setattr(torch.accelerator, "set_device_index", set_device_index)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: record("init_process_group", backend, kw.get("device_id")))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.setenv(key, "")  # recorded, so that what the code under test sets is undone too
        monkeypatch.delenv(key)
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    Fake.calls = []
    yield Fake
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize("name, local_rank, count, expected", [
    ("auto", 3, 8, "cuda:3"),    # one node, 8 ranks, all 8 GPUs visible to each
    ("auto", 3, 1, "cuda:0"),    # one visible GPU per rank (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES)
    ("auto", 5, 4, "cuda:1"),    # more local ranks than devices: round robin
    ("cuda", 5, 8, "cuda:5"),    # --device cuda on several ranks: an index, not None
    ("cuda", 0, 8, "cuda:0"),
    ("cuda:1", 0, 2, "cuda:1"),  # an explicit index is kept
    ("cpu", 3, 8, "cpu"),
])
def test_local_rank_maps_onto_the_visible_devices(fake_cuda, name, local_rank, count, expected):
    fake_cuda.count = count
    assert resolve_device(name, local_rank) == torch.device(expected)


def test_an_index_beyond_the_visible_devices_is_a_user_error(fake_cuda):
    fake_cuda.count = 1
    with pytest.raises(UserError, match="sees 1 cuda device"):
        resolve_device("cuda:1")


def test_rank_device_is_selected_before_the_process_group(fake_cuda):
    distributed.init(DistInfo(rank=9, world_size=16, local_rank=1), torch.device("cuda", 1))
    want = [("set_device", 1), ("init_process_group", "nccl", torch.device("cuda", 1))]
    assert [c[:-1] for c in fake_cuda.calls] == want


def test_one_process_on_cuda1_selects_it_too(fake_cuda):
    distributed.init(DistInfo(), torch.device("cuda", 1))
    assert [c[:-1] for c in fake_cuda.calls] == [("set_device", 1)]
    fake_cuda.calls.clear()
    distributed.init(DistInfo(), torch.device("cpu"))
    assert fake_cuda.calls == []


def _setup_until_set_device(fake_cuda, monkeypatch, recipe: str, overrides: list[str]) -> None:
    """Run a training run (engine/run.py fit, any task) as rank 1 of 2 on the fake machine up to
    the device selection."""
    from visionzoo.engine.run import fit

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake_cuda.stop_at_set_device = True
    cfg = load_config(recipe, ["train.device=auto", *overrides])
    with pytest.raises(Stop):
        fit(cfg)


@pytest.mark.parametrize("recipe", ["fashion_mnist", "dino_fashion_mnist"])
def test_deterministic_sets_the_cublas_workspace_before_cuda_starts(fake_cuda, monkeypatch, recipe):
    _setup_until_set_device(fake_cuda, monkeypatch, recipe, ["train.deterministic=true", "train.cudnn_benchmark=true"])
    first = fake_cuda.calls[0]
    assert first[0] == "is_available" and first[-1] == ":4096:8"  # set before the first accelerator call
    assert fake_cuda.calls[-1][:2] == ("set_device", 1)
    # DINO honours train.deterministic too; CUDA ops without a deterministic kernel only warn.
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_a_users_cublas_workspace_setting_is_kept(fake_cuda, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    _setup_until_set_device(fake_cuda, monkeypatch, "fashion_mnist", ["train.deterministic=true"])
    assert all(c[-1] == ":16:8" for c in fake_cuda.calls)


def test_not_deterministic_leaves_cublas_alone_and_benchmarks(fake_cuda, monkeypatch):
    _setup_until_set_device(fake_cuda, monkeypatch, "dino_fashion_mnist", ["train.cudnn_benchmark=true"])
    assert all(c[-1] is None for c in fake_cuda.calls)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


# ----------------------------------------------------------------------------- BatchNorm over ranks

def _bn_types(module: nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_dino_student_and_teacher_get_syncbn_on_several_accelerator_ranks(backbone):
    """On the meta device (an accelerator-like device without memory): with DDP both networks are
    converted, as the reference does; one process keeps plain BatchNorm."""
    from test_dino import TINY_OVERRIDES
    from visionzoo.engine.tasks.base import RunEnv
    from visionzoo.engine.tasks.dino import DinoTask

    def build_dino_training(cfg, device: torch.device, amp: None, ddp: bool) -> DinoTask:
        task = DinoTask(cfg, RunEnv(device, amp, ddp=ddp))
        task.steps_per_epoch = 1
        task.build()
        return task

    cfg = load_config("dino_fashion_mnist", TINY_OVERRIDES)
    if backbone == "vit":
        cfg.dino.use_bn_in_head = True  # BatchNorm1d in the head
    else:
        # BatchNorm2d in the backbone
        cfg.model.name, cfg.model.kwargs, cfg.model.vit_pos_embed = "resnet10t", {}, "timm"
    meta = torch.device("meta")
    parts = build_dino_training(cfg, meta, None, ddp=True)
    assert _bn_types(parts.student) == _bn_types(parts.teacher) == {"SyncBatchNorm"}
    first_trained = next(p for p in parts.student.parameters() if p.requires_grad)
    assert parts.optimizer.param_groups[0]["params"][0] is first_trained
    single = build_dino_training(cfg, meta, None, ddp=False)
    assert "SyncBatchNorm" not in _bn_types(single.student) | _bn_types(single.teacher)
    assert _bn_types(single.teacher)  # there was BatchNorm to convert
    cpu = build_dino_training(cfg, torch.device("cpu"), None, ddp=True)  # no CPU kernel: left as is
    assert "SyncBatchNorm" not in _bn_types(cpu.teacher)


def _fake_gather(monkeypatch, others: list[torch.Tensor]) -> list[torch.Tensor]:
    """A 2-rank all_gather: this rank's checksum is recorded, the other rank's is ``others[0]``."""
    mine: list[torch.Tensor] = []

    def all_gather(out, t):
        mine.append(t.clone())
        out[0].copy_(t)
        out[1].copy_(others[0] if others else t)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    return mine


def test_params_in_sync_compares_buffers(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    other = copy.deepcopy(net)
    mine = _fake_gather(monkeypatch, [])
    assert distributed.params_in_sync(net)
    other[1].running_mean.add_(0.5)  # the other rank's BN statistics differ, its weights do not
    _fake_gather(monkeypatch, mine)
    assert not distributed.params_in_sync(other)
