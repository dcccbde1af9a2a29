"""`torch.nn.functional.scaled_dot_product_attention`, quantized where quantattn applies.

`quantattn.sdpa` has SDPA's exact signature. It runs `quantattn.sageattn` on the calls the kernels
compute with SDPA's meaning, and hands every other call to the original SDPA, counting the reasons
and saying each one once. `patch()` / `unpatch()` / `patched()` swap it into `torch.nn.functional`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

from quantattn.api import sageattn
from quantattn.config import QuantConfig
from quantattn.validation import ACCEPTED_DTYPES, MAX_HEAD_DIM

logger = logging.getLogger("quantattn")

ORIGINAL_SDPA = F.scaled_dot_product_attention

# Why a call went to the original SDPA: reason -> count (since the last reset_fallbacks()).
fallbacks: collections.Counter = collections.Counter()
_said: set[str] = set()
_lock = threading.Lock()


# One (config, cpu) entry per active patch; the innermost one rules.
_patches: list[tuple[QuantConfig | None, str]] = []


def _active() -> tuple[QuantConfig | None, str]:
    return _patches[-1] if _patches else (None, "fallback")


def reset_fallbacks() -> None:
    with _lock:
        fallbacks.clear()
        _said.clear()


def why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """The reason quantattn cannot compute this SDPA call with SDPA's meaning, or None."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "inputs are not tensors"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not 4-D [B, H, N, d]"
    if attn_mask is not None:
        return "attn_mask is given (the kernels take no mask yet)"
    if dropout_p != 0.0:
        return "dropout_p > 0"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in ACCEPTED_DTYPES:
        return f"dtype {query.dtype} (quantattn takes float16 and bfloat16)"
    if query.device.type == "cpu" and _active()[1] == "fallback":
        return "CPU tensors (patch(cpu='reference') runs quantattn's slow reference on them)"
    if not (query.device == key.device == value.device):
        return "tensors on different devices"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return "value head_dim differs from the query's"
    if d > MAX_HEAD_DIM:
        return f"head_dim {d} > {MAX_HEAD_DIM}"
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        return "batch, heads or lengths do not match"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not (enable_gqa and hkv and hq % hkv == 0):
        return "query and key/value heads differ without enable_gqa"
    if is_causal and query.shape[2] != key.shape[2]:
        # SDPA aligns a causal mask top-left, quantattn bottom-right: they agree only when Nq == Nk
        return "is_causal with Nq != Nk (SDPA's top-left alignment)"
    return None


def _fall_back(reason: str) -> None:
    with _lock:
        fallbacks[reason] += 1
        first = reason not in _said
        _said.add(reason)
    if first:
        logger.warning("quantattn.sdpa: falling back to torch SDPA: %s", reason)


def sdpa(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` (same arguments, same result
    within quantattn's accuracy); see the module's docstring for when it falls back."""
    reason = why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        _fall_back(reason)
        return ORIGINAL_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    return sageattn(
        query, key, value, "HND", is_causal, scale, config=_active()[0],
        backend="reference" if query.device.type == "cpu" else "auto",
    )  # fmt: skip


def patch(config: QuantConfig | None = None, cpu: str = "fallback") -> None:
    """Make `torch.nn.functional.scaled_dot_product_attention` quantattn's `sdpa` until `unpatch()`.

    config: the variant to run (default: the device's default). cpu: "fallback" (CPU calls go to torch's
    SDPA) or "reference" (they run quantattn's slow PyTorch reference). Code that imported the function
    itself (`from torch.nn.functional import scaled_dot_product_attention`) before patching keeps the
    original. Patches nest: each patch() needs its unpatch(), and the innermost one's settings rule."""
    if cpu not in ("fallback", "reference"):
        raise ValueError(f"cpu must be 'fallback' or 'reference', got {cpu!r}")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a quantattn.QuantConfig, got {type(config).__name__}")
    with _lock:
        _patches.append((config, cpu))
        F.scaled_dot_product_attention = sdpa


def unpatch() -> None:
    """Undo the last patch(); the original SDPA is back once every patch() has been undone."""
    with _lock:
        if not _patches:
            raise RuntimeError("unpatch() without a matching patch()")
        _patches.pop()
        if not _patches:
            F.scaled_dot_product_attention = ORIGINAL_SDPA


@contextlib.contextmanager
def patched(config: QuantConfig | None = None, cpu: str = "fallback"):
    """`with quantattn.patched(): ...` runs the block with SDPA swapped for quantattn's."""
    patch(config, cpu)
    try:
        yield
    finally:
        unpatch()


def attach(module: torch.nn.Module, config: QuantConfig | None = None, cpu: str = "fallback"):
    """Patch SDPA only while `module` runs its forward (other models stay on torch's SDPA).

    Returns a handle; `handle.remove()` detaches. The patch is undone even if the forward raises."""
    if cpu not in ("fallback", "reference"):
        raise ValueError(f"cpu must be 'fallback' or 'reference', got {cpu!r}")
    pre = module.register_forward_pre_hook(lambda mod, args: patch(config, cpu))
    post = module.register_forward_hook(lambda mod, args, out: unpatch(), always_call=True)
    return _Handles(pre, post)


class _Handles:
    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
