"""torch's own SDPA as a destination: the fallback counter that every route to it shares, and the
backend that `backend="auto"` hands a call to where the speed table says torch's SDPA is faster.

Backend-neutral on purpose: the integrations (quantattn.sdpa) and the dispatch (quantattn.backends) both
count here, so that `quantattn.integrations.fallbacks` sees every call that went to torch's SDPA and why.
"""

from __future__ import annotations

import collections
import logging
import threading

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

logger = logging.getLogger("quantattn")

# Captured at import, before any quantattn.patch(): the SDPA that quantattn's own routes call.
ORIGINAL_SDPA = F.scaled_dot_product_attention
# enable_gqa arrived in torch 2.5; before it, grouped K/V heads are repeated instead.
SDPA_HAS_GQA = TorchVersion(torch.__version__) >= (2, 5)

# Why a call went to torch's SDPA: reason -> count (since the last reset_fallbacks()).
fallbacks: collections.Counter = collections.Counter()
_said: set[str] = set()
_lock = threading.Lock()


def reset_fallbacks() -> None:
    with _lock:
        fallbacks.clear()
        _said.clear()


def count_fallback(reason: str, message: str) -> None:
    """Count the reason; log `message % reason` the first time that reason is counted."""
    with _lock:
        fallbacks[reason] += 1
        first = reason not in _said
        _said.add(reason)
    if first:
        logger.warning(message, reason)


class SdpaBackend:
    """torch's SDPA in the call's own precision: exact attention, chosen only by `backend="auto"` from a
    speed table (quantattn.backends.speed_table), never requested by name.

    It takes only calls whose SDPA meaning is quantattn's: dense, no mask or key lengths, no lse (SDPA
    does not return one), no gradient to record (quantattn's backward is its own), and Nq == Nk (the
    shapes the table measured; also where SDPA's top-left causal mask equals quantattn's bottom-right one).
    """

    name = "sdpa"

    @staticmethod
    def eligible(call) -> bool:
        q, k, v = call.q, call.k, call.v
        return (
            call.lse is None
            and call.cu_seqlens_q is None
            and call.attn_mask is None
            and call.key_lengths is None
            and q.shape[2] == k.shape[2]
            and not (q.requires_grad or k.requires_grad or v.requires_grad)
        )

    @staticmethod
    def run(call) -> torch.Tensor:
        """torch's SDPA on the call's HND views; returns its [B, Hq, N, d] output (no copy into call.out)."""
        q, k, v = call.q, call.k, call.v
        hq, hkv = q.shape[1], k.shape[1]
        if hq == hkv:
            return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale)
        if SDPA_HAS_GQA:
            return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale, enable_gqa=True)
        group = hq // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale)


AUTO_SDPA = SdpaBackend()
AUTO_SDPA_MESSAGE = "quantattn: backend='auto' runs torch SDPA: %s"
