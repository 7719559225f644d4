"""The Python API, for notebooks and scripts; the CLI calls the same functions.

    import visionzoo
    visionzoo.recipes()                                       # names of the shipped recipes
    cfg = visionzoo.load_recipe("fashion_mnist", train={"epochs": 2}, optim__lr=0.05)
    run = visionzoo.train(cfg, data="/usr/share/datasets/fashion-mnist", device="cpu")
    model, preprocess, classes = visionzoo.load(run)
    visionzoo.predict(run, ["shoe.png"], topk=3)
    run.report()                                              # RUN/report/index.html

Overrides are keyword arguments: a dict per config section (``optim={"lr": 0.2}``), or a dotted
key with ``__`` for the dot (``optim__lr=0.2``), the CLI's flag names (``epochs``, ``batch_size``,
``lr``, ``workers``, ``seed``, ``amp``, ``device``), or ``key=value`` strings as on the command line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, RecipeConfig


def _value(v: Any) -> str:
    """A Python value as an override's right-hand side (OmegaConf's dot-list syntax)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def overrides_from(args: Iterable[str] = (), kwargs: dict | None = None) -> list[str]:
    """``key=value`` strings from positional strings and keyword arguments (dicts are flattened
    into dotted keys, ``__`` in a name is a dot)."""
    out = list(args)

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and "." not in prefix:  # a section: optim={"lr": 0.2}
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        elif isinstance(value, dict):  # a dict-valued key (model.kwargs={...})
            out.append(f"{prefix}={_value(value)}")
        else:
            out.append(f"{prefix}={_value(value)}")
    from visionzoo.config import FLAG_ALIASES  # epochs, batch_size, lr, workers, seed, amp, device

    for key, value in (kwargs or {}).items():
        add(FLAG_ALIASES.get(key, key.replace("__", ".")), value)
    return out


def load_recipe(name: str, *overrides: str, **kw: Any) -> RecipeConfig:
    """A recipe (shipped name or YAML path) resolved with overrides: a ``RecipeConfig``
    dataclass, the object ``visionzoo train`` runs (``visionzoo recipes --show`` prints it)."""
    from visionzoo.config import load_config

    return load_config(name, overrides_from(overrides, kw))


@dataclass
class Run:
    """A training run: its folder and results (results.json)."""

    path: Path
    results: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        p = Path(path).expanduser()
        res = p / "results.json"
        return cls(p, json.loads(res.read_text()) if res.is_file() else {})

    @property
    def config(self) -> RecipeConfig:
        """The run's resolved config (config.yaml)."""
        from visionzoo.config import load_config

        return load_config(str(self.path / "config.yaml"))

    @property
    def table(self) -> str:
        """The results row as a Markdown table (what ``visionzoo train`` prints at the end)."""
        from visionzoo.run_folder import format_table

        return format_table([self.results]) if self.results else f"{self.path}: no results yet"

    def _repr_markdown_(self) -> str:  # a notebook cell that ends with the run shows its table
        return f"`{self.path}`\n\n{self.table}"

    def report(self, max_images: int = 24, **overrides: Any) -> Path:
        """Write RUN/report/index.html (as ``visionzoo report RUN``); return its path."""
        from visionzoo.html_report.build import write_report

        return write_report(self.path, overrides_from((), overrides), max_images=max_images)

    def __fspath__(self) -> str:
        return str(self.path)


def fit_config(cfg: RecipeConfig, perf: bool = False, resume_dir: Path | None = None, summary: bool = True) -> dict:
    """Train a resolved config in this process (one device, or one rank under torchrun) through
    the run lifecycle (engine/run.py) with its task; ``summary``: print the results table at the
    end (the CLI does; ``train`` returns it). Returns results.json's dict."""
    from visionzoo.engine.run import fit
    from visionzoo.html_report.build import report_at_end  # the cheap page, when a full run ends

    return fit(cfg, perf=perf, resume_dir=resume_dir, on_finished=report_at_end, summary=summary)


