"""Preprocessing kernels: token statistics (smoothing means, ranges) and the K/V quantization.

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
def token_stats_kernel(
    X, stride_xb, stride_xh, stride_xn,
    Y, stride_yb, stride_yh, stride_yn,
    cu_seqlens, n_dense, H, n_programs,
    STATS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Per (tensor, sequence, head, channel): mean, max and min of the finite elements over the tokens.

    Programs [0, n_programs) read X, the next n_programs read Y (K and V in one launch); STATS is
    [tensors, 3, sequences, H, HEAD_DIM] float32 (mean, max, min).
    """
    pid = tl.program_id(0)
    which = pid // n_programs
    local = pid % n_programs
    seq, h = local // H, local % H
    b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN)
    if which == 0:
        base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + start.to(tl.int64) * stride_xn
        stride_n = stride_xn
    else:
        base = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + start.to(tl.int64) * stride_yn
        stride_n = stride_yn
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
    plane = (local.to(tl.int64) * 0 + n_programs) * HEAD_DIM  # one (mean | max | min) plane of one tensor
    out = STATS + which.to(tl.int64) * 3 * plane + local.to(tl.int64) * HEAD_DIM + cols
    cmask = cols < HEAD_DIM
    tl.store(out, total / tl.maximum(n * 1.0, 1.0), mask=cmask)
    tl.store(out + plane, cmax, mask=cmask)
    tl.store(out + 2 * plane, cmin, mask=cmask)


@triton.jit
def quantize_kv_kernel(
    K, stride_kb, stride_kh, stride_kn,
    V, stride_vb, stride_vh, stride_vn,
    cu_seqlens, n_dense, H,
    K_MEAN, K_MAX, K_MIN, V_MEAN, V_MAX, V_MIN,
    KQ, stride_qb, stride_qh, stride_qn,
    K_SCALE, stride_sb, stride_sh,
    VQ, stride_ob, stride_oh, stride_on, stride_od,
    GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
    V_MODE: tl.constexpr, SMOOTH_V: tl.constexpr, V_RANGE: tl.constexpr, EXACT_CASTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """One 64-key block: K -> INT8/INT4 (smoothed, scale per key); V -> FP8 per channel (V_MODE 1,
    written transposed [d, N] as the FP8 MMA wants it) or V - mean in the PV dtype (V_MODE 2)."""
    pid_n, pid = tl.program_id(0), tl.program_id(1)
    seq, h = pid // H, pid % H
    b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN)
    if pid_n * BLOCK_N >= n:
        return
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    rmask = rows < n
    cmask = cols < HEAD_DIM
    mask = rmask[:, None] & cmask[None, :]
    grow = (start + rows).to(tl.int64)  # row within the (packed) tensor
    stat = pid.to(tl.int64) * HEAD_DIM + cols

    k = tl.load(
        K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + grow[:, None] * stride_kn + cols[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    row_ok = tl.min(tl.where(is_finite(k), 1, 0), 1) > 0
    k_mean = tl.load(K_MEAN + stat, mask=cmask, other=0.0)
    if SMOOTH_K:
        k = k - k_mean[None, :]
    k = tl.where(is_finite(k) & mask, k, 0.0)
    if GRAN == PER_TENSOR:
        amax = channel_amax(k_mean, tl.load(K_MAX + stat, mask=cmask, other=0.0),
                            tl.load(K_MIN + stat, mask=cmask, other=0.0), SMOOTH_K)  # fmt: skip
        amax = tl.zeros((BLOCK_N,), tl.float32) + tl.max(tl.where(cmask, amax, 0.0), 0)
    else:
        amax = k_row_amax(tl.abs(k), BLOCK_N, D_PAD, GRAN)
    kq, scale = quantize_rows(k, amax, QMAX)
    scale = tl.where(row_ok, scale, float("nan"))
    tl.store(
        KQ + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + grow[:, None] * stride_qn + cols[None, :],
        kq, mask=mask,
    )  # fmt: skip
    tl.store(K_SCALE + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + grow, scale, mask=rmask)

    if V_MODE != 0:
        v = tl.load(
            V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + grow[:, None] * stride_vn + cols[None, :],
            mask=mask, other=0.0,
        ).to(tl.float32)  # fmt: skip
        v_mean = tl.load(V_MEAN + stat, mask=cmask, other=0.0)
        if SMOOTH_V:
            v = v - v_mean[None, :]
        if V_MODE == 1:
            amax_v = channel_amax(v_mean, tl.load(V_MAX + stat, mask=cmask, other=0.0),
                                  tl.load(V_MIN + stat, mask=cmask, other=0.0), SMOOTH_V)  # fmt: skip
            amax_v = tl.maximum(amax_v, 1e-30)
            vq = to_fp8_e4m3(v * (V_RANGE / amax_v)[None, :], EXACT_CASTS)
        else:
            vq = cast(v, VQ.dtype.element_ty, EXACT_CASTS)
        out = VQ + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        tl.store(out + grow[:, None] * stride_on + cols[None, :].to(tl.int64) * stride_od, vq, mask=mask)
