"""A quantized KV cache for decoding: quantize K/V once (and each new token once), attend many times.

    cache = quantattn.QuantizedKVCache.from_kv(k, v, capacity=4096)   # prefill's K/V, [B, Hkv, N, d]
    out = quantattn.sageattn_decode(q, cache)                         # q: [B, Hq, 1..16, d]
    cache.append(k_new, v_new)                                        # in place, new tokens only

The numerics are specified in quantattn/reference/decode.py and docs/numerics.md ("Decoding").
"""

from __future__ import annotations

import math

import torch

from quantattn import backends
from quantattn import validation as V
from quantattn.config import QuantConfig
from quantattn.reference import decode as R

_DEFAULT = QuantConfig()
BACKENDS = backends.DECODE_REQUESTS


def _check_config(config) -> QuantConfig:
    if config is None:
        return _DEFAULT
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a quantattn.QuantConfig, got {type(config).__name__}")
    problems = []
    if config.qk_dtype != "int8" or config.qk_granularity != "per_token":
        problems.append("INT8 K with per-token scales (qk_quant_dtype='int8', qk_quant_gran='per_token')")
    if config.pv_dtype != "fp8" or config.pv_accum not in ("fp32+fp32", "fp32+fp16"):
        problems.append(
            "FP8 V with a fresh accumulator per block (pv_dtype='fp8', pv_accum_dtype 'fp32+fp32' or 'fp32+fp16': "
            "each 64-token block has its own V scales, so one accumulator cannot chain across blocks)"
        )
    if config.smooth_q or config.smooth_v:
        problems.append("no smooth_q or smooth_v")
    if problems:
        raise ValueError(f"config: the quantized KV cache needs {'; '.join(problems)}; got {config.name}")
    return config


