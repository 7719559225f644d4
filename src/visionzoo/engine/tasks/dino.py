"""Self-supervised training with DINO (facebookresearch/dino main_dino.py) as a task.

A step: multi-crop batch → teacher (EMA network, global crops only, no gradients) and student
(all crops) under autocast → cross-entropy of the centred, sharpened teacher distribution of
each global crop against the student's distribution of every *other* crop (plus, with
dino.koleo_weight, DINOv2's KoLeo term on the student's global-crop features) → GradStep (backward,
per-tensor gradient clipping, the prototypes' gradients dropped while the last layer is frozen,
optimizer step) → teacher EMA update → centre update (mean teacher output over all ranks).

LR, weight decay, teacher momentum and teacher temperature are precomputed per optimizer step
(arrays indexed by the global step); the LR peaks at config.peak_lr (optim.lr per 256 images by
default for this task). Labels are never read in training; the teacher backbone is evaluated by
weighted k-NN (its top-1 is the run's Acc@1) and is what model.safetensors holds; the student,
teacher, centre and optimizer are in the checkpoint's state, so a resumed run continues exactly."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.config import RecipeConfig, peak_lr, to_dict
from visionzoo.data.loading.build import build_datasets, multicrop_train_loader
from visionzoo.engine import lockstep
from visionzoo.engine.evaluation.collapse import Spread, collapse_warning, spread
from visionzoo.engine.evaluation.knn import knn_eval
from visionzoo.engine.step import Clipping, GradStep
from visionzoo.engine.tasks.base import Batch, Evaluation, Task, Weights
from visionzoo.errors import UserError
from visionzoo.models import build_model, create
from visionzoo.models.dino import DINOLoss, build_dino, cancel_last_layer_grads, koleo_loss, update_teacher
from visionzoo.models.weights import load_weights
from visionzoo.optim import build_optimizer, cosine_schedule
from visionzoo.runtime import compile_module


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> np.ndarray:
    """Per step: ``linspace(warmup_temp, temp, warmup_epochs)`` over the first epochs, then
    ``temp``; constant within an epoch, as the reference indexes it by epoch."""
    per_epoch = np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs),
                                np.full(max(epochs - warmup_epochs, 0), temp)])[:epochs]
    return np.repeat(per_epoch, steps_per_epoch)


def dino_loader(cfg: RecipeConfig, ds: Any, device: torch.device, rank: int, world_size: int) -> Any:
    """Multi-crop batches of the training images ``ds`` (labels carried, never used), the views made
    on the data's path (data/augment/registry.py: per image in DataLoader workers, a batch at a
    time on the device for in-memory data and for JPEGs decoded there)."""
    return multicrop_train_loader(ds, cfg.data, cfg.dino, cfg.data.batch_size_per_device, device, cfg.train.seed,
                                  rank, world_size)


def _feature_dim(backbone: nn.Module, in_chans: int, size: int) -> int:
    dim = getattr(backbone, "num_features", None)
    if dim is None:
        with torch.no_grad():
            dim = backbone.eval()(torch.zeros(2, in_chans, size, size)).shape[-1]
        backbone.train()
    if not dim:
        raise UserError("the DINO backbone must return features with num_classes=0 (use a timm model)")
    return int(dim)


def build_student_teacher(cfg: RecipeConfig, device: torch.device, ddp: bool) -> tuple[nn.Module, nn.Module, dict]:
    """The recipe's student and teacher (same initial weights) on ``device``, and the backbone's
    constructor arguments. With ``ddp`` on an accelerator, BatchNorm layers (of the backbone or of
    a dino.use_bn_in_head head) become SyncBatchNorm in student and teacher, as in the reference:
    the teacher is no DDP module, so nothing else would keep its statistics equal over ranks."""
    d, dc = cfg.data, cfg.dino
    # model.weights: the backbone's weights, and the head's too when the file is a DINO training checkpoint.
    backbone, model_args = build_model(replace(cfg.model, weights=None), 0, d.in_chans)
    weights = cfg.model.weights
    head_state = load_weights(backbone, model_args, weights, cfg.model.checkpoint_key) if weights else None
    teacher_args = {**model_args, "drop_rate": 0.0, "drop_path_rate": 0.0}  # the reference's teacher
    student, teacher = build_dino(backbone, create(teacher_args), _feature_dim(backbone, d.in_chans, d.image_size), dc,
                                  head_state)
    student, teacher = student.to(device), teacher.to(device)
    if ddp and device.type != "cpu":  # SyncBatchNorm has no CPU kernel; end_epoch averages the statistics there
        from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct2d

        student, teacher = convert_sync_batchnorm(student), convert_sync_batchnorm(teacher)
    return student, teacher, model_args


class DinoTask(Task):
    """DINO self-distillation (``task: dino``)."""

    name = "dino"
    title = "DINO training"

    def __init__(self, cfg: RecipeConfig, env: Any) -> None:
        super().__init__(cfg, env)
        self.accuracy_label = f"k-NN Accuracy (k={cfg.dino.knn_report_k})"
        self.knn: dict | None = None

    @classmethod
    def check(cls, cfg: RecipeConfig, world_size: int, device_type: str) -> None:
        if cfg.train.accum_steps != 1:
            raise UserError("task=dino does not support train.accum_steps (centre and teacher move every step)")
        t, m = cfg.train, cfg.model
        unused = {"train.mixup": t.mixup, "train.cutmix": t.cutmix, "train.label_smoothing": t.label_smoothing,
                  "train.ema_decay": t.ema_decay, "model.bn_group": m.bn_group}
        unused = {k: v for k, v in unused.items() if v}
        if unused:  # refused, not silently ignored
            raise UserError(f"task=dino does not use {', '.join(f'{k}={v}' for k, v in unused.items())} (they are for "
                            "supervised training; DINO's teacher is its own EMA): leave them at 0")

    def setup_data(self, splits: Any = None) -> None:
        cfg, env, d = self.cfg, self.env, self.cfg.data
        splits = splits or build_datasets(d, train=True)
        self.train_loader = dino_loader(cfg, splits.train, env.device, env.rank, env.world_size)
        self.n_images, self.classes = len(splits.train), list(splits.classes)
        if self.classes:  # the labels k-NN evaluates with, recorded as found (not the default)
            cfg.data.num_classes = len(self.classes)
        t = cfg.train
        self.steps_per_epoch = min(len(self.train_loader), t.max_steps_per_epoch) if t.max_steps_per_epoch \
            else len(self.train_loader)
        if self.steps_per_epoch < 1:
            raise UserError(f"the training split ({self.n_images} images) is smaller than one global batch "
                            f"({d.batch_size}); lower data.batch_size")

    def build(self) -> None:
        """Student, teacher, loss with its centre, optimizer, GradStep and the per-step schedules."""
        cfg, env, dc, d = self.cfg, self.env, self.cfg.dino, self.cfg.data
        self.student, self.teacher, self.model_args = build_student_teacher(cfg, env.device, env.ddp)
        self.model: nn.Module = self.student  # the student's forward: DDP- and compile-wrapped by ``wrap``
        self.teacher_fwd: nn.Module = self.teacher
        self.criterion = DINOLoss(dc.out_dim, dc.student_temp, dc.center_momentum).to(env.device)
        self.optimizer = build_optimizer(self.student, cfg.optim, env.device.type)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.frozen_last_layer = False
        clipping = Clipping("per_tensor", dc.clip_grad, params) if dc.clip_grad > 0 else None
        self.step = GradStep(self.optimizer, env.device, env.amp_dtype, cfg.train.loss_scale, cfg.train.init_scale,
                             clipping, before_step=self._before_step)
        self.reduce = distributed.all_reduce_sum if env.ddp else None
        # At least one epoch of schedule, so that a --perf run of a 0-epoch config has values.
        epochs, n = max(cfg.train.epochs, 1), max(self.steps_per_epoch, 1)
        self.total = epochs * n
        self.peak_lr = peak_lr(cfg)
        # The reference's cosine_scheduler: linspace warm-up from warmup_lr that reaches the peak on
        # its last step, then cosine to min_lr (schedule.name is not consulted: DINO's is cosine).
        self.lrs = cosine_schedule(self.peak_lr, cfg.schedule.min_lr, self.total,
                                   int(round(cfg.schedule.warmup_epochs * n)), cfg.schedule.warmup_lr)
        self.wds = cosine_schedule(cfg.optim.weight_decay, dc.weight_decay_end, self.total)
        self.moms = cosine_schedule(dc.momentum_teacher, 1.0, self.total)
        self.temps = teacher_temp_schedule(dc.warmup_teacher_temp, dc.teacher_temp, dc.warmup_teacher_temp_epochs,
                                           epochs, n)
        self.crop_shapes = [(d.in_chans, d.image_size, d.image_size)] * 2 + \
            [(d.in_chans, dc.local_crop_size, dc.local_crop_size)] * dc.local_crops_number
        teacher_args = {**self.model_args, "drop_rate": 0.0, "drop_path_rate": 0.0}  # the reference's teacher
        self.meta = {"config": to_dict(cfg), "model": teacher_args, "classes": self.classes,
                     "task": "dino"}
        self._momentum = self._temp = 0.0
        self._teacher_out, self._weight = None, 1.0
        self._last_view: torch.Tensor | None = None  # the latest batch's first global crops (epoch_metrics)

    def wrap(self, resumed: bool) -> None:
        """DDP around the student on several ranks (a new run's teacher then starts from rank 0's
        student, as DDP gave every rank), and torch.compile when asked."""
        env = self.env
        if env.ddp:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
            if not resumed:
                self.teacher.load_state_dict(self.student.state_dict())
        if self.cfg.train.compile:
            self.model = compile_module(self.model, env.device)
            self.teacher_fwd = compile_module(self.teacher, env.device)

    # --- a step --------------------------------------------------------------------------------
    def train(self) -> None:
        self.student.train()
        self.teacher.train()  # as the reference; the teacher has no dropout or drop path

    def prepare(self, item: Any) -> Batch:
        crops, _, n_bad = item
        if not crops:  # every image of the batch was unreadable
            return Batch(0, n_bad)
        crops = [c.to(self.env.device, non_blocking=True) for c in crops]
        self.crop_shapes = [tuple(c.shape[1:]) for c in crops]
        return Batch(crops[0].shape[0], n_bad, crops)

    def set_step(self, global_step: int, epoch: int) -> dict[str, float]:
        it = min(global_step, self.total - 1)  # a perf run may outlast the schedule
        lr, wd = float(self.lrs[it]), float(self.wds[it])
        self._momentum, self._temp = float(self.moms[it]), float(self.temps[it])
        for i, group in enumerate(self.optimizer.param_groups):  # floats: the state loads weights_only
            group["lr"] = lr
            if i == 0:  # only the first group (weights, not biases/norms) is decayed
                group["weight_decay"] = wd
        self.frozen_last_layer = epoch < self.cfg.dino.freeze_last_layer
        return {"lr": lr, "wd": wd, "momentum": self._momentum, "teacher_temp": self._temp}

    def _before_step(self) -> None:
        if self.frozen_last_layer:
            cancel_last_layer_grads(self.student)

    def loss(self, batch: Batch, micro: int) -> tuple[torch.Tensor, None]:
        crops = batch.data
        with self.env.autocast():
            with torch.no_grad():
                self._teacher_out = self.teacher_fwd(crops[:2])
            koleo = self.cfg.dino.koleo_weight
            if koleo > 0 and crops[0].shape[0] > 1:  # a row needs another to be nearest to
                out, features = self.model(crops, with_features=True)
                loss = self.criterion(out, self._teacher_out, self._temp)
                batch = crops[0].shape[0]  # the 2 global crops' rows come first, crop-major
                loss = loss + koleo * sum(koleo_loss(f) for f in features[:2 * batch].chunk(2))
            else:
                loss = self.criterion(self.model(crops), self._teacher_out, self._temp)
        self._weight, self._last_view = 1.0, crops[0]
        return loss, None

    def placeholder_loss(self) -> torch.Tensor:
        rows = lockstep.placeholder_rows(self.student)
        crops = [lockstep.placeholder(s, self.env.device, rows=rows) for s in self.crop_shapes]
        with self.env.autocast():
            with torch.no_grad():  # the teacher leaves its statistics alone too (its rows weigh nothing)
                self._teacher_out = lockstep.placeholder_forward(self.teacher_fwd, self.teacher, crops[:2])
            loss = lockstep.zero_weight_loss(self.model, self.student, crops)
        self._weight = 0.0
        return loss

    def after_update(self, batch: Batch) -> None:
        update_teacher(self.student, self.teacher, self._momentum)
        self.criterion.update_center(self._teacher_out, self.reduce, self._weight)

    # --- epochs, evaluation, state ---------------------------------------------------------------
    def end_epoch(self) -> None:
        distributed.average_bn_stats(self.student, self.teacher)  # BN without SyncBN (CPU): ranks agree

    def epoch_metrics(self) -> dict[str, float]:
        """The collapse indicators (engine/evaluation/collapse.py) of the teacher on the epoch's
        last batch (this rank's first global crop of each image): the spread of its sharpened,
        centred outputs at the epoch's teacher temperature, and of its backbone features. The
        teacher runs in eval mode (BatchNorm statistics untouched, no collective) and the
        student and the loader's order are not touched, so the run itself is unchanged."""
        if self._last_view is None or self._last_view.shape[0] < 2:
            return {}
        teacher, was_training = self.teacher, self.teacher.training
        with torch.no_grad(), self.env.autocast():
            teacher.eval()
            features = teacher.backbone(self._last_view)
            out = teacher.head(features)
        teacher.train(was_training)
        self._last_view = None  # the next epoch measures its own
        return spread(out, self.criterion.center, self._temp, features).as_dict()

    def epoch_warning(self, record: dict) -> str | None:
        figures = Spread.from_record(record)
        line = collapse_warning(figures) if figures else None
        return line and f"{line} (docs/dino.md: collapse)"

    def evaluate(self) -> Evaluation:
        """Weighted k-NN of the teacher backbone for dino.knn_k and dino.knn_report_k (every rank
        takes part)."""
        cfg, env, k = self.cfg, self.env, self.cfg.dino.knn_report_k
        ks = sorted(set(cfg.dino.knn_k) | {k})
        res, _ = knn_eval(self.teacher.backbone, cfg.data, cfg.dino, env.device, env.amp_dtype,
                          cfg.data.batch_size_per_device, ks)
        if env.is_main:
            print("k-NN: " + ", ".join(f"{kk}-NN {a:.2f}%" for kk, (a, _) in res.items()), flush=True)
        self.knn = res
        return Evaluation(res[k][0], res[k][1], {"knn": {str(kk): v for kk, v in res.items()}})

    def describe_eval(self, record: dict) -> str:
        return f"k-NN (k={self.cfg.dino.knn_report_k}) top-1 {record['acc1']:.2f}%"

    def weights(self) -> Weights:
        return Weights(self.teacher.backbone, self.meta)

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "dino_loss": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
                "grad_step": self.step.state_dict()}

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        own = state  # what state_dict() returned
        self.student.load_state_dict(own["student"])
        self.teacher.load_state_dict(own["teacher"])
        self.criterion.load_state_dict(own["dino_loss"])
        self.optimizer.load_state_dict(own["optimizer"])
        self.step.load_state_dict(own.get("grad_step") or {"scaler": own["scaler"]})  # older checkpoints: the scaler

    def header(self) -> tuple[str, str]:
        a, dc = self.model_args, self.cfg.dino
        return (f"{a['library']} {a['name']} | {self.n_images} images × {2 + dc.local_crops_number} crops",
                f"batch {self.cfg.data.batch_size}, peak lr {self.peak_lr:.3g}")

    def results(self, last_eval: Evaluation | None) -> dict:
        k, knn = self.cfg.dino.knn_report_k, self.knn
        return {"eval": f"k-NN k={k}" if knn else None,
                "crops_per_image": 2 + self.cfg.dino.local_crops_number,  # FPS counts original images
                "knn": {str(kk): {"top1": a, "top5": b} for kk, (a, b) in knn.items()} if knn else None}

    def in_sync(self) -> bool:
        return distributed.params_in_sync(self.student) and distributed.params_in_sync(self.teacher)
