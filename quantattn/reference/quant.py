"""Quantization primitives, in float32 exactly as the Triton kernels compute them.

Conventions shared with the kernels (quantattn/kernels/quant.py):
- integer rounding is round-half-to-even of `x * (qmax / amax)`;
- statistics (means, maxima) ignore non-finite elements, so a NaN in one row cannot spread through a
  shared scale to rows that never saw it; the API marks such rows itself;
- a group whose elements are all zero gets the scale of `AMAX_FLOOR`, so it quantizes to zeros.
"""

from __future__ import annotations

import torch

from quantattn import config as C

AMAX_FLOOR = 1e-30


def ieee_div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t rounded once, as a GPU's div.rn.f32 does (PyTorch computes `float / tensor`
    as `float * reciprocal(tensor)`, which rounds twice)."""
    return torch.full_like(t, numerator) / t


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def finite_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over `dim` of the finite elements' values, counting non-finite ones as zero."""
    n = x.shape[dim]
    if n == 0:
        return torch.zeros_like(x.sum(dim))
    return finite_or_zero(x.float()).sum(dim) / n


def finite_trimmed_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over `dim` of the finite elements without their largest and smallest one:
    (sum - max - min) / (count - 2) of the finite elements, and zero where fewer than 3 are finite.

    Computed from the sum, maximum, minimum and count, in float32 (float64 for float64 inputs), as
    quantattn/kernels/quant.py computes it from its per-channel statistics."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ok = torch.isfinite(x)
    if x.shape[dim] == 0:
        return torch.zeros_like(x.sum(dim))
    count = ok.sum(dim).to(x.dtype)
    total = torch.where(ok, x, 0.0).sum(dim)
    cmax = torch.where(ok, x, -torch.inf).amax(dim)
    cmin = torch.where(ok, x, torch.inf).amin(dim)
    trimmed = (total - cmax - cmin) / (count - 2).clamp_min(1)
    return torch.where(count >= 3, trimmed, torch.zeros_like(trimmed))


def smoothing_vector_k(k: torch.Tensor) -> torch.Tensor:
    """The per-channel vector smooth K subtracts from every key of K [..., N, d]: the trimmed token mean
    (`finite_trimmed_mean` over the N keys), [..., d].

    Any vector subtracted from all keys shifts each score row by a constant, which the softmax ignores;
    the lse correction and smooth Q's correction term must use the same vector. The plain mean would
    remove the channel offsets just as well, but one key far larger than the rest dominates it when keys
    are few, and every other key would then carry that key's size into its INT8 scale. Dropping each
    channel's largest and smallest value removes such a key from the centre, and differs from the mean
    by O(1/N) on ordinary keys."""
    return finite_trimmed_mean(k, dim=-2)


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    n = x.shape[-2]
    pad = (-n) % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def row_group_amax(x: torch.Tensor, granularity: str, role: str) -> torch.Tensor:
    """Per-row absolute maximum of the row's scale group; x is [..., N, d], returns [..., N].

    role "q" or "k": the two operands group their rows differently (see config.py).
    """
    n = x.shape[-2]
    a = finite_or_zero(x.float()).abs()
    lead = a.shape[:-2]
    if granularity == "per_token":
        return a.amax(-1) if a.shape[-1] else a.new_zeros(a.shape[:-1])
    if granularity == "per_tensor":
        m = a.flatten(-2).amax(-1, keepdim=True) if a.numel() else a.new_zeros(*lead, 1)
        return m.expand(*lead, n)
    if role == "q" and granularity in ("per_block", "per_warp"):
        rows = C.Q_BLOCK_ROWS if granularity == "per_block" else C.Q_WARP_ROWS
        g = _pad_rows(a, rows).unflatten(-2, (-1, rows)).amax(dim=(-1, -2), keepdim=True)
        return g.expand(*g.shape[:-2], rows, 1).flatten(-3)[..., :n]
    if role == "q" and granularity == "per_thread":
        # rows {r, r+8} of each 16-row tile share a scale: view tile rows as (2, 8).
        t = _pad_rows(a, C.Q_THREAD_TILE).unflatten(-2, (-1, 2, 8))
        g = t.amax(dim=(-1, -3), keepdim=True)  # [..., tiles, 1, 8, 1]
        return g.expand(*g.shape[:-3], 2, 8, 1).flatten(-4)[..., :n]
    if role == "k" and granularity in ("per_block", "per_warp"):
        rows = C.K_BLOCK_KEYS
        g = _pad_rows(a, rows).unflatten(-2, (-1, rows)).amax(dim=(-1, -2), keepdim=True)
        return g.expand(*g.shape[:-2], rows, 1).flatten(-3)[..., :n]
    if role == "k" and granularity == "per_thread":
        # key n = 8j + 2c + t of a 64-key block belongs to group c: a thread's B-fragment columns.
        t = _pad_rows(a, C.K_BLOCK_KEYS).unflatten(-2, (-1, 8, 4, 2))
        g = t.amax(dim=(-1, -2, -4), keepdim=True)  # [..., blocks, 1, 4, 1, 1]
        return g.expand(*g.shape[:-4], 8, 4, 2, 1).flatten(-5)[..., :n]
    raise ValueError(f"unknown granularity {granularity!r} for role {role!r}")


def quantize_int(x: torch.Tensor, amax: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization with one scale per row; x [..., N, d], amax [..., N].

    Returns (integer values held in float32, per-row scale) with x ~= values * scale.
    A row holding a non-finite element gets a NaN scale, so that NaN reaches exactly the scores
    that row takes part in, as it would in full precision.
    """
    amax = amax.float().clamp_min(AMAX_FLOOR)
    inv = ieee_div(qmax, amax)
    q = torch.round(finite_or_zero(x.float()) * inv[..., None]).clamp(-qmax, qmax)
    scale = amax / qmax
    row_finite = torch.isfinite(x).all(-1) if x.shape[-1] else torch.ones_like(scale, dtype=torch.bool)
    return q, torch.where(row_finite, scale, torch.full_like(scale, float("nan")))


def round_to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even), saturating at +-448; NaN and +-Inf become NaN."""
    clamped = x.float().clamp(-C.FP8_MAX, C.FP8_MAX)
    y = clamped.to(torch.float8_e4m3fn).float()
    return torch.where(torch.isfinite(x), y, torch.full_like(y, float("nan")))


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def round_to_fp22(x: torch.Tensor) -> torch.Tensor:
    """Model of the FP8 MMA's accumulator on Ada/Hopper: FP32 cut to 13 mantissa bits (toward zero)."""
    return (x.float().view(torch.int32) & ~0x3FF).view(torch.float32)


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to `dtype`, finite values beyond its range clamped to its largest finite value (NaN and
    +-Inf kept). Attention's output is a convex combination of V's rows, so its true value never lies
    beyond V's range; the quantized P can: FP8 rounds P up by as much as 1/16 while the softmax
    denominator sums the unrounded P, so V near float16's largest value would otherwise give Inf."""
    big = torch.finfo(dtype).max
    return torch.where(torch.isfinite(x), x.clamp(-big, big), x).to(dtype)


def quantize_v_fp8(v: torch.Tensor, v_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 quantization of V [..., N, d]: returns (values in float32, scale [..., d])."""
    amax = finite_or_zero(v.float()).abs().amax(-2) if v.shape[-2] else v.new_zeros(v.shape[:-2] + v.shape[-1:])
    amax = amax.clamp_min(AMAX_FLOOR)
    inv = ieee_div(v_range, amax)
    return round_to_fp8_e4m3(v.float() * inv[..., None, :]), amax / v_range
