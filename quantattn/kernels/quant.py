"""Preprocessing kernels: token statistics (smoothing means, ranges) and the K/V quantization.

One program per (sequence, head) reads its K and V twice (statistics, then quantization) in one launch.

Sequences are addressed the same way in every kernel: program `seq` of a dense call reads batch
`seq` from row 0; in a varlen call (IS_VARLEN) all sequences are packed in batch 0 and sequence
`seq` starts at row cu_seqlens[seq].
"""

import triton
import triton.language as tl

from quantattn.kernels.common import (
    PER_TENSOR,
    cast,
    channel_amax,
    is_finite,
    k_row_amax,
    quantize_rows,
    to_fp8_e4m3,
)


@triton.jit
def seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN: tl.constexpr):
    """(batch index, first row, length) of sequence `seq`."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + seq)
        return seq * 0, start, tl.load(cu_seqlens + seq + 1) - start
    return seq, seq * 0, n_dense


@triton.jit
def column_stats(base, stride_n, n, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean, max and min over the n rows at `base` of the finite elements, per channel ([D_PAD] each)."""
    cols = tl.arange(0, D_PAD)
    rows = tl.arange(0, BLOCK_N)
    total = tl.zeros((D_PAD,), tl.float32)
    cmax = tl.full((D_PAD,), float("-inf"), tl.float32)
    cmin = tl.full((D_PAD,), float("inf"), tl.float32)
    for r0 in range(0, n, BLOCK_N):
        r = r0 + rows
        mask = (r[:, None] < n) & (cols[None, :] < HEAD_DIM)
        x = tl.load(base + r[:, None].to(tl.int64) * stride_n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ok = is_finite(x) & mask
        total += tl.sum(tl.where(ok, x, 0.0), 0)
        cmax = tl.maximum(cmax, tl.max(tl.where(ok, x, float("-inf")), 0))
        cmin = tl.minimum(cmin, tl.min(tl.where(ok, x, float("inf")), 0))
    return total / tl.maximum(n * 1.0, 1.0), cmax, cmin


@triton.jit
def _store_stats(out, plane, stats, cmask):
    mean, cmax, cmin = stats
    tl.store(out, mean, mask=cmask)
    tl.store(out + plane, cmax, mask=cmask)
    tl.store(out + 2 * plane, cmin, mask=cmask)


@triton.jit
def token_stats_kernel(
    X, stride_xb, stride_xh, stride_xn, cu_seqlens, n_dense, H, STATS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Per (sequence, head, channel) statistics of X into STATS [3, sequences, H, HEAD_DIM] (mean, max, min)."""
    pid = tl.program_id(0)
    seq, h = pid // H, pid % H
    b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + start.to(tl.int64) * stride_xn
    stats = column_stats(base, stride_xn, n, HEAD_DIM, D_PAD, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    plane = (pid.to(tl.int64) * 0 + tl.num_programs(0)) * HEAD_DIM
    _store_stats(STATS + pid.to(tl.int64) * HEAD_DIM + cols, plane, stats, cols < HEAD_DIM)


@triton.jit
def preprocess_kv_kernel(
    K, stride_kb, stride_kh, stride_kn,
    V, stride_vb, stride_vh, stride_vn,
    cu_seqlens, n_dense, H,
    STATS,
    KQ, stride_qb, stride_qh, stride_qn,
    K_SCALE, stride_sb, stride_sh,
    VQ, stride_ob, stride_oh, stride_on, stride_od,
    GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
    V_MODE: tl.constexpr, SMOOTH_V: tl.constexpr, V_RANGE: tl.constexpr, EXACT_CASTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head): statistics of K (and V), then, block by block, K -> INT8/INT4 (smoothed,
    scale per key) and V -> FP8 per channel (V_MODE 1, written transposed [d, N] as the FP8 MMA wants
    it) or V - mean in the PV dtype (V_MODE 2). Two passes over each of K and V, in one launch.

    STATS is [2, 3, sequences, H, HEAD_DIM]: (K, V) x (mean, max, min), for the attention kernel."""
    pid = tl.program_id(0)
    seq, h = pid // H, pid % H
    b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN)
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + start.to(tl.int64) * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + start.to(tl.int64) * stride_vn
    plane = (pid.to(tl.int64) * 0 + tl.num_programs(0)) * HEAD_DIM
    out = STATS + pid.to(tl.int64) * HEAD_DIM + cols
    k_mean, k_max, k_min = column_stats(k_base, stride_kn, n, HEAD_DIM, D_PAD, BLOCK_N)
    _store_stats(out, plane, (k_mean, k_max, k_min), cmask)
    if GRAN == PER_TENSOR:
        k_amax_tensor = tl.max(tl.where(cmask, channel_amax(k_mean, k_max, k_min, SMOOTH_K), 0.0), 0)
    if V_MODE != 0:
        v_mean, v_max, v_min = column_stats(v_base, stride_vn, n, HEAD_DIM, D_PAD, BLOCK_N)
        _store_stats(out + 3 * plane, plane, (v_mean, v_max, v_min), cmask)
        if V_MODE == 1:
            v_inv = V_RANGE / tl.maximum(channel_amax(v_mean, v_max, v_min, SMOOTH_V), 1e-30)
    kq_base = KQ + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + start.to(tl.int64) * stride_qn
    ks_base = K_SCALE + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + start.to(tl.int64)
    vq_base = VQ + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + start.to(tl.int64) * stride_on
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < n
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        k = tl.load(k_base + r64[:, None] * stride_kn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_ok = tl.min(tl.where(is_finite(k), 1, 0), 1) > 0
        if SMOOTH_K:
            k = k - k_mean[None, :]
        k = tl.where(is_finite(k) & mask, k, 0.0)
        if GRAN == PER_TENSOR:
            amax = tl.zeros((BLOCK_N,), tl.float32) + k_amax_tensor
        else:
            amax = k_row_amax(tl.abs(k), BLOCK_N, D_PAD, GRAN)
        kq, scale = quantize_rows(k, amax, QMAX)
        tl.store(kq_base + r64[:, None] * stride_qn + cols[None, :], kq, mask=mask)
        tl.store(ks_base + r64, tl.where(row_ok, scale, float("nan")), mask=rmask)
        if V_MODE != 0:
            v = tl.load(v_base + r64[:, None] * stride_vn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if SMOOTH_V:
                v = v - v_mean[None, :]
            if V_MODE == 1:
                vq = to_fp8_e4m3(v * v_inv[None, :], EXACT_CASTS)
            else:
                vq = cast(v, VQ.dtype.element_ty, EXACT_CASTS)
            tl.store(vq_base + r64[:, None] * stride_on + cols[None, :].to(tl.int64) * stride_od, vq, mask=mask)
