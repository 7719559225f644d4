"""Typed configuration: dataclasses are the schema, one YAML per recipe fills them in, and
dotted ``key=value`` overrides change any field. Unknown keys and wrong types are user errors
that name the closest valid key.

Resolution order: dataclass defaults < recipe YAML < command-line overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from visionzoo.errors import UserError
from visionzoo.ranges import RANGES, check_range
from visionzoo.redaction import without_credentials

AMP_MODES = ("auto", "none", "bf16", "fp16", "fp64")
# data.augment's presets: the augmentation-only rows of data/augment/registry.py (a lower layer
# cannot import it; tests/test_augment_registry.py checks the two agree), checked before torch loads.
AUGMENTS = ("imagenet", "cifar", "none")


def _check(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


# The seed scripts' flags, as aliases of config keys.
FLAG_ALIASES = {
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "workers": "data.workers",
    "seed": "train.seed",
    "amp": "train.amp",
    "device": "train.device",
}
# apex opt levels of the seeds: O1 (autocast) and O2 (fp16 weights, fp32 master copy) both map to
# fp16 autocast with a loss scaler; O0 is full precision.
AMP_ALIASES = {"o0": "none", "o1": "fp16", "o2": "fp16", "true": "auto", "false": "none"}




@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    # A data source of data/sources/table.py (docs/data.md): the CLI checks it as it resolves the
    # config (config sits below data/, so the table is not imported here).
    name: str = "imagefolder"
    path: str | None = None  # folder of the data set; None: the data set's default location
    num_classes: int = 1000  # used by synthetic data; real data sets count their classes
    batch_size: int = 256  # global batch (all devices together), images per optimizer step
    # >0: keep this many images per device on any number of devices instead; the global batch
    # becomes per-device x devices x accum_steps and optim.lr scales linearly with it.
    batch_size_per_device: int = 0
    workers: int = 8  # DataLoader worker processes per device (capped at the CPU count)
    # In-memory data sets (CIFAR, MNIST): keep the split on the device and augment whole batches
    # there (no workers); ImageFolder always uses the DataLoader.
    device_resident: bool = True
    # ImageFolder training data: cpu decodes and augments in the loader workers (Pillow);
    # device has workers read file bytes only and decodes (nvJPEG on CUDA), crops, flips,
    # RandAugments and normalises each batch on the training device (augment=imagenet, or DINO's
    # views: the presets each path runs are in docs/data-path.md).
    decode: str = "cpu"
    # data.decode=cpu: decode a training JPEG at 1/2, 1/4 or 1/8 of its size (Pillow's draft
    # mode) when the random crop shrinks it at least that much; false: always in full.
    draft: bool = True
    # The same for the eval resize (eval, knn, linear, infer). Off: Acc@1 is measured on fully
    # decoded pixels, as the references measure it.
    eval_draft: bool = False
    in_chans: int = 3
    # Train-time augmentation.
    augment: str = "imagenet"  # imagenet: RandomResizedCrop; cifar: pad + RandomCrop; none: as stored
    image_size: int = 224  # train crop size, pixels
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    crop_padding: int = 4  # pixels of zero padding before RandomCrop (augment=cifar)
    hflip: float = 0.5  # probability of a horizontal flip
    randaugment: str | None = None  # timm RandAugment string, e.g. rand-m9-n2-mstd0.5
    interpolation: str = "bilinear"  # bilinear | bicubic
    # Evaluation preprocessing: resize the short side to test_resize, centre-crop test_size.
    test_size: int = 224
    test_resize: int = 256
    # Normalisation in pixel units (0-255), as MMClassification writes them.
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # The order of the float32 operations, as the recipe's reference computes them (the results
    # differ in the last bit): unit: x/255, then (x - mean/255) / (std/255) (torchvision's
    # ToTensor + Normalize: pytorch/examples, torchvision references, DINO); pixel: (x - mean) / std
    # on 0-255 (timm's PrefetchLoader); mmcv: (x - mean) * (1/std) on 0-255 with float64 mean and
    # 1/std, each result rounded once to float32 (mmcv.imnormalize under OpenCV 4, mmcls).
    normalize: str = "unit"
    synthetic_samples: int = 512  # images per split for data.name=synthetic
    # Shards (data.name=webdataset: tar files; hfds: Hugging Face parquet / save_to_disk), see
    # data/sources/shards.py. train/val: the splits' shards (brace pattern, glob, folder or URL pattern);
    # None: found from data.path (DATA/train-*.tar + DATA/val-*.tar, or the Hub's parquet layout).
    train: str | None = None
    val: str | None = None
    shuffle_buffer: int = 2048  # samples each loader worker shuffles among (after a per-epoch shard order)
    io_timeout: float = 60.0  # seconds a shard URL may take to answer or to send more bytes
    io_retries: int = 2  # re-opens of a remote shard that broke off, continuing where it stopped
    scan_cache: bool = True  # imagefolder: cache the file list (data/sources/scan_cache.py)

    def __post_init__(self) -> None:
        _check(self.augment, AUGMENTS, "data.augment")
        _check(self.interpolation, ("bilinear", "bicubic", "nearest"), "data.interpolation")
        _check(self.decode, ("cpu", "device"), "data.decode")
        _check(self.normalize, ("unit", "pixel", "mmcv"), "data.normalize")
        if self.batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 0 or self.io_timeout <= 0 or self.io_retries < 0:
            raise UserError("data.shuffle_buffer and data.io_retries must be >= 0, data.io_timeout > 0")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UserError(f"data.mean and data.std need {self.in_chans} values (data.in_chans)")


@dataclass
class ModelConfig:
    """Which network; its constructor arguments are saved with every checkpoint."""

    name: str = "resnet50"  # registry name: see visionzoo.models.MODELS, or any timm/torchvision name
    library: str = "torchvision"  # torchvision | timm | visionzoo
    drop_rate: float = 0.0  # dropout before the classifier (timm drop_rate / AlexNet dropout)
    drop_path_rate: float = 0.0  # stochastic depth (timm models only)
    # NHWC memory format (faster convolutions), on accelerators and on the CPU too (measured faster
    # there as well). Outputs then differ from an NCHW run in the last bits (another summation
    # order; ReLU / max-pool ties may flip): false gives NCHW everywhere, as the references run.
    channels_last: bool = True
    sync_bn: bool = False  # SyncBatchNorm across devices (multi-device runs; statistics over all of them)
    # BatchNorm group: the images each BatchNorm statistic is taken over in training, i.e. the
    # reference's images per device. A larger per-device batch (fewer devices than the reference)
    # is normalised group by group in one forward (models/ghost_bn.py); train.accum_steps that
    # make the micro-batch one group give the reference's numbers bit for bit; the loaders then
    # put reference rank i's images in group i (docs/devices.md). A batch that is not a multiple
    # ends in a smaller group. 0: the whole per-device batch (plain BatchNorm). Ignored with
    # sync_bn on several devices.
    bn_group: int = 0
    # BatchNorm running statistics across ranks, as the reference keeps them: DDP broadcasts rank
    # 0's buffers before every training forward (DDP's default: torchvision, timm references), and
    # average them over the ranks at every epoch end (timm's distribute_bn). mmcls does neither.
    bn_broadcast: bool = True
    bn_average: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor args, e.g. img_size
    # Position embeddings of a timm ViT (dynamic_img_size) at another grid than its own: timm
    # (timm's antialiased resample) | dino (the DINO reference's interpolate_pos_encoding).
    vit_pos_embed: str = "timm"
    # Initial weights (training starts from them; see models/weights.py for the formats): a file
    # (visionzoo, DINO, timm, torchvision, mmcls checkpoints), or timm's/torchvision's own
    # pretrained weights (their download caches). Neither is stored with the run's checkpoints.
    weights: str | None = None
    pretrained: bool = False
    checkpoint_key: str = "teacher"  # DINO training checkpoints: teacher | student

    def __post_init__(self) -> None:
        _check(self.library, ("torchvision", "timm", "visionzoo"), "model.library")
        _check(self.vit_pos_embed, ("timm", "dino"), "model.vit_pos_embed")
        _check(self.checkpoint_key, ("teacher", "student"), "model.checkpoint_key")
        if self.weights and self.pretrained:
            raise UserError("model.weights and model.pretrained=true both give initial weights; set one")
        if self.bn_group < 0:
            raise UserError(f"model.bn_group must be >= 0 (0: the whole per-device batch), got {self.bn_group}")


@dataclass
class OptimConfig:
    """Optimizer and gradient clipping."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # peak learning rate, for the global batch optim.lr_scaling says (peak_lr)
    # How optim.lr follows the run's global batch (one rule for every task, config.peak_lr):
    # linear: lr is for the global batch optim.lr_batch and scales with the run's (it only differs
    # with data.batch_size_per_device); per256: lr is per 256 images, lr x global batch / 256
    # (DINO's rule); none: lr as written, whatever the batch; auto: per256 for task=dino, else linear.
    lr_scaling: str = "auto"
    lr_batch: int = 0  # linear: the global batch optim.lr is for; 0: the recipe's data.batch_size
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = 1e-4
    wd_exclude_bias_norm: bool = False  # no weight decay on biases and normalisation gains
    # No weight decay on parameters whose own name (the part after the last dot) contains one of
    # these strings, e.g. [gain, bias] as DeepMind's NFNets.
    wd_exclude: list[str] = field(default_factory=list)
    # none | norm (global) | value | agc (adaptive gradient clipping, NFNet) | per_tensor (each
    # tensor's norm on its own, DINO's; task=dino clips so with dino.clip_grad)
    clip_mode: str = "none"
    clip_value: float = 0.0  # max norm (norm, per_tensor), max value (value), or clip factor (agc)
    agc_exclude: list[str] = field(default_factory=list)  # parameter-name prefixes AGC skips

    def __post_init__(self) -> None:
        _check(self.name, ("sgd", "adamw"), "optim.name")
        _check(self.clip_mode, ("none", "norm", "value", "agc", "per_tensor"), "optim.clip_mode")
        _check(self.lr_scaling, ("auto", "linear", "per256", "none"), "optim.lr_scaling")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, precomputed for every step."""

    name: str = "cosine"  # cosine | step | constant
    by: str = "step"  # step: LR changes every step; epoch: once per epoch
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0  # LR at the first warm-up step
    min_lr: float = 0.0  # cosine end value
    milestones: list[int] = field(default_factory=list)  # epochs where step decay happens
    gamma: float = 0.1  # step decay factor

    def __post_init__(self) -> None:
        _check(self.name, ("cosine", "step", "constant"), "schedule.name")
        _check(self.by, ("step", "epoch"), "schedule.by")
        if self.by == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise UserError(f"schedule.warmup_epochs={self.warmup_epochs} with schedule.by=epoch: the LR changes "
                            f"once per epoch, so the warm-up needs a whole number of epochs")


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 90
    # auto (bf16 on GPUs that have it and on CPUs with AMX/avx512_bf16, else fp32) | none (fp32) | bf16 |
    # fp16 | fp64 (float64 weights and math, supervised only: slow; for numerical checks whose
    # round-off must not matter)
    amp: str = "auto"
    loss_scale: str = "dynamic"  # fp16 only: dynamic, or a number for a static scale
    init_scale: float = 65536.0  # first dynamic loss scale
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_prob: float = 1.0  # probability that a batch (batch mode) or an image (elem mode) is mixed
    mixup_mode: str = "batch"  # batch: one lambda/box per batch (timm); elem: per image, batched on the device
    ema_decay: float = 0.0  # exponential moving average of weights (0: off)
    accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | ...
    dist_timeout: int = 1800  # seconds a collective may wait for the other ranks before failing
    deterministic: bool = False  # deterministic algorithms (slower; bit-exact reruns on CPU)
    cudnn_benchmark: bool = True
    compile: bool = False  # torch.compile the model (minutes of compile time on large models)
    eval_every: int = 1  # validate every N epochs (and always after the last)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps (0: at epoch ends only)
    keep_checkpoints: int = 2  # newest checkpoints kept in checkpoints/ (plus best.safetensors)
    skip_nonfinite: int = 0  # steps with a NaN/inf loss that may be skipped before the run stops
    max_steps_per_epoch: int = 0  # stop an epoch early after N steps (0: the whole epoch)
    log_every: int = 50  # steps between metrics.jsonl step records
    perf_warmup_steps: int = 10  # --perf: untimed steps
    perf_steps: int = 100  # --perf: timed steps

    def __post_init__(self) -> None:
        _check(self.amp, AMP_MODES, "train.amp")
        _check(self.mixup_mode, ("batch", "elem"), "train.mixup_mode")
        if self.loss_scale != "dynamic":
            try:
                float(self.loss_scale)
            except ValueError:
                raise UserError(f"train.loss_scale must be 'dynamic' or a number, got {self.loss_scale!r}") from None
        if self.accum_steps < 1:
            raise UserError("train.accum_steps must be >= 1")


@dataclass
class DinoConfig:
    """Self-distillation with no labels (task=dino), as in facebookresearch/dino main_dino.py.

    Only DINO's own knobs live here; the usual sections hold the rest: optim (adamw, lr *per
    256 images*, weight_decay = start of the weight-decay schedule), schedule (warmup_epochs,
    min_lr), data (global batch_size, image_size = global crop size, mean/std, interpolation)
    and train (epochs, amp, eval_every = k-NN every N epochs, 0: after the last only)."""

    # Projection head: MLP in→hidden→hidden→bottleneck (GELU), L2-normalise, weight-normed last layer.
    out_dim: int = 65536  # prototypes K; larger K helps on ImageNet, a few thousand suit small data
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True  # fix the last layer's weight-norm gain to 1: more stable training
    freeze_last_layer: int = 1  # epochs during which the last layer is not updated (stabilises start)
    # Teacher and loss.
    momentum_teacher: float = 0.996  # EMA momentum at step 0, cosine to 1; raise (0.9995) for small batches
    warmup_teacher_temp: float = 0.04  # teacher temperature at epoch 0
    teacher_temp: float = 0.04  # after the warm-up; above 0.07 training tends to collapse
    warmup_teacher_temp_epochs: int = 0  # linear warm-up length (reference variant: 0.04→0.07 over 30)
    student_temp: float = 0.1
    center_momentum: float = 0.9  # EMA of the teacher output mean that is subtracted (centering)
    # DINOv2's KoLeo term on the student's global-crop features, summed over the 2 crops (each
    # crop's batch on its own rank); 0: off, as DINO v1 (DINOv2 uses 0.1).
    koleo_weight: float = 0.0
    # DINO-specific optimisation.
    weight_decay_end: float = 0.4  # cosine from optim.weight_decay to this (not on biases/norms)
    clip_grad: float = 3.0  # max L2 norm of each parameter's gradient, clipped tensor by tensor; 0: off
    # Multi-crop: two global crops of data.image_size px plus local_crops_number small ones.
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_crops_number: int = 8
    local_crop_size: int = 96  # pixels
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # b, c, s, h
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, locals
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # pixels, drawn uniformly
    solarize_p: float = 0.2  # second global crop only
    # Evaluation of the teacher backbone (visionzoo knn / linear; k-NN at the end of training).
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    # k-NN: at most N training images (every len/N-th, the same ones every time; 0: all). A short
    # run's end-of-run k-NN over a large training split can take longer than the run itself.
    knn_max_train: int = 0
    knn_report_k: int = 20  # the k whose top-1 is a training run's Acc@1 (evaluated too if not in knn_k)
    linear_epochs: int = 100
    linear_lr: float = 0.001  # SGD m0.9 cosine, per 256 images (reference eval_linear.py)
    linear_batch_size: int = 1024  # global (reference: 128 per device × 8)
    linear_n_last_blocks: int = 4  # ViT: concatenate the [CLS] token of the last N blocks
    linear_avgpool: bool = False  # ViT: also append the mean patch token (reference: ViT-B only)
    linear_augment: bool = True  # train the probe on augmented images (reference); False: cache
    # the features of the un-augmented training split once (much faster on a CPU)

    def __post_init__(self) -> None:
        for key in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise UserError(f"dino.{key} must be [low, high] with 0 < low <= high, got {list(lo_hi)}")
        if len(self.color_jitter) != 4 or len(self.blur_p) != 3:
            raise UserError("dino.color_jitter needs 4 values (b, c, s, h) and dino.blur_p 3 "
                            "(global 1, global 2, local)")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise UserError("dino temperatures must be > 0")
        if self.local_crops_number < 0 or self.out_dim < 1 or self.head_layers < 1:
            raise UserError("dino.local_crops_number must be >= 0, dino.out_dim and dino.head_layers >= 1")
        if not self.knn_k or min(self.knn_k) < 1 or self.knn_report_k < 1:
            raise UserError(f"dino.knn_k={list(self.knn_k)} and dino.knn_report_k must be >= 1")


@dataclass
class LogConfig:
    """What a run shows and records besides metrics.jsonl."""

    progress: str = "auto"  # auto: a progress bar on a terminal, plain lines otherwise | bar | lines | off
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    # Experiment trackers (optional extras; rank 0 only; one that cannot be reached is a warning):
    mlflow: bool = False  # MLflow: log.mlflow_uri, else MLFLOW_TRACKING_URI, else MLflow's local store
    # e.g. http://host:5000, https://user:token@host (never written: https://***@host), sqlite:///path/mlflow.db
    mlflow_uri: str | None = None  # set: MLflow is on
    wandb: bool = False  # Weights & Biases (WANDB_MODE=offline writes RUN/wandb/ only; WANDB_PROJECT)

    def __post_init__(self) -> None:
        if self.progress in (False, "False", "false"):  # YAML reads a bare `off` as false
            self.progress = "off"
        _check(self.progress, ("auto", "bar", "lines", "off"), "log.progress")


@dataclass
class RecipeConfig:
    """A whole recipe: everything a run needs, saved as config.yaml in the run folder."""

    recipe: str = ""
    task: str = "supervised"  # supervised | dino (self-supervised: see DinoConfig) | a registered task
    description: str = ""
    seed_target: str = ""  # what the seed document reports, for the recipes table
    source: str = ""  # the reference implementation the hyper-parameters follow
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)  # used when task=dino
    log: LogConfig = field(default_factory=LogConfig)
    output: str | None = None  # run folder; None: runs/<recipe>-<timestamp>

    def __post_init__(self) -> None:
        # task: checked against the registry (engine/tasks TASKS, where a new task registers) by
        # the CLI and the API before torch loads, and by the run itself.
        for key, spec in RANGES.items():
            section, name = key.split(".")
            check_range(getattr(getattr(self, section), name), spec, key)
        if self.task == "dino" and self.train.amp == "fp64":
            raise UserError("train.amp=fp64 is for supervised runs (task=dino trains in fp32, bf16 or fp16)")


RECIPES_PACKAGE = "visionzoo.recipes"


def recipe_names() -> list[str]:
    """Names of the recipes shipped with visionzoo (the YAML files in visionzoo/recipes)."""
    files = resources.files(RECIPES_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def _recipe_text(name: str) -> tuple[str, str]:
    """The YAML text of a recipe given by name or by path, and the name to record."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise UserError(f"recipe file not found: {name}")
        return path.read_text(), path.stem
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown recipe '{name}'{hint} (visionzoo recipes lists them)")
    return resources.files(RECIPES_PACKAGE).joinpath(f"{name}.yaml").read_text(), name


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, (dict, DictConfig)):
            keys += _all_keys(v, f"{full}.")
    return keys


