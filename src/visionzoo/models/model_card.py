"""The model card (README.md) of an exported model folder, in the Hugging Face Hub's conventions:
YAML metadata (library, tags, license, datasets, a ``model-index`` with the run's results, written
by huggingface_hub's ``ModelCardData``), then what the weights are, the results beside the
seed's target, how they were trained (recipe, resolved hyper-parameters, data, devices,
precision, time), the command that trains them again and how to load them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from visionzoo.config import RecipeConfig, to_dict
from visionzoo.version import __version__

if TYPE_CHECKING:  # the hf export extra
    from huggingface_hub import ModelCardData

# visionzoo's data set names -> (Hub data set id, display name, evaluated split).
HUB_DATASETS = {
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST", "test"),
    "mnist": ("ylecun/mnist", "MNIST", "test"),
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10", "test"),
    "cifar100": ("uoft-cs/cifar100", "CIFAR-100", "test"),
}
IMAGENET = ("ILSVRC/imagenet-1k", "ImageNet-1k", "validation")
HPARAM_SECTIONS = ("data", "model", "optim", "schedule", "train")  # + dino for DINO runs


def dataset(cfg: RecipeConfig) -> tuple[str | None, str, str]:
    """(Hub id or None, name, split) of the data a recipe evaluates on. The ImageNet recipes read
    an ImageFolder: their name (``*_imagenet``) and 1000 classes say which."""
    d = cfg.data
    if d.name in HUB_DATASETS:
        return HUB_DATASETS[d.name]
    if cfg.recipe.endswith("_imagenet") and d.num_classes == 1000:
        return IMAGENET
    return None, d.name, "validation"


def measured(meta: dict, results: dict | None) -> dict:
    """The numbers this card reports: results.json's when the exported weights are the run's
    final ones, else the checkpoint's own Acc@1 and epoch (its metadata)."""
    if results:
        return dict(results)
    return {"Acc@1": meta.get("acc1"), "epochs": meta.get("epoch")}


