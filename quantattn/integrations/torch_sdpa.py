"""`torch.nn.functional.scaled_dot_product_attention`, quantized where quantattn applies.

`quantattn.sdpa` has SDPA's exact signature. It runs `quantattn.sageattn` on the calls the kernels
compute with SDPA's meaning, and hands every other call to the original SDPA, counting the reasons
and saying each one once. `patch()` / `unpatch()` / `patched()` swap it into `torch.nn.functional`;
`attach()` does so only while one module runs.

Everything on the call path compiles under `torch.compile(fullgraph=True)`: the fallback decision reads
only shapes, dtypes, devices and flags, and the lock that guards patching is skipped while Dynamo traces
(tracing is single-threaded). Dynamo can trace neither that lock nor the logger, so under torch.compile a
fallback's bookkeeping runs when the graph is traced (`torch.compiler.assume_constant_result` makes Dynamo
call it then, instead of breaking the graph): the reason is said, and counted once per compiled graph
rather than once per call. A compiled graph never changes its mind, so the count still says which calls
fell back and why.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantattn.api import sageattn
from quantattn.backends.sdpa import (  # noqa: F401  fallbacks, reset_fallbacks: this module's public names
    ORIGINAL_SDPA,
    count_fallback,
    fallbacks,
    reset_fallbacks,
)
from quantattn.config import QuantConfig
from quantattn.validation import ACCEPTED_DTYPES, MAX_HEAD_DIM, broadcasts_to

CPU_MODES = ("fallback", "reference")

# `fallbacks` (reason -> count since the last reset_fallbacks()) is shared with backend="auto", which
# counts there the calls it gives to torch's SDPA by its speed table.
_lock = threading.Lock()  # guards patching


@dataclass(frozen=True)
class Route:
    """Where quantized calls go: the variant (None: the device's default) and what CPU tensors do,
    "fallback" (torch's SDPA) or "reference" (quantattn's slow PyTorch reference)."""

    config: QuantConfig | None = None
    cpu: str = "fallback"

    def __post_init__(self):
        if self.cpu not in CPU_MODES:
            raise ValueError(f"cpu must be 'fallback' or 'reference', got {self.cpu!r}")
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise TypeError(f"config must be a quantattn.QuantConfig, got {type(self.config).__name__}")


DEFAULT_ROUTE = Route()

# One Route per active patch; the innermost one rules.
_routes: list[Route] = []


def _active() -> Route:
    return _routes[-1] if _routes else DEFAULT_ROUTE


def why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, cpu="fallback") -> str | None:
    """The reason quantattn cannot compute this SDPA call with SDPA's meaning, or None.

    Reads only types, shapes, dtypes, devices and flags, never tensor values: under torch.compile the
    decision is made once, when the graph is traced, and guarded like any other shape check."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "inputs are not tensors"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not 4-D [B, H, N, d]"
    if attn_mask is not None:
        reason = _why_not_mask(query, key, attn_mask, is_causal)
        if reason is not None:
            return reason
    if dropout_p != 0.0:
        return "dropout_p > 0"
    if (
        attn_mask is not None
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        return "attn_mask with inputs that require grad (quantattn's backward pass takes no mask yet)"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in ACCEPTED_DTYPES:
        return f"dtype {query.dtype} (quantattn takes float16 and bfloat16)"
    if query.device.type == "cpu" and cpu == "fallback":
        return "CPU tensors (patch(cpu='reference') runs quantattn's slow reference on them)"
    if not (query.device == key.device == value.device):
        return "tensors on different devices"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return "value head_dim differs from the query's"
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head_dim {d} outside 1..{MAX_HEAD_DIM}"
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        return "batch, heads or lengths do not match"
    if key.shape[2] == 0:
        return "no keys (SDPA gives NaN rows, quantattn zeros)"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not (enable_gqa and hkv and hq % hkv == 0):
        return "query and key/value heads differ without enable_gqa"
    if is_causal and query.shape[2] != key.shape[2]:
        # SDPA aligns a causal mask top-left, quantattn bottom-right: they agree only when Nq == Nk
        return "is_causal with Nq != Nk (SDPA's top-left alignment)"
    return None


def _why_not_mask(query, key, attn_mask, is_causal) -> str | None:
    """Masks the kernels take with SDPA's meaning: bool, float32 or the query's dtype, broadcastable to
    [B, Hq, Nq, Nk], without a gradient to give; the rest (and SDPA's own errors) stay SDPA's."""
    if not isinstance(attn_mask, torch.Tensor):
        return "attn_mask is not a tensor"
    if is_causal:
        return "attn_mask together with is_causal (SDPA refuses the pair)"
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return f"attn_mask of dtype {attn_mask.dtype} (SDPA takes bool, float32 or the query's dtype)"
    if attn_mask.device != query.device:
        return "attn_mask on another device"
    if torch.is_grad_enabled() and attn_mask.requires_grad:
        return "attn_mask requires grad"
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if not broadcasts_to(attn_mask.shape, shape):
        return "attn_mask does not broadcast to [B, Hq, Nq, Nk]"
    return None


def _fall_back(reason: str) -> None:
    """Count the reason and say it the first time (under torch.compile: when the graph is traced)."""
    count_fallback(reason, "quantattn.sdpa: falling back to torch SDPA: %s")


_dynamo_knows_fall_back = False


def let_dynamo_count_fallbacks(load_dynamo: bool = True) -> None:
    """Tell Dynamo to run `_fall_back` at trace time instead of tracing it (idempotent).

    Until this has run, compiled code still falls back correctly but neither counts nor says it (the
    alternative would be a graph break). Loading Dynamo costs about a second, so `import quantattn`
    only does this when Dynamo is loaded already; patch(), attach() and the transformers and diffusers
    integrations do it with load_dynamo=True."""
    global _dynamo_knows_fall_back
    if _dynamo_knows_fall_back or (not load_dynamo and "torch._dynamo" not in sys.modules):
        return
    torch.compiler.assume_constant_result(_fall_back)  # marks the function; eager calls are unchanged
    _dynamo_knows_fall_back = True


let_dynamo_count_fallbacks(load_dynamo=False)


def routed_sdpa(route: Route, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA's call under `route`: quantattn where it computes SDPA's meaning, else the original SDPA."""
    reason = why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, route.cpu)
    if reason is not None:
        if _dynamo_knows_fall_back or not torch.compiler.is_compiling():
            _fall_back(reason)
        return ORIGINAL_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    return sageattn(
        query, key, value, "HND", is_causal, scale, attn_mask=attn_mask, config=route.config,
        backend="reference" if query.device.type == "cpu" else "auto",
    )  # fmt: skip


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
    return routed_sdpa(_active(), query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _guard():
    # Dynamo cannot enter a lock; while it traces, nothing else runs this frame's Python
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _lock


def push_route(route: Route) -> None:
    """Swap SDPA for quantattn's under `route` (validated already); pop_route() undoes it."""
    with _guard():
        _routes.append(route)
        F.scaled_dot_product_attention = sdpa


def pop_route() -> None:
    with _guard():
        if not _routes:
            raise RuntimeError("unpatch() without a matching patch()")
        _routes.pop()
        if not _routes:
            F.scaled_dot_product_attention = ORIGINAL_SDPA


def patch(config: QuantConfig | None = None, cpu: str = "fallback") -> None:
    """Make `torch.nn.functional.scaled_dot_product_attention` quantattn's `sdpa` until `unpatch()`.

    config: the variant to run (default: the device's default). cpu: "fallback" (CPU calls go to torch's
    SDPA) or "reference" (they run quantattn's slow PyTorch reference). Code that imported the function
    itself (`from torch.nn.functional import scaled_dot_product_attention`) before patching keeps the
    original. Patches nest: each patch() needs its unpatch(), and the innermost one's settings rule."""
    route = Route(config, cpu)
    let_dynamo_count_fallbacks()
    push_route(route)


def unpatch() -> None:
    """Undo the last patch(); the original SDPA is back (the very same function) once every patch()
    has been undone."""
    pop_route()


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
    route = Route(config, cpu)
    let_dynamo_count_fallbacks()
    pre = module.register_forward_pre_hook(lambda mod, args: push_route(route))
    post = module.register_forward_hook(lambda mod, args, out: pop_route(), always_call=True)
    return _Handles(pre, post)


class _Handles:
    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
