"""How much GPU memory one quantattn call allocates besides its output: the quantized K/V buffers and
the statistics the kernels read, nothing that copies Q, K or V in their own precision.

The K/V buffers (`triton_preprocess_kv`'s outputs and scratch) are computed from the layout the launchers
allocate, quantattn.calls.kv_buffer_layout; the other buffers of quantattn/kernels/launch.py (`token_stats`'
per-tensor Q statistics, `_smooth_q_terms`' temporaries, `sequences`' int32 offsets) are stated here,
and tests/test_integrations_gpu.py checks the total against `torch.cuda.max_memory_allocated`.
Each buffer counts as the CUDA caching allocator counts it: rounded up to 512 bytes.

The Hopper backend (quantattn/hopper) allocates the same buffers with k_scale rows rounded up to 4 floats
and V^T's keys to 32 instead of 16: at most 12 bytes per (batch, kv head) and 16 per channel row more. Up
to 2K keys its resident preprocessing needs no partials and no counters, so it allocates less than stated.

Not counted: the output and the log-sum-exp (the caller gets those), and a contiguous copy of Q, K or V when its last dimension is not contiguous
(stride != 1: the kernels read channels with stride 1; every other layout, transposes and offsets
included, is read in place).
"""

from __future__ import annotations

from quantattn import config as C
from quantattn.calls import cdiv, kv_buffer_layout
from quantattn.config import QuantConfig

ALLOCATOR_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
FLOAT32, INT32, INT64 = 4, 4, 8


def _block(nbytes: int) -> int:
    return cdiv(nbytes, ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK if nbytes else 0


def buffers(
    q_shape,
    k_shape,
    config: QuantConfig,
    *,
    tensor_layout: str = "HND",
    num_sequences: int | None = None,
    max_seqlen_k: int | None = None,
) -> dict[str, int]:
    """Bytes of each buffer one call allocates (arguments as for extra_bytes); "smooth_q" is the peak
    of smooth Q's temporaries."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a quantattn.QuantConfig, got {type(config).__name__}")
    if (num_sequences is None) != (max_seqlen_k is None):
        raise ValueError("give num_sequences and max_seqlen_k together (varlen calls), or neither")
    varlen = num_sequences is not None
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    if len(q_shape) != (3 if varlen else 4) or len(k_shape) != len(q_shape):
        raise ValueError(f"expected {'3-D [total, H, d]' if varlen else '4-D'} shapes, got {q_shape} and {k_shape}")
    if varlen:
        (nq, hq, d), (nk, hkv, _) = q_shape, k_shape
        b, seqs, max_len = 1, num_sequences, max_seqlen_k
    else:
        if tensor_layout not in ("HND", "NHD"):
            raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
        if tensor_layout == "NHD":
            q_shape, k_shape = ((s[0], s[2], s[1], s[3]) for s in (q_shape, k_shape))
        (b, hq, nq, d), (_, hkv, nk, _) = q_shape, k_shape
        seqs, max_len = b, nk
    sizes = dict.fromkeys(
        ("stats", "k_int8", "k_scale", "v_quant", "partials", "sync", "offsets", "q_stats", "smooth_q"), 0
    )
    if b * hq * nq * d == 0:
        return sizes  # nothing runs

    # triton_preprocess_kv: statistics (mean, max, min of K and V), INT8 K, its scales, the quantized V (absent
    # where the kernel reads V itself), the partial sums and the ticket counters (the Triton layout)
    layout = kv_buffer_layout(b, hkv, nk, d, seqs, max_len, config)
    for name in layout.allocations:
        sizes[name] = _block(layout.nbytes(name))
    if varlen:
        sizes["offsets"] = 2 * _block((seqs + 1) * INT32)  # sequences(): cu_seqlens as int32 (q's and k's)
    # attention: per-tensor Q statistics, or smooth Q's block means and score corrections
    if config.qk_granularity == "per_tensor":
        sizes["q_stats"] = _block(3 * seqs * hq * d * FLOAT32)
    if config.smooth_q and not varlen:
        sizes["smooth_q"] = _smooth_q_peak(b, hq, nq, hkv, nk, d)
    return sizes


def extra_bytes(
    q_shape,
    k_shape,
    config: QuantConfig,
    *,
    tensor_layout: str = "HND",
    num_sequences: int | None = None,
    max_seqlen_k: int | None = None,
) -> int:
    """Peak bytes that one call with the Triton kernels allocates besides its output (and lse).

    Dense calls: q_shape [B, Hq, Nq, d] and k_shape [B, Hkv, Nk, d] in `tensor_layout` ("HND" or
    "NHD"). Varlen calls: [total, H, d] shapes, with num_sequences and max_seqlen_k. config: the
    variant that runs (`quantattn.default_config(device)` for the default).

    With the default variant (FP8 PV) that is, per key and kv head: d bytes of INT8 K, 4 bytes of K
    scale and d bytes of FP8 V (keys padded to 16), plus 24 * d bytes of statistics per sequence and kv
    head and the preprocessing's partial sums; about half of K and V's own size in 16-bit."""
    s = buffers(
        q_shape, k_shape, config, tensor_layout=tensor_layout, num_sequences=num_sequences,
        max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    kv = s["stats"] + s["k_int8"] + s["k_scale"] + s["v_quant"] + s["offsets"]
    # the partial sums and counters are freed when triton_preprocess_kv returns, before the attention kernel's extras
    return max(kv + s["partials"] + s["sync"], kv + s["q_stats"] + s["smooth_q"])


def _smooth_q_peak(b: int, hq: int, nq: int, hkv: int, nk: int, d: int) -> int:
    """The float32 temporaries of launch._smooth_q_terms at their peak, step by step, plus what it
    returns (block means and score corrections, alive while the kernel runs)."""
    nb = cdiv(nq, C.Q_BLOCK_ROWS)
    q32 = _block(b * hq * nq * d * FLOAT32)
    finite = _block(b * hq * nq * d)  # torch.isfinite's bool mask
    padded = _block(b * hq * nb * C.Q_BLOCK_ROWS * d * FLOAT32)
    counts = _block(nb * INT64)
    means = _block(b * hq * nb * d * FLOAT32)
    k32 = _block(b * hkv * nk * d * FLOAT32)
    delta = _block(b * hq * nb * nk * FLOAT32)
    return max(
        2 * q32 + finite,  # q.float() and torch.where(isfinite(...), ...)
        q32 + padded,  # the padded copy
        padded + 2 * counts,  # the rows per block: two int64 temporaries at once
        padded + counts + 2 * means,  # the sums, then the means
        padded + counts + means + 2 * k32,  # k.float(), then K minus its mean
        padded + counts + means + k32 + 2 * delta,  # the corrections, then scaled
    )
