"""Preprocessing kernels: token statistics (smoothing means, ranges) and the K/V quantization.

Sequences are addressed the same way in every kernel: program `seq` of a dense call reads batch
`seq` from row 0; in a varlen call (IS_VARLEN) all sequences are packed in batch 0 and sequence
`seq` starts at row cu_seqlens[seq].
"""

import triton
import triton.language as tl

from quantattn import calls
from quantattn.kernels.common import (
    PER_TENSOR,
    cast,
    channel_amax,
    is_finite,
    k_row_amax,
    quantize_rows,
    to_fp8_e4m3,
)

# rows of preprocess_kv_kernel's per-chunk partials: K sum, max, min; V sum, max, min; K finite count
PARTIAL_ROWS = tl.constexpr(calls.PARTIAL_ROWS)
K_COUNT_ROW = tl.constexpr(6)


@triton.jit
def seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN: tl.constexpr, LENGTHS: tl.constexpr):
    """(batch index, first row, length) of sequence `seq`.

    LENGTHS (dense calls only): `cu_seqlens` holds each batch entry's length instead, clamped to
    [0, n_dense] here (so that reading them on the host, a GPU sync, is never needed to validate them)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + seq)
        return seq * 0, start, tl.load(cu_seqlens + seq + 1) - start
    if LENGTHS:
        return seq, seq * 0, tl.minimum(tl.maximum(tl.load(cu_seqlens + seq), 0), n_dense)
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
    b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN, False)
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
def _load_rows(X, b, h, stride_b, stride_h, stride_n, first, local, cols, mask):
    """Rows first + local of head (b, h): a 64-bit scalar base and 32-bit offsets within the tile, so
    that the tile's addresses do not take two registers per element."""
    base = X + (b * stride_b + h * stride_h + first * stride_n)
    return tl.load(base + (local[:, None] * stride_n + cols[None, :]), mask=mask, other=0.0)


@triton.jit
def _partial_stats(x, mask):
    """Per channel: sum, max and min of the finite elements of a [rows, D] tile."""
    x = x.to(tl.float32)
    ok = is_finite(x) & mask
    return (
        tl.sum(tl.where(ok, x, 0.0), 0),
        tl.max(tl.where(ok, x, float("-inf")), 0),
        tl.min(tl.where(ok, x, float("inf")), 0),
    )


@triton.jit
def _finite_count(x, mask):
    """Per channel: how many elements of a [rows, D] tile are finite (in float32: exact below 2**24)."""
    return tl.sum(tl.where(is_finite(x.to(tl.float32)) & mask, 1.0, 0.0), 0)


@triton.jit
def _store_stats(ptr, plane, total, cmax, cmin, cmask):
    tl.store(ptr, total, mask=cmask)
    tl.store(ptr + plane, cmax, mask=cmask)
    tl.store(ptr + 2 * plane, cmin, mask=cmask)


