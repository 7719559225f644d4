"""One pass over a run's validation split: every image's top-k classes and probabilities, the
images the report's grids show, and (DINO runs) attention maps and k-NN neighbours, cached in
the run folder as ``predictions.npz`` so later reports reuse them.

Classifier runs predict with their classifier (softmax of the logits, the precision and
preprocessing ``visionzoo eval`` uses). DINO runs have no classifier: the teacher backbone's
weighted k-NN vote over the training split (dino.knn_report_k, dino.knn_temperature, as
``visionzoo knn``), normalised to sum 1, is the class distribution.

The grids' images are kept while the pass runs (a bounded set, best candidates so far), taken
from the normalised batch itself, so they are exactly what the model saw and any loader works
(shard streams too)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionzoo.errors import UserError
from visionzoo.progress import Progress

if TYPE_CHECKING:
    from visionzoo.config import DataConfig
    from visionzoo.data.loading.build import Loader

CACHE = "predictions.npz"
TOPK = 5
ATTENTION_IMAGES = 4  # validation images whose DINO attention maps are drawn
NEIGHBOUR_QUERIES = 4  # validation images shown with their nearest training images
NEIGHBOURS = 5


@dataclass
class Predictions:
    """What one pass over the validation split found (the contents of predictions.npz)."""

    classes: list[str]
    kind: str  # classifier | knn
    targets: np.ndarray  # [N] int64
    topk: np.ndarray  # [N, K] int64, most probable first
    topk_prob: np.ndarray  # [N, K] float32
    key: str = ""  # what the cache was made from (weights file, data); a different key recomputes
    # Grids: name -> arrays "images" [M, H, W, C] uint8, "target" [M], "pred" [M], "prob" [M].
    grids: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # DINO: "images" [A, H, W, C] uint8, "maps" [A, heads, h, w] float32 (attention of [CLS] on the
    # patches, or the patch tokens' mean attention for a ViT that pools them), "masks" [A, heads, h, w]
    # bool (the 60% mass threshold), "of" [] str (whose attention: the figure's title).
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    # DINO: "queries" [Q, H, W, C], "neighbours" [Q, 5, H, W, C] uint8, "sims" [Q, 5], "labels" [Q, 5],
    # "query_labels" [Q].
    knn: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def preds(self) -> np.ndarray:
        return self.topk[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        return self.topk_prob[:, 0]

    def save(self, path: Path) -> None:
        arrays = {"targets": self.targets, "topk": self.topk, "topk_prob": self.topk_prob,
                  "meta": np.array(json.dumps({"classes": self.classes, "kind": self.kind, "key": self.key}))}
        for group, content in (("grid", self.grids), ("attention", {"": self.attention}), ("knn", {"": self.knn})):
            for name, arrs in content.items():
                for k, v in arrs.items():
                    arrays[f"{group}/{name}/{k}"] = v
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            p = cls(meta["classes"], meta["kind"], z["targets"], z["topk"], z["topk_prob"], meta["key"])
            for name in z.files:
                if "/" not in name:
                    continue
                group, sub, k = name.split("/")
                if group == "grid":
                    p.grids.setdefault(sub, {})[k] = z[name]
                else:
                    getattr(p, group)[k] = z[name]
        return p


class TopImages:
    """The ``m`` images with the highest scores offered so far, with their labels."""

    def __init__(self, m: int):
        self.m = m
        self.score = np.empty(0)
        self.images: list[np.ndarray] = []
        self.rows: list[tuple[int, int, float]] = []  # target, pred, prob

    def offer(self, score: np.ndarray, images: torch.Tensor, target: np.ndarray, pred: np.ndarray,
              prob: np.ndarray, to_uint8: Callable[[torch.Tensor], np.ndarray]) -> None:
        """Candidates of one batch: ``score`` [B] (NaN: not a candidate); ``images`` only the
        chosen ones are converted (``to_uint8``)."""
        if self.m <= 0:
            return
        cand = np.flatnonzero(~np.isnan(score))
        if len(cand) == 0:
            return
        all_scores = np.concatenate([self.score, score[cand]])
        keep = np.argsort(-all_scores, kind="stable")[: self.m]
        old = len(self.score)
        new_imgs = {int(i): to_uint8(images[cand[i - old]]) for i in keep if i >= old}
        self.images = [self.images[i] if i < old else new_imgs[int(i)] for i in keep]
        self.rows = [self.rows[i] if i < old else (int(target[cand[i - old]]), int(pred[cand[i - old]]),
                                                      float(prob[cand[i - old]])) for i in keep]
        self.score = all_scores[keep]

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.images:
            return {}
        t, p, q = zip(*self.rows, strict=True)  # rows of (target, pred, prob)
        return {"images": np.stack(self.images), "target": np.array(t), "pred": np.array(p),
                "prob": np.array(q, dtype=np.float32)}


THUMBNAIL = 128  # pixels, longer side: the page stays small whatever the crop size


def thumbnail(img: np.ndarray) -> np.ndarray:
    """A uint8 [H, W, C] image shrunk to at most THUMBNAIL pixels on its longer side."""
    h, w = img.shape[:2]
    if max(h, w) <= THUMBNAIL:
        return img
    from PIL import Image

    scale = THUMBNAIL / max(h, w)
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    small = np.asarray(pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    return small[..., None] if small.ndim == 2 else small


def unnormalise(mean: list[float], std: list[float]) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from one normalised [C, H, W] tensor back to the uint8 [H, W, C] thumbnail."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        img = (x.detach().float().cpu() * s + m).round().clamp(0, 255).to(torch.uint8)
        return thumbnail(img.permute(1, 2, 0).numpy())
    return to_uint8


Scores = Callable[[torch.Tensor], torch.Tensor]  # normalised images [B, C, H, W] -> class probabilities [B, K]


@dataclass(frozen=True)
class PassSettings:
    """How a pass over a split runs: batches on ``device`` in ``memory_format``, under autocast to
    ``amp_dtype`` (None: float32), with a progress bar as ``progress`` says (Progress)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    progress: str = "off"


