"""Decode kernels: attention of a few query tokens against a quantized KV cache, and the cache's append.

Decoding is memory-bound: each step reads the whole K/V once. The cache holds K as INT8 (per-token
scales, a fixed smoothing vector) and V as FP8 with per-channel scales per 64-token block
(quantattn/reference/decode.py is the specification), about half the bytes of bf16 K/V.

`decode_attention_kernel` is split-K ("flash-decoding"): program (split, kv head, row tile) runs an
online softmax over one split of the keys for ALL query rows that read its kv head: the GQA group's
heads times the query tokens are packed into the M dimension of the products (at least 16 rows, what
the MMA needs), so one pass over a kv head's keys serves every query head of its group. With one split
the program writes the output; otherwise it writes float32 partials (acc, m, l) that
`decode_merge_kernel` combines. `append_kv_kernel` quantizes new tokens into the cache.
"""

import triton
import triton.language as tl

from quantattn import config as C
from quantattn.kernels.common import (
    AMAX_FLOOR,
    cast,
    is_finite,
    round_half_even,
    saturate,
    softmax_divisor,
    to_fp8_e4m3,
)

LN2 = tl.constexpr(C.LN2)


@triton.jit
def _div(a, b):
    """a / b rounded once (div.rn.f32), as the reference's `ieee_div` and torch's tensor division.
    Triton's `/` on float32 compiles to div.full.f32, up to 2 ulp off: enough to move a product that
    sits on a rounding tie (frequent when bf16 values are scaled onto the FP8 or INT8 grid) to the
    other side, so the cache's bytes and Q's INT8 values would differ from the reference's."""
    a, b = tl.broadcast(tl.cast(a, tl.float32), tl.cast(b, tl.float32))
    return tl.div_rn(a, b)


@triton.jit
def _quantize_rows(x, amax, QMAX: tl.constexpr):
    """common.quantize_rows with correctly rounded divisions (`_div`): INT8 tile and scale per row.
    The launcher compiles the decode kernels without FMA contraction, so `x * inv` is rounded before
    round_half_even adds its magic constant, as torch.round(x * inv) rounds it."""
    amax = tl.maximum(amax, AMAX_FLOOR)
    q = round_half_even(x * _div(QMAX, amax)[:, None])
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    return q.to(tl.int8), _div(amax, QMAX)


@triton.jit
def _scores_step(m_i, l_i, q_i8, q_scale, k, k_scale, visible, MASKED: tl.constexpr):
    """Scores of one 64-key block and the online-softmax update; returns (p, alpha, m_new, l_i)."""
    s = tl.dot(q_i8, tl.trans(k)).to(tl.float32) * k_scale[None, :]
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # q_scale > 0 commutes with the row max: one multiply per score (as the main kernel)
    m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * q_scale[:, None] - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