def _field_type(key: str) -> Any:
    """The annotation of a dotted schema key, e.g. ``list[int]`` for schedule.milestones; None for
    a key that is not a schema field (one inside model.kwargs, or an unknown one)."""
    node: Any = RecipeConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


# What each field type takes, in the words of an error message (alone, and as list items).
_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a text value"}
_ITEM_WORDS = {bool: "true/false values", int: "whole numbers", float: "numbers", str: "names"}


def _type_words(tp: Any) -> str:
    """``tp`` as a user reads it: "a whole number", "a list of numbers", "a number or null"."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None (or Optional[X])
        return f"{_type_words(args[0])} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {_ITEM_WORDS.get(args[0], 'values') if args else 'values'}"
    if typing.get_origin(tp) is dict:
        return "a mapping such as {img_size: 32}"
    return _TYPE_WORDS.get(tp, "another type of value")


_MISSING = object()  # a key with no value to show


def _show(value: Any) -> str:
    """A config value as it is written in YAML and overrides (true, null, [30, 60])."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
    except yaml.YAMLError:  # an OmegaConf value node (a recipe file's value of the wrong type)
        return str(value)


def _bad_type(key: str, given: str, current: Any, now: str) -> str:
    """The message for a value of the wrong type: what ``key`` takes, how to write it, and its
    value before (``now``: "currently" for an override, "default" in a recipe file)."""
    tp = _field_type(key)
    words = _type_words(tp) if tp is not None else "another type of value"
    was = f" ({now} {_show(current)})" if current is not _MISSING else ""
    if typing.get_origin(tp) is list and not given.lstrip().startswith("["):
        return f"{key} takes {words}: write {key}=[{given}]{was}"
    return f"{key} takes {words}, not {given!r}{was}"


