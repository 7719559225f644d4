"""DINO's networks and objective: projection head, multi-crop student/teacher wrapper, teacher EMA, loss.

The backbone is any registry model built with ``num_classes=0`` (timm's ViTs then return the
final-norm [CLS] token). Student and teacher are two such wrappers with the same architecture;
the teacher is an EMA of the student and never receives gradients (see ``update_teacher``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

if TYPE_CHECKING:
    from visionzoo.config import DinoConfig

LAST_LAYER = "head.last_layer"  # parameter-name prefix of the prototypes layer (frozen in epoch 1)


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU, optional BatchNorm) down to ``bottleneck_dim``,
    L2 normalisation, then a bias-free weight-normalised linear layer to ``out_dim`` logits.

    With ``norm_last_layer`` the weight-norm gain stays fixed at 1, so every prototype is a unit
    vector and the logits are cosine similarities (the reference's default, more stable)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(dims):
                layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of (possibly) different resolutions.

    Consecutive crops of one resolution go through the backbone as one batch (2 global crops,
    then the local crops), and the head runs once on all features. The output is crop-major:
    rows ``[i*B:(i+1)*B]`` belong to crop ``i``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor,
                with_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The head's logits, crop-major; with ``with_features`` also the backbone features
        (crop-major, the same rows) that the KoLeo term spreads."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, start = [], 0
        # Runs of equal size, e.g. [224, 224, 96 x 8] -> crops[0:2], crops[2:10] (plain Python,
        # so torch.compile sees no data-dependent ops).
        for _, run in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            end = start + len(list(run))
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(feats)
        out = self.head(features)
        return (out, features) if with_features else out


def build_dino(backbone: nn.Module, teacher_backbone: nn.Module, embed_dim: int, dino: DinoConfig,
               head_state: dict | None = None) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher for a DinoConfig. ``teacher_backbone`` has the student's architecture
    (built without drop path); it starts as an exact copy of the student and is frozen."""
    def head() -> DINOHead:
        return DINOHead(embed_dim, dino.out_dim, dino.use_bn_in_head, dino.norm_last_layer,
                        dino.head_layers, dino.hidden_dim, dino.bottleneck_dim)

    student = MultiCropWrapper(backbone, head())
    if head_state:  # the head of a DINO training checkpoint (model.weights)
        load_head(student.head, head_state)
    teacher = MultiCropWrapper(teacher_backbone, head())
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def load_head(head: DINOHead, state: dict) -> None:
    """The head of a DINO training checkpoint (names already mapped to visionzoo's weight-norm
    parametrization by models/weights.py) into ``head``; a head of another shape (out_dim,
    hidden_dim, bottleneck_dim, head_layers, use_bn_in_head) is a UserError."""
    from visionzoo.errors import UserError

    own = head.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        names = (missing + unexpected + reshaped)[:4]
        raise UserError(f"the DINO head of model.weights does not fit dino.* here: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(reshaped)} of another shape ({', '.join(names)})")
    head.load_state_dict(state)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA step: ``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter
    (buffers, e.g. BatchNorm statistics of a BN head, are the teacher's own, as in the reference)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("student and teacher have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def cancel_last_layer_grads(student: nn.Module) -> None:
    """Drop the prototypes' gradients (first ``freeze_last_layer`` epochs): their optimizer state
    is then left untouched, as in the reference."""
    for name, p in student.named_parameters():
        if LAST_LAYER in name:
            p.grad = None



def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
              teacher_temp: float, student_temp: float, n_global: int = 2) -> torch.Tensor:
    """Mean over (teacher crop i, student crop v ≠ i) pairs of
    ``-sum_k softmax((t_i - center) / teacher_temp)_k * log_softmax(s_v / student_temp)_k``,
    averaged over the batch. Inputs are crop-major: ``[n_crops * B, K]`` and ``[n_global * B, K]``."""
    batch = teacher_out.shape[0] // n_global
    n_crops = student_out.shape[0] // batch
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    q = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, pairs = student_out.new_zeros((), dtype=torch.float32), 0
    for i, q_i in enumerate(q):
        for v, log_p_v in enumerate(log_p):
            if v == i:  # a crop is never compared with itself
                continue
            total = total + torch.sum(-q_i * log_p_v, dim=-1).mean()
            pairs += 1
    return total / pairs


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate, negated (DINOv2's KoLeo regulariser): the mean of
    ``-log d_i`` where ``d_i`` is the Euclidean distance from row i of the L2-normalised
    ``features [B, D]`` to its nearest other row. Minimising it spreads the batch's features
    over the sphere, so that nearest neighbours (what k-NN reads) stay apart."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # which row is nearest is a choice, not a function to differentiate
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """``dino_loss`` against the centre, an EMA (``center_momentum``) of the teacher's mean output
    over the global batch. The caller updates the centre after each step (``update_center``),
    once it knows the loss is finite, as the reference does after computing the loss."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, n_global: int = 2):
        super().__init__()
        self.student_temp, self.center_momentum, self.n_global = student_temp, center_momentum, n_global
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return dino_loss(student_out, teacher_out, self.center, teacher_temp, self.student_temp, self.n_global)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor,
                      all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      weight: float = 1.0) -> None:
        """``center = m * center + (1 - m) * mean of teacher_out`` over all ranks' rows
        (``all_reduce_sum`` sums a tensor over ranks; None: one process). A rank whose rows are
        placeholders passes ``weight=0``: its rows count for nothing, and when no rank has a real
        row the centre stays as it is."""
        # new_full is a fill kernel (new_tensor would copy from the host and wait for the device).
        rows = teacher_out.new_full((1,), teacher_out.shape[0] * weight, dtype=torch.float32)
        sums = torch.cat([teacher_out.float().sum(0) * weight if weight != 1.0 else teacher_out.float().sum(0), rows])
        if all_reduce_sum is not None:
            sums = all_reduce_sum(sums)
        batch_center = (sums[:-1] / sums[-1]).unsqueeze(0)
        if weight == 1.0 and all_reduce_sum is None:
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
            return
        # Without a host read: an all-placeholder global batch (0 rows, a NaN mean) leaves the centre.
        new = self.center.mul(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self.center.copy_(torch.where(sums[-1] > 0, new, self.center))
