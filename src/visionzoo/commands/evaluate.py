"""``visionzoo eval``, ``visionzoo knn`` and ``visionzoo linear``: a checkpoint (a run folder or a
.safetensors file) or released weights (``--weights FILE --recipe NAME``) evaluated on its data:
top-1/top-5 of the classifier, weighted k-NN or a linear probe on the frozen backbone."""

from __future__ import annotations

import torch

from visionzoo.engine.evaluation.knn import knn_eval
from visionzoo.engine.evaluation.linear_probe import train_linear
from visionzoo.engine.evaluation.topk import evaluate


def evaluate_checkpoint(checkpoint: str | None, overrides: list[str], weights: str | None = None,
                        recipe: str | None = None) -> dict:
    """``visionzoo eval``: rebuild the model of a checkpoint, evaluate it on the validation split
    of its data set (or the one ``overrides`` name), print and return the figures. With
    ``weights`` (any format models/weights.py reads), the model of ``recipe`` (or of the run
    folder) gets them and is evaluated on that data, whose classes it must have."""
    from visionzoo.checkpoint import command_config, load_model
    from visionzoo.data.loading.build import build_datasets, build_loaders
    from visionzoo.data.sources.table import data_source
    from visionzoo.errors import UserError
    from visionzoo.models.weights import model_from_weights
    from visionzoo.runtime import precision_name, resolve_amp, resolve_device, select_device, weights_dtype

    # The training config (or the recipe's), with this command's overrides (--data, --batch-size ...) on top.
    cfg, meta = command_config(checkpoint, overrides, weights, recipe)
    device = resolve_device(cfg.train.device)
    select_device(device)  # loaders' pin-memory thread and nvJPEG use the current device
    amp_dtype = resolve_amp(cfg.train.amp, device)
    splits = build_datasets(cfg.data, train=False)
    if weights:
        model, _ = model_from_weights(cfg.model, weights, len(splits.classes), cfg.data.in_chans)
    else:
        model, meta = load_model(checkpoint)
        if not data_source(cfg.data.name).generated and splits.classes != meta["classes"]:
            raise UserError(f"the data's {len(splits.classes)} classes are not the {len(meta['classes'])} "
                            f"classes the checkpoint was trained on")
    channels_last = cfg.model.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    _, loader = build_loaders(splits, cfg.data, cfg.data.batch_size, device, memory_format=memory_format)
    model = model.to(device, weights_dtype(cfg.train.amp), memory_format=memory_format)
    result = evaluate(model, loader, device, amp_dtype, channels_last, progress=cfg.log.progress)
    k = min(5, len(splits.classes))  # top-5 is top-k with fewer classes: named for what it is
    precision = precision_name(amp_dtype or weights_dtype(cfg.train.amp))
    print(f"{weights or checkpoint}: Acc@1 {result['acc1']:.2f}%  Acc@{k} {result['acc5']:.2f}%  "
          f"loss {result['loss']:.4f}  ({result['samples']} images, {precision} on {device})"
          + (f", {result['bad_images']} unreadable skipped" if result["bad_images"] else ""))
    return result


def _load(checkpoint: str | None, overrides: list[str], weights: str | None = None, recipe: str | None = None):
    """The backbone of a run folder / .safetensors file, or of ``weights`` (any format
    models/weights.py reads) in the model of ``recipe`` or of the run; its config (plus
    overrides), device and amp dtype."""
    from visionzoo.checkpoint import command_config, load_model
    from visionzoo.models.weights import model_from_weights
    from visionzoo.runtime import resolve_amp, resolve_device, select_device

    cfg, _ = command_config(checkpoint, overrides, weights, recipe)
    if weights:
        model, _ = model_from_weights(cfg.model, weights, 0, cfg.data.in_chans)
    else:
        model, _ = load_model(checkpoint)
    device = resolve_device(cfg.train.device)
    select_device(device)  # loaders' pin-memory thread and nvJPEG use the current device
    return model.to(device), cfg, device, resolve_amp(cfg.train.amp, device)


def knn_checkpoint(checkpoint: str | None, overrides: list[str], weights: str | None = None,
                   recipe: str | None = None) -> dict:
    """``visionzoo knn``: weighted k-NN of a checkpoint's backbone (or of ``weights``) on its (or
    --data's) data set."""
    from visionzoo.runtime import precision_name

    model, cfg, device, amp_dtype = _load(checkpoint, overrides, weights, recipe)
    res, classes = knn_eval(model, cfg.data, cfg.dino, device, amp_dtype, cfg.data.batch_size)
    print(f"{weights or checkpoint}: weighted k-NN, T={cfg.dino.knn_temperature}, {len(classes)} classes "
          f"({precision_name(amp_dtype)} on {device})")
    for k, (top1, top5) in res.items():
        print(f"  {k}-NN: Top1 {top1:.2f}%  Top5 {top5:.2f}%")
    return {k: {"top1": t1, "top5": t5} for k, (t1, t5) in res.items()}


def linear_checkpoint(checkpoint: str | None, overrides: list[str], weights: str | None = None,
                      recipe: str | None = None) -> dict:
    """``visionzoo linear``: train and evaluate a linear probe on a checkpoint's (or ``weights``')
    frozen backbone."""
    model, cfg, device, amp_dtype = _load(checkpoint, overrides, weights, recipe)
    for p in model.parameters():
        p.requires_grad = False
    res = train_linear(model, cfg.data, cfg.dino, device, amp_dtype)
    epochs = f"{cfg.dino.linear_epochs} epoch{'' if cfg.dino.linear_epochs == 1 else 's'}"
    print(f"{weights or checkpoint}: linear probe ({res['features']} features, {epochs}): "
          f"Acc@1 {res['acc1']:.2f}%  Acc@5 {res['acc5']:.2f}%  ({res['samples']} images)")
    return res