def _unknown_key(key: str, schema: DictConfig, value: str | None) -> str:
    """The message for an unknown key, with the closest valid one; a key without its section
    (``lr=0.1``) gets the full key and the command-line flag that sets it."""
    keys = _all_keys(schema)
    if "." not in key:
        same = [k for k in keys if k.rsplit(".", 1)[-1] == key and "." in k]
        if not same:
            last = difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in keys if "." in k], n=1, cutoff=0.6)
            same = [k for k in keys if last and k.endswith(f".{last[0]}")][:1]
        if len(same) == 1:
            rhs = f"={value}" if value is not None else ""
            flag = {v: k for k, v in FLAG_ALIASES.items()}.get(same[0])
            also = f" (or the flag --{flag.replace('_', '-')} {value})" if flag and value is not None else ""
            return f"unknown config key '{key}'; keys have a section: did you mean {same[0]}{rhs}{also}?"
        if same:
            listed = f"{', '.join(same[:-1])} or {same[-1]}"
            return f"unknown config key '{key}'; keys have a section: did you mean {listed}?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint}"


def _explain(err: OmegaConfBaseException, base: DictConfig, where: str, given: str | None = None) -> UserError:
    """Turn an OmegaConf error into one line in the project's words: the unknown key and the
    closest valid one, or what a key takes, how to write it and its value before. ``base``: the
    config the value was merged into; ``given``: the override's right-hand side as typed."""
    key = re.sub(r"\[\d+\]$", "", getattr(err, "full_key", None) or "")  # schedule.milestones[0]: the list
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return UserError(f"{where}: {_unknown_key(key, base, given)}")
    if isinstance(err, ValidationError) and key:
        current = OmegaConf.select(base, key, default=_MISSING)
        shown = given if given is not None else _show(getattr(err, "value", None))
        return UserError(f"{where}: {_bad_type(key, shown, current, 'currently' if given is not None else 'default')}")
    return UserError(f"{where}: {str(err).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, where: str, given: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, base, where, given) from None


def resolve(base: Any, name: str, overrides: list[str] | None = None) -> RecipeConfig:
    """Merge ``base`` (a recipe mapping) over the defaults, then ``key=value`` overrides."""
    schema = OmegaConf.structured(RecipeConfig)
    cfg = _merge(schema, base, f"recipe {name}")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.1)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise UserError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]})") from None
        key, value = item.split("=", 1)
        if typing.get_origin(_field_type(key)) is dict:
            # model.kwargs={...} replaces the recipe's mapping (a merge would keep its keys, which
            # belong to the recipe's model); model.kwargs.img_size=32 still changes one key.
            mapping = OmegaConf.select(dot, key)
            if not isinstance(mapping, DictConfig):  # (OmegaConf's merge raises a bare TypeError)
                raise UserError(f"override '{item}': {_bad_type(key, value, OmegaConf.select(cfg, key), 'currently')}")
            OmegaConf.update(cfg, key, mapping, merge=False)  # cfg is this function's own merge result
            continue
        cfg = _merge(cfg, dot, f"override '{item}'", value)
    if not cfg.recipe:
        cfg.recipe = name
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, f"recipe {name}") from None


