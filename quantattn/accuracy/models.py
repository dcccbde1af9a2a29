"""A small transformer that calls torch's SDPA, randomly initialized: what the inspector and calibration are
shown and tested on (tiny on a CPU in CI, hidden 1024 and a few thousand tokens on a GPU).

Each block is pre-norm attention (optionally grouped-query, causal or not, or with an attention mask,
which quantattn does not take) and an MLP. `key_bias` adds a fixed per-channel offset to every block's
keys, the channel outliers real models have, so that smooth K has something to remove.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, causal: bool, masked: bool, key_bias: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.masked = causal, masked
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("k_offset", key_bias * torch.randn(kv_heads, 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = k + self.k_offset.to(k.dtype)
        mask = None
        if self.masked:  # the last quarter of the keys is padding
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
            mask[:, n - n // 4 :] = False
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None, **gqa)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, causal, masked, key_bias):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, causal, masked, key_bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """`depth` blocks; block i is causal when `causal[i % len(causal)]`, masked when i is in `masked`."""

    def __init__(self, dim=64, heads=4, kv_heads=None, depth=2, causal=(True, False), masked=(), key_bias=0.0):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, causal[i % len(causal)], i in masked, key_bias) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
