"""The SageAttention kernel: one body for every variant, specialized by constexpr flags.

Per program: one BLOCK_M tile of queries of one head. Q is loaded once, smoothed and quantized in
registers (so no pass over Q precedes the kernel), then an online softmax runs over key blocks (config.KV_BLOCK) of
the pre-quantized K and V: INT8 QK^T with INT32 accumulation, exp2 with sm_scale * log2(e) folded
into Q's scale, and PV in FP8 or FP16/BF16 with the accumulator the config names.
"""

import triton
import triton.language as tl

from quantattn import config as C
from quantattn.kernels.common import (
    PER_TENSOR,
    cast,
    channel_amax,
    is_finite,
    key_block_bounds,
    q_row_amax,
    quantize_rows,
    saturate,
    softmax_divisor,
    to_fp8_e4m3,
)
from quantattn.kernels.quant import seq_bounds

# PV modes
PV_F16_ACC32 = tl.constexpr(0)  # FP16/BF16 operands, FP32 accumulator
PV_F16_ACC16 = tl.constexpr(1)  # FP16 operands, FP16 accumulator per key block, FP32 buffer
PV_F8_TWO_LEVEL = tl.constexpr(2)  # FP8, fresh accumulator per key block added into FP32 (SageAttention2)
PV_F8_ONE_LEVEL = tl.constexpr(3)  # FP8 chained into one accumulator (FP22 on Ada/Hopper)
PV_F8_ACC16 = tl.constexpr(4)  # FP8 with FP16 partials of 64 keys (SageAttention2++)

# attention masks given by the caller (launch.py passes an [B, Hq, Nq, Nk] view, broadcast dims of stride 0)
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)  # uint8 (a bool tensor's bytes): nonzero = the query attends to the key
MASK_ADD = tl.constexpr(2)  # float, added to the scores sm_scale * q.k (natural-log units, like SDPA)

