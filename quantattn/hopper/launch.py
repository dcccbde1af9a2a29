"""Launchers of the Hopper backend: the K/V preprocessing (CUDA, or Triton's where the CUDA one cannot read
the tensors), in the layout TMA and wgmma read, then the attention kernel, on the current stream. No host
synchronization, no tensor ops besides the buffers."""

from __future__ import annotations

import ctypes
import logging

import torch

from quantattn import settings
from quantattn.calls import LAG_CHUNKS, MAX_CHUNKS, KVBuffers, QuantizedKV, Sequences, cdiv, kv_buffers, sequences
from quantattn.config import LOG2E, QuantConfig
from quantattn.hopper import driver, kernels

logger = logging.getLogger("quantattn")

HEAD_DIMS = (64, 128)
# CUDA preprocessing: at most MAX_CHUNKS chunks per (batch, kv head) (the Triton kernel's number: the same
# buffers), about LAG_CHUNKS chunks between a chunk's statistics and its quantization. Measured on the H100
# (docs/perf-notes.md, session 6): 64 chunks were slower from 2K to 8K keys, other lags no faster.
DTYPES = (torch.float16, torch.bfloat16)
QK_GRANULARITIES = ("per_token", "per_thread")


def config_reasons(cfg: QuantConfig) -> list[str]:
    """What of a config the Hopper kernel does not compute (it implements SageAttention2-8b per token)."""
    reasons = []
    if cfg.qk_dtype != "int8" or cfg.qk_granularity not in QK_GRANULARITIES:
        reasons.append("the Hopper kernel quantizes QK to INT8 per token or per thread only")
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


def native_preprocess_reason(k: torch.Tensor, v: torch.Tensor, seqs: Sequences, cfg: QuantConfig) -> str | None:
    """Why the CUDA preprocessing cannot take K and V (it reads rows with 16-byte loads; dense calls only)."""
    if not settings.current.hopper_preprocess:
        return "QUANTATTN_HOPPER_PREPROCESS=0"
    if cfg.qk_granularity not in QK_GRANULARITIES:
        return f"K scales of granularity {cfg.qk_granularity!r} are computed by Triton's preprocessing"
    if seqs.is_varlen or seqs.has_lengths:
        return "varlen and key lengths are preprocessed by Triton"
    if k.dtype not in DTYPES or v.dtype != k.dtype or k.shape[-1] not in HEAD_DIMS:
        return "float16 or bfloat16 K and V of head_dim 64 or 128 only"
    for t in (k, v):
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return "rows of K and V must start at 16-byte boundaries"
    return None


def preprocess_path(k: torch.Tensor, v: torch.Tensor, seqs: Sequences, cfg: QuantConfig) -> str:
    """Which preprocessing `preprocess` runs: "resident" (CUDA, one cluster of CTAs per head holding its K
    and V in shared memory: up to kernels.RESIDENT_MAX_KEYS keys), "ticket" (CUDA, two phases) or
    "triton". QUANTATTN_HOPPER_RESIDENT=0 turns the resident one off; a GPU that cannot run its cluster
    of CTAs gets the ticketed one instead."""
    if native_preprocess_reason(k, v, seqs, cfg) is not None:
        return "triton"
    if settings.current.hopper_resident and k.shape[2] <= kernels.RESIDENT_MAX_KEYS:
        return "resident"
    return "ticket"


def hopper_preprocess(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: Sequences | None = None) -> QuantizedKV:
    """K and V (HND views) smoothed and quantized in the Hopper kernel's layout: by a CUDA preprocessing
    where it can read them, else by the Triton one (the same buffers; the values differ only by rounding:
    tests/test_hopper_preprocess.py)."""
    return _preprocess(k, v, cfg, seqs or sequences(k, None, 0))[0]


