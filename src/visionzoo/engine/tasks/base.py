"""The task interface: what a training task computes, apart from the run around it.

A task (classification, DINO, the next one) builds its model(s), optimizer and loaders from the
config, prepares a loader item for its step, computes the loss of one (micro-)batch, does what
its reference does after an optimizer step (an EMA, the teacher and centre), evaluates, and saves
and loads its state. Everything else — devices and process group, the run folder, trackers,
resume, checkpoints, the stop vote, timing, logging, results — is the run's (engine/run.py) and
the batch loop's (engine/loop.py), written once for every task. A new task is one file in
engine/tasks/ and one line in ``engine/tasks/__init__.py: TASKS``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from visionzoo.config import RecipeConfig
from visionzoo.engine.step import GradStep


@dataclass(frozen=True)
class RunEnv:
    """Where a run computes: its device, precision and place among the ranks (engine/run.py
    ``start_env`` makes it once the process group is up)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: the weights' own dtype
    rank: int = 0
    world_size: int = 1
    ddp: bool = False  # several ranks: the student/network is wrapped in DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        """Autocast in the run's precision (a no-op without one)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


@dataclass
class Batch:
    """One loader item as a task's step takes it: ``n`` usable images on this rank (0: a
    zero-weight step), ``n_bad`` the unreadable ones the loader dropped, ``data`` the task's own."""

    n: int
    n_bad: Any = 0
    data: Any = None


@dataclass
class Weights:
    """What a checkpoint's weight files hold: ``module`` (model.safetensors: the network eval,
    export and infer load), ``meta`` (its metadata), and ``ema`` (an EMA of it, or None)."""

    module: nn.Module
    meta: dict
    ema: nn.Module | None = None


@dataclass
class Evaluation:
    """What an evaluation measured: Acc@1 / Acc@5 (%), the fields it adds to the epoch record
    (``val_loss``; DINO's ``knn``), and the unreadable evaluation images it skipped."""

    acc1: float | None
    acc5: float | None = None
    record: dict = field(default_factory=dict)
    bad_images: int = 0
    bad_names: list[str] = field(default_factory=list)


class Task:
    """A training task; see the module docstring. Subclasses set the attributes below in
    ``setup`` and implement the methods that raise NotImplementedError."""

    name = "task"
    title = "training"  # the run header's verb: "training", "DINO training"
    accuracy_label = "Train Accuracy"  # the seeds' "Final ... : x" line for Acc@1

    def __init__(self, cfg: RecipeConfig, env: RunEnv) -> None:
        self.cfg, self.env = cfg, env
        self.train_loader: Any = None
        self.steps_per_epoch = 0
        self.step: GradStep | None = None
        self.model_args: dict = {}
        self.classes: list[str] = []

    @classmethod
    def check(cls, cfg: RecipeConfig, world_size: int, device_type: str) -> None:
        """Refuse in one line what this task cannot train, from the config (as ``for_world_size``
        resolved it), the device count and the device type alone: checked before any data is
        read, in each rank's ``start_env`` and once by the ``--devices N`` launcher."""

    # --- built once -------------------------------------------------------------------------
    def setup(self) -> None:
        """Build data, then model(s), optimizer, step and schedules from ``self.cfg``."""
        self.setup_data()
        self.build()

    def setup_data(self, splits: Any = None) -> None:
        """Loaders of the recipe's data (or of ``splits``, data/loading/build.py ``Splits``:
        ``visionzoo bench``'s decode-free source): ``train_loader``, ``steps_per_epoch``, ``classes``."""
        raise NotImplementedError

    def build(self) -> None:
        """Model(s), optimizer, GradStep and schedules, for the data ``setup_data`` found."""
        raise NotImplementedError

    def wrap(self, resumed: bool) -> None:
        """DDP and torch.compile around the network(s), once a resumed state is loaded."""

    # --- every step -------------------------------------------------------------------------
    def train(self) -> None:
        """Put the networks in training mode (the start of an epoch)."""
        raise NotImplementedError

    def prepare(self, item: Any) -> Batch:
        """A loader item on the device, as ``loss`` takes it."""
        raise NotImplementedError

    def set_step(self, global_step: int, epoch: int) -> dict[str, float]:
        """Set the hyper-parameters of optimizer step ``global_step`` (LR, ...); returns them
        as the values a log point records."""
        raise NotImplementedError

    def accumulate(self, update: bool) -> AbstractContextManager:
        """The context of a micro-batch's forward and backward (DDP's no_sync until ``update``)."""
        return nullcontext()

    def loss(self, batch: Batch, micro: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, number of correct top-1 predictions or None) of a batch with images;
        ``micro``: its index among the step's micro-batches."""
        raise NotImplementedError

    def placeholder_loss(self) -> torch.Tensor:
        """A zero-weight step's loss (engine/lockstep.py): this rank's batch is empty."""
        raise NotImplementedError

    def after_update(self, batch: Batch) -> None:
        """What follows an optimizer step (an EMA update, the teacher and its centre)."""

    # --- epochs and results -----------------------------------------------------------------
    def end_epoch(self) -> None:
        """Epoch end, before evaluation: e.g. BatchNorm statistics averaged over the ranks."""

    def epoch_metrics(self) -> dict[str, float]:
        """Figures the task adds to each epoch's record, measured after ``end_epoch`` (DINO: the
        collapse indicators of engine/evaluation/collapse.py)."""
        return {}

    def epoch_warning(self, record: dict) -> str | None:
        """One line the run prints after the epoch's line when ``record`` shows trouble, else None."""
        return None

    def evaluate(self) -> Evaluation | None:
        """Evaluate the network the run reports (every rank takes part)."""
        return None

    def describe_eval(self, record: dict) -> str:
        """The evaluation part of an epoch line."""
        return f"Acc@1 {record['acc1']:.2f}%"

    def weights(self) -> Weights:
        """What the checkpoint's weight files hold."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The task's training state for a checkpoint (optimizer, scaler, its own modules)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        """Put back ``state_dict``'s output (with ``ema_weights`` when the checkpoint has an EMA
        weights file); ``weights``: the checkpoint's weights file (``weights().module``'s)."""
        raise NotImplementedError

    def header(self) -> tuple[str, str]:
        """The run header's model-and-data part and its batch part."""
        raise NotImplementedError

    def results(self, last_eval: Evaluation | None) -> dict:
        """The task's own fields of results.json."""
        return {}

    def in_sync(self) -> bool:
        """Whether every rank holds the same weights (a collective)."""
        return True

    def loaders(self) -> list:
        """The loaders whose failed shards and CPU fall-backs the results report."""
        return [self.train_loader]