LN2 = tl.constexpr(C.LN2)
LOG2E = tl.constexpr(C.LOG2E)


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
def _pv_step(acc, alpha, p_low, v, PV_MODE: tl.constexpr, PV_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """acc * alpha + P V for one key block and one slab of channels, with the config's accumulator."""
    if PV_MODE == PV_F8_TWO_LEVEL:
        acc = acc * alpha[:, None] + tl.dot(p_low, v)
    elif PV_MODE == PV_F8_ONE_LEVEL:
        acc = tl.dot(p_low, v, acc * alpha[:, None])
    elif PV_MODE == PV_F8_ACC16:
        acc = acc * alpha[:, None] + tl.dot(p_low, v, out_dtype=tl.float16).to(tl.float32)
    else:
        v = cast(v, PV_DTYPE, EXACT_CASTS)
        if PV_MODE == PV_F16_ACC32:
            if EXACT_CASTS and PV_DTYPE == tl.bfloat16:
                # the interpreter multiplies bfloat16 tiles wrongly; their products are exact in float32
                acc = tl.dot(p_low.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p_low, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p_low, v, out_dtype=tl.float16).to(tl.float32)
    return acc


@triton.jit
def _attend_block(
    acc, acc2, m_i, l_i, q_i8, q2_i8, q_scale, delta_rows, kv_row0, k_len, offs_m_causal,
    k_ptrs, k2_ptrs, stride_kn, KS_blk, v_ptrs, v2_ptrs, stride_vn, DS_blk, offs_n, cols, cols2,
    mask_rows, stride_an, row_ok,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr, PV_MODE: tl.constexpr,
    P_SCALE: tl.constexpr, PV_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, D_TAIL: tl.constexpr, ONE_Q_GROUP: tl.constexpr, MASK_MODE: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys kv_row0 .. kv_row0 + BLOCK_N (pointer tiles at key 0).

    MASK: the block may hold keys past the sequence or hidden by the causal mask (bounds checked);
    MASK_MODE: the caller's attention mask, read on every block. D_TAIL > 0: the channels come in two
    slabs (cols: D_PAD wide, cols2: D_TAIL wide), each with its own tiles and accumulator."""
    keys = kv_row0 + offs_n
    key_ok = keys < k_len
    # 64-bit offsets: the caller's V (FP16 PV, NHD) has a row stride of H * d, and 128K keys of it
    # pass 2**31 elements
    row0 = tl.cast(kv_row0, tl.int64)
    k = _load_tile(k_ptrs + row0 * stride_kn, key_ok, cols < HEAD_DIM, 0, MASK, HEAD_DIM >= D_PAD)
    if MASK:
        k_scale = tl.load(KS_blk + keys, mask=key_ok, other=0.0)
    else:
        k_scale = tl.load(KS_blk + keys)
    qk = tl.dot(q_i8, tl.trans(k))
    if D_TAIL > 0:
        k2 = _load_tile(k2_ptrs + row0 * stride_kn, key_ok, cols2 < HEAD_DIM, 0, MASK, HEAD_DIM == D_PAD + D_TAIL)
        qk = tl.dot(q2_i8, tl.trans(k2), qk, out_dtype=tl.int32)
    # scores s = (qk * k_scale) * q_scale; q_scale > 0 commutes with the row max, so the row's
    # multiply joins the exponent's subtraction in one FMA (one multiply per score, not two)
    s = qk.to(tl.float32) * k_scale[None, :]
    # terms added to the scores need them in exp2 units first: then s holds q_scale already
    if SMOOTH_Q or MASK_MODE == MASK_ADD:
        s = s * q_scale[:, None]
    if SMOOTH_Q:
        if ONE_Q_GROUP:  # the tile is one smooth-Q block: one correction row for all its queries
            delta = tl.load(DS_blk + delta_rows + keys, mask=key_ok, other=0.0)[None, :]
        else:
            delta = tl.load(DS_blk + delta_rows[:, None] + keys[None, :], mask=key_ok[None, :], other=0.0)
        s = s + delta
    if MASK_MODE != MASK_NONE:
        m_ptrs = mask_rows[:, None] + (keys.to(tl.int64) * stride_an)[None, :]
        in_bounds = row_ok[:, None] & key_ok[None, :]
        if MASK_MODE == MASK_BOOL:
            s = tl.where(tl.load(m_ptrs, mask=in_bounds, other=1) != 0, s, float("-inf"))
        else:
            s = s + tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if MASK:
        visible = key_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (keys[None, :] <= offs_m_causal[:, None])
        s = tl.where(visible, s, float("-inf"))
    if SMOOTH_Q or MASK_MODE == MASK_ADD:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if SMOOTH_Q or MASK_MODE == MASK_ADD:
        p = tl.exp2(s - m_safe[:, None])
    else:
        p = tl.exp2(s * q_scale[:, None] - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_MODE >= PV_F8_TWO_LEVEL:
        if EXACT_CASTS:
            p_low = to_fp8_e4m3(p * P_SCALE, True)
        else:
            # P * P_SCALE lies in [0, 448] or is NaN: the hardware's satfinite cast needs no clamping
            p_low = (p * P_SCALE).to(tl.float8e4nv)
    else:
        p_low = cast(p, PV_DTYPE, EXACT_CASTS)
    v = _load_tile(v_ptrs + row0 * stride_vn, key_ok, cols < HEAD_DIM, 0.0, MASK, HEAD_DIM >= D_PAD)
    acc = _pv_step(acc, alpha, p_low, v, PV_MODE, PV_DTYPE, EXACT_CASTS)
    if D_TAIL > 0:
        v2 = _load_tile(v2_ptrs + row0 * stride_vn, key_ok, cols2 < HEAD_DIM, 0.0, MASK, HEAD_DIM == D_PAD + D_TAIL)
        acc2 = _pv_step(acc2, alpha, p_low, v2, PV_MODE, PV_DTYPE, EXACT_CASTS)
    return acc, acc2, m_new, l_i


@triton.jit
def _load_q_slab(q_rows_ptr, means_rows_ptr, K_MEAN_row, cols, rows_in, HEAD_DIM: tl.constexpr,
                 SMOOTH_Q: tl.constexpr, SMOOTH_K: tl.constexpr, RETURN_LSE: tl.constexpr):  # fmt: skip
    """One slab of Q's channels in float32, smoothed, non-finite elements zeroed; also the number of
    non-finite elements per row and (for the lse of smooth K) the row's dot product with K's vector:
    smooth K dropped q . k̄ (K_MEAN: its trimmed token mean) from every score of the row."""
    cmask = cols < HEAD_DIM
    inside = rows_in[:, None] & cmask[None, :]
    q = tl.load(q_rows_ptr[:, None] + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    finite = is_finite(q)
    bad = tl.sum(tl.where(finite, 0, 1), 1)
    q_dot_kmean = tl.zeros_like(bad).to(tl.float32)
    if RETURN_LSE and SMOOTH_K:
        q_dot_kmean = tl.sum(q * tl.load(K_MEAN_row + cols, mask=cmask, other=0.0)[None, :], 1)
    if SMOOTH_Q:
        q = q - tl.load(means_rows_ptr[:, None] + cols[None, :], mask=cmask[None, :], other=0.0)
    return tl.where(finite & inside, q, 0.0), bad, q_dot_kmean


@triton.jit
def _q_amax(q, Q_MAX_row, Q_MIN_row, cols, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            D: tl.constexpr, GRAN: tl.constexpr):  # fmt: skip
    """Per-row amax of one slab over each row's scale group (per tensor: from Q's channel ranges)."""
    # one return after the branches: Triton compiles the statements after a constexpr-guarded return too
    if GRAN == PER_TENSOR:
        cmask = cols < HEAD_DIM
        q_amax = channel_amax(0.0, tl.load(Q_MAX_row + cols, mask=cmask, other=0.0),
                              tl.load(Q_MIN_row + cols, mask=cmask, other=0.0), False)  # fmt: skip
        amax = tl.zeros((BLOCK_M,), tl.float32) + tl.max(tl.where(cmask, q_amax, 0.0), 0)
    else:
        amax = q_row_amax(tl.abs(q), BLOCK_M, D, GRAN)
    return amax


@triton.jit
def _store_out_slab(acc, l_div, has_keys, O_rows_ptr, rows_in, cols, stat_kv, V_MEAN, V_MAX, V_MIN,
                    HEAD_DIM: tl.constexpr, PV_MODE: tl.constexpr, SMOOTH_V: tl.constexpr, V_RANGE: tl.constexpr,
                    P_SCALE: tl.constexpr, EXACT_CASTS: tl.constexpr, OUT_DTYPE: tl.constexpr):  # fmt: skip
    """Normalize one slab of the output, undo the V scale and smoothing, store it."""
    cmask = cols < HEAD_DIM
    out = acc / l_div[:, None]
    if PV_MODE >= PV_F8_TWO_LEVEL:
        v_mean = tl.load(V_MEAN + stat_kv + cols, mask=cmask, other=0.0)
        v_amax = channel_amax(v_mean, tl.load(V_MAX + stat_kv + cols, mask=cmask, other=0.0),
                              tl.load(V_MIN + stat_kv + cols, mask=cmask, other=0.0), SMOOTH_V)  # fmt: skip
        v_scale = tl.maximum(v_amax, 1e-30) / V_RANGE
        out = out * (v_scale / P_SCALE)[None, :]
    if SMOOTH_V:
        out = out + tl.load(V_MEAN + stat_kv + cols, mask=cmask, other=0.0)[None, :]
    # P rounded up (FP8: by as much as 1/16) can put a row above V's range, and float16's range with it
    out = saturate(tl.where(has_keys[:, None], out, 0.0), OUT_DTYPE)
    inside = rows_in[:, None] & cmask[None, :]
    tl.store(O_rows_ptr[:, None] + cols[None, :], cast(out, OUT_DTYPE, EXACT_CASTS), mask=inside)


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
    MASK, stride_ab, stride_ah, stride_am, stride_an,
    cu_seqlens_q, cu_seqlens_k, nq_dense, nk_dense, H, KV_GROUP,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr,
    SMOOTH_V: tl.constexpr, PV_MODE: tl.constexpr, P_SCALE: tl.constexpr, V_RANGE: tl.constexpr,
    PV_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr, MASK_MODE: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):  # fmt: skip
    """Channels: D_TAIL == 0: one slab of D_PAD >= HEAD_DIM (a power of two, masked past HEAD_DIM);
    D_TAIL > 0: D_PAD channels then D_TAIL more (80 = 64 + 16 -> 64 + 32, 160 = 128 + 32, ...), so that
    head dims between powers of two do not pay the next power's matrix work.

    KEY_LENGTHS: cu_seqlens_k holds each batch entry's number of keys (a key-padding mask): the
    keys past it are skipped, block by block; the causal mask stays aligned to the tensor's nk_dense."""
    tl.static_assert(BLOCK_M % 64 == 0)
    # an FP16 accumulator may sum at most 64 products of the largest P and V (config.FP16_ACCUM_KEYS)
    if PV_MODE == PV_F8_ACC16 or PV_MODE == PV_F16_ACC16:
        tl.static_assert(BLOCK_N == 64)
    pid_m, pid = tl.program_id(0), tl.program_id(1)
    seq, h = pid // H, pid % H
    kvh = h // KV_GROUP
    b, q_start, q_len = seq_bounds(seq, cu_seqlens_q, nq_dense, IS_VARLEN, False)
    _, k_start, k_len = seq_bounds(seq, cu_seqlens_k, nk_dense, IS_VARLEN, KEY_LENGTHS)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    cols2 = cols  # unused unless D_TAIL > 0
    if D_TAIL > 0:
        cols2 = D_PAD + tl.arange(0, D_TAIL)
    row_ok = offs_m < q_len
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    stat_q = pid.to(tl.int64) * HEAD_DIM
    stat_kv = (seq * (H // KV_GROUP) + kvh).to(tl.int64) * HEAD_DIM

    # ---- Q: load, smooth, quantize (in registers) ----
    q_rows = (q_start + offs_m).to(tl.int64)
    q_rows_ptr = Q + b64 * stride_qb + h64 * stride_qh + q_rows * stride_qm
    delta_rows = offs_m  # unused unless SMOOTH_Q
    means_rows = Q_MEANS  # unused unless SMOOTH_Q
    if SMOOTH_Q:
        grp = (offs_m // 64).to(tl.int64)
        means_rows = Q_MEANS + b64 * stride_mb + h64 * stride_mh + grp * HEAD_DIM
        if BLOCK_M == 64:
            delta_rows = (m0 // 64).to(tl.int64) * stride_dm
        else:
            delta_rows = grp * stride_dm
    q, bad, q_dot_kmean = _load_q_slab(q_rows_ptr, means_rows, K_MEAN + stat_kv, cols, row_ok, HEAD_DIM, SMOOTH_Q,
                                       SMOOTH_K, RETURN_LSE)  # fmt: skip
    amax = _q_amax(q, Q_MAX + stat_q, Q_MIN + stat_q, cols, HEAD_DIM, BLOCK_M, D_PAD, GRAN)
    q2 = q  # unused unless D_TAIL > 0
    if D_TAIL > 0:
        q2, bad2, q_dot_kmean2 = _load_q_slab(q_rows_ptr, means_rows, K_MEAN + stat_kv, cols2, row_ok, HEAD_DIM,
                                              SMOOTH_Q, SMOOTH_K, RETURN_LSE)  # fmt: skip
        bad += bad2
        q_dot_kmean += q_dot_kmean2
        amax = tl.maximum(amax, _q_amax(q2, Q_MAX + stat_q, Q_MIN + stat_q, cols2, HEAD_DIM, BLOCK_M, D_TAIL, GRAN))
    q_i8, q_scale = quantize_rows(q, amax, QMAX)
    q2_i8 = q_i8  # unused unless D_TAIL > 0
    if D_TAIL > 0:
        q2_i8, _ = quantize_rows(q2, amax, QMAX)
    q_scale = tl.where(bad == 0, q_scale * qk_scale, float("nan"))

    # ---- online softmax over key blocks: unmasked full blocks first, then the masked tail ----
    K_blk = K + b64 * stride_kb + kvh64 * stride_kh + k_start.to(tl.int64) * stride_kn
    KS_blk = K_SCALE + b64 * stride_sb + kvh64 * stride_sh + k_start.to(tl.int64)
    V_blk = V + b64 * stride_vb + kvh64 * stride_vh + k_start.to(tl.int64) * stride_vn
    # pointer tiles at key 0, computed once: each step only adds a scalar offset
    k_ptrs = K_blk + offs_n[:, None] * stride_kn + cols[None, :]
    v_ptrs = V_blk + offs_n[:, None] * stride_vn + cols[None, :].to(tl.int64) * stride_vd
    k2_ptrs, v2_ptrs = k_ptrs, v_ptrs  # unused unless D_TAIL > 0
    if D_TAIL > 0:
        k2_ptrs = K_blk + offs_n[:, None] * stride_kn + cols2[None, :]
        v2_ptrs = V_blk + offs_n[:, None] * stride_vn + cols2[None, :].to(tl.int64) * stride_vd
    DS_blk = DELTA_S + b64 * stride_db + h64 * stride_dh
    # bottom-right alignment: row i sees keys j <= i + k_len - q_len (of the tensor, not of a key length)
    if KEY_LENGTHS:
        causal_shift = nk_dense - q_len
    else:
        causal_shift = k_len - q_len
    mask_rows = MASK + b64 * stride_ab + h64 * stride_ah + offs_m.to(tl.int64) * stride_am
    offs_m_causal = offs_m + causal_shift
    unmasked_end, end = key_block_bounds(m0, causal_shift, k_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    acc2 = acc  # unused unless D_TAIL > 0
    if D_TAIL > 0:
        acc2 = tl.zeros((BLOCK_M, D_TAIL), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, acc2, m_i, l_i = _attend_block(
            acc, acc2, m_i, l_i, q_i8, q2_i8, q_scale, delta_rows, n0, k_len, offs_m_causal,
            k_ptrs, k2_ptrs, stride_kn, KS_blk, v_ptrs, v2_ptrs, stride_vn, DS_blk, offs_n, cols, cols2,
            mask_rows, stride_an, row_ok,
            False, IS_CAUSAL, SMOOTH_Q, PV_MODE, P_SCALE, PV_DTYPE, EXACT_CASTS, HEAD_DIM, D_PAD, D_TAIL,
            BLOCK_M == 64, MASK_MODE,
        )  # fmt: skip
    for n0 in range(unmasked_end, end, BLOCK_N):
        acc, acc2, m_i, l_i = _attend_block(
            acc, acc2, m_i, l_i, q_i8, q2_i8, q_scale, delta_rows, n0, k_len, offs_m_causal,
            k_ptrs, k2_ptrs, stride_kn, KS_blk, v_ptrs, v2_ptrs, stride_vn, DS_blk, offs_n, cols, cols2,
            mask_rows, stride_an, row_ok,
            True, IS_CAUSAL, SMOOTH_Q, PV_MODE, P_SCALE, PV_DTYPE, EXACT_CASTS, HEAD_DIM, D_PAD, D_TAIL,
            BLOCK_M == 64, MASK_MODE,
        )  # fmt: skip

    # ---- epilogue: normalize, undo the V scale and smoothing, store ----
    has_keys = (l_i > 0) | (l_i != l_i)
    l_div = softmax_divisor(l_i)
    O_rows = O + b64 * stride_ob + h64 * stride_oh + q_rows * stride_om
    _store_out_slab(acc, l_div, has_keys, O_rows, row_ok, cols, stat_kv, V_MEAN, V_MAX, V_MIN,
                    HEAD_DIM, PV_MODE, SMOOTH_V, V_RANGE, P_SCALE, EXACT_CASTS, O.dtype.element_ty)  # fmt: skip
    if D_TAIL > 0:
        _store_out_slab(acc2, l_div, has_keys, O_rows, row_ok, cols2, stat_kv, V_MEAN, V_MAX, V_MIN,
                        HEAD_DIM, PV_MODE, SMOOTH_V, V_RANGE, P_SCALE, EXACT_CASTS, O.dtype.element_ty)  # fmt: skip
    if RETURN_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
        if SMOOTH_K:
            lse = lse + q_dot_kmean * sm_scale
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_rows, lse, mask=row_ok)