def train(recipe_or_cfg: str | Path | RecipeConfig, *overrides: str, data: str | None = None, devices: int = 1,
          output: str | None = None, perf: bool = False, resume: str | Path | None = None, summary: bool = False,
          **kw: Any) -> Run:
    """Train a recipe (name, YAML path or ``load_recipe``'s config) with overrides, as
    ``visionzoo train``; ``data`` is the data folder (or "synthetic"), ``devices`` > 1 launches
    that many worker processes; ``resume`` ("auto" or a run folder) continues a run exactly as
    ``visionzoo train --resume`` does (a finished run is returned as it is). Progress is a bar
    in a notebook or on a terminal (log.progress); the results table is the returned ``Run``'s
    (``run.table``, shown when a notebook cell ends with the run), printed only with ``summary``."""
    from visionzoo.config import RecipeConfig, from_dict, load_config, to_dict
    from visionzoo.engine.resume import plan_resume
    from visionzoo.engine.tasks import check_task

    extra = overrides_from(overrides, kw)
    if data:
        extra.insert(0, "data.name=synthetic" if data == "synthetic" else f"data.path={data}")
    if output:
        extra.append(f"output={output}")
    if isinstance(recipe_or_cfg, RecipeConfig):
        cfg = from_dict(to_dict(recipe_or_cfg, secrets=True), extra)  # credentials kept in this process
    else:
        cfg = load_config(str(recipe_or_cfg), extra)
    check_task(cfg.task)
    plan = plan_resume(cfg, str(resume) if resume is not None else None, output or cfg.output, extra)
    if plan.note:
        print(f"visionzoo: {plan.note}", flush=True)
    if plan.finished is not None:
        return Run(plan.finished_dir, plan.finished)
    if devices > 1:
        return _train_launched(plan.cfg, devices, perf, plan.resume_dir)
    results = fit_config(plan.cfg, perf=perf, resume_dir=plan.resume_dir, summary=summary)
    return Run(Path(results["run_dir"]), results)


