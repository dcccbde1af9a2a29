"""Pure-PyTorch SageAttention: the specification the Triton kernels are tested against.

Tiled like the kernels: an online softmax over blocks of `block_n` keys, so the FP8 quantization of P
sees the same running maxima, and the accumulators are rounded where the hardware rounds them.
Inputs are HND ([B, H, N, d]); the public API handles layouts, varlen and validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantattn import config as C
from quantattn.config import LN2, LOG2E, QuantConfig
from quantattn.reference.quant import (
    finite_mean,
    quantize_int,
    quantize_v_fp8,
    round_to_fp8_e4m3,
    round_to_fp16,
    row_group_amax,
    saturating_cast,
    smoothing_vector_k,
)


@dataclass
class QuantizedQ:
    values: torch.Tensor  # integer values in float32 [B, Hq, Nq, d]
    scale: torch.Tensor  # [B, Hq, Nq], sm_scale * log2(e) folded in
    delta_s: torch.Tensor | None  # smooth-Q correction of the scores, [B, Hq, Nq/64, Nk], same units


@dataclass
class ReferenceKV:
    k: torch.Tensor  # integer values in float32 [B, Hkv, Nk, d]
    k_scale: torch.Tensor  # [B, Hkv, Nk]
    k_mean: torch.Tensor | None  # [B, Hkv, d] smooth K's vector: the trimmed token mean (smoothing_vector_k)
    k_smoothed: torch.Tensor  # K - k_mean in float32, for smooth Q's correction term
    v: torch.Tensor  # FP8 values (float32) or V in the PV precision (float32) [B, Hkv, Nk, d]
    v_scale: torch.Tensor | None  # [B, Hkv, d] (FP8 PV)
    v_mean: torch.Tensor | None  # [B, Hkv, d] (smooth V)


def smooth_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K - its trimmed token mean (smoothing_vector_k): every score row shifts by a constant, which
    softmax ignores. Returns (smoothed K in float32, the vector)."""
    centre = smoothing_vector_k(k)
    return k.float() - centre[..., None, :], centre


def smooth_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V - mean over tokens; the mean is added back to the output (softmax rows sum to 1)."""
    mean = finite_mean(v, dim=-2)
    return v.float() - mean[..., None, :], mean


def q_block_means(q: torch.Tensor) -> torch.Tensor:
    """Mean of each block of Q_BLOCK_ROWS rows (the last block over its own rows): [..., Nq/64, d]."""
    n, rows = q.shape[-2], C.Q_BLOCK_ROWS
    blocks = []
    for start in range(0, n, rows):
        blocks.append(finite_mean(q[..., start : start + rows, :], dim=-2))
    if not blocks:
        return q.new_zeros(*q.shape[:-2], 0, q.shape[-1], dtype=torch.float32)
    return torch.stack(blocks, dim=-2)


def expand_rows(x: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """[..., blocks, c] -> [..., n, c]: repeat each block's row `rows` times."""
    return x.repeat_interleave(rows, dim=-2)[..., :n, :]


def quantize_kv(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig) -> ReferenceKV:
    if cfg.smooth_k:
        k_s, k_mean = smooth_k(k)
    else:
        k_s, k_mean = k.float(), None
    k_q, k_scale = quantize_int(k_s, row_group_amax(k_s, cfg.qk_granularity, "k"), cfg.qmax)
    if cfg.smooth_v:
        v_s, v_mean = smooth_v(v)
    else:
        v_s, v_mean = v.float(), None
    if cfg.is_fp8_pv:
        v_q, v_scale = quantize_v_fp8(v_s, cfg.v_range)
    else:
        pv_dtype = torch.float16 if cfg.pv_dtype == "fp16" else torch.bfloat16
        v_q, v_scale = v_s.to(pv_dtype).float(), None
    return ReferenceKV(k_q, k_scale, k_mean, k_s, v_q, v_scale, v_mean)


def quantize_q(q: torch.Tensor, kv: ReferenceKV, cfg: QuantConfig, sm_scale: float) -> QuantizedQ:
    qk_scale = sm_scale * LOG2E
    q32 = q.float()
    delta_s = None
    if cfg.smooth_q:
        means = q_block_means(q32)  # [B, Hq, nb, d]
        q32 = q32 - expand_rows(means, C.Q_BLOCK_ROWS, q.shape[-2])
        k_s = _expand_heads(kv.k_smoothed, q.shape[1])
        delta_s = (means @ k_s.transpose(-1, -2)) * qk_scale
    values, scale = quantize_int(q32, row_group_amax(q32, cfg.qk_granularity, "q"), cfg.qmax)
    return QuantizedQ(values, scale * qk_scale, delta_s)


