"""Signs of a collapsing DINO run, measured on one batch: pure functions of the teacher's
outputs and of the backbone's features (no model, no training state).

DINO's two failure modes (Caron et al. 2021, section 5.3; main_dino.py's help strings):
without centring the sharpened teacher puts every image on one prototype (the entropy of its
*mean* output distribution falls to 0); with too much centring and too little sharpening every
output becomes uniform (each image's own entropy rises to log K). Either way the teacher's
output stops depending on the image: the mutual information between image and prototype,
H(mean output) - mean H(output), falls to 0. A collapsed backbone maps every image to (nearly)
one direction: the mean pairwise cosine of its L2-normalised features nears 1 and their
effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values)
nears 1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# A collapse, as ``collapse_warning`` reads the figures: the teacher's output tells at most this
# share of the information it could carry about the image (of log min(batch, K) nats) ...
MIN_INFO_FRACTION = 0.05
# ... or the backbone's features all point (nearly) one way.
MAX_FEATURE_COSINE = 0.99
MIN_EFFECTIVE_RANK = 2.0
PREFIX = "collapse_"  # of the figures' names in an epoch record (metrics.jsonl, trackers)


def teacher_entropies(teacher_out: torch.Tensor, center: torch.Tensor | float,
                      temperature: float) -> tuple[float, float]:
    """(entropy of the batch's mean teacher distribution, mean entropy of one image's), in nats,
    of ``softmax((teacher_out - center) / temperature)`` over the K prototypes, as DINO's loss
    builds its targets. ``teacher_out``: [N, K] head outputs (logits); ``center``: [1, K] or 0."""
    q = F.softmax((teacher_out.detach().float() - center) / temperature, dim=-1)
    mean = q.mean(dim=0)
    mean_entropy = -(mean * torch.log(mean.clamp_min(1e-30))).sum()
    row_entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(dim=-1).mean()
    return float(mean_entropy), float(row_entropy)


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``features`` [N, D] (N >= 2):
    (|sum of the unit rows|^2 - N) / (N (N - 1)), without the N x N matrix."""
    z = F.normalize(features.detach().float(), dim=-1)
    n = z.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 rows")
    total = z.sum(dim=0).pow(2).sum()
    return float((total - n) / (n * (n - 1)))


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the singular values of the L2-normalised rows, as a distribution):
    1 when every row points one way, up to min(N, D) when the rows fill every direction equally.
    Not centred: a direction all rows share counts as one, as it does for the cosines k-NN uses."""
    z = F.normalize(features.detach().float(), dim=-1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-30)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


@dataclass(frozen=True)
class Spread:
    """How spread out one batch's teacher outputs and backbone features are (``spread``)."""

    teacher_entropy: float  # nats: entropy of the mean teacher distribution (0: one prototype for all)
    teacher_image_entropy: float  # nats: mean entropy of one image's distribution (log K: uniform)
    teacher_info: float  # nats: teacher_entropy - teacher_image_entropy (0: output ignores the image)
    teacher_info_max: float  # nats: log min(N, K), the most teacher_info can be
    feature_cosine: float  # mean pairwise cosine of the features (1: one direction)
    feature_rank: float  # effective rank of the L2-normalised features (1: one direction)
    rows: int  # N, images in the batch
    prototypes: int  # K

    def as_dict(self, prefix: str = PREFIX) -> dict[str, float]:
        """The figures as flat metrics (e.g. a metrics.jsonl epoch record): ``{prefix + name: value}``."""
        return {prefix + k: v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict) -> Spread | None:
        """The figures ``as_dict`` put in ``record`` (an epoch record), or None when it has none."""
        figures = {k.removeprefix(PREFIX): v for k, v in record.items() if k.startswith(PREFIX)}
        return cls(**figures) if figures else None


def spread(teacher_out: torch.Tensor, center: torch.Tensor | float, temperature: float,
           features: torch.Tensor) -> Spread:
    """Every figure of ``Spread`` for one batch: the teacher head's outputs ``teacher_out`` [N, K]
    with the loss's ``center`` and teacher ``temperature``, and the teacher backbone's features
    ``features`` [N, D] of the same images."""
    n, k = teacher_out.shape
    mean_h, row_h = teacher_entropies(teacher_out, center, temperature)
    # max(0, ...): the difference is >= 0 (entropy is concave); rounding can make it -1e-7.
    return Spread(teacher_entropy=mean_h, teacher_image_entropy=row_h, teacher_info=max(0.0, mean_h - row_h),
                  teacher_info_max=math.log(min(n, k)), feature_cosine=mean_pairwise_cosine(features),
                  feature_rank=effective_rank(features), rows=n, prototypes=k)


def collapse_warning(s: Spread) -> str | None:
    """One line saying how the batch looks collapsed, or None when it does not: the teacher's
    output carries under MIN_INFO_FRACTION of the information it could about the image (named
    one-prototype or uniform by which entropy gave way), or the features' mean cosine exceeds
    MAX_FEATURE_COSINE, or their effective rank is under MIN_EFFECTIVE_RANK."""
    signs = []
    if s.teacher_info < MIN_INFO_FRACTION * s.teacher_info_max:
        mode = ("one prototype for every image" if s.teacher_entropy < 0.5 * s.teacher_info_max
                else "uniform outputs")
        signs.append(f"teacher output carries {s.teacher_info:.2f} of {s.teacher_info_max:.2f} nats about the "
                     f"image ({mode})")
    if s.feature_cosine > MAX_FEATURE_COSINE or s.feature_rank < MIN_EFFECTIVE_RANK:
        signs.append(f"features crowd one direction (mean cosine {s.feature_cosine:.3f}, effective rank "
                     f"{s.feature_rank:.1f})")
    if not signs:
        return None
    return "DINO collapse: " + "; ".join(signs)
