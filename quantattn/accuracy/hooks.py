"""Where a model calls attention: stable keys for its SDPA calls, and the interception of those calls.

A call's key is the qualified name of the innermost module whose forward is running when SDPA is
called, and the call's index among that module's SDPA calls in that forward: "blocks.3.attn#0". Keys
are the same in every forward pass of the same model, so the inspector can aggregate over inputs and a
plan can be applied at inference. Module names come from forward pre-hooks and forward hooks.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from quantattn.integrations import torch_sdpa as S
from quantattn.integrations.torch_sdpa import call_sdpa, why_not_quantized

ROOT = "<model>"  # the key prefix of calls made by the model's own forward


def call_key(module: str, index: int) -> str:
    return f"{module or ROOT}#{index}"


class _Frames(threading.local):
    def __init__(self):
        self.stack: list[str] = []
        self.counts: list[int] = []


class CallSites:
    """Tracks the innermost running module of `model` and counts SDPA calls per module invocation, per
    thread (the same model run in two threads at once gives each call its own key).

    modules: the qualified names to hook (default: every module). Hooking only the modules that own
    calls gives the same keys as hooking all of them, as long as the model runs the same code path.
    """

    def __init__(self, model: torch.nn.Module, modules=None):
        self._frames = _Frames()
        self._handles = []
        wanted = None if modules is None else set(modules)
        for name, mod in model.named_modules():
            if wanted is not None and name not in wanted:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self._handles.append(mod.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name):
        def hook(module, args):
            self._frames.stack.append(name)
            self._frames.counts.append(0)

        return hook

    def _leave(self, module, args, output):
        if self._frames.stack:
            self._frames.stack.pop()
            self._frames.counts.pop()

    def next_key(self) -> str:
        """The key of an SDPA call made now in this thread (and count it)."""
        frames = self._frames
        if not frames.stack:
            return call_key("", 0)
        index = frames.counts[-1]
        frames.counts[-1] += 1
        return call_key(frames.stack[-1], index)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def sdpa_targets(targets=None) -> tuple:
    """(object, attribute) pairs: `targets`, default torch.nn.functional.scaled_dot_product_attention."""
    return tuple(targets) if targets is not None else (S.SDPA_TARGET,)


@contextlib.contextmanager
def intercepted_sdpa(handler, targets=None):
    """Route this thread's SDPA calls to `handler(original, query, key, value, attn_mask, dropout_p,
    is_causal, scale, enable_gqa)` inside the block (other threads' calls are not affected).

    targets: (object, attribute) pairs holding SDPA-compatible functions; default
    `torch.nn.functional.scaled_dot_product_attention`. Add a model's own module and name when it imported
    the function itself (`from torch.nn.functional import scaled_dot_product_attention`), or any function
    with SDPA's signature that the model calls (a registered attention)."""
    targets = sdpa_targets(targets)
    S.open_route(handler, targets)
    try:
        yield
    finally:
        S.close_route(handler, targets)


def why_not_quantizable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, scale=None) -> str | None:
    """Why quantattn cannot compute this SDPA call with SDPA's meaning, or None: quantattn.sdpa's rules,
    on any device (CPU calls run the reference)."""
    return why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, cpu="reference",
                             scale=scale)  # fmt: skip


__all__ = ["CallSites", "call_key", "call_sdpa", "intercepted_sdpa", "sdpa_targets", "why_not_quantizable"]