def load_config(recipe: str, overrides: list[str] | None = None) -> RecipeConfig:
    """Resolve a recipe (name or YAML path) plus ``key=value`` overrides into a RecipeConfig."""
    text, name = _recipe_text(recipe)
    try:
        recipe_cfg = OmegaConf.create(text)
    except Exception as err:  # yaml syntax errors come in several types
        raise UserError(f"recipe {name}: not valid YAML: {str(err).splitlines()[0]}") from None
    return resolve(recipe_cfg, name, overrides)


def for_world_size(cfg: RecipeConfig, world_size: int) -> RecipeConfig:
    """The config as it runs on ``world_size`` devices, with both batch numbers filled in.

    By default the recipe's global batch is kept and split over the devices. With
    ``data.batch_size_per_device`` set, the per-device batch is kept instead and the global batch
    grows with the device count; the LR follows by optim.lr_scaling (``peak_lr``), for which
    ``optim.lr_batch`` records the recipe's global batch. Applying it twice changes nothing."""
    cfg = copy.deepcopy(cfg)
    d, o, accum = cfg.data, cfg.optim, cfg.train.accum_steps
    if o.lr_batch <= 0:
        o.lr_batch = d.batch_size  # the global batch optim.lr was written for
    if d.batch_size_per_device > 0:
        d.batch_size = d.batch_size_per_device * world_size * accum
    else:
        if d.batch_size % (world_size * accum):
            raise UserError(f"data.batch_size={d.batch_size} (global) does not split into {world_size} "
                            f"device(s) x {accum} accumulation step(s); set data.batch_size_per_device instead")
        d.batch_size_per_device = d.batch_size // (world_size * accum)
    return cfg


