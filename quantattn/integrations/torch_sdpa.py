"""`torch.nn.functional.scaled_dot_product_attention`, quantized where quantattn applies.

`quantattn.sdpa` has SDPA's exact signature. It runs `quantattn.sageattn` on the calls the kernels
compute with SDPA's meaning, and hands every other call to the original SDPA, counting the reasons
and saying each one once. `patch()` / `unpatch()` / `patched()` swap it into `torch.nn.functional`;
`attach()` does so only while one module runs.

Routing is per thread. While any route is open, `F.scaled_dot_product_attention` is `quantattn.sdpa`,
which sends each call to the calling thread's innermost route (`patched()`, an attached forward, a
calibration plan), else to the process-wide `patch()`, else to torch's SDPA: two models attached with
different variants and run in two threads each get their own, and a third thread's calls stay torch's.
Open routes are counted, so the original function is back exactly when the last one closes, in whatever
order they close. (Threads, not asyncio tasks: Dynamo can trace a `threading.local`, not a ContextVar.)

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
import dataclasses
import math
import numbers
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
    # the call that takes `cpu`, for the CPU fallback's hint: "patch", "register" (transformers), ...
    setup: str = dataclasses.field(default="patch", compare=False)

    def __call__(self, original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return routed_sdpa(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def __post_init__(self):
        if self.cpu not in CPU_MODES:
            raise ValueError(f"cpu must be 'fallback' or 'reference', got {self.cpu!r}")
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise TypeError(f"config must be a quantattn.QuantConfig, got {type(self.config).__name__}")


DEFAULT_ROUTE = Route()


class _ThreadRoutes(threading.local):
    """Each thread's open routes: {target key: (handler, ...)}, the innermost last."""

    def __init__(self):
        self.stacks: dict[tuple[int, str], tuple] = {}


_local = _ThreadRoutes()
# patch(): process-wide Routes, innermost last; a thread's own routes (patched(), attach(), plans) rule over them
_routes: list[Route] = []
# patched attributes: key -> [object, attribute, original, dispatcher, open routes in all threads]
_switches: dict[tuple[int, str], list] = {}
SDPA_TARGET = (F, "scaled_dot_product_attention")


SDPA_KEY = (id(F), "scaled_dot_product_attention")


def _key(obj, attr: str) -> tuple[int, str]:
    # SDPA's key without id(): Dynamo (torch 2.11) cannot trace id() of a module, and patched()/attach()
    # open SDPA's route inside compiled code
    if obj is F and attr == "scaled_dot_product_attention":
        return SDPA_KEY
    return (id(obj), attr)


def _innermost(key):
    """The handler that a call to the patched attribute `key` made now, in this thread, goes to (or None)."""
    stack = _local.stacks.get(key, ())
    if stack:
        return stack[-1]
    if key == SDPA_KEY and _routes:
        return _routes[-1]
    return None


def _active() -> Route:
    """The innermost Route of this thread (routes of a calibration plan are skipped), else the default."""
    for handler in reversed(_local.stacks.get(SDPA_KEY, ())):
        if isinstance(handler, Route):
            return handler
    return _routes[-1] if _routes else DEFAULT_ROUTE


CPU_REASON = "CPU tensors (patch(cpu='reference') runs quantattn's slow reference on them)"