def _train_launched(cfg: RecipeConfig, devices: int, perf: bool, resume_dir: Path | None = None) -> Run:
    """``devices`` local workers through the CLI's launcher, on the resolved config (or
    continuing ``resume_dir``)."""
    import tempfile
    from datetime import datetime

    from visionzoo.config import to_yaml
    from visionzoo.engine.run import launch

    out = Path(resume_dir or cfg.output or Path("runs") / f"{cfg.recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with tempfile.TemporaryDirectory() as tmp:  # the workers read the resolved config from here
        recipe = Path(tmp) / f"{cfg.recipe}.yaml"
        recipe.write_text(to_yaml(cfg, secrets=True))  # for this run's own workers only
        argv = ["train", str(recipe), "--devices", str(devices)] + (["--perf"] if perf else [])
        argv += ["--resume", str(out)] if resume_dir is not None else ["--output", str(out)]
        code = launch(cfg, devices, argv)  # what visionzoo train --devices N runs
    if code != 0:
        raise UserError(f"training on {devices} devices failed (exit code {code}); see the messages above")
    return Run.open(out)


class Loaded(NamedTuple):
    """What ``load`` returns: the network (eval mode, CPU), its preprocessing and class names."""

    model: Any
    preprocess: Any
    classes: list[str]


class Preprocess:
    """The recipe's evaluation preprocessing (resize, centre crop, normalise) as a callable: a PIL
    image, an image file path or a uint8 [C, H, W] / [H, W] tensor in, the model's float
    [C, H, W] input out. It is ``visionzoo eval``'s and ``visionzoo infer``'s
    (data/augment/presets.py EvalInput): an image of another size than a recipe that evaluates at
    the stored size (test_resize 0) is resized to it as infer does."""

    def __init__(self, data_cfg: DataConfig, in_chans: int):
        from visionzoo.data.augment.presets import EvalInput

        self.data, self.in_chans = data_cfg, in_chans
        self.input = EvalInput(data_cfg, in_chans)

    def __call__(self, image: Any):
        import torch
        from PIL import Image

        from visionzoo.data.sources.folder import DECODE_ERRORS

        if isinstance(image, (str, Path)):
            path = Path(image).expanduser()
            if not path.is_file():
                raise UserError(f"image not found: {path}")
            try:
                with Image.open(path) as img:
                    img.load()
                    image = img.copy()
            except DECODE_ERRORS as err:
                raise UserError(f"cannot decode image {path}: {str(err).splitlines()[0]}") from None
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise UserError(f"preprocess takes uint8 image tensors (0-255), got {image.dtype}")
            image = image.unsqueeze(0) if image.dim() == 2 else image
        elif not isinstance(image, Image.Image):
            raise UserError(f"preprocess takes a PIL image, a file path or a uint8 tensor, not {type(image).__name__}")
        return self.input(image)

    def __repr__(self) -> str:
        d = self.data
        return (f"Preprocess(resize={d.test_resize}, crop={d.test_size}, interpolation={d.interpolation}, "
                f"mean={list(d.mean)}, std={list(d.std)}, in_chans={self.in_chans})")


def load(run_or_weights: str | Path | Run, recipe: str | Path | RecipeConfig | None = None) -> Loaded:
    """A trained network: ``run_or_weights`` is a run folder, a ``Run`` or a visionzoo
    .safetensors file; with ``recipe`` (name, YAML or config) it is released weights in any
    format ``visionzoo eval --weights`` reads, put into that recipe's model. Returns
    ``(model, preprocess, classes)``."""
    from visionzoo.config import RecipeConfig, from_dict, to_yaml

    path = str(run_or_weights.path if isinstance(run_or_weights, Run) else run_or_weights)
    if recipe is None:
        from visionzoo.checkpoint import load_model

        model, meta = load_model(path)
    else:
        from visionzoo.commands.export import model_for_weights

        if isinstance(recipe, RecipeConfig):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the config as a recipe file command_config reads
                yaml = Path(tmp) / f"{recipe.recipe or 'recipe'}.yaml"
                yaml.write_text(to_yaml(recipe))
                model, meta = model_for_weights(None, path, str(yaml), [])
        else:
            model, meta = model_for_weights(None, path, str(recipe), [])
    cfg = from_dict(meta["config"])
    return Loaded(model.eval(), Preprocess(cfg.data, int(meta["model"]["in_chans"])), list(meta["classes"]))


def predict(model_or_run: Any, images: Any, topk: int = 5, batch_size: int = 64,
            device: str = "cpu") -> list[list[dict]]:
    """The ``topk`` classes of each image, most probable first: ``[{"class", "index", "prob"}, ...]``
    per image. ``model_or_run``: a run folder / ``Run`` / weights file (loaded with ``load``) or
    ``load``'s result; ``images``: one or a list of PIL images, file paths or uint8 tensors, or a
    float batch [N, C, H, W] already preprocessed."""
    import torch

    if isinstance(model_or_run, tuple) and len(model_or_run) == 3:  # load's result, also as a plain tuple
        loaded = Loaded(*model_or_run)
    else:
        loaded = load(model_or_run)
    if not loaded.classes:
        raise UserError("this model has no classifier (a DINO backbone): use visionzoo knn or its features")
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        batch_items = list(images)
    else:
        many = isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.dim() == 4)
        items = images if many else [images]
        batch_items = [loaded.preprocess(i) for i in items]
    model = loaded.model.to(device)
    k = min(topk, len(loaded.classes))
    out: list[list[dict]] = []
    with torch.no_grad():
        for start in range(0, len(batch_items), batch_size):
            x = torch.stack(batch_items[start:start + batch_size]).to(device)
            p, i = model(x).float().softmax(1).topk(k, dim=1)
            for probs, idx in zip(p.tolist(), i.tolist(), strict=True):  # topk: k of each per image
                out.append([{"class": loaded.classes[c], "index": c, "prob": q}
                            for c, q in zip(idx, probs, strict=True)])
    return out