def _expand_heads(x: torch.Tensor | None, hq: int) -> torch.Tensor | None:
    """Give each query head its kv head (grouped-query attention): head h reads h // (Hq/Hkv)."""
    if x is None or x.shape[1] == hq:
        return x
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _accumulate_chunks(p, v, keys, rnd, acc):
    """Chained MMAs over `keys`-wide slices, the accumulator rounded by `rnd` after each one."""
    for start in range(0, p.shape[-1], keys):
        acc = rnd(acc + p[..., start : start + keys] @ v[..., start : start + keys, :])
    return acc


def _fp8_mma_chain(p8, v, acc, rows=256):
    """Chained FP8 MMAs (32 keys each) into an FP22 accumulator, modelled as Ada/Hopper behave: each
    MMA aligns its 32 exact products and the accumulator to the largest exponent among them and keeps
    13 bits below it (truncating), so small products added to a large sum lose their low bits. A
    simpler model that rounds only the running sum once per MMA misses most of this loss (it predicted
    rel L1 0.0080 where the H100 gives 0.032 on the outlier inputs of docs/accuracy.md)."""
    out = []
    for r0 in range(0, p8.shape[-2], rows):
        a = acc[..., r0 : r0 + rows, :]
        pr = p8[..., r0 : r0 + rows, :]
        for start in range(0, p8.shape[-1], C.FP8_MMA_KEYS):
            sl = slice(start, start + C.FP8_MMA_KEYS)
            terms = pr[..., :, sl, None] * v[..., None, sl, :]  # [..., rows, 32, d], exact in float32
            biggest = torch.maximum(a.abs(), terms.abs().amax(-2))
            _, exponent = torch.frexp(biggest)  # biggest = m * 2**exponent, m in [0.5, 1)
            ulp = torch.ldexp(torch.ones_like(biggest), exponent - 14)  # 13 bits below the leading one
            ulp = torch.where(biggest > 0, ulp, torch.ones_like(ulp))
            kept = torch.trunc(terms / ulp[..., None, :]) * ulp[..., None, :]
            a = torch.trunc(a / ulp) * ulp + kept.sum(-2)
        out.append(a)
    return torch.cat(out, -2) if out else acc


