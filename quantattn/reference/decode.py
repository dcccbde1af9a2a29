"""Pure-PyTorch twin of the quantized KV cache and of the decode kernel (quantattn/kernels/decode.py).

The cache (quantattn.QuantizedKVCache) holds, per (batch, kv head):
- K as INT8 with one scale per token (amax / 127 of the token's row), after subtracting a fixed vector
  `k_mean` (smooth K's trimmed token mean of the K first given, `smoothing_vector_k`; smoothing by any
  fixed vector leaves softmax unchanged, so appended tokens reuse it and no older token is ever
  requantized);
- V as FP8 E4M3 in blocks of V_BLOCK (64) tokens, one scale per channel per block
  (scale = the block's channel amax / config.v_range), stored transposed ([d, tokens]) as the FP8 MMA
  wants it; the last, incomplete block stays in the input precision (`v_tail`) until it has 64 tokens.

The decode attention is split-K ("flash-decoding"): the keys are cut into splits of
`blocks_per_split * 64` keys; each split runs an online softmax over its 64-key blocks (P rounded to FP8
against the split's running maximum, each block's P V product multiplied by that block's V scale; the
16-bit tail block through a 16-bit product), and the splits' (acc, m, l) are merged at the end. The
split length is part of the numerics (it decides which running maximum P is rounded against), so it is
chosen here, by `blocks_per_split`, and the launcher takes it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantattn.calls import cdiv
from quantattn.config import LN2, LOG2E, QuantConfig
from quantattn.reference.attention import _pv_partial
from quantattn.reference.quant import (
    quantize_int,
    quantize_v_fp8,
    round_to_fp8_e4m3,
    row_group_amax,
    saturating_cast,
    smoothing_vector_k,
)

V_BLOCK = 64  # tokens per V scale block, and keys per online-softmax step of the decode kernel
MAX_DECODE_QUERIES = 16  # query tokens per call (LLM decoding, speculative decoding)
# Splits: enough programs to fill an H100 (132 SMs) about four times. A constant rather than the
# device's SM count, because the split decides the numerics and must not depend on the machine.
TARGET_PROGRAMS = 4 * 132
MIN_SPLIT_BLOCKS = 4  # at least 256 keys per split: shorter ones cost more in partials than they gain
MAX_ROWS_PER_PROGRAM = 64  # packed query rows (GQA group x Nq) one program holds


def packed_rows(hq: int, hkv: int, nq: int) -> int:
    """Query rows that share one kv head: the GQA group's heads times the query tokens."""
    return (hq // hkv) * nq


def blocks_per_split(n_keys: int, batch_kv_heads: int, rows: int) -> int:
    """64-key blocks per split of the decode kernel (the last split may hold fewer).

    As many splits as fill TARGET_PROGRAMS programs, but each at least MIN_SPLIT_BLOCKS blocks, and few
    enough that the float32 partial outputs (written and read once per split and row) stay a small
    fraction (~1/8) of the K/V bytes the split reads: splits <= n_keys / (16 rows)."""
    n_blocks = cdiv(n_keys, V_BLOCK)
    if n_blocks == 0:
        return 1
    tiles = cdiv(rows, MAX_ROWS_PER_PROGRAM)
    want = cdiv(TARGET_PROGRAMS, max(batch_kv_heads * tiles, 1))
    by_traffic = max(1, n_keys // (16 * max(rows, 1)))
    splits = max(1, min(want, by_traffic, n_blocks // MIN_SPLIT_BLOCKS))
    return cdiv(n_blocks, splits)


# ----------------------------------------------------------------------------------------------------
# The cache


@dataclass
class KVCacheBuffers:
    """Storage of a quantized KV cache of `capacity` tokens (capacity a multiple of V_BLOCK)."""

    k: torch.Tensor  # int8 [B, Hkv, capacity, d]: round((k - k_mean) / k_scale)
    k_scale: torch.Tensor  # float32 [B, Hkv, capacity] (NaN for a token with a non-finite element)
    k_mean: torch.Tensor  # float32 [B, Hkv, d]: the fixed smoothing vector (zeros without smooth K)
    v: torch.Tensor  # float8_e4m3fn [B, Hkv, d, capacity] (transposed): complete 64-token blocks
    v_scale: torch.Tensor  # float32 [B, Hkv, capacity / 64, d]: amax / v_range per block and channel
    v_tail: torch.Tensor  # input dtype [B, Hkv, 64, d]: the tokens of the incomplete last block

    @staticmethod
    def allocate(b: int, hkv: int, d: int, capacity: int, dtype: torch.dtype, device) -> KVCacheBuffers:
        assert capacity % V_BLOCK == 0
        return KVCacheBuffers(
            k=torch.zeros(b, hkv, capacity, d, dtype=torch.int8, device=device),
            k_scale=torch.zeros(b, hkv, capacity, dtype=torch.float32, device=device),
            k_mean=torch.zeros(b, hkv, d, dtype=torch.float32, device=device),
            v=torch.zeros(b, hkv, d, capacity, dtype=torch.float8_e4m3fn, device=device),
            v_scale=torch.zeros(b, hkv, capacity // V_BLOCK, d, dtype=torch.float32, device=device),
            v_tail=torch.zeros(b, hkv, V_BLOCK, d, dtype=dtype, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grown(self, capacity: int, length: int) -> KVCacheBuffers:
        """A copy with room for `capacity` tokens holding this cache's first `length` tokens."""
        b, hkv, _, d = self.k.shape
        new = KVCacheBuffers.allocate(b, hkv, d, capacity, self.v_tail.dtype, self.k.device)
        full = length // V_BLOCK
        new.k[:, :, :length] = self.k[:, :, :length]
        new.k_scale[:, :, :length] = self.k_scale[:, :, :length]
        new.k_mean.copy_(self.k_mean)
        new.v[..., : full * V_BLOCK] = self.v[..., : full * V_BLOCK]
        new.v_scale[:, :, :full] = self.v_scale[:, :, :full]
        new.v_tail.copy_(self.v_tail)
        return new

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def k_token_mean(k: torch.Tensor) -> torch.Tensor:
    """The smoothing vector of a new cache, float32 [B, Hkv, d]: smooth K's vector of the main path
    (`smoothing_vector_k`, the per-channel trimmed token mean of K's finite elements; zero where fewer
    than 3 are finite, i.e. no smoothing, which is exact). Both backends compute it with this function
    (a torch reduction), so they store the same bits."""
    return smoothing_vector_k(k)


def quantize_k_tokens(k: torch.Tensor, k_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K [B, Hkv, n, d] -> (int8 values, float32 scale [B, Hkv, n]): per token, after subtracting k_mean."""
    k_s = k.float() - k_mean[:, :, None, :]
    values, scale = quantize_int(k_s, row_group_amax(k_s, "per_token", "k"), 127.0)
    return values.to(torch.int8), scale


def append_reference(buf: KVCacheBuffers, k_new: torch.Tensor, v_new: torch.Tensor, pos0: int, v_range: float):
    """Write tokens pos0 .. pos0 + n of an HND K/V into the cache buffers (what the append kernel does).

    K is quantized per token. V: the tokens of the tail (pos0's block, before pos0) and the new ones are
    cut into 64-token blocks; each complete block becomes FP8 with its own per-channel scales, what
    remains is the new tail."""
    n = k_new.shape[2]
    if n == 0:
        return
    kq, ks = quantize_k_tokens(k_new, buf.k_mean)
    buf.k[:, :, pos0 : pos0 + n] = kq
    buf.k_scale[:, :, pos0 : pos0 + n] = ks
    first = pos0 // V_BLOCK * V_BLOCK
    pending = torch.cat([buf.v_tail[:, :, : pos0 - first], v_new.to(buf.v_tail.dtype)], dim=2)
    end_full = (pos0 + n) // V_BLOCK * V_BLOCK
    n_full = (end_full - first) // V_BLOCK
    if n_full > 0:
        blocks = pending[:, :, : end_full - first].unflatten(2, (n_full, V_BLOCK))
        values, scale = quantize_v_fp8(blocks.float(), v_range)  # [B, Hkv, n_full, 64, d], [.., n_full, d]
        buf.v[..., first:end_full] = values.flatten(2, 3).transpose(-1, -2).to(torch.float8_e4m3fn)
        buf.v_scale[:, :, first // V_BLOCK : end_full // V_BLOCK] = scale
    rest = pending[:, :, end_full - first :]
    buf.v_tail[:, :, : rest.shape[2]] = rest


# ----------------------------------------------------------------------------------------------------
# The attention


def decode_reference(
    q: torch.Tensor,
    buf: KVCacheBuffers,
    n_keys: int,
    cfg: QuantConfig,
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    split_blocks: int | None = None,
    fp32_pv: bool = False,
):
    """Decode attention of q (HND [B, Hq, Nq, d]) against the first n_keys tokens of the cache.

    fp32_pv: the FP8 P V product of a block accumulates exactly in FP32 (what the kernel's MMA does
    where it holds fewer than 64 rows on Hopper: `decode_launch.pv_accumulates_in_fp32`), instead of
    the FP8 tensor-core accumulator of docs/numerics.md §5.

    Mirrors the kernel step by step: Q quantized per token (sm_scale * log2 e folded into its scale),
    the GQA group's rows packed together, splits of `split_blocks` 64-key blocks (default:
    blocks_per_split), online softmax per split, then the merge of the splits. Returns the output in
    q's dtype and, with return_lse, the natural-log logsumexp [B, Hq, Nq] of sm_scale * q.k.
    """
    b, hq, nq, d = q.shape
    hkv = buf.k.shape[1]
    group, rows = hq // hkv, packed_rows(hq, hkv, nq)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    dev = q.device
    q32 = q.detach().float()
    q_values, q_scale = quantize_int(q32, row_group_amax(q32, "per_token", "q"), 127.0)
    q_values = q_values.reshape(b, hkv, rows, d)
    q_scale = (q_scale * (sm_scale * LOG2E)).reshape(b, hkv, rows)

    n_full = n_keys // V_BLOCK
    n_blocks = cdiv(n_keys, V_BLOCK)
    bps = split_blocks or blocks_per_split(n_keys, b * hkv, rows)
    splits = cdiv(n_blocks, bps)
    padded = splits * bps * V_BLOCK

    def pad_keys(x, dim, length=padded):
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
        return torch.nn.functional.pad(x, pad)

    k = pad_keys(buf.k[:, :, :n_keys].float(), 2).unflatten(2, (splits, bps, V_BLOCK))
    k_scale = pad_keys(buf.k_scale[:, :, :n_keys], 2).unflatten(2, (splits, bps, V_BLOCK))
    tail = n_keys - n_full * V_BLOCK
    v = torch.cat([buf.v[..., : n_full * V_BLOCK].transpose(-1, -2).float(), buf.v_tail[:, :, :tail].float()], 2)
    v = pad_keys(v, 2).unflatten(2, (splits, bps, V_BLOCK))
    v_scale = pad_keys(buf.v_scale[:, :, :n_full], 2, splits * bps).unflatten(2, (splits, bps))  # [B, Hkv, S, bps, d]
    query = torch.arange(rows, device=dev) % nq  # packed row -> query token

    m = torch.full((b, hkv, splits, rows), -math.inf, device=dev)
    l_sum = torch.zeros(b, hkv, splits, rows, device=dev)
    acc = torch.zeros(b, hkv, splits, rows, d, device=dev)
    for j in range(bps):
        block = torch.arange(splits, device=dev) * bps + j  # global block index, per split
        keys = block[:, None] * V_BLOCK + torch.arange(V_BLOCK, device=dev)  # [S, 64]
        s = (q_values[:, :, None] @ k[:, :, :, j].transpose(-1, -2)) * k_scale[:, :, :, j, None, :]
        s = s * q_scale[:, :, None, :, None]
        visible = (keys < n_keys)[:, None, :]
        if is_causal:
            visible = visible & (keys[:, None, :] <= query[None, :, None] + (n_keys - nq))
        s = s.masked_fill(~visible, -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(s - m_safe[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        vb = v[:, :, :, j]
        if fp32_pv:
            fp8_part = round_to_fp8_e4m3(p * cfg.p_scale) @ vb
        else:
            fp8_part = _pv_partial(p, vb, cfg)
        fp8_part = fp8_part * (v_scale[:, :, :, j] / cfg.p_scale)[..., None, :]
        tail_part = p.to(buf.v_tail.dtype).float() @ vb
        part = torch.where((block < n_full)[:, None, None], fp8_part, tail_part)
        acc = acc * alpha[..., None] + part
        m = m_new

    # merge the splits
    m_max = m.amax(2)
    m_max_safe = torch.where(m_max == -math.inf, torch.zeros_like(m_max), m_max)
    w = torch.exp2(m - m_max_safe[:, :, None])
    l_tot = (l_sum * w).sum(2)
    acc_tot = (acc * w[..., None]).sum(2)
    has_keys = (l_tot > 0) | torch.isnan(l_tot)
    out = acc_tot / torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))[..., None]
    out = torch.where(has_keys[..., None], out, torch.zeros_like(out))
    out = saturating_cast(out.reshape(b, hq, nq, d), q.dtype)
    if not return_lse:
        return out
    lse2 = torch.where(has_keys, m_max + torch.log2(l_tot), torch.full_like(m_max, -math.inf))
    k_mean = buf.k_mean.repeat_interleave(group, 1)[:, :, None, :]
    lse = lse2.reshape(b, hq, nq) * LN2 + (q32 * k_mean).sum(-1) * sm_scale
    return out, lse
