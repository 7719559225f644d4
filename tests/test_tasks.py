"""The task interface is real: a third task, written here in a few lines against
engine/tasks/base.py (a linear classifier on a frozen, randomly initialised convolutional
backbone), trains through the same run lifecycle as classification and DINO — run folder,
metrics, checkpoints, results, a stop and an exact resume — without a line of engine code."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import StopAfter
from visionzoo.cli import main
from visionzoo.config import to_dict
from visionzoo.data.loading.build import build_datasets, build_loaders
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.engine import lockstep, tasks
from visionzoo.engine.evaluation.topk import evaluate
from visionzoo.engine.step import GradStep
from visionzoo.engine.tasks.base import Batch, Evaluation, Task, Weights
from visionzoo.errors import UserError


class FrozenBackboneLinear(Task):
    """A linear head trained on the features of a frozen random conv backbone."""

    name = "linear_head"

    def setup_data(self, splits=None) -> None:
        d, env = self.cfg.data, self.env
        splits = splits or build_datasets(d, train=True)
        self.classes = list(splits.classes)
        order = SampleOrder(self.cfg.train.seed, env.rank, env.world_size)
        self.train_loader, self.val_loader = build_loaders(splits, d, d.batch_size_per_device, env.device, order)
        self.steps_per_epoch = len(self.train_loader)

    def build(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        self.backbone = nn.Sequential(nn.Conv2d(self.cfg.data.in_chans, 8, 5, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten()).requires_grad_(False)
        self.head = nn.Linear(8, len(self.classes))
        self.net = nn.Sequential(self.backbone, self.head)
        opt = torch.optim.SGD(self.head.parameters(), lr=self.cfg.optim.lr, momentum=0.9)
        self.step = GradStep(opt, self.env.device, None, "dynamic", 1.0)
        self.meta = {"config": to_dict(self.cfg), "model": {"name": "frozen_linear"}, "classes": self.classes}

    def train(self) -> None:
        self.head.train()

    def prepare(self, item) -> Batch:
        images, targets, n_bad = item
        return Batch(len(images), n_bad, (images, targets))

    def set_step(self, global_step: int, epoch: int) -> dict[str, float]:
        return {"lr": self.step.optimizer.param_groups[0]["lr"]}

    def loss(self, batch: Batch, micro: int):
        images, targets = batch.data
        logits = self.net(images)
        return nn.functional.cross_entropy(logits, targets), (logits.argmax(1) == targets).sum()

    def placeholder_loss(self) -> torch.Tensor:
        return lockstep.zero_weight_loss(self.net, self.net, torch.zeros(2, self.cfg.data.in_chans, 28, 28))

    def evaluate(self) -> Evaluation:
        res = evaluate(self.net, self.val_loader, self.env.device, None)
        return Evaluation(res["acc1"], res["acc5"], {"val_loss": res["loss"]})

    def weights(self) -> Weights:
        return Weights(self.net, self.meta)

    def state_dict(self) -> dict:
        return {"optimizer": self.step.optimizer.state_dict()}

    def load_state_dict(self, state: dict, weights: dict) -> None:
        self.net.load_state_dict(weights)
        self.step.optimizer.load_state_dict(state["optimizer"])

    def header(self) -> tuple[str, str]:
        return f"frozen conv + linear | {len(self.classes)} classes", f"batch {self.cfg.data.batch_size}"


@pytest.fixture
def linear_head():
    tasks.register("linear_head", FrozenBackboneLinear)
    yield
    tasks.TASKS.pop("linear_head")


ARGS = ["fashion_mnist", "task=linear_head", "--epochs", "3", "--batch-size", "64", "--lr", "0.5", "--device", "cpu",
        "train.log_every=2", "train.checkpoint_every_steps=5", "train.keep_checkpoints=20", "log.progress=lines"]


def test_a_third_task_trains_stops_and_resumes_through_the_lifecycle(linear_head, fmnist_dir: Path, tmp_path: Path,
                                                                      monkeypatch, capsys) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(fmnist_dir), "--output", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "visionzoo: training fashion_mnist | frozen conv + linear | 10 classes | 1 × cpu" in out
    results = json.loads((ref / "results.json").read_text())
    assert results["steps"] == 30 and results["epochs"] == 3 and results["Acc@1"] > 30  # 10 classes: chance is 10%
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert all("acc1" in r and "train_acc1" in r for r in records if r["kind"] == "epoch")
    assert json.loads((ref / "status.json").read_text())["status"] == "finished"

    # SIGTERM after step 7 (a stop vote at a step boundary): a checkpoint, exit 143, then --resume.
    import visionzoo.engine.run as run_engine

    with monkeypatch.context() as m:
        m.setattr(run_engine, "StopSignal", StopAfter(7))
        assert main(["train", *ARGS, "--data", str(fmnist_dir), "--output", str(run)]) == 128 + 15
    assert "stopped at step 7" in capsys.readouterr().err
    assert main(["train", *ARGS, "--data", str(fmnist_dir), "--resume", str(run)]) == 0
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the resume was exact
    resumed = json.loads((run / "results.json").read_text())
    assert (resumed["steps"], resumed["Acc@1"], resumed["ActualLoss"]) == (30, results["Acc@1"], results["ActualLoss"])
    resumed_records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records if r["kind"] != "resume"] == [r["step"] for r in records]
    assert [r for r in resumed_records if r["kind"] == "resume"] == [{"kind": "resume", "step": 7, "time": ANY}]


def test_an_unknown_task_is_one_line(capsys) -> None:
    assert main(["train", "fashion_mnist", "task=lineer_head"]) == 2
    err = capsys.readouterr().err
    assert err == ("visionzoo: error: task='lineer_head' is not a task visionzoo has (have: supervised, dino)\n")
    tasks.register("linear_head", FrozenBackboneLinear)
    try:
        with pytest.raises(UserError, match="did you mean 'linear_head'"):
            tasks.check_task("lineer_head")
    finally:
        tasks.TASKS.pop("linear_head")
