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
import torch.nn.functional as F

from quantattn.integrations.torch_sdpa import why_not_quantized

ROOT = "<model>"  # the key prefix of calls made by the model's own forward
_lock = threading.Lock()


def call_key(module: str, index: int) -> str:
    return f"{module or ROOT}#{index}"


class CallSites:
    """Tracks the innermost running module of `model` and counts SDPA calls per module invocation.

    modules: the qualified names to hook (default: every module). Hooking only the modules that own
    calls gives the same keys as hooking all of them, as long as the model runs the same code path.
    """

    def __init__(self, model: torch.nn.Module, modules=None):
        self._stack: list[str] = []
        self._counts: list[int] = []
        self._handles = []
        wanted = None if modules is None else set(modules)
        for name, mod in model.named_modules():
            if wanted is not None and name not in wanted:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self._handles.append(mod.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name):
        def hook(module, args):
            self._stack.append(name)
            self._counts.append(0)

        return hook

    def _leave(self, module, args, output):
        if self._stack:
            self._stack.pop()
            self._counts.pop()

    def next_key(self) -> str:
        """The key of an SDPA call made now (and count it)."""
        if not self._stack:
            return call_key("", 0)
        index = self._counts[-1]
        self._counts[-1] += 1
        return call_key(self._stack[-1], index)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def intercepted_sdpa(handler, targets=None):
    """Replace SDPA with `handler(original, query, key, value, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)` inside the block.

    targets: (object, attribute) pairs holding SDPA-compatible functions; default
    `torch.nn.functional.scaled_dot_product_attention`. Add a model's own module and name when it imported
    the function itself (`from torch.nn.functional import scaled_dot_product_attention`), or any function
    with SDPA's signature that the model calls (a registered attention)."""
    targets = list(targets) if targets is not None else [(F, "scaled_dot_product_attention")]
    saved = []
    with _lock:
        for obj, attr in targets:
            original = getattr(obj, attr)

            def replacement(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, _original=original):  # fmt: skip
                return handler(_original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

            replacement.__wrapped__ = original
            saved.append((obj, attr, original))
            setattr(obj, attr, replacement)
    try:
        yield
    finally:
        with _lock:
            for obj, attr, original in reversed(saved):
                setattr(obj, attr, original)


def call_sdpa(original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The original SDPA with the arguments it was called with (enable_gqa only where given: older
    torch versions do not take it)."""
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = enable_gqa
    return original(query, key, value, **kwargs)


def why_not_quantizable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """Why quantattn cannot compute this SDPA call with SDPA's meaning, or None: quantattn.sdpa's rules,
    on any device (CPU calls run the reference)."""
    return why_not_quantized(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, cpu="reference")