@triton.jit
def _reduce_partials(PART, n_chunks, cols, cmask, count, OUT, plane, D_PAD: tl.constexpr, TRIMMED: tl.constexpr):
    """Sum, max and min over the chunks' partials of one tensor (PART: its rows of the
    [n_chunks, PARTIAL_ROWS, D_PAD] partials), in chunk order, so the result does not depend on which
    program ran last; stores centre, max, min. The centre is the mean over `count` tokens (V), or
    (TRIMMED: K, smooth K's vector) the trimmed mean of the finite elements, (sum - max - min) /
    (finite - 2), zero where fewer than 3 are finite (reference.quant.smoothing_vector_k says why).
    Eight chunks at a time: a rarely taken branch must not raise the whole kernel's register count.
    `.cg` loads bypass L1: other programs, maybe on other SMs, wrote the partials."""
    total = tl.zeros((D_PAD,), tl.float32)
    cmax = tl.full((D_PAD,), float("-inf"), tl.float32)
    cmin = tl.full((D_PAD,), float("inf"), tl.float32)
    finite = tl.zeros((D_PAD,), tl.float32)
    for c0 in range(0, n_chunks, 8):
        chunks = c0 + tl.arange(0, 8)
        ptrs = PART + chunks[:, None] * (PARTIAL_ROWS * D_PAD) + cols[None, :]
        ok = (chunks[:, None] < n_chunks) & cmask[None, :]
        total += tl.sum(tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg"), 0)
        cmax = tl.maximum(cmax, tl.max(tl.load(ptrs + D_PAD, mask=ok, other=float("-inf"), cache_modifier=".cg"), 0))
        cmin = tl.minimum(cmin, tl.min(tl.load(ptrs + 2 * D_PAD, mask=ok, other=float("inf"), cache_modifier=".cg"), 0))
        if TRIMMED:
            finite += tl.sum(tl.load(ptrs + K_COUNT_ROW * D_PAD, mask=ok, other=0.0, cache_modifier=".cg"), 0)
    if TRIMMED:
        enough = finite >= 3.0  # (and no infinite max/min to subtract where there are fewer)
        trimmed = total - tl.where(enough, cmax, 0.0) - tl.where(enough, cmin, 0.0)
        centre = tl.where(enough, trimmed / tl.maximum(finite - 2.0, 1.0), 0.0)
    else:
        centre = total / tl.maximum(count * 1.0, 1.0)
    _store_stats(OUT, plane, centre, cmax, cmin, cmask)


@triton.jit
def _quantize_k(k, first, local, rmask, mask, cmask, b, h, stat, K_MEAN, K_MAX, K_MIN,
                KQ, stride_qb, stride_qh, stride_qn, K_SCALE, stride_sb, stride_sh, cols,
                GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr, BLOCK_N: tl.constexpr,
                D_PAD: tl.constexpr):  # fmt: skip
    """K block -> INT8/INT4 values (smoothed) with their scale per key group."""
    k = k.to(tl.float32)
    row_ok = tl.min(tl.where(is_finite(k), 1, 0), 1) > 0
    k_mean = tl.load(K_MEAN + stat, mask=cmask, other=0.0, cache_modifier=".cg")
    if SMOOTH_K:
        k = k - k_mean[None, :]
    k = tl.where(is_finite(k) & mask, k, 0.0)
    if GRAN == PER_TENSOR:
        amax = channel_amax(k_mean, tl.load(K_MAX + stat, mask=cmask, other=0.0, cache_modifier=".cg"),
                            tl.load(K_MIN + stat, mask=cmask, other=0.0, cache_modifier=".cg"), SMOOTH_K)  # fmt: skip
        amax = tl.zeros((BLOCK_N,), tl.float32) + tl.max(tl.where(cmask, amax, 0.0), 0)
    else:
        amax = k_row_amax(tl.abs(k), BLOCK_N, D_PAD, GRAN)
    kq, scale = quantize_rows(k, amax, QMAX)
    scale = tl.where(row_ok, scale, float("nan"))
    kq_base = KQ + (b * stride_qb + h * stride_qh + first * stride_qn)
    tl.store(kq_base + (local[:, None] * stride_qn + cols[None, :]), kq, mask=mask)
    tl.store(K_SCALE + (b * stride_sb + h * stride_sh + first) + local, scale, mask=rmask)


@triton.jit
def _quantize_v(v, first, local, mask, cmask, b, h, stat, V_MEAN, V_MAX, V_MIN,
                VQ, stride_ob, stride_oh, stride_on, stride_od, cols, store_mask,
                V_MODE: tl.constexpr, SMOOTH_V: tl.constexpr, V_RANGE: tl.constexpr, EXACT_CASTS: tl.constexpr,
                V_WGMMA_ORDER: tl.constexpr):  # fmt: skip
    """V block -> FP8 with one scale per channel (V_MODE 1, stored transposed [d, N] as the FP8 MMA
    wants it) or V - mean in the PV dtype (V_MODE 2).

    V_WGMMA_ORDER (V_MODE 1, blocks starting at a multiple of 32 keys): inside each 32-key chunk, key
    16h + 8a + 2t + b goes to column 16h + 4t + 2a + b, the order in which the Hopper kernel's QK
    accumulator holds P (reference: quantattn.hopper.layout.wgmma_key_order); store_mask then also
    covers the zeroed padding keys up to the next multiple of 32."""
    v = v.to(tl.float32)
    v_mean = tl.load(V_MEAN + stat, mask=cmask, other=0.0, cache_modifier=".cg")
    if SMOOTH_V:
        v = v - v_mean[None, :]
    if V_MODE == 1:
        amax_v = channel_amax(v_mean, tl.load(V_MAX + stat, mask=cmask, other=0.0, cache_modifier=".cg"),
                              tl.load(V_MIN + stat, mask=cmask, other=0.0, cache_modifier=".cg"), SMOOTH_V)  # fmt: skip
        amax_v = tl.maximum(amax_v, 1e-30)
        vq = to_fp8_e4m3(v * (V_RANGE / amax_v)[None, :], EXACT_CASTS)
    else:
        vq = cast(v, VQ.dtype.element_ty, EXACT_CASTS)
    out = VQ + (b * stride_ob + h * stride_oh + first * stride_on)
    if V_WGMMA_ORDER:
        local = (local & ~31) + (local & 16) + 4 * ((local >> 1) & 3) + 2 * ((local >> 3) & 1) + (local & 1)
    tl.store(out + (local[:, None] * stride_on + cols[None, :] * stride_od), vq, mask=store_mask)


@triton.jit
def preprocess_kv_kernel(
    K, stride_kb, stride_kh, stride_kn,
    V, stride_vb, stride_vh, stride_vn,
    cu_seqlens, n_dense, H, n_heads, n_chunks, lag,
    PART, STATS, SYNC,
    KQ, stride_qb, stride_qh, stride_qn,
    K_SCALE, stride_sb, stride_sh,
    VQ, stride_ob, stride_oh, stride_on, stride_od,
    BLOCKS_PER_CHUNK: tl.constexpr,
    GRAN: tl.constexpr, QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
    V_STATS: tl.constexpr, V_MODE: tl.constexpr, SMOOTH_V: tl.constexpr, V_RANGE: tl.constexpr,
    EXACT_CASTS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, LENGTHS: tl.constexpr, V_WGMMA_ORDER: tl.constexpr,
):  # fmt: skip
    """Smooth and quantize K (and V) of every (sequence, kv head) in one launch.

    Work comes in chunks of BLOCKS_PER_CHUNK * BLOCK_N keys of one head. Programs take tickets from a
    counter (SYNC[0]) in the order they start; ticket t = (head h, chunk c) computes the statistics
    of chunk c of head h (PART: [heads, n_chunks, PARTIAL_ROWS, D_PAD] sums, maxima, minima of K then
    V, and K's finite counts; the head's last chunk to finish reduces them into STATS, [2, 3, heads, D]:
    K's trimmed mean (smooth K's vector), max, min, then V's mean, max, min) and then quantizes chunk
    c of head h - lag with that head's finished statistics. A program
    waits only for tickets smaller than its own, whose programs have all started, so the launch
    cannot deadlock however few programs fit on the GPU (the interpreter, which runs them one after
    another, included); with `lag` heads between the two halves the wait is rarely felt, and the
    chunks being quantized were read recently enough to come from L2. The grid has
    (n_heads + lag) * n_chunks programs. SYNC = [ticket, arrivals per head], zeroed before the launch.
    """
    ticket = tl.atomic_add(SYNC, 1)
    head = ticket // n_chunks
    chunk = ticket % n_chunks
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM
    plane = (ticket * 0 + n_heads).to(tl.int64) * HEAD_DIM  # one plane of STATS (n_heads may be a constexpr 1)
    row0 = chunk * (BLOCKS_PER_CHUNK * BLOCK_N)

    # ---- statistics of chunk c of head h ----
    if head < n_heads:
        seq, h = head // H, head % H
        b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN, LENGTHS)
        b64, h64, head64 = b.to(tl.int64), h.to(tl.int64), head.to(tl.int64)
        k_sum = tl.zeros((D_PAD,), tl.float32)
        k_max = tl.full((D_PAD,), float("-inf"), tl.float32)
        k_min = tl.full((D_PAD,), float("inf"), tl.float32)
        v_sum, v_max, v_min = k_sum, k_max, k_min
        k_count = k_sum
        for i in range(BLOCKS_PER_CHUNK):
            local = tl.arange(0, BLOCK_N)
            mask = (row0 + i * BLOCK_N + local[:, None] < n) & cmask[None, :]
            first = (start + row0 + i * BLOCK_N).to(tl.int64)
            k = _load_rows(K, b64, h64, stride_kb, stride_kh, stride_kn, first, local, cols, mask)
            s, mx, mn = _partial_stats(k, mask)
            k_sum, k_max, k_min = k_sum + s, tl.maximum(k_max, mx), tl.minimum(k_min, mn)
            k_count += _finite_count(k, mask)
            if V_STATS:
                v = _load_rows(V, b64, h64, stride_vb, stride_vh, stride_vn, first, local, cols, mask)
                s, mx, mn = _partial_stats(v, mask)
                v_sum, v_max, v_min = v_sum + s, tl.maximum(v_max, mx), tl.minimum(v_min, mn)
        part = PART + (head64 * n_chunks + chunk) * (PARTIAL_ROWS * D_PAD) + cols
        _store_stats(part, D_PAD, k_sum, k_max, k_min, cmask)
        _store_stats(part + 3 * D_PAD, D_PAD, v_sum, v_max, v_min, cmask)
        tl.store(part + K_COUNT_ROW * D_PAD, k_count, mask=cmask)
        # every thread's partials are stored before the (releasing) arrival is counted
        tl.debug_barrier()
        arrived = tl.atomic_add(SYNC + 1 + head, 1, sem="acq_rel")
        if arrived == n_chunks - 1:  # the head's last chunk: reduce all of them
            tl.debug_barrier()
            head_part = PART + head64 * n_chunks * (PARTIAL_ROWS * D_PAD)
            stat = head64 * HEAD_DIM + cols
            _reduce_partials(head_part, n_chunks, cols, cmask, n, STATS + stat, plane, D_PAD, True)
            if V_STATS:
                _reduce_partials(
                    head_part + 3 * D_PAD, n_chunks, cols, cmask, n, STATS + 3 * plane + stat, plane, D_PAD, False
                )
            tl.debug_barrier()
            tl.atomic_add(SYNC + 1 + head, 1, sem="release")  # n_chunks + 1: the statistics are ready

    # ---- quantization of chunk c of head h - lag ----
    qhead = head - lag
    if qhead >= 0:
        while tl.load(SYNC + 1 + qhead, volatile=True) <= n_chunks:
            pass
        tl.atomic_add(SYNC + 1 + qhead, 0, sem="acquire")
        tl.debug_barrier()
        seq, h = qhead // H, qhead % H
        b, start, n = seq_bounds(seq, cu_seqlens, n_dense, IS_VARLEN, LENGTHS)
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        stat = qhead.to(tl.int64) * HEAD_DIM + cols
        for i in range(BLOCKS_PER_CHUNK):
            local = tl.arange(0, BLOCK_N)
            rmask = row0 + i * BLOCK_N + local < n
            mask = rmask[:, None] & cmask[None, :]
            first = (start + row0 + i * BLOCK_N).to(tl.int64)
            k = _load_rows(K, b64, h64, stride_kb, stride_kh, stride_kn, first, local, cols, mask)
            _quantize_k(k, first, local, rmask, mask, cmask, b64, h64, stat, STATS, STATS + plane, STATS + 2 * plane,
                        KQ, stride_qb, stride_qh, stride_qn, K_SCALE, stride_sb, stride_sh, cols,
                        GRAN, QMAX, SMOOTH_K, BLOCK_N, D_PAD)  # fmt: skip
            if V_MODE != 0:
                vstore = mask
                if V_WGMMA_ORDER:  # padding keys up to a multiple of 32 are written as zeros
                    vstore = (row0 + i * BLOCK_N + local < (n + 31) // 32 * 32)[:, None] & cmask[None, :]
                v = _load_rows(V, b64, h64, stride_vb, stride_vh, stride_vn, first, local, cols, mask)
                _quantize_v(v, first, local, mask, cmask, b64, h64, stat, STATS + 3 * plane, STATS + 4 * plane,
                            STATS + 5 * plane, VQ, stride_ob, stride_oh, stride_on, stride_od, cols, vstore,
                            V_MODE, SMOOTH_V, V_RANGE, EXACT_CASTS, V_WGMMA_ORDER)  # fmt: skip
