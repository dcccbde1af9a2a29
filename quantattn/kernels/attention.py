"""The SageAttention kernel: one body for every variant, specialized by constexpr flags.

Per program: one BLOCK_M tile of queries of one head. Q is loaded once, smoothed and quantized in
registers (so no pass over Q precedes the kernel), then an online softmax runs over key blocks (config.KV_BLOCK) of
the pre-quantized K and V: INT8 QK^T with INT32 accumulation, exp2 with sm_scale * log2(e) folded
into Q's scale, and PV in FP8 or FP16/BF16 with the accumulator the config names.
"""

import triton
import triton.language as tl

from quantattn.kernels.common import (
    PER_TENSOR,
    cast,
    channel_amax,
    is_finite,
    q_row_amax,
    quantize_rows,
    saturate,
    to_fp8_e4m3,
)
from quantattn.kernels.quant import seq_bounds

# PV modes
PV_F16_ACC32 = tl.constexpr(0)  # FP16/BF16 operands, FP32 accumulator
PV_F16_ACC16 = tl.constexpr(1)  # FP16 operands, FP16 accumulator per key block, FP32 buffer
PV_F8_TWO_LEVEL = tl.constexpr(2)  # FP8, fresh accumulator per key block added into FP32 (SageAttention2)
PV_F8_ONE_LEVEL = tl.constexpr(3)  # FP8 chained into one accumulator (FP22 on Ada/Hopper)
PV_F8_ACC16 = tl.constexpr(4)  # FP8 with FP16 partials of 64 keys (SageAttention2++)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, other, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, D_PAD] tile, masking only what may be out of bounds: unmasked loads vectorize."""
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=rows_ok[:, None], other=other)
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=other)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols_ok[None, :], other=other)