def _num(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def results_rows(cfg: RecipeConfig, meta: dict, results: dict | None) -> list[tuple[str, str, str]]:
    """The results table's rows: (metric, this run, the seed's target)."""
    r = measured(meta, results)
    how = f" ({r['eval']})" if r.get("eval") else ""  # DINO runs: "k-NN k=20"
    rows = [(f"Acc@1{how}", _num(r.get("Acc@1")), cfg.seed_target or "-")]
    if r.get("Acc@5") is not None:
        rows.append(("Acc@5", _num(r["Acc@5"]), "-"))
    if r.get("FPS") is not None:
        rows.append(("training images/s", _num(r["FPS"]), "-"))
    if r.get("epochs") is not None:
        rows.append(("epochs", _num(r["epochs"]), str(cfg.train.epochs)))
    return rows


def card_data(cfg: RecipeConfig, meta: dict, results: dict | None) -> ModelCardData:
    """huggingface_hub's ModelCardData: library, tags, license, data set, and the model-index
    (top-1 and top-5 accuracy in %, as results.json gives them)."""
    from huggingface_hub import EvalResult, ModelCardData

    args, features = meta["model"], meta.get("task") == "dino"
    hub_id, name, split = dataset(cfg)
    task = "image-feature-extraction" if features else "image-classification"
    r = measured(meta, results)
    evals = []
    for key, metric, label in (("Acc@1", "accuracy", "Top-1 accuracy (%)"), ("Acc@5", "top_5_accuracy",
                                                                             "Top-5 accuracy (%)")):
        if r.get(key) is not None:
            label = f"{r['eval']} top-{key[-1]} accuracy (%)" if r.get("eval") else label
            evals.append(EvalResult(task_type=task, dataset_type=hub_id or name, dataset_name=name,
                                    dataset_split=split, metric_type=metric, metric_value=float(r[key]),
                                    metric_name=label))
    return ModelCardData(
        library_name="timm" if args["library"] == "timm" else None, license="other", pipeline_tag=task,
        tags=[task, "visionzoo", args["library"], cfg.recipe], datasets=[hub_id] if hub_id else None,
        model_name=cfg.recipe, eval_results=evals or None)


def _what(cfg: RecipeConfig, meta: dict) -> str:
    args = meta["model"]
    net = f"{args['library']} `{args['name']}`"
    if meta.get("task") == "dino":
        return f"The DINO teacher backbone ({net}, [CLS] features, no classifier) of visionzoo's `{cfg.recipe}` recipe"
    return f"A {net} classifier of {len(meta['classes'])} classes from visionzoo's `{cfg.recipe}` recipe"


def _training(cfg: RecipeConfig, meta: dict, results: dict | None, source: dict) -> list[str]:
    d, r = cfg.data, measured(meta, results)
    crop = f"resize {d.test_resize}, centre crop {d.test_size}" if d.test_resize > 0 else f"{d.test_size} px as stored"
    lines = [f"- **Recipe:** `{cfg.recipe}`: {cfg.description} (source: {cfg.source or 'visionzoo'})",
             f"- **Data:** {d.name} ({d.num_classes} classes) from `{d.path}`; training at {d.image_size} px "
             f"({d.augment} augmentation); evaluation: {crop}, {d.interpolation}, mean {list(d.mean)}, "
             f"std {list(d.std)} (0-255 units)"]
    if results:
        lines += [f"- **Devices:** {r.get('devices', '-')} x {r.get('device', '-')}",
                  f"- **Precision:** {r.get('precision', '-')}",
                  f"- **Time:** {_num(r.get('E2ETrainingTime'), 1)} s end to end, {r.get('steps', '-')} steps, "
                  f"{_num(r.get('epochs'))} epochs (global batch {r.get('batch_size', d.batch_size)})",
                  f"- **Software:** torch {r.get('torch', '-')}"]
    lines.append(f"- **Weights:** `{source['path']}` (sha256 `{source['sha256']}`)"
                 + (f", epoch {_num(meta.get('epoch'))}" if meta.get("epoch") is not None else ""))
    return lines


def _reproduce(cfg: RecipeConfig, results: dict | None, source: dict) -> list[str]:
    if source.get("weights_of"):  # weights visionzoo did not train: the export is what reproduces the folder
        return ["These weights were not trained here; the folder is made again with", "", "```bash",
                f"visionzoo export --weights {source['path']} --recipe {cfg.recipe} --format hf", "```"]
    devices = int((results or {}).get("devices") or 1)
    flag = f" --devices {devices}" if devices > 1 else ""
    return ["`recipe.yaml` beside this card is the run's resolved recipe; on the same number of devices it "
            "trains the same model again:", "", "```bash",
            f"visionzoo train recipe.yaml --data {cfg.data.path or '<data folder>'}{flag}", "```"]


def _usage(meta: dict) -> list[str]:
    args = meta["model"]
    lines = ["```python", "import visionzoo", "", 'model, preprocess, classes = visionzoo.load("PATH")  # this folder',
             "```"]
    if args["library"] == "timm":
        lines += ["", "```python", "import timm", "",
                  'model = timm.create_model("local-dir:PATH", pretrained=True).eval()  # or "hf-hub:USER/REPO"',
                  "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
                  "```"]
    elif args["library"] == "torchvision":
        lines += ["", "```python", "import torchvision", "from safetensors.torch import load_file", "",
                  f"model = torchvision.models.{args['name']}(num_classes={args['num_classes']})",
                  'model.load_state_dict(load_file("PATH/model.safetensors"))', "```"]
    return lines


def model_card(cfg: RecipeConfig, meta: dict, results: dict | None, source: dict, files: dict[str, str]) -> str:
    """README.md of the folder. ``meta``: the checkpoint's metadata (model args, classes, task,
    epoch, acc1); ``results``: the run's results.json when the weights are its final ones;
    ``source``: path and sha256 of the exported weights (``weights_of``: they came with
    --weights); ``files``: name -> sha256 of the folder's files."""
    rows = results_rows(cfg, meta, results)
    sections = ["dino"] if meta.get("task") == "dino" else []
    hparams = {k: v for k, v in to_dict(cfg).items() if k in (*HPARAM_SECTIONS, *sections)}
    _, data_name, split = dataset(cfg)
    text = ["---", card_data(cfg, meta, results).to_yaml(), "---", "", f"# {cfg.recipe}", "",
            f"{_what(cfg, meta)}, exported by visionzoo {__version__}.", "",
            "## Results", "", f"On the {data_name} {split} split.", "",
            "| metric | this run | seed target |", "|---|---|---|",
            *(f"| {m} | {v} | {t} |" for m, v, t in rows), "",
            "## Training", "", *_training(cfg, meta, results, source), "",
            "Resolved hyper-parameters:", "", "```yaml", yaml.safe_dump(hparams, sort_keys=False).rstrip(), "```", "",
            "## Reproduce", "", *_reproduce(cfg, results, source), "",
            "## Use", "", *_usage(meta), "",
            "## Files", "", "| file | sha256 |", "|---|---|", *(f"| {n} | `{h}` |" for n, h in files.items()), "",
            "## License", "", "Set `license:` in the metadata above before publishing: trained weights are licensed "
            "by their owner, within the terms of the training data (ImageNet's: non-commercial research only).", ""]
    return "\n".join(text)
