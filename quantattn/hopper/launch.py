"""Launchers of the Hopper backend: the K/V preprocessing (CUDA, or Triton's where the CUDA one cannot read
the tensors), in the layout TMA and wgmma read, then the attention kernel, on the current stream. No host
synchronization, no tensor ops besides the buffers."""

from __future__ import annotations

import os

import torch

from quantattn import hopper
from quantattn.config import QuantConfig
from quantattn.kernels import launch as L
from quantattn.reference.attention import LOG2E

HEAD_DIMS = (64, 128)
# CUDA preprocessing: at most MAX_CHUNKS chunks per (batch, kv head) (the Triton kernel's number: the same
# buffers), about LAG_CHUNKS chunks between a chunk's statistics and its quantization. Measured on the H100
# (docs/perf-notes.md, session 6): 64 chunks were slower from 2K to 8K keys, other lags no faster.
MAX_CHUNKS = L.MAX_CHUNKS
LAG_CHUNKS = L.LAG_CHUNKS
DTYPES = (torch.float16, torch.bfloat16)


def config_reasons(cfg: QuantConfig) -> list[str]:
    """What of a config the Hopper kernel does not compute (it implements SageAttention2-8b per token)."""
    reasons = []
    if cfg.qk_dtype != "int8" or cfg.qk_granularity != "per_token":
        reasons.append("the Hopper kernel quantizes QK to INT8 per token only")
    if cfg.pv_dtype != "fp8" or cfg.pv_accum != "fp32+fp32":
        reasons.append("the Hopper kernel runs FP8 PV with two-level FP32 accumulation only")
    if cfg.smooth_q or cfg.smooth_v:
        reasons.append("the Hopper kernel has no smooth Q / smooth V")
    return reasons


