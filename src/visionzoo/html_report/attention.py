"""DINO's pictures: the self-attention in the last block of what the feature is made of, per head
(the [CLS] token's, as facebookresearch/dino visualize_attention.py; the patch tokens' mean for a
ViT whose feature pools them), and a query's nearest training images in the frozen feature space."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionzoo.html_report.figures import CLS_ATTENTION
from visionzoo.models.weights_out import pools_patch_tokens

ATTENTION_MASS = 0.6  # visualize_attention.py --threshold: keep the patches holding 60% of the mass


POOLED_LABEL = "self-attention of the patch tokens (mean over them: the pooled feature)"


def _last_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, N]: softmax(q k^T / sqrt(d)) of the last block of a timm ViT. The attention
    module is run unfused once so that its probabilities can be read where timm computes them."""
    attn = vit.blocks[-1].attn
    seen: list[torch.Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    was_training = vit.training
    vit.eval()
    try:
        vit(x)
    finally:
        attn.fused_attn = fused
        hook.remove()
        vit.train(was_training)
    return seen[-1]


def _as_maps(rows: torch.Tensor, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ph, pw = vit.patch_embed.patch_size
    return rows.reshape(rows.shape[0], rows.shape[1], x.shape[-2] // ph, x.shape[-1] // pw).float()


@torch.no_grad()
def cls_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, h, w]: the attention of the [CLS] token on each patch in the last block of a
    timm ViT (the row of [CLS], prefix tokens left out)."""
    prefix = getattr(vit, "num_prefix_tokens", 1)
    return _as_maps(_last_attention(vit, x)[:, :, 0, prefix:], vit, x)


@torch.no_grad()
def feature_attention(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """[B, heads, h, w] maps of where the feature's tokens look in the last block, and their
    name: the [CLS] row, or for a ViT that pools its patch tokens the mean of the patch tokens'
    rows (the feature averages those tokens, so their attention is what it is built from)."""
    if not pools_patch_tokens(vit):
        return cls_attention(vit, x), CLS_ATTENTION
    prefix = getattr(vit, "num_prefix_tokens", 1)
    return _as_maps(_last_attention(vit, x)[:, :, prefix:, prefix:].mean(2), vit, x), POOLED_LABEL


def mass_mask(maps: torch.Tensor, mass: float = ATTENTION_MASS) -> torch.Tensor:
    """Per map, the smallest set of patches holding ``mass`` of its attention (the reference:
    sort ascending, cumulative share > 1 - mass)."""
    flat = maps.flatten(-2)
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1 - mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.view_as(maps)


@torch.no_grad()
def nearest_training_images(query_feats: torch.Tensor, bank: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity and index of the ``n`` most similar bank rows for each query (both
    sides L2-normalised here)."""
    sim = F.normalize(query_feats.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    return sim.topk(min(n, bank.shape[0]), dim=1)


def is_vit(model: nn.Module) -> bool:
    """A timm ViT whose last block's attention cls_attention can read."""
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.blocks[-1], "attn") \
        and hasattr(model.blocks[-1].attn, "attn_drop")


def as_numpy(maps: torch.Tensor) -> np.ndarray:
    return maps.detach().cpu().numpy().astype(np.float32)