# the cache length changes every decode step: one compiled kernel for all of them
@triton.jit(do_not_specialize=["n_keys"])
def decode_attention_kernel(
    Q, stride_qb, stride_qh, stride_qm,
    K, stride_kb, stride_kh, stride_kn,
    K_SCALE, stride_sb, stride_sh,
    V, stride_vb, stride_vh, stride_vd,
    V_SCALE, stride_wb, stride_wh, stride_wblk,
    V_TAIL, stride_tb, stride_th, stride_tn,
    K_MEAN,
    O, stride_ob, stride_oh, stride_om,
    LSE, stride_lb, stride_lh,
    PART_O, PART_ML,
    H_KV, n_q, n_keys, split_keys, n_splits, row_tiles, KV_GROUP,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    P_SCALE: tl.constexpr, PV_ACC16: tl.constexpr, EXACT_CASTS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
):  # fmt: skip
    """One split of the keys (program_id 0) for one row tile of one (batch, kv head) (program_id 1).

    Packed row r of kv head g is query token r % n_q of query head g * KV_GROUP + r // n_q. Keys
    [0, n_keys // 64 * 64) are FP8 blocks (V transposed: [d, tokens], one scale row per block); the
    rest, fewer than 64, are the 16-bit tail (V_TAIL, [64, d]). PART_O is [programs, BLOCK_M, n_splits,
    D_PAD] and PART_ML [programs, BLOCK_M, n_splits, 2] (m, l), programs = B * H_KV * row_tiles.
    """
    tl.static_assert(BLOCK_M >= 16)
    split = tl.program_id(0)
    pid = tl.program_id(1)
    tile = pid % row_tiles
    bh = pid // row_tiles
    b = bh // H_KV
    kvh = bh % H_KV
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < KV_GROUP * n_q
    head = kvh * KV_GROUP + rows // n_q
    qi = rows % n_q
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)

    # ---- Q: per-token INT8, sm_scale * log2(e) folded into the scale ----
    q_rows = b64 * stride_qb + head.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qm
    qmask = row_ok[:, None] & cmask[None, :]
    q_raw = tl.load(Q + q_rows[:, None] + cols[None, :], mask=qmask, other=0.0).to(tl.float32)
    finite = is_finite(q_raw)
    q_row_finite = tl.min(tl.where(finite, 1, 0), 1) > 0
    q = tl.where(finite, q_raw, 0.0)
    q_i8, q_scale = _quantize_rows(q, tl.max(tl.abs(q), 1), 127.0)
    q_scale = tl.where(q_row_finite, q_scale * qk_scale, float("nan"))

    # ---- online softmax over this split's 64-key blocks ----
    K_h = K + b64 * stride_kb + kvh64 * stride_kh
    KS_h = K_SCALE + b64 * stride_sb + kvh64 * stride_sh
    V_h = V + b64 * stride_vb + kvh64 * stride_vh
    VS_h = V_SCALE + b64 * stride_wb + kvh64 * stride_wh
    VT_h = V_TAIL + b64 * stride_tb + kvh64 * stride_th
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K_h + offs_n[:, None] * stride_kn + cols[None, :]
    v_ptrs = V_h + offs_n[:, None] + cols[None, :].to(tl.int64) * stride_vd  # [keys, d] view of [d, keys]
    last_key = qi + (n_keys - n_q)  # bottom-right causal: query i sees keys j <= i + Nk - Nq
    start = split * split_keys
    end = tl.minimum(start + split_keys, n_keys)
    full_end = (n_keys // BLOCK_N) * BLOCK_N
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(start, tl.minimum(end, full_end), BLOCK_N):
        keys = n0 + offs_n
        n064 = tl.cast(n0, tl.int64)
        if EVEN_D:
            k = tl.load(k_ptrs + n064 * stride_kn)
            v = tl.load(v_ptrs + n064)
        else:
            k = tl.load(k_ptrs + n064 * stride_kn, mask=cmask[None, :], other=0)
            v = tl.load(v_ptrs + n064, mask=cmask[None, :], other=0.0)
        k_scale = tl.load(KS_h + keys)
        visible = keys[None, :] <= last_key[:, None]
        p, alpha, m_i, l_i = _scores_step(m_i, l_i, q_i8, q_scale, k, k_scale, visible, IS_CAUSAL)
        v_scale = tl.load(VS_h + (n0 // BLOCK_N) * stride_wblk + cols, mask=cmask, other=0.0)
        if EXACT_CASTS:
            p8 = to_fp8_e4m3(p * P_SCALE, True)
        else:
            # P * P_SCALE lies in [0, P_SCALE] or is NaN: the hardware's satfinite cast needs no clamping
            p8 = (p * P_SCALE).to(tl.float8e4nv)
        if PV_ACC16:
            pv = tl.dot(p8, v, out_dtype=tl.float16).to(tl.float32)
        else:
            pv = tl.dot(p8, v)  # a fresh accumulator per block: the FP22 rounding stays within it
        acc = acc * alpha[:, None] + pv * (v_scale / P_SCALE)[None, :]
    for n0 in range(tl.maximum(start, full_end), end, BLOCK_N):  # the 16-bit tail: at most one block
        keys = n0 + offs_n
        key_ok = keys < n_keys
        kv_mask = key_ok[:, None] & cmask[None, :]
        k = tl.load(k_ptrs + tl.cast(n0, tl.int64) * stride_kn, mask=kv_mask, other=0)
        k_scale = tl.load(KS_h + keys, mask=key_ok, other=0.0)
        visible = key_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (keys[None, :] <= last_key[:, None])
        p, alpha, m_i, l_i = _scores_step(m_i, l_i, q_i8, q_scale, k, k_scale, visible, True)
        vt = tl.load(VT_h + offs_n[:, None] * stride_tn + cols[None, :], mask=kv_mask, other=0.0)
        p16 = cast(p, V_TAIL.dtype.element_ty, EXACT_CASTS)
        if EXACT_CASTS and V_TAIL.dtype.element_ty == tl.bfloat16:
            # the interpreter multiplies bfloat16 tiles wrongly; their products are exact in float32
            pv = tl.dot(p16.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p16, vt)
        acc = acc * alpha[:, None] + pv

    if SINGLE_SPLIT:
        has_keys = (l_i > 0) | (l_i != l_i)
        out = acc / softmax_divisor(l_i)[:, None]
        out = saturate(tl.where(has_keys[:, None], out, 0.0), O.dtype.element_ty)
        o_rows = b64 * stride_ob + head.to(tl.int64) * stride_oh + qi.to(tl.int64) * stride_om
        tl.store(O + o_rows[:, None] + cols[None, :], cast(out, O.dtype.element_ty, EXACT_CASTS), mask=qmask)
        if RETURN_LSE:
            k_mean = tl.load(K_MEAN + bh.to(tl.int64) * HEAD_DIM + cols, mask=cmask, other=0.0)
            lse = tl.where(has_keys, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
            lse = lse + tl.sum(q_raw * k_mean[None, :], 1) * sm_scale
            lse_rows = b64 * stride_lb + head.to(tl.int64) * stride_lh + qi
            tl.store(LSE + lse_rows, lse, mask=row_ok)
    else:
        slot = (pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)) * n_splits + split
        # padding rows (a 64-row tile for 4 packed rows on the GPU) write nothing: the merge skips them
        tl.store(PART_O + slot[:, None] * D_PAD + cols[None, :], acc, mask=row_ok[:, None])
        tl.store(PART_ML + slot * 2, m_i, mask=row_ok)
        tl.store(PART_ML + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def decode_merge_kernel(
    PART_O, PART_ML,
    Q, stride_qb, stride_qh, stride_qm,
    K_MEAN,
    O, stride_ob, stride_oh, stride_om,
    LSE, stride_lb, stride_lh,
    H_KV, n_q, n_splits, row_tiles, KV_GROUP, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    EXACT_CASTS: tl.constexpr, RETURN_LSE: tl.constexpr,
):  # fmt: skip
    """Combine one packed row's splits: O = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s."""
    slot = tl.program_id(0)
    pid = slot // BLOCK_M
    row = (pid % row_tiles) * BLOCK_M + slot % BLOCK_M
    if row >= KV_GROUP * n_q:
        return
    bh = pid // row_tiles
    b = bh // H_KV
    head = (bh % H_KV) * KV_GROUP + row // n_q
    qi = row % n_q
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    splits = tl.arange(0, SPLIT_BLOCK)
    base = slot.to(tl.int64) * n_splits
    m_vec = tl.full((SPLIT_BLOCK,), float("-inf"), tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        ok = s0 + splits < n_splits
        m_vec = tl.maximum(m_vec, tl.load(PART_ML + (base + s0 + splits) * 2, mask=ok, other=float("-inf")))
    m_max = tl.max(m_vec, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_vec = tl.zeros((SPLIT_BLOCK,), tl.float32)
    acc = tl.zeros((SPLIT_BLOCK, D_PAD), tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        ok = s0 + splits < n_splits
        idx = base + s0 + splits
        w = tl.exp2(tl.load(PART_ML + idx * 2, mask=ok, other=float("-inf")) - m_safe)
        l_vec += tl.load(PART_ML + idx * 2 + 1, mask=ok, other=0.0) * w
        acc += tl.load(PART_O + idx[:, None] * D_PAD + cols[None, :], mask=ok[:, None], other=0.0) * w[:, None]
    l_tot = tl.sum(l_vec, 0)
    out = tl.sum(acc, 0)
    has_keys = (l_tot > 0) | (l_tot != l_tot)
    out = out / softmax_divisor(l_tot)
    out = saturate(tl.where(has_keys, out, 0.0), O.dtype.element_ty)
    b64, head64, qi64 = b.to(tl.int64), head.to(tl.int64), qi.to(tl.int64)
    tl.store(
        O + b64 * stride_ob + head64 * stride_oh + qi64 * stride_om + cols,
        cast(out, O.dtype.element_ty, EXACT_CASTS),
        mask=cmask,
    )
    if RETURN_LSE:
        q = tl.load(Q + b64 * stride_qb + head64 * stride_qh + qi64 * stride_qm + cols, mask=cmask, other=0.0)
        k_mean = tl.load(K_MEAN + bh.to(tl.int64) * HEAD_DIM + cols, mask=cmask, other=0.0)
        lse = tl.where(has_keys, (m_max + tl.log2(l_tot)) * LN2, float("-inf"))
        lse = lse + tl.sum(q.to(tl.float32) * k_mean, 0) * sm_scale
        tl.store(LSE + b64 * stride_lb + head64 * stride_lh + qi64, lse)


@triton.jit(do_not_specialize=["pos0", "n_new"])
def append_kv_kernel(
    K_NEW, stride_kb, stride_kh, stride_kn,
    V_NEW, stride_vb, stride_vh, stride_vn,
    K_MEAN,
    KQ, stride_qb, stride_qh, stride_qn,
    K_SCALE, stride_sb, stride_sh,
    VQ, stride_ob, stride_oh, stride_od,
    V_SCALE, stride_wb, stride_wh, stride_wblk,
    V_TAIL, stride_tb, stride_th, stride_tn,
    H_KV, pos0, n_new,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, V_RANGE: tl.constexpr,
    EXACT_CASTS: tl.constexpr,
):  # fmt: skip
    """Cache tokens pos0 .. pos0 + n_new: program (j, batch * kv head) handles cache block pos0 // 64 + j.

    K: each new token of the block, minus k_mean, to INT8 with its own scale. V: if the block is now
    complete, its 64 tokens (older ones from V_TAIL, the rest new) become FP8 with one scale per
    channel; otherwise the new tokens go to V_TAIL. The launcher never has one launch both read V_TAIL
    (completing the first block) and write it (a later, incomplete block): it splits such an append in two.
    """
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H_KV).to(tl.int64)
    h64 = (bh % H_KV).to(tl.int64)
    blk = pos0 // BLOCK_N + j
    t = tl.arange(0, BLOCK_N)
    pos = blk * BLOCK_N + t
    new_row = (pos - pos0).to(tl.int64)
    is_new = (pos >= pos0) & (pos < pos0 + n_new)
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    new_mask = is_new[:, None] & cmask[None, :]
    pos64 = pos.to(tl.int64)

    # ---- K, per token ----
    k = tl.load(
        K_NEW + b64 * stride_kb + h64 * stride_kh + new_row[:, None] * stride_kn + cols[None, :],
        mask=new_mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    row_ok = tl.min(tl.where(is_finite(k), 1, 0), 1) > 0
    k = k - tl.load(K_MEAN + bh.to(tl.int64) * HEAD_DIM + cols, mask=cmask, other=0.0)[None, :]
    k = tl.where(is_finite(k) & new_mask, k, 0.0)
    kq, k_scale = _quantize_rows(k, tl.max(tl.abs(k), 1), 127.0)
    k_scale = tl.where(row_ok, k_scale, float("nan"))
    tl.store(KQ + b64 * stride_qb + h64 * stride_qh + pos64[:, None] * stride_qn + cols[None, :], kq, mask=new_mask)
    tl.store(K_SCALE + b64 * stride_sb + h64 * stride_sh + pos64, k_scale, mask=is_new)

    # ---- V, per 64-token block ----
    v_new = tl.load(
        V_NEW + b64 * stride_vb + h64 * stride_vh + new_row[:, None] * stride_vn + cols[None, :],
        mask=new_mask, other=0.0,
    )  # fmt: skip
    tail_ptrs = V_TAIL + b64 * stride_tb + h64 * stride_th + t[:, None] * stride_tn + cols[None, :]
    if (blk + 1) * BLOCK_N <= pos0 + n_new:
        old = pos < pos0
        v_old = tl.load(tail_ptrs, mask=old[:, None] & cmask[None, :], other=0.0)
        v = tl.where(old[:, None], v_old.to(tl.float32), v_new.to(tl.float32))
        amax = tl.max(tl.where(is_finite(v), tl.abs(v), 0.0), 0)
        amax = tl.maximum(amax, 1e-30)
        vq = to_fp8_e4m3(v * _div(V_RANGE, amax)[None, :], EXACT_CASTS)
        v_out = VQ + b64 * stride_ob + h64 * stride_oh + pos64[:, None] + cols[None, :].to(tl.int64) * stride_od
        tl.store(v_out, vq, mask=cmask[None, :])
        tl.store(V_SCALE + b64 * stride_wb + h64 * stride_wh + blk.to(tl.int64) * stride_wblk + cols,
                 _div(amax, V_RANGE), mask=cmask)  # fmt: skip
    else:
        tl.store(tail_ptrs, v_new.to(V_TAIL.dtype.element_ty), mask=new_mask)
