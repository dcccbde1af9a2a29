"""Backend-neutral call and buffer types: what the entry layer hands a backend (`AttentionCall`), how its
rows split into sequences (`Sequences`), and the quantized K/V buffers that both the Triton and the Hopper
launchers fill (`KVBuffers`, laid out by `kv_buffer_layout`, which quantattn/memory.py also reads).

The lowest layer of the call path: it imports torch and quantattn.config only, so every layer above
(entry, dispatch, backends, launchers, memory estimates) can share it without importing each other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quantattn import config as C
from quantattn.config import QuantConfig

# CUDA's limit on a grid's second and third dimensions: the kernels put (sequence, head) pairs there.
MAX_GRID_Y = 65535

QUANT_BLOCK = C.K_BLOCK_KEYS  # keys per quantization block (per-thread K groups live in 64 keys)
# K/V preprocessing: at most MAX_CHUNKS programs per (sequence, head), and about LAG_CHUNKS chunks
# between a chunk's statistics and its quantization (the Hopper backend's CUDA preprocessing takes the
# same numbers: the same buffers; docs/perf-notes.md, session 6)
MAX_CHUNKS = 16
LAG_CHUNKS = 512
PARTIAL_ROWS = 7  # rows of a chunk's partial statistics: sums, maxima, minima of K and V, K's finite counts
PV_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_parts(count: int, heads: int) -> list[tuple[int, int]]:
    """Runs [start, end) of `count` independent sequences whose (sequence, head) pairs fit the grid's
    MAX_GRID_Y rows (one run when all fit, or when one sequence's heads alone do not: nothing to split)."""
    if count * heads <= MAX_GRID_Y or heads > MAX_GRID_Y:
        return [(0, count)]
    step = MAX_GRID_Y // heads
    return [(s, min(s + step, count)) for s in range(0, count, step)]


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def head_dim_pad(d: int) -> int:
    # plain Python: triton.next_power_of_2 is a JIT function, ~5 us per host call
    return max(32, next_power_of_2(d))


@dataclass
class AttentionCall:
    """One attention call, in HND views ([B, H, N, d]); varlen packs all sequences into B = 1."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cfg: QuantConfig
    is_causal: bool
    sm_scale: float
    out: torch.Tensor  # HND view the backend writes
    lse: torch.Tensor | None  # [B, Hq, Nq] float32 the backend writes, natural log
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # dense calls only: bool (True attends) or additive float mask viewed as [B, Hq, Nq, Nk] (broadcast
    # dims of stride 0), and int32 [B] numbers of valid keys (keys past them are padding)
    attn_mask: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None


@dataclass
class Sequences:
    """How the rows of an HND view split into sequences: dense batches, or packed varlen ones."""

    count: int
    n_dense: int  # sequence length of a dense call; 0 for varlen
    max_len: int
    cu_seqlens: torch.Tensor | None
    lengths: torch.Tensor | None = None  # dense calls: int32 [B] valid rows per batch entry (key padding)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def has_lengths(self) -> bool:
        return self.lengths is not None


def sequences(call_tensor: torch.Tensor, cu_seqlens, max_seqlen: int, lengths=None) -> Sequences:
    if cu_seqlens is None:
        return Sequences(call_tensor.shape[0], call_tensor.shape[2], call_tensor.shape[2], None, lengths)
    return Sequences(cu_seqlens.numel() - 1, 0, max_seqlen, cu_seqlens.to(torch.int32))


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean, max, min [S, H, d]


@dataclass
class QuantizedKV:
    """K and V after preprocessing, ready for an attention kernel (reusable across queries)."""

    k: torch.Tensor  # int8 [B, Hkv, N, d]
    k_scale: torch.Tensor  # float32 [B, Hkv, N] (NaN for keys with a non-finite element)
    v: torch.Tensor  # FP8 [B, Hkv, d, N_pad] / smoothed V in the PV dtype / the caller's V
    v_transposed: bool
    k_stats: Stats  # K's trimmed mean (smooth K's vector: reference.quant.smoothing_vector_k), max, min
    v_stats: Stats
    cfg: QuantConfig
    seqs: Sequences


# V as the attention kernels read it
V_AS_GIVEN, V_FP8_TRANSPOSED, V_SMOOTHED = 0, 1, 2


@dataclass(frozen=True)
class KVBufferLayout:
    """Shapes and dtypes of what the K/V preprocessing writes, and of its scratch, for one call.

    `allocations`: name -> (shape, dtype) of each tensor allocated, in allocation order ("k_scale"'s
    shape is its allocation: its view keeps the first N keys); "v_quant" is absent when the kernel reads
    V itself, "partials" and "sync" when there is no scratch."""

    allocations: dict
    v_mode: int
    per_chunk: int = 0  # QUANT_BLOCK-key blocks per chunk of a (sequence, head)
    n_chunks: int = 0
    lag: int = 0  # heads between a chunk's statistics and its quantization

    def nbytes(self, name: str) -> int:
        if name not in self.allocations:
            return 0
        shape, dtype = self.allocations[name]
        count = 1
        for s in shape:
            count *= s
        return count * dtype.itemsize


# one layout per signature: kv_buffers is on every call's path (callers only read the layout)
@functools.lru_cache(maxsize=256)
def kv_buffer_layout(
    b: int,
    h: int,
    n: int,
    d: int,
    count: int,
    max_len: int,
    cfg: QuantConfig,
    wgmma_order: bool = False,
    max_chunks: int = MAX_CHUNKS,
    lag_chunks: int = LAG_CHUNKS,
    scratch: bool = True,
) -> KVBufferLayout:
    """The buffers for K and V of shape [b, h, n, d] split into `count` sequences of at most `max_len` keys:
    at most max_chunks chunks per (sequence, head), about lag_chunks chunks between a chunk's statistics
    and its quantization; no scratch when there is no work or scratch is False (the Hopper backend's
    resident preprocessing needs none). wgmma_order: the Hopper kernel's layout (k_scale rows of a
    multiple of 4 floats, V^T's keys padded to 32 instead of 16)."""
    f32 = torch.float32
    alloc = {
        "stats": ((2, 3, count, h, d), f32),  # K's trimmed mean, max, min; V's mean, max, min
        "k_int8": ((b, h, n, d), torch.int8),
        "k_scale": ((b, h, cdiv(max(n, 1), 4) * 4 if wgmma_order else n), f32),
    }
    if cfg.is_fp8_pv:
        key_pad = 32 if wgmma_order else 16  # 16-byte aligned rows of V^T; whole 32-key chunks for Hopper
        alloc["v_quant"] = ((b, h, d, cdiv(max(n, 1), key_pad) * key_pad), torch.float8_e4m3fn)
        v_mode = V_FP8_TRANSPOSED
    elif cfg.smooth_v:
        alloc["v_quant"] = ((b, h, n, d), PV_TORCH_DTYPE[cfg.pv_dtype])
        v_mode = V_SMOOTHED
    else:
        v_mode = V_AS_GIVEN
    heads = count * h
    if not (scratch and heads and max_len):
        return KVBufferLayout(alloc, v_mode)
    blocks = cdiv(max_len, QUANT_BLOCK)
    per_chunk = next_power_of_2(cdiv(blocks, max_chunks))  # a power of two: few compiled variants
    n_chunks = cdiv(blocks, per_chunk)
    alloc["partials"] = ((heads, n_chunks, PARTIAL_ROWS, head_dim_pad(d)), f32)
    alloc["sync"] = ((heads + 1,), torch.int32)  # the ticket counter, arrivals per head
    lag = min(heads, max(1, lag_chunks // n_chunks))
    return KVBufferLayout(alloc, v_mode, per_chunk, n_chunks, lag)


@dataclass
class KVBuffers:
    """What the K/V preprocessing writes, and its scratch: shared by the Triton launcher
    (quantattn/kernels/launch.py) and the Hopper backend's CUDA preprocessing (quantattn/hopper/launch.py),
    which take the same buffers."""

    stats: torch.Tensor  # float32 [2, 3, S, H, d]: K's trimmed mean, max, min; V's mean, max, min
    kq: torch.Tensor
    k_scale: torch.Tensor
    vq: torch.Tensor
    v_mode: int  # V_AS_GIVEN, V_FP8_TRANSPOSED or V_SMOOTHED
    vq_strides: tuple
    per_chunk: int = 0
    n_chunks: int = 0
    lag: int = 0
    partials: torch.Tensor | None = None  # [heads, n_chunks, PARTIAL_ROWS, d_pad]
    sync: torch.Tensor | None = None  # int32 [1 + heads], zeroed: the ticket counter, arrivals per head

    def result(self, cfg: QuantConfig, seqs: Sequences) -> QuantizedKV:
        rows = self.stats.flatten(0, 1).unbind(0)  # one unbind, not three: this is on every call's path
        return QuantizedKV(self.kq, self.k_scale, self.vq, cfg.is_fp8_pv, rows[:3], rows[3:], cfg, seqs)


def kv_buffers(
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: QuantConfig,
    seqs: Sequences,
    wgmma_order: bool,
    max_chunks: int = MAX_CHUNKS,
    lag_chunks: int = LAG_CHUNKS,
    scratch: bool = True,
) -> KVBuffers:
    """The buffers of `kv_buffer_layout` for K and V (HND views), allocated on K's device."""
    b, h, n, d = k.shape
    layout = kv_buffer_layout(b, h, n, d, seqs.count, seqs.max_len, cfg, wgmma_order, max_chunks, lag_chunks, scratch)
    alloc = layout.allocations

    def empty(name):
        shape, dtype = alloc[name]
        return torch.empty(shape, dtype=dtype, device=k.device)

    stats, kq = empty("stats"), empty("k_int8")
    k_scale = empty("k_scale")[:, :, :n] if wgmma_order else empty("k_scale")
    if layout.v_mode == V_FP8_TRANSPOSED:
        vq = empty("v_quant")
        vq_strides = (vq.stride(0), vq.stride(1), 1, vq.stride(2))
    else:
        vq = empty("v_quant") if layout.v_mode == V_SMOOTHED else v
        vq_strides = (vq.stride(0), vq.stride(1), vq.stride(2), 1)
    buf = KVBuffers(stats, kq, k_scale, vq, layout.v_mode, vq_strides)
    if "sync" in alloc:
        buf.per_chunk, buf.n_chunks, buf.lag = layout.per_chunk, layout.n_chunks, layout.lag
        buf.partials = empty("partials")
        # zeroed per call (a memset, not a kernel): no state between calls, so concurrent streams,
        # CUDA-graph replays and torch.compile's graph pools need no care
        buf.sync = torch.zeros(alloc["sync"][0], dtype=torch.int32, device=k.device)
    return buf