def tensor_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> list[str]:
    """Shapes, dtypes and strides the kernel reads directly (Q with 8-byte loads, out with 4-byte stores)."""
    reasons = []
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        reasons.append(f"the Hopper kernel takes head_dim 64 or 128, got {d}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype == out.dtype):
        reasons.append("the Hopper kernel takes float16 or bfloat16 q, k, v of one dtype")
    for name, t, align in (("q", q, 4), ("out", out, 2)):
        if t.stride(-1) != 1 or any(s % align for s in t.stride()[:-1]) or t.data_ptr() % (2 * align):
            reasons.append(f"the Hopper kernel needs {name}'s channels contiguous and rows aligned")
    return reasons


def native_preprocess_reason(k: torch.Tensor, v: torch.Tensor, seqs: L.Sequences) -> str | None:
    """Why the CUDA preprocessing cannot take K and V (it reads rows with 16-byte loads; dense calls only)."""
    if os.environ.get("QUANTATTN_HOPPER_PREPROCESS", "1") == "0":
        return "QUANTATTN_HOPPER_PREPROCESS=0"
    if hopper.preprocess_kernel() is None:
        return "the Hopper library has no preprocessing (built from older sources)"
    if seqs.is_varlen or seqs.has_lengths:
        return "varlen and key lengths are preprocessed by Triton"
    if k.dtype not in DTYPES or v.dtype != k.dtype or k.shape[-1] not in HEAD_DIMS:
        return "float16 or bfloat16 K and V of head_dim 64 or 128 only"
    for t in (k, v):
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return "rows of K and V must start at 16-byte boundaries"
    return None


def preprocess_path(k: torch.Tensor, v: torch.Tensor, seqs: L.Sequences) -> str:
    """Which preprocessing `preprocess` runs: "resident" (CUDA, one cluster of CTAs per head holding its K
    and V in shared memory: up to hopper.resident_max_keys() keys), "ticket" (CUDA, two phases) or
    "triton". QUANTATTN_HOPPER_RESIDENT=0 turns the resident one off; a GPU that cannot run its cluster
    of CTAs gets the ticketed one instead."""
    if native_preprocess_reason(k, v, seqs) is not None:
        return "triton"
    if os.environ.get("QUANTATTN_HOPPER_RESIDENT", "1") != "0" and k.shape[2] <= hopper.resident_max_keys():
        return "resident"
    return "ticket"


def preprocess(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: L.Sequences | None = None) -> L.QuantizedKV:
    """K and V (HND views) smoothed and quantized in the Hopper kernel's layout: by a CUDA preprocessing
    where it can read them, else by the Triton one (the same buffers; the values differ only by rounding:
    tests/gpu/test_hopper_preprocess_gpu.py)."""
    seqs = seqs or L.sequences(k, None, 0)
    path = preprocess_path(k, v, seqs)
    if path == "triton":
        return L.preprocess_kv(k, v, cfg, seqs, wgmma_order=True)
    if path == "resident":
        kv = _preprocess_resident(k, v, cfg, seqs)
        if kv is not None:
            return kv
    buf = L.kv_buffers(k, v, cfg, seqs, wgmma_order=True, max_chunks=MAX_CHUNKS, lag_chunks=LAG_CHUNKS)
    if buf.sync is not None:
        b, h, n, _ = k.shape
        err = hopper.preprocess_kernel()(
            *_input_args(k, v), h, n, b * h, buf.n_chunks, buf.per_chunk, buf.lag,
            buf.partials.data_ptr(), buf.stats.data_ptr(), buf.sync.data_ptr(), *_output_args(k, buf, cfg),
        )  # fmt: skip
        _check_preprocess(err)
    return buf.result(cfg, seqs)


def _input_args(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """K's and V's pointers and (batch, head, token) strides, as both CUDA preprocessings take them."""
    return (k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3])


def _output_args(k: torch.Tensor, buf: L.KVBuffers, cfg: QuantConfig) -> tuple:
    """Both CUDA preprocessings' last arguments: INT8 K, its scales, FP8 V^T, head_dim, dtype, smooth K, stream."""
    return (
        buf.kq.data_ptr(), buf.k_scale.data_ptr(), buf.k_scale.stride(1), buf.vq.data_ptr(), buf.vq.shape[-1],
        k.shape[-1], k.dtype == torch.bfloat16, cfg.smooth_k, torch.cuda.current_stream(k.device).cuda_stream,
    )  # fmt: skip


def _check_preprocess(err: int) -> None:
    if err:
        raise RuntimeError(f"quantattn Hopper preprocessing: {hopper.ERRORS.get(err, err)}")


def _preprocess_resident(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: L.Sequences) -> L.QuantizedKV | None:
    """None when the GPU cannot run the cluster this length needs (nothing was launched)."""
    buf = L.kv_buffers(k, v, cfg, seqs, wgmma_order=True, scratch=False)
    b, h, n, _ = k.shape
    if b * h and n:
        err = hopper.resident_preprocess_kernel()(
            *_input_args(k, v), h, n, b * h, buf.stats.data_ptr(), *_output_args(k, buf, cfg)
        )
        if err == hopper.CLUSTER_REFUSED:
            return None
        _check_preprocess(err)
    return buf.result(cfg, seqs)


def attention(
    q: torch.Tensor,
    kv: L.QuantizedKV,
    is_causal: bool,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> None:
    """The attention kernel on K/V from `preprocess`: writes out (HND view) and lse ([B, Hq, Nq])."""
    b, hq, nq, d = q.shape
    _, hkv, nk, _ = kv.k.shape
    if nq == 0 or b * hq == 0:
        return
    if nk == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    k_mean = kv.k_stats[0].data_ptr() if (lse is not None and kv.cfg.smooth_k) else None
    lse_args = (lse.data_ptr(), lse.stride(0), lse.stride(1)) if lse is not None else (None, 0, 0)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    err = hopper.kernel()(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        kv.k.data_ptr(), kv.k_scale.data_ptr(), kv.k_scale.stride(1), kv.v.data_ptr(), kv.v.shape[-1],
        k_mean, kv.v_stats[1].data_ptr(), kv.v_stats[2].data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1), out.stride(2),
        *lse_args,
        b, hq, hkv, nq, nk, d, q.dtype == torch.bfloat16, is_causal,
        sm_scale * LOG2E, sm_scale, stream,
    )  # fmt: skip
    if err:
        raise RuntimeError(f"quantattn Hopper kernel: {hopper.ERRORS.get(err, err)}")


def forward(call) -> None:
    """Whole call (a backends.AttentionCall the backend accepted): preprocessing, then the kernel."""
    dev = call.q.device
    if dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return forward(call)
    kv = preprocess(call.k, call.v, call.cfg)
    attention(call.q, kv, call.is_causal, call.sm_scale, call.out, call.lse)