def _pv_partial(p: torch.Tensor, v: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """One key block's P V, as the kernel's fresh (second-level) accumulator holds it."""
    zero = p.new_zeros(*p.shape[:-1], v.shape[-1])
    if cfg.is_fp8_pv:
        p8 = round_to_fp8_e4m3(p * cfg.p_scale)
        if cfg.pv_accum == "fp32+fp32":
            return _fp8_mma_chain(p8, v, zero)
        # fp32+fp16 (SageAttention2++): FP16 partials over 64 keys, summed in FP32.
        total = zero
        for start in range(0, p.shape[-1], C.FP16_ACCUM_KEYS):
            sl = slice(start, start + C.FP16_ACCUM_KEYS)
            total = total + _accumulate_chunks(p8[..., sl], v[..., sl, :], C.FP8_MMA_KEYS, round_to_fp16, zero)
        return total
    p16 = p.to(torch.float16 if cfg.pv_dtype == "fp16" else torch.bfloat16).float()
    if cfg.pv_accum == "fp16+fp32":
        return _accumulate_chunks(p16, v, C.FP16_MMA_KEYS, round_to_fp16, zero)
    return p16 @ v


def attention_quantized(
    q: QuantizedQ,
    kv: ReferenceKV,
    cfg: QuantConfig,
    is_causal: bool,
    block_n: int | None = None,
    attn_mask: torch.Tensor | None = None,
    causal_shift: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention over quantized operands, `block_n` keys a step (default cfg.kv_block).

    attn_mask: bool (True attends) or float (added to the scores in natural-log units), broadcastable
    to [B, Hq, Nq, Nk]. causal_shift: query i sees keys j <= i + causal_shift (default Nk - Nq).
    Returns (output float32, lse in log2 units)."""
    block_n = block_n or cfg.kv_block
    hq = q.values.shape[1]
    k, k_scale, v = (_expand_heads(t, hq) for t in (kv.k, kv.k_scale, kv.v))
    b, _, nq, _ = q.values.shape
    nk, dv = k.shape[-2], v.shape[-1]
    dev = q.values.device
    m = torch.full((b, hq, nq), -math.inf, device=dev)
    l_sum = torch.zeros(b, hq, nq, device=dev)
    acc = torch.zeros(b, hq, nq, dv, device=dev)
    rows = torch.arange(nq, device=dev)[:, None]
    delta_s = expand_rows(q.delta_s, C.Q_BLOCK_ROWS, nq) if q.delta_s is not None else None
    if causal_shift is None:
        causal_shift = nk - nq
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, nq, nk)
    for start in range(0, nk, block_n):
        end = min(start + block_n, nk)
        s = (q.values @ k[..., start:end, :].transpose(-1, -2)) * k_scale[..., None, start:end]
        s = s * q.scale[..., None]
        if delta_s is not None:
            s = s + delta_s[..., start:end]
        if attn_mask is not None:
            blk = attn_mask[..., start:end]
            s = s.masked_fill(~blk, -math.inf) if blk.dtype == torch.bool else s + blk.float() * LOG2E
        if is_causal:
            keys = torch.arange(start, end, device=dev)[None, :]
            s = s.masked_fill(keys > rows + causal_shift, -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(s - m_safe[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        if cfg.is_fp8_pv and cfg.pv_accum == "fp32":
            # single level: the FP8 MMAs chain straight into the rescaled FP22 accumulator
            p8 = round_to_fp8_e4m3(p * cfg.p_scale)
            acc = _fp8_mma_chain(p8, v[..., start:end, :], acc * alpha[..., None])
        else:
            acc = acc * alpha[..., None] + _pv_partial(p, v[..., start:end, :], cfg)
        m = m_new
    has_keys = l_sum > 0
    out = acc / torch.where(has_keys, l_sum, torch.ones_like(l_sum))[..., None]
    if cfg.is_fp8_pv:
        out = out * (_expand_heads(kv.v_scale, hq) / cfg.p_scale)[..., None, :]
    if kv.v_mean is not None:
        out = out + _expand_heads(kv.v_mean, hq)[..., None, :]
    out = torch.where(has_keys[..., None] | torch.isnan(l_sum)[..., None], out, torch.zeros_like(out))
    lse2 = torch.where(has_keys | torch.isnan(l_sum), m + torch.log2(l_sum), torch.full_like(m, -math.inf))
    return out, lse2


def sage_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: QuantConfig,
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    block_n: int | None = None,
    attn_mask: torch.Tensor | None = None,
    causal_shift: int | None = None,
):
    """SageAttention of HND tensors, computed with float32 tensor ops on q's device; output in q's dtype.

    lse (float32 [B, Hq, Nq]) is the natural-log logsumexp of the full-precision-equivalent scores
    sm_scale * q.k (plus an additive attn_mask), with smooth K's dropped per-row constant added back.
    attn_mask and causal_shift as in attention_quantized.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype
    q, k, v = (t.detach() for t in (q, k, v))
    kv = quantize_kv(k, v, cfg)
    qq = quantize_q(q, kv, cfg, sm_scale)
    out, lse2 = attention_quantized(qq, kv, cfg, is_causal, block_n, attn_mask, causal_shift)
    out = saturating_cast(out, dtype)
    if not return_lse:
        return out
    lse = lse2 * LN2
    if kv.k_mean is not None:
        k_mean = _expand_heads(kv.k_mean, q.shape[1])
        lse = lse + (q.float() * k_mean[..., None, :]).sum(-1) * sm_scale
    return out, lse


def attention_fp64(q, k, v, is_causal=False, sm_scale=None, return_lse=False, chunk=1024, attn_mask=None):
    """softmax(sm_scale q k^T + mask) v in float64, bottom-right causal; the ground truth for accuracy.

    attn_mask: bool (True attends) or additive float, broadcastable to [B, Hq, Nq, Nk]; rows that see no
    key give zeros (and lse -inf)."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.detach().double() for t in (q, k, v))
    hq = q.shape[1]
    k, v = _expand_heads(k, hq), _expand_heads(v, hq)
    nq, nk = q.shape[-2], k.shape[-2]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], hq, nq, nk)
    outs, lses = [], []
    for start in range(0, max(nq, 1), chunk):
        s = (q[..., start : start + chunk, :] @ k.transpose(-1, -2)) * sm_scale
        if attn_mask is not None:
            blk = attn_mask[..., start : start + chunk, :]
            s = s.masked_fill(~blk, -math.inf) if blk.dtype == torch.bool else s + blk.double()
        if is_causal:
            rows = torch.arange(start, min(start + chunk, nq), device=q.device)[:, None]
            s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > rows + (nk - nq), -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(lse == -math.inf, 0.0, lse)[..., None])
        outs.append(p @ v)
        lses.append(lse)
    out, lse = torch.cat(outs, -2)[..., :nq, :], torch.cat(lses, -1)[..., :nq]
    return (out, lse) if return_lse else out
