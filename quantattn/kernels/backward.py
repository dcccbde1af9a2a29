"""The backward kernels: exact gradients of full-precision attention, FlashAttention-2 style.

The gradient is that of softmax(sm_scale q k^T) v at the given q, k, v, not of the quantized forward:
nothing the forward quantized is read here. Three launches, no atomics, FP32 accumulation, the
matrix products on the inputs' 16-bit values (P and dS rounded to the input dtype, as FlashAttention
does), exp2 with sm_scale * log2(e) folded into the scores:

1. `attention_bwd_rows_kernel` with STATS: per query block, the exact row statistics from q and k, an
   online max m and sum l (lse2 = m + log2 l, in log2 units) and delta_i = sum_j P_ij (dO_i . v_j).
   FlashAttention-2 takes delta = rowsum(dO * O) from the forward's output; here O is the quantized
   output, whose error would leak into every gradient, so delta is recomputed from P.
2. `attention_bwd_dkdv_kernel`: per key block of one kv head, a loop over the query blocks of every
   query head of its group (grouped-query attention sums there, in FP32 registers: no per-query-head
   buffers, no reduction pass): dV += P^T dO, dK += dS^T Q with dS = P (dO V^T - delta).
3. `attention_bwd_rows_kernel` without STATS: per query block, dQ += dS K over the key blocks.

Causal masking is bottom-right aligned, as in the forward: query i sees keys j <= i + Nk - Nq. A row that
sees no key has lse2 = +inf, so its P, and every gradient it contributes, is 0.
"""

import triton
import triton.language as tl

from quantattn.kernels.attention import _load_tile
from quantattn.kernels.common import cast, key_block_bounds


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """acc + a @ b with both operands rounded to DTYPE (the inputs' 16-bit type) and an FP32 accumulator.

    The interpreter multiplies bfloat16 tiles wrongly; products of 16-bit values are exact in float32,
    so it multiplies the rounded values in float32 instead (the same products the tensor cores form)."""
    a = cast(a, DTYPE, EXACT_CASTS)
    b = cast(b, DTYPE, EXACT_CASTS)
    if EXACT_CASTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _rows_step(
    q, do, lse2, delta, m_i, l_i, acc, n0, k_len, offs_m_causal, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_n, cmask, qk_scale,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, STATS: tl.constexpr, DTYPE: tl.constexpr,
    EXACT_CASTS: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block for a query block: the online statistics (STATS) or dQ's accumulation."""
    keys = n0 + offs_n
    key_ok = keys < k_len
    row0 = tl.cast(n0, tl.int64)
    k = _load_tile(k_ptrs + row0 * stride_kn, key_ok, cmask, 0.0, MASK, EVEN_D)
    v = _load_tile(v_ptrs + row0 * stride_vn, key_ok, cmask, 0.0, MASK, EVEN_D)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DTYPE, EXACT_CASTS) * qk_scale
    if MASK:
        visible = key_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (keys[None, :] <= offs_m_causal[:, None])
        s = tl.where(visible, s, float("-inf"))
    dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DTYPE, EXACT_CASTS)
    if STATS:
        # acc: sum_j exp2(s_ij - m_i) dp_ij, rescaled with l_i whenever the running max moves
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha + tl.sum(p * dp, 1)
        m_i = m_new
    else:
        p = tl.exp2(s - lse2[:, None])
        ds = p * (dp - delta[:, None])
        acc = _dot(ds, k, acc, DTYPE, EXACT_CASTS)
    return m_i, l_i, acc