def peak_lr(cfg: RecipeConfig) -> float:
    """The LR the schedule of a run resolved by ``for_world_size`` peaks at: optim.lr scaled to
    the run's global batch by optim.lr_scaling (linear: x global / lr_batch; per256: x global /
    256; none: as written). Every task's schedule starts from it."""
    o, batch = cfg.optim, cfg.data.batch_size
    rule = o.lr_scaling if o.lr_scaling != "auto" else ("per256" if cfg.task == "dino" else "linear")
    if rule == "per256":
        return o.lr * batch / 256
    if rule == "linear" and o.lr_batch > 0 and batch != o.lr_batch:
        return o.lr * batch / o.lr_batch
    return o.lr


def absolute_data_path(path: str | None) -> str | None:
    """``data.path`` as an absolute path when it names a local file or folder (so a run's config,
    checkpoints and exports work from any directory); URLs, shard patterns and None unchanged."""
    if not path or "://" in path or path.startswith("pipe:") or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def to_yaml(cfg: RecipeConfig, comments: dict[str, str] | None = None, secrets: bool = False) -> str:
    """The resolved config as YAML (what `recipes --show` prints and runs save), the tracking URI's
    credentials redacted unless ``secrets`` (a config handed to this process's own workers);
    ``comments`` ({"data.num_classes": "..."}) end the lines of those section keys as YAML comments."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg if secrets else without_credentials(cfg)))
    if not comments:
        return text
    lines, section = text.splitlines(), ""
    for i, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            note = comments.get(f"{section}.{line.strip().split(':', 1)[0]}")
            lines[i] += f"  # {note}" if note else ""
    return "\n".join(lines) + "\n"


def to_dict(cfg: RecipeConfig, secrets: bool = False) -> dict:
    """The resolved config as plain Python containers (stored inside checkpoints, given to the
    trackers), the tracking URI's credentials redacted unless ``secrets``."""
    return OmegaConf.to_container(OmegaConf.structured(cfg if secrets else without_credentials(cfg)))


def from_dict(d: dict, overrides: list[str] | None = None) -> RecipeConfig:
    """Rebuild a RecipeConfig from to_dict's output (as stored in checkpoints), plus overrides."""
    return resolve(d, d.get("recipe", "checkpoint"), overrides)
