"""A small DiT-like image transformer (no downloads): Conv2d patch embedding -> blocks of
self-attention (``attn1``, via ``F.scaled_dot_product_attention``) + MLP -> unpatchify.

Module paths look like diffusers' (``transformer_blocks.3.attn1``) so policies written for DiT read the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, C]
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]
        return self.to_out(o.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TinyDiT(nn.Module):
    """``[B, C, H, W]`` latents -> same shape. Tokens: (H/p) x (W/p) grid, row-major."""

    def __init__(self, in_channels=4, patch=2, dim=256, heads=4, layers=4):
        super().__init__()
        self.patch = patch
        self.pos_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.transformer_blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        x = self.pos_embed(latents).flatten(2).transpose(1, 2)  # [B, S, dim]
        for blk in self.transformer_blocks:
            x = blk(x)
        x = self.proj_out(self.norm_out(x))
        p = self.patch
        x = x.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)