def _preprocess(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: Sequences) -> tuple[QuantizedKV, bool]:
    """hopper_preprocess, and whether it launched the resident preprocessing, which lets the attention
    kernel after it start while it ends (hopper_attention's after_preprocessing). After the ticketed one
    that overlap measured slower (H100, session 12: 4K +1.5%, 4K causal +2%), so it is not asked."""
    path = preprocess_path(k, v, seqs, cfg)
    if path == "triton":
        from quantattn.kernels.launch import triton_preprocess_kv  # Triton's preprocessing, in the Hopper layout

        return triton_preprocess_kv(k, v, cfg, seqs, wgmma_order=True), False
    if path == "resident":
        kv = _preprocess_resident(k, v, cfg, seqs)
        if kv is not None:
            return kv, k.numel() > 0
    buf = kv_buffers(k, v, cfg, seqs, wgmma_order=True, max_chunks=MAX_CHUNKS, lag_chunks=LAG_CHUNKS)
    if buf.sync is not None:
        b, h, n, d = k.shape
        p = _preprocess_params(k, v, buf)
        p.n_chunks, p.blocks_per_chunk, p.lag = buf.n_chunks, buf.per_chunk, buf.lag
        p.part, p.sync = buf.partials.data_ptr(), buf.sync.data_ptr()
        spec = _preprocess_spec(k, cfg, resident=False)
        device = _device_index(k)
        driver.ensure_context(device)
        grid = ((b * h + buf.lag) * buf.n_chunks, 1, 1)
        driver.launch(kernels.load(spec, device), grid, kernels.PREPROCESS_THREADS, 0, _stream(k), p)
    return buf.result(cfg, seqs), False


def _preprocess_spec(k: torch.Tensor, cfg: QuantConfig, resident: bool) -> kernels.Spec:
    per_thread = cfg.qk_granularity == "per_thread"
    return kernels.preprocess_spec(k.shape[-1], kernels.ELEMENT[_dtype_name(k)], cfg.smooth_k, resident, per_thread)


def _dtype_name(t: torch.Tensor) -> str:
    return "bfloat16" if t.dtype == torch.bfloat16 else "float16"


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(t: torch.Tensor) -> int:
    return _raw_stream(_device_index(t))


# torch's current stream as a handle, without building a torch.cuda.Stream (5 µs of host time a call);
# torch._C._cuda_getCurrentRawStream is what Triton's launcher reads too
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda i: torch.cuda.current_stream(i).cuda_stream)


def _preprocess_params(k: torch.Tensor, v: torch.Tensor, buf: KVBuffers) -> kernels.PreprocessParams:
    """What both CUDA preprocessings read and write (the ticketed one adds its chunking and scratch)."""
    b, h, n, _ = k.shape
    p = kernels.PreprocessParams()
    p.k, (p.k_sb, p.k_sh, p.k_sn) = k.data_ptr(), k.stride()[:3]
    p.v, (p.v_sb, p.v_sh, p.v_sn) = v.data_ptr(), v.stride()[:3]
    p.h, p.n, p.heads = h, n, b * h
    p.stats = buf.stats.data_ptr()
    p.kq, p.k_scale, p.ks_stride = buf.kq.data_ptr(), buf.k_scale.data_ptr(), buf.k_scale.stride(1)
    p.vq, p.n_pad = buf.vq.data_ptr(), buf.vq.shape[-1]
    return p


def _preprocess_resident(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: Sequences) -> QuantizedKV | None:
    """None when the GPU cannot run the cluster this length needs (nothing was launched)."""
    b, h, n, d = k.shape
    spec = _preprocess_spec(k, cfg, resident=True)
    cluster = cdiv(n, kernels.RESIDENT_KEYS)
    device = _device_index(k)
    if b * h and n:
        driver.ensure_context(device)
        if not kernels.cluster_fits(spec, device, cluster):
            return None
    buf = kv_buffers(k, v, cfg, seqs, wgmma_order=True, scratch=False)
    if b * h and n:
        p = _preprocess_params(k, v, buf)
        driver.launch_cluster(
            kernels.load(spec, device), b * h * cluster, kernels.PREPROCESS_THREADS, spec.shared_bytes, _stream(k),
            cluster, p,
        )  # fmt: skip
    return buf.result(cfg, seqs)