@torch.no_grad()
def predict_split(score_fn: Scores, loader: Loader, run: PassSettings, d: DataConfig, classes: list[str],
                  kind: str, max_images: int,
                  keep_inputs: int = 0) -> tuple[Predictions, torch.Tensor | None, torch.Tensor | None]:
    """Run ``score_fn`` over ``loader``; keep the ``max_images`` most confident mistakes and least
    confident correct predictions, and the first ``keep_inputs`` inputs (normalised, on the CPU)
    with their labels."""
    device = run.device
    autocast = torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext()
    to_uint8 = unnormalise(d.mean, d.std)
    k = min(TOPK, len(classes))
    targets, topk, topk_prob, kept, kept_labels = [], [], [], [], []
    mistakes, unsure = TopImages(max_images), TopImages(max_images)
    for images, labels, _ in Progress(loader, len(loader), "predict", run.progress, leave=False):
        if images.numel() == 0:
            continue
        x = images.to(device, non_blocking=True, memory_format=run.memory_format)
        with autocast:
            probs = score_fn(x)
        probs = probs.float()
        p, i = probs.topk(k, dim=1)
        p, i, y = p.cpu().numpy(), i.cpu().numpy(), labels.cpu().numpy()
        targets.append(y), topk.append(i), topk_prob.append(p)
        wrong = i[:, 0] != y
        mistakes.offer(np.where(wrong, p[:, 0], np.nan), images, y, i[:, 0], p[:, 0], to_uint8)
        unsure.offer(np.where(~wrong, -p[:, 0], np.nan), images, y, i[:, 0], p[:, 0], to_uint8)
        have = sum(len(t) for t in kept)
        if have < keep_inputs:
            kept.append(images[: keep_inputs - have].float().cpu())
            kept_labels.append(labels[: keep_inputs - have].cpu())
    if not targets:
        raise UserError("no readable validation images to predict")
    pred = Predictions(classes, kind, np.concatenate(targets).astype(np.int64), np.concatenate(topk).astype(np.int64),
                       np.concatenate(topk_prob).astype(np.float32))
    pred.grids = {name: a for name, a in (("mistakes", mistakes.arrays()), ("unsure", unsure.arrays())) if a}
    return pred, (torch.cat(kept) if kept else None), (torch.cat(kept_labels) if kept else None)


def classifier_scores(model: nn.Module) -> Scores:
    """Softmax of a classifier's logits."""
    return lambda x: model(x).float().softmax(dim=1)


def knn_scores(backbone: nn.Module, bank: torch.Tensor, bank_labels: torch.Tensor, k: int, temperature: float,
               num_classes: int) -> Scores:
    """The weighted k-NN vote of ``engine/evaluation/knn.py`` (weights exp(cos / T) of the k most similar
    training features), normalised to sum 1, as class probabilities. ``bank``: L2-normalised."""
    kk = min(k, bank.shape[0])

    def score(x: torch.Tensor) -> torch.Tensor:
        q = F.normalize(backbone(x).float(), dim=1)
        sim, idx = (q @ bank.T).topk(kk, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        return votes / votes.sum(dim=1, keepdim=True)
    return score
