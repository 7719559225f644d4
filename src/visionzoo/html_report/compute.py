"""The model pass behind a full report: load the run's weights, predict the validation split
(classifier or DINO k-NN), draw the DINO extras, and cache it all in RUN/predictions.npz."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionzoo.errors import UserError
from visionzoo.html_report import attention
from visionzoo.html_report.predictions import (
    ATTENTION_IMAGES,
    CACHE,
    NEIGHBOUR_QUERIES,
    NEIGHBOURS,
    PassSettings,
    Predictions,
    classifier_scores,
    knn_scores,
    predict_split,
    thumbnail,
    unnormalise,
)

if TYPE_CHECKING:
    from visionzoo.config import RecipeConfig


def cache_key(weights: Path, cfg: RecipeConfig, max_images: int) -> str:
    """What a cached prediction set depends on: the weights file (path, size, modification
    time), the validation data and its preprocessing, and the grid size."""
    st = weights.stat()
    d = cfg.data
    return json.dumps({"weights": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "data": [d.name, d.path, d.val, d.test_resize, d.test_size, d.interpolation, d.eval_draft],
                       "knn": [cfg.dino.knn_report_k, cfg.dino.knn_temperature] if cfg.task == "dino" else None,
                       "max_images": max_images}, sort_keys=True)


def cached_predictions(run_dir: Path, overrides: list[str], max_images: int,
                       progress: str = "auto") -> tuple[Predictions, str]:
    """The run's predictions: from predictions.npz when it was made from the same weights and
    data, else from one pass (then saved). Returns them and a note saying which."""
    from visionzoo.checkpoint import command_config, resolve_weights

    weights = resolve_weights(run_dir)
    cfg, meta = command_config(str(run_dir), overrides)
    key = cache_key(weights, cfg, max_images)
    cache = run_dir / CACHE
    if cache.is_file():
        try:
            cached = Predictions.load(cache)
        except (OSError, ValueError, KeyError):  # an unreadable cache is recomputed
            cached = None
        if cached is not None and cached.key == key:
            return cached, f"read from {CACHE} (same weights and data)"
    pred = predict_run(weights, cfg, meta, max_images, progress)
    pred.key = key
    pred.save(cache)
    return pred, f"one pass over the split, saved as {CACHE}"


def predict_run(weights: Path, cfg: RecipeConfig, meta: dict, max_images: int, progress: str = "auto") -> Predictions:
    """One pass over the validation split of ``cfg.data`` with the model of ``weights``."""
    from visionzoo.checkpoint import load_model
    from visionzoo.runtime import resolve_amp, resolve_device, select_device

    device = resolve_device(cfg.train.device)
    select_device(device)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    run = PassSettings(device, resolve_amp(cfg.train.amp, device), memory_format, progress)
    model, meta = load_model(weights)
    model = model.eval()
    if meta.get("task", cfg.task) == "dino":
        return _predict_dino(model, cfg, replace(run, memory_format=torch.contiguous_format), max_images)
    from visionzoo.data.loading.build import build_datasets, build_loaders
    from visionzoo.data.sources.table import data_source

    splits = build_datasets(cfg.data, train=False)
    if not data_source(cfg.data.name).generated and splits.classes != meta["classes"]:
        raise UserError(f"the data's {len(splits.classes)} classes are not the {len(meta['classes'])} "
                        f"classes the checkpoint was trained on")
    _, loader = build_loaders(splits, cfg.data, cfg.data.batch_size, device, memory_format=memory_format)
    model = model.to(device, memory_format=memory_format)
    pred, _, _ = predict_split(classifier_scores(model), loader, run, cfg.data, list(meta["classes"]),
                               "classifier", max_images)
    return pred


def _predict_dino(model: nn.Module, cfg: RecipeConfig, run: PassSettings, max_images: int) -> Predictions:
    """k-NN predictions of a DINO teacher backbone, its attention maps and neighbours."""
    from torch.utils.data import IterableDataset

    from visionzoo.data.loading.build import build_loader
    from visionzoo.engine.evaluation.knn import eval_splits, extract_features

    d, dc, device = cfg.data, cfg.dino, run.device
    model = model.to(device)
    train_ds, val_ds, classes = eval_splits(d)
    bank, bank_labels = extract_features(model, train_ds, d.batch_size, d.workers, device, run.amp_dtype)
    bank = F.normalize(bank, dim=1)
    loader = build_loader(val_ds, d.batch_size, d.workers, train=False, device=device)
    score = knn_scores(model, bank, bank_labels, dc.knn_report_k, dc.knn_temperature, len(classes))
    keep = max(ATTENTION_IMAGES, NEIGHBOUR_QUERIES)
    pred, inputs, labels = predict_split(score, loader, run, d, list(classes), "knn", max_images, keep_inputs=keep)
    if inputs is None:
        return pred
    to_uint8 = unnormalise(d.mean, d.std)
    x = inputs.to(device)
    if attention.is_vit(model):
        maps, of = attention.feature_attention(model, x[:ATTENTION_IMAGES])
        pred.attention = {"images": np.stack([to_uint8(i) for i in x[:ATTENTION_IMAGES]]),
                          "maps": attention.as_numpy(maps), "masks": attention.mass_mask(maps).cpu().numpy(),
                          "of": np.array(of)}
    if not isinstance(train_ds, IterableDataset):
        with torch.no_grad():
            sims, idx = attention.nearest_training_images(model(x[:NEIGHBOUR_QUERIES]).float(), bank, NEIGHBOURS)
        neighbours = [[_train_image(train_ds, int(i)) for i in row] for row in idx.cpu().tolist()]
        pred.knn = {"queries": np.stack([to_uint8(i) for i in x[:NEIGHBOUR_QUERIES]]),
                    "query_labels": labels[:NEIGHBOUR_QUERIES].numpy(),
                    "neighbours": np.stack([np.stack(r) for r in neighbours]),
                    "sims": sims.cpu().numpy().astype(np.float32),
                    "labels": bank_labels[idx].cpu().numpy()}
    return pred


def _train_image(ds: Dataset, index: int) -> np.ndarray:
    """Training image ``index`` as its (evaluation-preprocessed) uint8 [H, W, C] thumbnail."""
    item = ds[index]
    img = item[0] if item is not None else None
    if not isinstance(img, torch.Tensor):
        raise UserError(f"training image {index} could not be read for the neighbour grid")
    return thumbnail(img.permute(1, 2, 0).contiguous().numpy())
