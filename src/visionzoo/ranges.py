"""The range of every numeric config key and how a value is checked against it: one line naming
the key (or flag) and its range when a value is out of it."""

from __future__ import annotations

from typing import Any

from visionzoo.errors import UserError

# The range of every numeric key, checked when a config resolves (one line names the key and the
# range). ">=0": at least 0; ">0": above 0; "0..1": 0 to 1, both included. A list's range
# holds for each of its numbers.
RANGES: dict[str, str] = {
    "data.num_classes": ">=1", "data.batch_size": ">=1", "data.batch_size_per_device": ">=0",
    "data.workers": ">=0", "data.in_chans": ">=1", "data.image_size": ">=1", "data.crop_scale": "0..1",
    "data.crop_padding": ">=0", "data.hflip": "0..1", "data.test_size": ">=1", "data.test_resize": ">=0",
    "data.mean": ">=0", "data.std": ">0", "data.synthetic_samples": ">=1", "data.shuffle_buffer": ">=0",
    "data.io_timeout": ">0", "data.io_retries": ">=0",
    "model.drop_rate": "0..1", "model.drop_path_rate": "0..1", "model.bn_group": ">=0",
    "optim.lr": ">=0", "optim.momentum": "0..1", "optim.betas": "0..1", "optim.weight_decay": ">=0",
    "optim.clip_value": ">=0", "optim.lr_batch": ">=0",
    "schedule.warmup_epochs": ">=0", "schedule.warmup_lr": ">=0", "schedule.min_lr": ">=0",
    "schedule.milestones": ">=0", "schedule.gamma": ">0",
    "train.epochs": ">=0", "train.init_scale": ">0", "train.label_smoothing": "0..1", "train.mixup": ">=0",
    "train.cutmix": ">=0", "train.mixup_switch_prob": "0..1", "train.mixup_prob": "0..1", "train.ema_decay": "0..1",
    "train.accum_steps": ">=1", "train.seed": ">=0", "train.dist_timeout": ">=1", "train.eval_every": ">=0",
    "train.checkpoint_every_steps": ">=0", "train.keep_checkpoints": ">=1", "train.skip_nonfinite": ">=0",
    "train.max_steps_per_epoch": ">=0", "train.log_every": ">=0", "train.perf_warmup_steps": ">=0",
    "train.perf_steps": ">=1",
    "dino.out_dim": ">=1", "dino.hidden_dim": ">=1", "dino.bottleneck_dim": ">=1", "dino.head_layers": ">=1",
    "dino.freeze_last_layer": ">=0", "dino.momentum_teacher": "0..1", "dino.warmup_teacher_temp": ">0",
    "dino.teacher_temp": ">0", "dino.warmup_teacher_temp_epochs": ">=0", "dino.student_temp": ">0",
    "dino.center_momentum": "0..1", "dino.koleo_weight": ">=0", "dino.weight_decay_end": ">=0", "dino.clip_grad": ">=0",
    "dino.global_crops_scale": "0..1", "dino.local_crops_scale": "0..1", "dino.local_crops_number": ">=0",
    "dino.local_crop_size": ">=1", "dino.color_jitter": ">=0", "dino.color_jitter_p": "0..1",
    "dino.grayscale_p": "0..1", "dino.blur_p": "0..1", "dino.blur_sigma": ">=0", "dino.solarize_p": "0..1",
    "dino.knn_k": ">=1", "dino.knn_temperature": ">0", "dino.knn_report_k": ">=1", "dino.knn_max_train": ">=0",
    "dino.linear_epochs": ">=0", "dino.linear_lr": ">=0", "dino.linear_batch_size": ">=1",
    "dino.linear_n_last_blocks": ">=1",
}


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` lies in ``spec`` (">=N", ">N" or "A..B", see RANGES)."""
    if ".." in spec:
        lo, hi = (float(x) for x in spec.split(".."))
        return lo <= value <= hi
    if spec.startswith(">="):
        return value >= float(spec[2:])
    return value > float(spec[1:])


def check_range(value: Any, spec: str, name: str) -> None:
    """A UserError naming ``name`` and its range when ``value`` (a number or a list of them)
    lies outside ``spec``."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, (int, float)) and not in_range(v, spec):
            shown = spec.replace("..", " to ").replace(">=", ">= ").replace(">0", "> 0")
            sep = " " if name.startswith("--") else "="  # --flag 5, key=5: as the user typed it
            raise UserError(f"{name}{sep}{v if not isinstance(value, (list, tuple)) else list(value)} is out of "
                            f"range (must be {shown})")
