"""DINO's position-embedding interpolation for timm's VisionTransformer.

timm's ViT with ``dynamic_img_size`` resamples its position embeddings to another patch grid
with ``F.interpolate(size=..., mode="bicubic", antialias=True)``. The DINO reference
(vision_transformer.py at cb71140, ``VisionTransformer.interpolate_pos_encoding``) does it
without antialiasing and with a scale factor of ``(grid + 0.1) / native grid`` per axis, which
also moves the sampling positions; on ViT-S/16's 96 px local crops the two differ by ~1.5e-2
per embedding value. ``DinoPosEmbedViT`` is timm's class with the reference's rule; the weights,
parameter names and every other method are timm's."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from visionzoo.errors import UserError


def dino_interpolate(pos_embed: torch.Tensor, grid: tuple[int, int], native: tuple[int, int],
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` ([1, prefix + native_h * native_w, D]) for a ``grid`` of patches: unchanged
    on the native grid, else the patch part bicubically interpolated with scale factors
    ``(grid_h + 0.1) / native_h`` and ``(grid_w + 0.1) / native_w`` (no antialias, PyTorch's
    default align_corners=False), in float32. The 0.1 keeps floor(native * scale) == grid."""
    if tuple(grid) == tuple(native):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patches = patches.float().reshape(1, native[0], native[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1]),
                            mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class DinoPosEmbedViT(VisionTransformer):
    """timm's VisionTransformer whose position embeddings follow the DINO reference off the
    native grid (class token with its own embedding, no register tokens, dynamic image size)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape  # dynamic_img_size: patch embeddings arrive as [B, H, W, C]
        pos = dino_interpolate(self.pos_embed, (h, w), tuple(self.patch_embed.grid_size), self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(x + pos)


def use_dino_pos_embed(model: nn.Module) -> nn.Module:
    """Give a timm ViT (built with ``dynamic_img_size=True``) the reference's interpolation, in
    place; anything else is a UserError naming what is needed."""
    if type(model) is not VisionTransformer:
        raise UserError(f"model.vit_pos_embed=dino needs a timm VisionTransformer, not {type(model).__name__}")
    if not model.dynamic_img_size or model.cls_token is None or model.reg_token is not None or model.no_embed_class:
        raise UserError("model.vit_pos_embed=dino needs a ViT with dynamic_img_size: true, a class token with its "
                        "own position embedding and no register tokens (DINO's layout)")
    model.__class__ = DinoPosEmbedViT  # same attributes, state dict and methods but _pos_embed
    return model
