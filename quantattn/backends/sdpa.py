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


# torch's switches per SDPA backend (public API; process-wide state, which torch's own sdpa_kernel also sets)
_SWITCHES = {
    "FLASH_ATTENTION": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "EFFICIENT_ATTENTION": (
        torch.backends.cuda.mem_efficient_sdp_enabled,
        torch.backends.cuda.enable_mem_efficient_sdp,
    ),
    "MATH": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    "CUDNN_ATTENTION": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
}

_switch_lock = threading.Lock()


class SdpaBackend:
    """torch's SDPA in the call's own precision: exact attention, chosen only by `backend="auto"` from a
    speed table (quantattn.backends.speed_table), never requested by name.

    It takes only calls whose SDPA meaning is quantattn's: dense, no mask or key lengths, no lse (SDPA
    does not return one), no gradient to record (quantattn's backward is its own), and Nq == Nk (the
    shapes the table measured; also where SDPA's top-left causal mask equals quantattn's bottom-right one).

    `only` names the SDPA backend the table measured fastest (torch's names, "CUDNN_ATTENTION"): torch's
    own priority puts FlashAttention-2 first and cuDNN last, while on Hopper cuDNN is the faster one by far,
    so the call runs with only that backend switched on (torch's switches, set and restored around the call:
    a few attribute calls instead of the ~10 µs of `sdpa_kernel`); where that backend refuses the call,
    torch's own choice runs it. None: torch's own choice.
    """

    name = "sdpa"

    def __init__(self, only: str | None = None):
        if only is not None and only not in _SWITCHES:
            raise ValueError(f"unknown SDPA backend {only!r}; one of {', '.join(_SWITCHES)}")
        self.only = only

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

    def run(self, call) -> torch.Tensor:
        """torch's SDPA on the call's HND views; returns its [B, Hq, N, d] output (no copy into call.out)."""
        if self.only is None:
            return self._sdpa(call)
        with _switch_lock:  # two threads saving and restoring at once could leave the switches changed
            saved = [(enable, enabled()) for enabled, enable in _SWITCHES.values()]
            for name, (_, enable) in _SWITCHES.items():
                enable(name == self.only)
            try:
                return self._sdpa(call)
            except RuntimeError:
                pass  # that backend refuses this call here ("No available kernel"): torch's own choice, below
            finally:
                for enable, was in saved:
                    enable(was)
        return self._sdpa(call)

    @staticmethod
    def _sdpa(call) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        hq, hkv = q.shape[1], k.shape[1]
        if hq == hkv:
            return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale)
        if SDPA_HAS_GQA:
            return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale, enable_gqa=True)
        group = hq // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return ORIGINAL_SDPA(q, k, v, is_causal=call.is_causal, scale=call.sm_scale)


# one instance per SDPA backend a table names (and None: torch's choice)
SDPA_BACKENDS = {only: SdpaBackend(only) for only in (None, *_SWITCHES)}
AUTO_SDPA = SDPA_BACKENDS[None]
AUTO_SDPA_MESSAGE = "quantattn: backend='auto' runs torch SDPA: %s"
