"""Typed configuration: dataclasses are the schema, one YAML per recipe fills them in, and
dotted ``key=value`` overrides change any field. Unknown keys and wrong types are user errors
that name the closest valid key.

Resolution order: dataclass defaults < recipe YAML < command-line overrides.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from visionzoo.errors import UserError
from visionzoo.ranges import RANGES, check_range
from visionzoo.redaction import without_credentials

AMP_MODES = ("auto", "none", "bf16", "fp16", "fp64")
DATASETS = ("imagefolder", "cifar10", "cifar100", "fashion_mnist", "mnist", "synthetic", "webdataset", "hfds")


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

    name: str = "imagefolder"  # one of DATASETS
    path: Optional[str] = None  # folder of the data set; None: the data set's default location
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
    # device has workers read file bytes only and decodes (nvJPEG on CUDA), crops, flips and
    # normalises each batch on the training device (augment=imagenet, no randaugment).
    decode: str = "cpu"
    # data.decode=cpu: decode a training JPEG at 1/2, 1/4 or 1/8 of its size (Pillow's draft
    # mode) when the random crop shrinks it at least that much; false: always in full.
    draft: bool = True
    # The same for the eval resize (eval, knn, linear, infer). Off: Acc@1 is measured on fully
    # decoded pixels, as the references measure it.
    eval_draft: bool = False
    in_chans: int = 3
    # Train-time augmentation.
    augment: str = "imagenet"  # imagenet: RandomResizedCrop; cifar: pad + RandomCrop; none
    image_size: int = 224  # train crop size, pixels
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    crop_padding: int = 4  # pixels of zero padding before RandomCrop (augment=cifar)
    hflip: float = 0.5  # probability of a horizontal flip
    randaugment: Optional[str] = None  # timm RandAugment string, e.g. rand-m9-n2-mstd0.5
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
    train: Optional[str] = None
    val: Optional[str] = None
    shuffle_buffer: int = 2048  # samples each loader worker shuffles among (after a per-epoch shard order)
    io_timeout: float = 60.0  # seconds a shard URL may take to answer or to send more bytes
    io_retries: int = 2  # re-opens of a remote shard that broke off, continuing where it stopped
    scan_cache: bool = True  # imagefolder: cache the file list (data/sources/scan_cache.py)

    def __post_init__(self) -> None:
        _check(self.name, DATASETS, "data.name")
        _check(self.augment, ("imagenet", "cifar", "none"), "data.augment")
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
    weights: Optional[str] = None
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
    lr: float = 0.1  # peak learning rate for the global batch data.batch_size
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = 1e-4
    wd_exclude_bias_norm: bool = False  # no weight decay on biases and normalisation gains
    # No weight decay on parameters whose own name (the part after the last dot) contains one of
    # these strings, e.g. [gain, bias] as DeepMind's NFNets.
    wd_exclude: list[str] = field(default_factory=list)
    clip_mode: str = "none"  # none | norm | value | agc (adaptive gradient clipping, NFNet)
    clip_value: float = 0.0  # max norm (norm), max value (value), or clip factor (agc)
    agc_exclude: list[str] = field(default_factory=list)  # parameter-name prefixes AGC skips

    def __post_init__(self) -> None:
        _check(self.name, ("sgd", "adamw"), "optim.name")
        _check(self.clip_mode, ("none", "norm", "value", "agc"), "optim.clip_mode")


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
                raise UserError(f"train.loss_scale must be 'dynamic' or a number, got {self.loss_scale!r}")
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
            raise UserError("dino.color_jitter needs 4 values (b, c, s, h) and dino.blur_p 3 (global 1, global 2, local)")
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
    mlflow_uri: Optional[str] = None  # set: MLflow is on
    wandb: bool = False  # Weights & Biases (WANDB_MODE=offline writes RUN/wandb/ only; WANDB_PROJECT)

    def __post_init__(self) -> None:
        if self.progress in (False, "False", "false"):  # YAML reads a bare `off` as false
            self.progress = "off"
        _check(self.progress, ("auto", "bar", "lines", "off"), "log.progress")


@dataclass
class RecipeConfig:
    """A whole recipe: everything a run needs, saved as config.yaml in the run folder."""

    recipe: str = ""
    task: str = "supervised"  # supervised | dino (self-supervised: see DinoConfig)
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
    output: Optional[str] = None  # run folder; None: runs/<recipe>-<timestamp>

    def __post_init__(self) -> None:
        _check(self.task, ("supervised", "dino"), "task")
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


def _explain(err: OmegaConfBaseException, schema: DictConfig, where: str) -> UserError:
    """Turn an OmegaConf error into one line that names the key and the closest valid one."""
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(key, _all_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return UserError(f"{where}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return UserError(f"{where}: bad value for '{key}': {msg}")
    return UserError(f"{where}: {str(err).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, base, where) from None


def resolve(base: Any, name: str, overrides: list[str] | None = None) -> RecipeConfig:
    """Merge ``base`` (a recipe mapping) over the defaults, then ``key=value`` overrides."""
    schema = OmegaConf.structured(RecipeConfig)
    cfg = _merge(schema, base, f"recipe {name}")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.1)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise UserError(f"override '{item}': {str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, dot, f"override '{item}'")
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
    ``data.batch_size_per_device`` set, the per-device batch is kept instead, the global batch
    grows with the device count, and ``optim.lr`` follows the linear scaling rule
    (lr x new global batch / recipe global batch)."""
    cfg = copy.deepcopy(cfg)
    d, accum = cfg.data, cfg.train.accum_steps
    if d.batch_size_per_device > 0:
        new_global = d.batch_size_per_device * world_size * accum
        cfg.optim.lr = cfg.optim.lr * new_global / d.batch_size
        d.batch_size = new_global
    else:
        if d.batch_size % (world_size * accum):
            raise UserError(f"data.batch_size={d.batch_size} (global) does not split into {world_size} "
                            f"device(s) x {accum} accumulation step(s); set data.batch_size_per_device instead")
        d.batch_size_per_device = d.batch_size // (world_size * accum)
    return cfg


def absolute_data_path(path: Optional[str]) -> Optional[str]:
    """``data.path`` as an absolute path when it names a local file or folder (so a run's config,
    checkpoints and exports work from any directory); URLs, shard patterns and None unchanged."""
    if not path or "://" in path or path.startswith("pipe:") or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def to_yaml(cfg: RecipeConfig, secrets: bool = False) -> str:
    """The resolved config as YAML (what `recipes --show` prints and runs save), the tracking URI's
    credentials redacted unless ``secrets`` (a config handed to this process's own workers)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg if secrets else without_credentials(cfg)))


def to_dict(cfg: RecipeConfig, secrets: bool = False) -> dict:
    """The resolved config as plain Python containers (stored inside checkpoints, given to the
    trackers), the tracking URI's credentials redacted unless ``secrets``."""
    return OmegaConf.to_container(OmegaConf.structured(cfg if secrets else without_credentials(cfg)))


def from_dict(d: dict, overrides: list[str] | None = None) -> RecipeConfig:
    """Rebuild a RecipeConfig from to_dict's output (as stored in checkpoints), plus overrides."""
    return resolve(d, d.get("recipe", "checkpoint"), overrides)
