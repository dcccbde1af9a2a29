"""Accuracy metrics, attention inputs and operation counts shared by `python -m quantattn`, the benchmark
and the accuracy tool.
Accuracy metrics are the ones the SageAttention papers report, computed in float64 over the flattened
outputs. Inputs come in two kinds: N(0, 1), the easy case, and N(0, 1) with the channel-wise outliers
that real models put in Q, K and V.
"""

from __future__ import annotations

import torch


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine of the angle between the flattened outputs (1.0: same direction)."""
    a, b = out.detach().double().flatten(), ref.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum|out - ref| / sum|ref|."""
    a, b = out.detach().double(), ref.detach().double()
    return float((a - b).abs().sum() / b.abs().sum())


def rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square of out - ref."""
    a, b = out.detach().double(), ref.detach().double()
    return float((a - b).square().mean().sqrt())


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| over all elements."""
    a, b = out.detach().double(), ref.detach().double()
    return float((a - b).abs().max()) if a.numel() else 0.0


def worst_row_rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative L1 of one output row (one query of one head): sum|out - ref| / sum|ref| over
    the last dimension. A row whose reference is all zeros counts its error against the mean row's size."""
    a, b = out.detach().double(), ref.detach().double()
    if not a.numel():
        return 0.0
    err, size = (a - b).abs().sum(-1), b.abs().sum(-1)
    return float((err / torch.where(size > 0, size, size.mean().clamp_min(1e-300))).max())


def accuracy_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"cosine": cosine_similarity(out, ref), "rel_l1": relative_l1(out, ref), "rmse": rmse(out, ref)}


def add_channel_outliers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give HND float tensors the per-channel structure of real models' activations.

    One offset per (batch, head, channel), shared by every token: K += 8 N(0,1) (the channel bias that
    smooth K removes), Q = 2 Q + 2 N(0,1) (large query values), V += 2 N(0,1).
    """

    def channel_noise(t: torch.Tensor) -> torch.Tensor:
        shape = (*t.shape[:-2], 1, t.shape[-1])
        return torch.randn(shape, generator=generator, device=t.device, dtype=t.dtype)

    return 2 * q + 2 * channel_noise(q), k + 8 * channel_noise(k), v + 2 * channel_noise(v)


def make_qkv(
    batch: int,
    heads: int,
    seq_q: int,
    head_dim: int,
    *,
    seq_k: int | None = None,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    outliers: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random HND attention inputs: q [batch, heads, seq_q, d], k and v [batch, kv_heads, seq_k, d].

    Drawn in float32 from a seeded generator on `device`, then cast to `dtype`.
    """
    seq_k = seq_q if seq_k is None else seq_k
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(h: int, n: int) -> torch.Tensor:
        return torch.randn(batch, h, n, head_dim, generator=gen, device=device)

    q, k, v = draw(heads, seq_q), draw(kv_heads, seq_k), draw(kv_heads, seq_k)
    if outliers:
        q, k, v = add_channel_outliers(q, k, v, gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention_ops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool) -> float:
    """Operations of one attention forward, counted as the benchmark counts them (README "Performance"): 4 B H Nq Nk d, halved when causal."""
    ops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    return ops / 2 if causal else ops


def tops(ops: float, milliseconds: float) -> float:
    return ops / (milliseconds * 1e-3) / 1e12