@triton.jit
def _attend_block(
    acc, m_i, l_i, q_i8, q_scale, delta_rows, kv_row0, k_len, offs_m_causal,
    k_ptrs, stride_kn, KS_blk, v_ptrs, stride_vn, DS_blk, offs_n, cols,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr, PV_MODE: tl.constexpr,
    P_SCALE: tl.constexpr, PV_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr, ONE_Q_GROUP: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys kv_row0 .. kv_row0 + BLOCK_N (pointer tiles at key 0)."""
    keys = kv_row0 + offs_n
    key_ok = keys < k_len
    cmask = cols < HEAD_DIM
    # 64-bit offsets: the caller's V (FP16 PV, NHD) has a row stride of H * d, and 128K keys of it
    # pass 2**31 elements
    row0 = tl.cast(kv_row0, tl.int64)
    k = _load_tile(k_ptrs + row0 * stride_kn, key_ok, cmask, 0, MASK, EVEN_D)
    if MASK:
        k_scale = tl.load(KS_blk + keys, mask=key_ok, other=0.0)
    else:
        k_scale = tl.load(KS_blk + keys)
    # scores s = (qk * k_scale) * q_scale; q_scale > 0 commutes with the row max, so the row's
    # multiply joins the exponent's subtraction in one FMA (one multiply per score, not two)
    s = tl.dot(q_i8, tl.trans(k)).to(tl.float32) * k_scale[None, :]
    if SMOOTH_Q:
        if ONE_Q_GROUP:  # the tile is one smooth-Q block: one correction row for all its queries
            delta = tl.load(DS_blk + delta_rows + keys, mask=key_ok, other=0.0)[None, :]
        else:
            delta = tl.load(DS_blk + delta_rows[:, None] + keys[None, :], mask=key_ok[None, :], other=0.0)
        s = s * q_scale[:, None] + delta
    if MASK:
        visible = key_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (keys[None, :] <= offs_m_causal[:, None])
        s = tl.where(visible, s, float("-inf"))
    if SMOOTH_Q:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if SMOOTH_Q:
        p = tl.exp2(s - m_safe[:, None])
    else:
        p = tl.exp2(s * q_scale[:, None] - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs + row0 * stride_vn, key_ok, cmask, 0.0, MASK, EVEN_D)
    if PV_MODE >= PV_F8_TWO_LEVEL:
        if EXACT_CASTS:
            p8 = to_fp8_e4m3(p * P_SCALE, True)
        else:
            # P * P_SCALE lies in [0, 448] or is NaN: the hardware's satfinite cast needs no clamping
            p8 = (p * P_SCALE).to(tl.float8e4nv)
        if PV_MODE == PV_F8_TWO_LEVEL:
            acc = acc * alpha[:, None] + tl.dot(p8, v)
        elif PV_MODE == PV_F8_ONE_LEVEL:
            acc = tl.dot(p8, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p8, v, out_dtype=tl.float16).to(tl.float32)
    else:
        v = cast(v, PV_DTYPE, EXACT_CASTS)
        p16 = cast(p, PV_DTYPE, EXACT_CASTS)
        if PV_MODE == PV_F16_ACC32:
            if EXACT_CASTS and PV_DTYPE == tl.bfloat16:
                # the interpreter multiplies bfloat16 tiles wrongly; their products are exact in float32
                acc = tl.dot(p16.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p16, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p16, v, out_dtype=tl.float16).to(tl.float32)
    return acc, m_new, l_i


@triton.jit
def sage_attention_kernel(
    Q, stride_qb, stride_qh, stride_qm,
    K, stride_kb, stride_kh, stride_kn,
    K_SCALE, stride_sb, stride_sh,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    Q_MAX, Q_MIN, Q_MEANS, stride_mb, stride_mh,
    DELTA_S, stride_db, stride_dh, stride_dm,
    K_MEAN, V_MEAN, V_MAX, V_MIN,
    O, stride_ob, stride_oh, stride_om,
    LSE, stride_lb, stride_lh,
    cu_seqlens_q, cu_seqlens_k, nq_dense, nk_dense, H, KV_GROUP,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr,
    SMOOTH_V: tl.constexpr, PV_MODE: tl.constexpr, P_SCALE: tl.constexpr, V_RANGE: tl.constexpr,
    PV_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M % 64 == 0)
    # an FP16 accumulator may sum at most 64 products of the largest P and V (config.FP16_ACCUM_KEYS)
    if PV_MODE == PV_F8_ACC16 or PV_MODE == PV_F16_ACC16:
        tl.static_assert(BLOCK_N == 64)
    pid_m, pid = tl.program_id(0), tl.program_id(1)
    seq, h = pid // H, pid % H
    kvh = h // KV_GROUP
    b, q_start, q_len = seq_bounds(seq, cu_seqlens_q, nq_dense, IS_VARLEN)
    _, k_start, k_len = seq_bounds(seq, cu_seqlens_k, nk_dense, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    qmask = (offs_m[:, None] < q_len) & cmask[None, :]
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    stat_q = pid.to(tl.int64) * HEAD_DIM + cols
    stat_kv = (seq * (H // KV_GROUP) + kvh).to(tl.int64) * HEAD_DIM + cols

    # ---- Q: load, smooth, quantize (in registers) ----
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + q_rows[:, None] * stride_qm + cols[None, :], mask=qmask, other=0.0
    )
    q = q.to(tl.float32)
    finite = is_finite(q)
    row_ok = tl.min(tl.where(finite, 1, 0), 1) > 0
    if RETURN_LSE and SMOOTH_K:
        # smooth K dropped q . mean(K) from every score of the row; the lse adds it back
        q_dot_kmean = tl.sum(q * tl.load(K_MEAN + stat_kv, mask=cmask, other=0.0)[None, :], 1)
    delta_rows = offs_m  # unused unless SMOOTH_Q
    if SMOOTH_Q:
        grp = (offs_m // 64).to(tl.int64)
        means = Q_MEANS + b64 * stride_mb + h64 * stride_mh + grp[:, None] * HEAD_DIM + cols[None, :]
        q = q - tl.load(means, mask=cmask[None, :], other=0.0)
        if BLOCK_M == 64:
            delta_rows = (m0 // 64).to(tl.int64) * stride_dm
        else:
            delta_rows = grp * stride_dm
    q = tl.where(finite & qmask, q, 0.0)
    if GRAN == PER_TENSOR:
        q_amax = channel_amax(0.0, tl.load(Q_MAX + stat_q, mask=cmask, other=0.0),
                              tl.load(Q_MIN + stat_q, mask=cmask, other=0.0), False)  # fmt: skip
        amax = tl.zeros((BLOCK_M,), tl.float32) + tl.max(tl.where(cmask, q_amax, 0.0), 0)
    else:
        amax = q_row_amax(tl.abs(q), BLOCK_M, D_PAD, GRAN)
    q_i8, q_scale = quantize_rows(q, amax, QMAX)
    q_scale = tl.where(row_ok, q_scale * qk_scale, float("nan"))

    # ---- online softmax over key blocks: unmasked full blocks first, then the masked tail ----
    K_blk = K + b64 * stride_kb + kvh64 * stride_kh + k_start.to(tl.int64) * stride_kn
    KS_blk = K_SCALE + b64 * stride_sb + kvh64 * stride_sh + k_start.to(tl.int64)
    V_blk = V + b64 * stride_vb + kvh64 * stride_vh + k_start.to(tl.int64) * stride_vn
    # pointer tiles at key 0, computed once: each step only adds a scalar offset
    k_ptrs = K_blk + offs_n[:, None] * stride_kn + cols[None, :]
    v_ptrs = V_blk + offs_n[:, None] * stride_vn + cols[None, :].to(tl.int64) * stride_vd
    DS_blk = DELTA_S + b64 * stride_db + h64 * stride_dh
    causal_shift = k_len - q_len  # bottom-right alignment: row i sees keys j <= i + k_len - q_len
    offs_m_causal = offs_m + causal_shift
    full_end = (k_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        unmasked_end = tl.minimum(full_end, tl.maximum(m0 + causal_shift + 1, 0) // BLOCK_N * BLOCK_N)
        end = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_shift, 0), k_len)
    else:
        unmasked_end = full_end
        end = k_len
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_i8, q_scale, delta_rows, n0, k_len, offs_m_causal,
            k_ptrs, stride_kn, KS_blk, v_ptrs, stride_vn, DS_blk, offs_n, cols,
            False, IS_CAUSAL, SMOOTH_Q, PV_MODE, P_SCALE, PV_DTYPE, EXACT_CASTS, HEAD_DIM, HEAD_DIM == D_PAD, BLOCK_M == 64,
        )  # fmt: skip
    for n0 in range(unmasked_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_i8, q_scale, delta_rows, n0, k_len, offs_m_causal,
            k_ptrs, stride_kn, KS_blk, v_ptrs, stride_vn, DS_blk, offs_n, cols,
            True, IS_CAUSAL, SMOOTH_Q, PV_MODE, P_SCALE, PV_DTYPE, EXACT_CASTS, HEAD_DIM, HEAD_DIM == D_PAD, BLOCK_M == 64,
        )  # fmt: skip

    # ---- epilogue: normalize, undo the V scale and smoothing, store ----
    has_keys = (l_i > 0) | (l_i != l_i)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if PV_MODE >= PV_F8_TWO_LEVEL:
        v_mean = tl.load(V_MEAN + stat_kv, mask=cmask, other=0.0)
        v_amax = channel_amax(v_mean, tl.load(V_MAX + stat_kv, mask=cmask, other=0.0),
                              tl.load(V_MIN + stat_kv, mask=cmask, other=0.0), SMOOTH_V)  # fmt: skip
        v_scale = tl.maximum(v_amax, 1e-30) / V_RANGE
        out = out * (v_scale / P_SCALE)[None, :]
    if SMOOTH_V:
        out = out + tl.load(V_MEAN + stat_kv, mask=cmask, other=0.0)[None, :]
    # P rounded up (FP8: by as much as 1/16) can put a row above V's range, and float16's range with it
    out = saturate(tl.where(has_keys[:, None], out, 0.0), O.dtype.element_ty)
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + q_rows[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, cast(out, O.dtype.element_ty, EXACT_CASTS), mask=qmask)
    if RETURN_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
        if SMOOTH_K:
            lse = lse + q_dot_kmean * sm_scale
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_rows, lse, mask=offs_m < q_len)