@triton.jit
def attention_bwd_rows_kernel(
    Q, stride_qb, stride_qh, stride_qm,
    K, stride_kb, stride_kh, stride_kn,
    V, stride_vb, stride_vh, stride_vn,
    DO, stride_dob, stride_doh, stride_dom,
    LSE2, DELTA,
    DQ, stride_dqb, stride_dqh, stride_dqm,
    q_len, k_len, H, KV_GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, STATS: tl.constexpr, EXACT_CASTS: tl.constexpr,
):  # fmt: skip
    """One query block of one head: STATS writes lse2 and delta ([B, Hq, Nq], float32, contiguous);
    otherwise dQ = sm_scale * sum_j dS_ij k_j (reading lse2 and delta)."""
    pid_m, pid = tl.program_id(0), tl.program_id(1)
    b, h = pid // H, pid % H
    kvh = h // KV_GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    row_ok = offs_m < q_len
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    rows64 = offs_m.to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + rows64[:, None] * stride_qm + cols[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & cmask[None, :], other=0.0)
    do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + rows64[:, None] * stride_dom + cols[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None] & cmask[None, :], other=0.0)
    stat_ptrs = pid.to(tl.int64) * q_len + rows64
    if STATS:
        lse2 = tl.zeros((BLOCK_M,), tl.float32)  # unused
        delta = lse2
    else:
        # rows past the end get +inf: P = 0 there
        lse2 = tl.load(LSE2 + stat_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_ptrs, mask=row_ok, other=0.0)

    k_ptrs = K + b64 * stride_kb + kvh64 * stride_kh + offs_n[:, None] * stride_kn + cols[None, :]
    v_ptrs = V + b64 * stride_vb + kvh64 * stride_vh + offs_n[:, None] * stride_vn + cols[None, :]
    causal_shift = k_len - q_len
    offs_m_causal = offs_m + causal_shift
    unmasked_end, end = key_block_bounds(m0, causal_shift, k_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if STATS:
        acc = tl.zeros((BLOCK_M,), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for n0 in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _rows_step(
            q, do, lse2, delta, m_i, l_i, acc, n0, k_len, offs_m_causal, k_ptrs, v_ptrs, stride_kn, stride_vn,
            offs_n, cmask, qk_scale, False, IS_CAUSAL, STATS, Q.dtype.element_ty, EXACT_CASTS, HEAD_DIM == D_PAD,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for n0 in range(unmasked_end, end, BLOCK_N):
        m_i, l_i, acc = _rows_step(
            q, do, lse2, delta, m_i, l_i, acc, n0, k_len, offs_m_causal, k_ptrs, v_ptrs, stride_kn, stride_vn,
            offs_n, cmask, qk_scale, True, IS_CAUSAL, STATS, Q.dtype.element_ty, EXACT_CASTS, HEAD_DIM == D_PAD,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip

    if STATS:
        has_keys = l_i > 0
        lse2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
        delta = tl.where(has_keys, acc / tl.where(has_keys, l_i, 1.0), 0.0)
        tl.store(LSE2 + stat_ptrs, lse2, mask=row_ok)
        tl.store(DELTA + stat_ptrs, delta, mask=row_ok)
    else:
        dq = acc * sm_scale
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + rows64[:, None] * stride_dqm + cols[None, :]
        tl.store(dq_ptrs, cast(dq, DQ.dtype.element_ty, EXACT_CASTS), mask=row_ok[:, None] & cmask[None, :])


@triton.jit
def _dkdv_step(
    k, v, dk, dv, m0, keys, q_len, causal_shift, q_ptrs, do_ptrs, stride_qm, stride_dom, stat_ptrs,
    LSE2, DELTA, cmask, qk_scale,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DTYPE: tl.constexpr,
    EXACT_CASTS: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query block against the program's key block (transposed: keys are the rows here).

    Keys past the end need no mask: their rows of dK and dV are never stored, and every other row is
    computed from its own key only."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    row0 = tl.cast(m0, tl.int64)
    q = _load_tile(q_ptrs + row0 * stride_qm, row_ok, cmask, 0.0, MASK, EVEN_D)
    do = _load_tile(do_ptrs + row0 * stride_dom, row_ok, cmask, 0.0, MASK, EVEN_D)
    if MASK:
        lse2 = tl.load(LSE2 + stat_ptrs + row0, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_ptrs + row0, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(LSE2 + stat_ptrs + row0)
        delta = tl.load(DELTA + stat_ptrs + row0)
    # s^T: [keys, queries]
    st = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DTYPE, EXACT_CASTS) * qk_scale
    pt = tl.exp2(st - lse2[None, :])
    if MASK:
        if IS_CAUSAL:
            pt = tl.where(keys[:, None] <= offs_m[None, :] + causal_shift, pt, 0.0)
    dv = _dot(pt, do, dv, DTYPE, EXACT_CASTS)
    dpt = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DTYPE, EXACT_CASTS)
    dst = pt * (dpt - delta[None, :])
    dk = _dot(dst, q, dk, DTYPE, EXACT_CASTS)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, stride_qb, stride_qh, stride_qm,
    K, stride_kb, stride_kh, stride_kn,
    V, stride_vb, stride_vh, stride_vn,
    DO, stride_dob, stride_doh, stride_dom,
    LSE2, DELTA,
    DK, stride_dkb, stride_dkh, stride_dkn,
    DV, stride_dvb, stride_dvh, stride_dvn,
    q_len, k_len, H_KV, KV_GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EXACT_CASTS: tl.constexpr,
):  # fmt: skip
    """One key block of one kv head: dK and dV summed over the query heads of its group."""
    pid_n, pid = tl.program_id(0), tl.program_id(1)
    b, kvh = pid // H_KV, pid % H_KV
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    key_ok = keys < k_len
    kv_mask = key_ok[:, None] & cmask[None, :]
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)
    keys64 = keys.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + kvh64 * stride_kh + keys64[:, None] * stride_kn + cols[None, :], mask=kv_mask,
                other=0.0)  # fmt: skip
    v = tl.load(V + b64 * stride_vb + kvh64 * stride_vh + keys64[:, None] * stride_vn + cols[None, :], mask=kv_mask,
                other=0.0)  # fmt: skip
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)

    causal_shift = k_len - q_len
    full_end = (q_len // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # the first query that sees key n0, and the first block from which every query sees the whole
        # key block (query i sees key j when i >= j - shift)
        m_lo = tl.maximum(n0 - causal_shift, 0) // BLOCK_M * BLOCK_M
        m_mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M
        tail_start = tl.maximum(m_mid, full_end)
    else:
        m_lo = 0
        m_mid = 0
        tail_start = full_end
    for g in range(0, KV_GROUP):
        h64 = kvh64 * KV_GROUP + g
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + cols[None, :]
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom + cols[None, :]
        stat_ptrs = (b64 * H_KV * KV_GROUP + h64) * q_len + offs_m
        # the diagonal blocks (causal), then full blocks unmasked, then the last partial block
        if IS_CAUSAL:
            for m0 in range(m_lo, tl.minimum(m_mid, q_len), BLOCK_M):
                dk, dv = _dkdv_step(
                    k, v, dk, dv, m0, keys, q_len, causal_shift, q_ptrs, do_ptrs, stride_qm, stride_dom, stat_ptrs,
                    LSE2, DELTA, cmask, qk_scale, BLOCK_M, True, IS_CAUSAL, Q.dtype.element_ty, EXACT_CASTS,
                    HEAD_DIM == D_PAD, BLOCK_N,
                )  # fmt: skip
        for m0 in range(m_mid, full_end, BLOCK_M):
            dk, dv = _dkdv_step(
                k, v, dk, dv, m0, keys, q_len, causal_shift, q_ptrs, do_ptrs, stride_qm, stride_dom, stat_ptrs,
                LSE2, DELTA, cmask, qk_scale, BLOCK_M, False, IS_CAUSAL, Q.dtype.element_ty, EXACT_CASTS,
                HEAD_DIM == D_PAD, BLOCK_N,
            )  # fmt: skip
        for m0 in range(tail_start, q_len, BLOCK_M):
            dk, dv = _dkdv_step(
                k, v, dk, dv, m0, keys, q_len, causal_shift, q_ptrs, do_ptrs, stride_qm, stride_dom, stat_ptrs,
                LSE2, DELTA, cmask, qk_scale, BLOCK_M, True, IS_CAUSAL, Q.dtype.element_ty, EXACT_CASTS,
                HEAD_DIM == D_PAD, BLOCK_N,
            )  # fmt: skip

    dk = dk * sm_scale
    dk_ptrs = DK + b64 * stride_dkb + kvh64 * stride_dkh + keys64[:, None] * stride_dkn + cols[None, :]
    dv_ptrs = DV + b64 * stride_dvb + kvh64 * stride_dvh + keys64[:, None] * stride_dvn + cols[None, :]
    tl.store(dk_ptrs, cast(dk, DK.dtype.element_ty, EXACT_CASTS), mask=kv_mask)
    tl.store(dv_ptrs, cast(dv, DV.dtype.element_ty, EXACT_CASTS), mask=kv_mask)