def hopper_attention(
    q: torch.Tensor,
    kv: QuantizedKV,
    is_causal: bool,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    after_preprocessing: bool = False,
) -> None:
    """The attention kernel on K/V from `preprocess`: writes out (HND view) and lse ([B, Hq, Nq]).

    after_preprocessing: the last work on this stream was the resident preprocessing of this K/V (nothing
    since, by anyone: that kernel writes none of q, out and lse). The kernel is then launched to start
    while the preprocessing ends: it quantizes Q and waits for K/V (programmatic dependent launch;
    QUANTATTN_HOPPER_OVERLAP=0 turns it off)."""
    b, hq, nq, d = q.shape
    _, hkv, nk, _ = kv.k.shape
    if nq == 0 or b * hq == 0:
        return
    if nk == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    if d not in HEAD_DIMS or hq % hkv:
        raise ValueError(f"the Hopper kernel takes head_dim 64 or 128 and Hq a multiple of Hkv, got {d}, {hq}/{hkv}")
    p = kernels.AttentionParams()
    _encode_kv_maps(p, kv, b * hkv, nk, d)
    p.q, (p.q_sb, p.q_sh, p.q_sm) = q.data_ptr(), q.stride()[:3]
    p.o, (p.o_sb, p.o_sh, p.o_sm) = out.data_ptr(), out.stride()[:3]
    if lse is not None:
        p.lse, p.l_sb, p.l_sh = lse.data_ptr(), lse.stride(0), lse.stride(1)
    if lse is not None and kv.cfg.smooth_k:
        p.k_mean = kv.k_stats[0].data_ptr()
    p.v_max, p.v_min = kv.v_stats[1].data_ptr(), kv.v_stats[2].data_ptr()
    p.hq, p.hkv, p.nq, p.nk = hq, hkv, nq, nk
    p.qk_scale, p.sm_scale = sm_scale * LOG2E, sm_scale
    per_thread = kv.cfg.qk_granularity == "per_thread"
    spec = kernels.attention_spec(d, is_causal, kernels.ELEMENT[_dtype_name(q)], per_thread)
    device = _device_index(q)
    driver.ensure_context(device)
    grid = (cdiv(nq, kernels.ATTENTION_BLOCK_M), b * hq, 1)
    kernel, stream = kernels.load(spec, device), _stream(q)
    if after_preprocessing and settings.current.hopper_overlap and _overlap.usable:
        p.overlap = 1
        try:
            driver.launch_after_prior_grid(kernel, grid, kernels.ATTENTION_THREADS, spec.shared_bytes, stream, p)
            return
        except driver.DriverError as exc:  # nothing was launched: the ordinary launch below runs instead
            _overlap.refused(exc)
        p.overlap = 0
    driver.launch(kernel, grid, kernels.ATTENTION_THREADS, spec.shared_bytes, stream, p)


class _Overlap:
    """Whether this process still asks for the overlapped launch: a driver that refuses it once (say, during
    a stream capture it cannot put in a graph) gets the ordinary launch from then on, with one warning."""

    usable = True

    def refused(self, exc: Exception) -> None:
        if self.usable:
            self.usable = False
            logger.warning(
                "quantattn: the driver refused the overlapped launch of the Hopper attention kernel (%s); "
                "launching it after the K/V preprocessing from now on",
                exc,
            )


_overlap = _Overlap()


_MAPS = {name: getattr(kernels.AttentionParams, name).offset for name in ("tm_k", "tm_v", "tm_ks")}


def _encode_kv_maps(p: kernels.AttentionParams, kv: QuantizedKV, bhkv: int, nk: int, d: int) -> None:
    """The TMA maps of INT8 K [B*Hkv][Nk][d], FP8 V^T [B*Hkv][d][n_pad] and the key scales [B*Hkv][Nk],
    each loaded 128 keys at a time (the swizzles are the ones the kernel's wgmma descriptors assume)."""
    base = ctypes.addressof(p)
    n_pad = kv.v.shape[-1]
    sw_k = driver.SWIZZLE_128B if d == 128 else driver.SWIZZLE_64B
    u8, f32 = driver.TENSOR_MAP_UINT8, driver.TENSOR_MAP_FLOAT32
    driver.encode_tiled(base + _MAPS["tm_k"], u8, kv.k.data_ptr(), (d, nk, bhkv), (d, nk * d), (d, 128, 1), sw_k)
    driver.encode_tiled(
        base + _MAPS["tm_v"], u8, kv.v.data_ptr(), (n_pad, d, bhkv), (n_pad, n_pad * d), (128, d, 1),
        driver.SWIZZLE_128B,
    )  # fmt: skip
    ks_stride = kv.k_scale.stride(1)
    driver.encode_tiled(
        base + _MAPS["tm_ks"], f32, kv.k_scale.data_ptr(), (nk, bhkv), (ks_stride * 4,), (128, 1), driver.SWIZZLE_NONE
    )


def forward(call) -> None:
    """Whole call (a backends.AttentionCall the backend accepted): preprocessing, then the kernel."""
    dev = call.q.device
    if dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return forward(call)
    kv, native = _preprocess(call.k, call.v, call.cfg, sequences(call.k, None, 0))
    hopper_attention(call.q, kv, call.is_causal, call.sm_scale, call.out, call.lse, after_preprocessing=native)