def why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, cpu="fallback",
                      scale=None) -> str | None:  # fmt: skip
    """The reason quantattn cannot compute this SDPA call with SDPA's meaning, or None.

    Reads only types, shapes, dtypes, devices, flags and the scale, never tensor values: under
    torch.compile the decision is made once, when the graph is traced, and guarded like any other shape
    check."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "inputs are not tensors"
    if scale is not None and not (
        isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale) and scale != 0
    ):
        # SDPA computes with any float (0: uniform weights; NaN: NaN); sageattn refuses those scales
        return "scale is zero, not finite or not a number"
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
        return CPU_REASON
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
    if torch.compiler.is_compiling():
        # Dynamo refuses assume_constant_result while it traces (patched() inside a compiled function
        # before any eager patch): this graph's fallbacks go uncounted, the next eager call marks it
        return
    torch.compiler.assume_constant_result(_fall_back)  # marks the function; eager calls are unchanged
    _dynamo_knows_fall_back = True


let_dynamo_count_fallbacks(load_dynamo=False)


def routed_sdpa(route: Route, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA's call under `route`: quantattn where it computes SDPA's meaning, else the original SDPA."""
    reason = why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, route.cpu, scale)
    if reason == CPU_REASON and route.setup != "patch":
        reason = CPU_REASON.replace("patch(", f"{route.setup}(")
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
    handler = _innermost(SDPA_KEY)
    if handler is None:
        handler = DEFAULT_ROUTE
    switch = _switches.get(SDPA_KEY)
    original = switch[2] if switch is not None else ORIGINAL_SDPA  # what F held when the routes began
    return handler(original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def call_sdpa(original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The original SDPA with the arguments it was called with (enable_gqa only where given: older
    torch versions do not take it)."""
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = enable_gqa
    return original(query, key, value, **kwargs)


def _dispatcher(key, original):
    """The function that stands in for `original` while routes are open: each call goes to the calling
    thread's innermost handler, or to `original` where that thread has none."""
    if key == SDPA_KEY:
        return sdpa

    def dispatch(query, key_, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        handler = _innermost(key)
        if handler is None:
            return call_sdpa(original, query, key_, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return handler(original, query, key_, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    dispatch.__wrapped__ = original
    return dispatch


def _guard():
    # Dynamo cannot enter a lock; while it traces, nothing else runs this frame's Python
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _lock


def _hold(obj, attr: str) -> None:
    """One more open route on obj.attr: the dispatcher is put in place by the first."""
    key = _key(obj, attr)
    with _guard():
        switch = _switches.get(key)
        if switch is None:
            original = getattr(obj, attr)
            switch = _switches[key] = [obj, attr, original, _dispatcher(key, original), 0]
            setattr(obj, attr, switch[3])
        switch[4] += 1


def _release(obj, attr: str) -> None:
    """One route fewer on obj.attr: the last one puts the original back (unless something else has
    replaced the dispatcher since, which is then left alone)."""
    key = _key(obj, attr)
    with _guard():
        switch = _switches[key]
        switch[4] -= 1
        if switch[4] == 0:
            del _switches[key]
            if getattr(obj, attr) is switch[3]:
                setattr(obj, attr, switch[2])


def open_route(handler, targets=(SDPA_TARGET,)) -> None:
    """Route this thread's calls of each (object, attribute) in `targets` to `handler(original, query,
    key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)` until close_route(handler, targets)
    in the same thread. Other threads' calls are not affected; routes nest, the innermost rules."""
    for obj, attr in targets:
        _hold(obj, attr)
        key = _key(obj, attr)
        _local.stacks[key] = (*_local.stacks.get(key, ()), handler)


def close_route(handler, targets=(SDPA_TARGET,)) -> None:
    """Close this thread's innermost route to `handler` on `targets` (open_route's)."""
    for obj, attr in targets:
        key = _key(obj, attr)
        stack = _local.stacks.get(key, ())
        where = len(stack) - 1
        while where >= 0 and stack[where] is not handler:
            where -= 1
        if where < 0:
            raise RuntimeError(f"no open route to {handler!r} on {attr} in this thread")
        rest = stack[:where] + stack[where + 1 :]
        if rest:
            _local.stacks[key] = rest
        else:
            del _local.stacks[key]
        _release(obj, attr)


def push_route(route: Route) -> None:
    """Route this thread's SDPA calls to quantattn's under `route` (validated already); pop_route() undoes it."""
    open_route(route)


def pop_route(route: Route) -> None:
    close_route(route)


def patch(config: QuantConfig | None = None, cpu: str = "fallback") -> None:
    """Make `torch.nn.functional.scaled_dot_product_attention` quantattn's `sdpa` until `unpatch()`, in
    every thread (process-wide setup; `patched()` and `attach()` route one thread's calls only).

    config: the variant to run (default: the device's default). cpu: "fallback" (CPU calls go to torch's
    SDPA) or "reference" (they run quantattn's slow PyTorch reference). Code that imported the function
    itself (`from torch.nn.functional import scaled_dot_product_attention`) before patching keeps the
    original. Patches nest: each patch() needs its unpatch(), and the innermost one's settings rule; a
    thread's own patched() or attach() rules over them."""
    route = Route(config, cpu)
    let_dynamo_count_fallbacks()
    with _guard():
        _routes.append(route)
    _hold(*SDPA_TARGET)


def unpatch() -> None:
    """Undo the last patch(); the original SDPA is back (the very same function) once every patch(),
    patched() and attach()ed forward has ended."""
    with _guard():
        if not _routes:
            raise RuntimeError("unpatch() without a matching patch()")
        _routes.pop()
    _release(*SDPA_TARGET)


@contextlib.contextmanager
def patched(config: QuantConfig | None = None, cpu: str = "fallback"):
    """`with quantattn.patched(): ...` runs the block with SDPA swapped for quantattn's: the calls this
    thread makes inside the block (other threads keep theirs)."""
    route = Route(config, cpu, setup="patched")
    let_dynamo_count_fallbacks()
    open_route(route)
    try:
        yield
    finally:
        close_route(route)


def attach(module: torch.nn.Module, config: QuantConfig | None = None, cpu: str = "fallback"):
    """Patch SDPA only while `module` runs its forward, and only for that forward's thread (other
    models, and other threads, stay on torch's SDPA).

    Returns a handle; `handle.remove()` detaches (a forward running meanwhile finishes as it began).
    The patch is undone even if the forward raises."""
    route = Route(config, cpu, setup="attach")
    let_dynamo_count_fallbacks()
    return ForwardRoute(module, route)


class ForwardRoute:
    """Opens a route to `handler` (open_route's) on `targets` while `module` runs its forward, in the
    forward's thread. remove() stops it for forwards that start later; one that is running meanwhile
    still closes its route when it ends."""

    def __init__(self, module: torch.nn.Module, handler, targets=(SDPA_TARGET,)):
        self._handler, self._targets = handler, tuple(targets)
        self._running = 0
        self._removed = False
        self._pre = module.register_forward_pre_hook(self._enter)
        self._post = module.register_forward_hook(self._leave, always_call=True)

    def _enter(self, module, args):
        with _guard():
            self._running += 1
        open_route(self._handler, self._targets)

    def _leave(self, module, args, output):
        close_route(self._handler, self._targets)
        with _guard():
            self._running -= 1
            last = self._removed and self._running == 0
        if last:
            self._post.remove()

    def remove(self) -> None:
        self._pre.remove()
        with _guard():
            self._removed = True
            idle = self._running == 0
        if idle:
            self._post.remove()