def _to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class QuantizedKVCache:
    """K and V of one attention layer, quantized once, for `sageattn_decode`.

    Storage per (batch, kv head), in tokens of a preallocated `capacity` (grown by doubling when an
    append needs more):
    - K: INT8, one float32 scale per token (amax / 127 of the token's row), after subtracting a fixed
      channel vector `k_mean`: smooth K's trimmed token mean (`smoothing_vector_k`) of the K given to
      `from_kv` (or of the first append's K, or the caller's `k_mean`). Any fixed vector subtracted from every key shifts each score row by a
      constant, which softmax ignores, so appended tokens reuse it and older tokens are never
      requantized. Without config.smooth_k the vector is zero.
    - V: FP8 E4M3 in blocks of 64 tokens, one float32 scale per channel per block (the block's channel
      amax / config.v_range, 448 by default), stored transposed ([d, tokens]). The last, incomplete
      block stays in the input dtype until it has 64 tokens, then it is quantized like the others.
    About 2d + 4 + 4d/64 bytes per token and kv head (d = 128: 264 bytes, bf16 K/V: 512).

    A cache built by appends holds exactly the bytes of one built by `from_kv` of all tokens at once
    when both use the same `k_mean` (the groups, scales and rounding do not depend on how the tokens
    arrived). The cache's length is a Python int: nothing on the decode path reads device memory on
    the host.
    """

    def __init__(self, buffers: R.KVCacheBuffers, length: int, layout: str, config: QuantConfig, backend: str):
        self._buf = buffers
        self._len = length
        self._mean_set = length > 0
        self.tensor_layout = layout
        self.config = config
        self.backend = backend  # the quantization's: "triton" or "reference"

    # ---- construction ----

    @classmethod
    def from_kv(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tensor_layout: str = "HND",
        capacity: int | None = None,
        config: QuantConfig | None = None,
        k_mean: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> QuantizedKVCache:
        """Quantize k and v ([B, Hkv, N, d] for "HND", [B, N, Hkv, d] for "NHD"; float16 or bfloat16).

        capacity: tokens to preallocate (at least N; rounded up to a multiple of 64), so that appends up
        to it need no reallocation. config: an INT8 per-token / FP8 QuantConfig (default QuantConfig()).
        k_mean: the smoothing vector [B, Hkv, d] (default: smooth K's trimmed token mean of k, as
        `sageattn` smooths K; of the first append's k when N = 0). backend: "auto" (Triton kernels on CUDA, the PyTorch reference on CPU), "triton",
        "reference". The inputs are not modified."""
        V.check_layout(tensor_layout)
        for name, t in (("k", k), ("v", v)):
            V.check_tensor(name, t)
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be 4-D ([B, H, N, d] for 'HND', [B, N, H, d] for 'NHD'), got {tuple(t.shape)}"
                )
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"k and v must share one dtype and device, got {k.dtype} on {k.device}, {v.dtype} on {v.device}"
            )
        kh, vh = _to_hnd(k, tensor_layout), _to_hnd(v, tensor_layout)
        if kh.shape != vh.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        b, hkv, n, d = kh.shape
        if not 1 <= d <= V.MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be between 1 and {V.MAX_HEAD_DIM}, got {d}")
        if b == 0 or hkv == 0:
            raise ValueError(f"k must have at least one batch entry and one head, got shape {tuple(k.shape)}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
            raise TypeError(f"capacity must be a non-negative int or None, got {capacity!r}")
        if capacity is not None and capacity < n:
            raise ValueError(f"capacity ({capacity}) is smaller than the number of tokens given ({n})")
        cfg = _check_config(config)
        chosen = backends.decode_backend(k.device, backend)
        cap = _round_up(max(capacity if capacity is not None else n, 1), R.V_BLOCK)
        buf = R.KVCacheBuffers.allocate(b, hkv, d, cap, k.dtype, k.device)
        cache = cls(buf, 0, tensor_layout, cfg, chosen)
        if k_mean is not None:
            if not isinstance(k_mean, torch.Tensor) or tuple(k_mean.shape) != (b, hkv, d):
                got = tuple(k_mean.shape) if isinstance(k_mean, torch.Tensor) else type(k_mean).__name__
                raise ValueError(f"k_mean must be a tensor of shape {(b, hkv, d)} ([B, Hkv, d]), got {got}")
            if k_mean.device != k.device:
                raise ValueError(f"k_mean must be on k's device ({k.device}), got {k_mean.device}")
            cache._set_mean(k_mean.detach().float())
        if n:
            cache._append_hnd(kh, vh)
        return cache

    # ---- properties ----

    def __len__(self) -> int:
        return self._len

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return self._buf.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds (all `capacity` tokens)."""
        return self._buf.nbytes

    @property
    def batch_size(self) -> int:
        return self._buf.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self._buf.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self._buf.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.v_tail.dtype

    @property
    def device(self) -> torch.device:
        return self._buf.k.device

    @property
    def k_mean(self) -> torch.Tensor:
        """The smoothing vector [B, Hkv, d] (float32) subtracted from every key."""
        return self._buf.k_mean

    @property
    def buffers(self) -> R.KVCacheBuffers:
        """The storage (int8 K, its scales, the FP8 V transposed, its block scales, the 16-bit tail)."""
        return self._buf

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(batch={self.batch_size}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"len={self._len}, capacity={self.capacity}, dtype={self.dtype}, device={self.device}, "
            f"config={self.config.name})"
        )

    # ---- appending ----

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> QuantizedKVCache:
        """Quantize new tokens (in the cache's tensor_layout: [B, Hkv, n, d] or [B, n, Hkv, d]) into the
        cache, in place; only the new tokens (and, when they complete it, the 64-token V block they fall
        in) are quantized. Grows the storage by doubling when it is full. Returns self."""
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            V.check_tensor(name, t)
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be 4-D in the cache's layout {self.tensor_layout!r}, got {tuple(t.shape)}"
                )
            if t.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device ({self.device}), got {t.device}")
        kh, vh = _to_hnd(k_new, self.tensor_layout), _to_hnd(v_new, self.tensor_layout)
        b, hkv, _, d = kh.shape
        if (b, hkv, d) != (self.batch_size, self.kv_heads, self.head_dim) or kh.shape != vh.shape:
            want = "[B, Hkv, n, d]" if self.tensor_layout == "HND" else "[B, n, Hkv, d]"
            raise ValueError(
                f"k_new and v_new must be {want} with B={self.batch_size}, Hkv={self.kv_heads}, d={self.head_dim} "
                f"(layout {self.tensor_layout!r}), got {tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        self._append_hnd(kh, vh)
        return self

    def _set_mean(self, mean: torch.Tensor) -> None:
        self._buf.k_mean.copy_(mean if self.config.smooth_k else torch.zeros_like(mean))
        self._mean_set = True

    def _append_hnd(self, kh: torch.Tensor, vh: torch.Tensor) -> None:
        n = kh.shape[2]
        if n == 0:
            return
        if not self._mean_set:
            self._set_mean(R.k_token_mean(kh.detach()))
        needed = self._len + n
        if needed > self.capacity:
            self._buf = self._buf.grown(_round_up(max(2 * self.capacity, needed), R.V_BLOCK), self._len)
        backends.BACKENDS[self.backend].decode_append(self._buf, kh.detach(), vh.detach(), self._len, self.config)
        self._len = needed


def sageattn_decode(
    q: torch.Tensor,
    cache: QuantizedKVCache,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of 1 to 16 query tokens against a QuantizedKVCache (LLM decoding).

    q: [B, Hq, Nq, d] ("HND") or [B, Nq, Hq, d] ("NHD"), the cache's dtype and device, Hq a multiple of
    the cache's kv heads (query head h reads kv head h // (Hq / Hkv)). is_causal with Nq > 1 is
    bottom-right aligned: query i sees keys j <= i + len(cache) - Nq. Returns the output in q's layout
    and dtype and, with return_lse, the float32 natural-log logsumexp [B, Hq, Nq] of sm_scale * q.k.
    backend: "auto" (Triton kernels for CUDA tensors, the PyTorch reference for CPU ones), "triton",
    "reference". No host synchronization: a decode step can be captured in a CUDA graph.
    """
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a quantattn.QuantizedKVCache, got {type(cache).__name__}")
    V.check_layout(tensor_layout)
    V.check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D ([B, H, N, d] for 'HND', [B, N, H, d] for 'NHD'), got {tuple(q.shape)}")
    for name, value in (("is_causal", is_causal), ("return_lse", return_lse)):
        V.check_flag(name, value)
    V.check_sm_scale(sm_scale)
    qh = _to_hnd(q, tensor_layout)
    b, hq, nq, d = qh.shape
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device ({cache.device}), got {q.device}")
    if not 1 <= nq <= R.MAX_DECODE_QUERIES:
        raise ValueError(
            f"sageattn_decode takes 1 to {R.MAX_DECODE_QUERIES} query tokens, got Nq = {nq} (q of shape "
            f"{tuple(q.shape)}, layout {tensor_layout!r}); for longer queries (prefill) call quantattn.sageattn(q, k, v)"
        )
    if b != cache.batch_size:
        raise ValueError(f"q's batch size ({b}) must equal the cache's ({cache.batch_size})")
    if d != cache.head_dim:
        raise ValueError(f"q's head_dim ({d}) must equal the cache's ({cache.head_dim})")
    if hq % cache.kv_heads:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the cache's kv heads ({cache.kv_heads})")
    chosen = backends.decode_backend(q.device, backend)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    n_keys = len(cache)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device) if return_lse else None
    if n_keys == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(-math.inf)
    else:
        backends.BACKENDS[chosen].decode(
            qh, cache.buffers, n_keys, cache.config, is_causal, scale, _to_hnd(out, tensor_layout), lse
        )
    return (out, lse) if return_lse else out
