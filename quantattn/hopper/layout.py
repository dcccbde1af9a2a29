"""The operand layout the Hopper kernel reads, in PyTorch (no GPU needed): the reference for the
preprocessing's Hopper output and for the tests."""

from __future__ import annotations

import torch

CHUNK = 32  # keys one FP8 wgmma reduces (k32)


def wgmma_key_order(n: int, device=None) -> torch.Tensor:
    """Position -> key: the key that the Hopper layout of V^T holds at column p, for n columns (n % 32 == 0).

    The QK product leaves thread t of a quad holding, in each 32-key chunk, keys 8c + 2t + {0, 1} for
    c = 0..3 of its rows; the PV product's A operand wants that thread to hold positions 4t..4t+3 and
    16+4t..16+4t+3. Giving V^T's columns the order of the accumulator's registers lets P go from one
    product to the other without moving a byte: position 16h + 4t + 2a + b holds key 16h + 8a + 2t + b.
    """
    if n % CHUNK:
        raise ValueError(f"n must be a multiple of {CHUNK}, got {n}")
    p = torch.arange(n, device=device)
    return (p & ~31) + (p & 16) + 8 * ((p >> 1) & 1) + 2 * ((p >> 2) & 3) + (p & 1)


def to_wgmma_order(vt: torch.Tensor) -> torch.Tensor:
    """V^T [..., d, n] in key order -> the Hopper layout [..., d, n32] (keys permuted, zero padding)."""
    n = vt.shape[-1]
    n32 = -(-max(n, 1) // CHUNK) * CHUNK
    padded = torch.nn.functional.pad(vt.float(), (0, n32 - n)).to(vt.dtype)
    return padded[..., wgmma_key_order(n32, vt.device)]


def from_wgmma_order(vt: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of to_wgmma_order: the first n keys of a Hopper-layout V^T, in key order."""
    out = torch.empty_like(vt)
    out[..., wgmma_key_order(vt.shape[-1], vt.device)] = vt
    return out[..., :n]
