"""DINO's pictures: the [CLS] token's self-attention in the last block, per head (as
facebookresearch/dino visualize_attention.py), and a query's nearest training images in the
frozen feature space."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MASS = 0.6  # visualize_attention.py --threshold: keep the patches holding 60% of the mass


@torch.no_grad()
def cls_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, h, w]: the attention of the [CLS] token on each patch in the last block of a
    timm ViT (softmax(q k^T / sqrt(d)), the row of [CLS], prefix tokens left out). The attention
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
    a = seen[-1]  # [B, heads, N, N]
    prefix = getattr(vit, "num_prefix_tokens", 1)
    ph, pw = vit.patch_embed.patch_size
    h, w = x.shape[-2] // ph, x.shape[-1] // pw
    return a[:, :, 0, prefix:].reshape(a.shape[0], a.shape[1], h, w).float()


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
