"""The backend registry: which backend runs a forward, backward or decode call.

Each backend (one module each: reference, triton, hopper, and sdpa, torch's own SDPA as `auto`'s hand-off)
declares what it can run: `reasons(call)` lists why it cannot take a forward call (empty: it can), and
`backward_reasons(device)` / `decode_reasons(device)` the same for the other entry points it serves.
Dispatch takes the requested backend when it has no reasons, or for "auto" the first of AUTO_ORDER with
none; when none fits, the error lists every backend's reasons.
"""

from __future__ import annotations

import warnings

import torch

from quantattn import guards
from quantattn.backends import speed_table
from quantattn.backends.capability import device_capability, interpreter_active, triton_installed
from quantattn.backends.hopper import HopperBackend
from quantattn.backends.reference import ReferenceBackend
from quantattn.backends.sdpa import AUTO_SDPA, AUTO_SDPA_MESSAGE, SDPA_BACKENDS, SdpaBackend, count_fallback
from quantattn.backends.triton import TritonBackend
from quantattn.calls import AttentionCall

BACKENDS = {"hopper": HopperBackend(), "triton": TritonBackend(), "reference": ReferenceBackend()}
AUTO_ORDER = ("hopper", "triton")
# "auto": the first quantized backend of AUTO_ORDER that takes the call, or torch's SDPA where this GPU's
# speed table measured SDPA faster for the call's shape class (quantattn.backends.speed_table);
# "quantized": the same choice without torch's SDPA (for measuring quantattn itself).
REQUESTS = ("auto", "quantized", *BACKENDS)
BACKWARD_REQUESTS = ("auto", "triton", "reference")
DECODE_REQUESTS = ("auto", "triton", "reference")


# ---- forward ----------------------------------------------------------------------------------------


def select_backend(call: AttentionCall, requested: str):
    """The backend that runs `call`: a BACKENDS entry, or (for "auto" only) an SdpaBackend, torch's SDPA."""
    if requested not in REQUESTS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, REQUESTS))}; got {requested!r}")
    if requested in BACKENDS:
        backend = BACKENDS[requested]
        reasons = backend.reasons(call)
        if reasons:
            raise RuntimeError(f"backend {requested!r} cannot run this call: {'; '.join(reasons)}")
        return backend
    if call.q.device.type == "cpu":
        return BACKENDS["reference"]
    refusals = []
    for name in AUTO_ORDER:
        if not BACKENDS[name].prefers(call):
            refusals.append(f"{name}: not preferred for this shape")
            continue
        reasons = BACKENDS[name].reasons(call)
        if not reasons:
            if requested == "auto":
                span = speed_table.sdpa_span(call, name)
                if span is not None:
                    count_fallback(span.reason, AUTO_SDPA_MESSAGE)
                    return SDPA_BACKENDS[span.sdpa]
            return BACKENDS[name]
        refusals.append(f"{name}: {'; '.join(reasons)}")
    raise RuntimeError(
        "no quantattn kernel can run this call on "
        f"{call.q.device} ({' | '.join(refusals)}); backend='reference' runs the slow PyTorch version"
    )


_warned_cpu = False


def forward(call: AttentionCall, requested: str) -> torch.Tensor | None:
    """Run one validated call: route it past numerics that cannot represent it (quantattn.guards: shapes
    and dtypes only, no GPU sync), choose the backend (so that a refused choice is refused even for empty
    inputs), run it, cut into parts where the grid needs it.

    Returns None when the backend wrote call.out, or torch SDPA's HND output where backend="auto" gave the
    call to torch's SDPA (returned as it is rather than copied into call.out)."""
    global _warned_cpu
    call = guards.route(call)
    chosen = select_backend(call, requested)
    if not call.out.numel():
        return None
    if isinstance(chosen, SdpaBackend):
        return chosen.run(call)
    if chosen.name == "reference" and call.q.device.type == "cpu" and not _warned_cpu:
        _warned_cpu = True
        warnings.warn(
            "quantattn: CPU tensors run the pure-PyTorch reference of the quantized kernels: correct, slow; "
            "speed needs an NVIDIA GPU",
            stacklevel=4,  # the caller of sageattn: api -> prepare.run_dense -> here
        )
    for part in guards.split(call):
        chosen.forward(part)
    return None


# ---- backward ---------------------------------------------------------------------------------------


def backward_backend(device: torch.device, requested: str) -> str:
    """Which backward runs: "triton" or "reference" (the forward has refused what neither can do)."""
    if requested in ("triton", "reference"):
        return requested
    return "triton" if device.type == "cuda" else "reference"


def backward(q, k, v, grad_out, is_causal: bool, sm_scale: float, dq, dk, dv, grad_lse, requested: str) -> None:
    """The exact attention gradient of HND views into dq, dk, dv (see quantattn/autograd.py)."""
    BACKENDS[backward_backend(q.device, requested)].backward(q, k, v, grad_out, is_causal, sm_scale, dq, dk, dv,
                                                             grad_lse)  # fmt: skip


# ---- decode -----------------------------------------------------------------------------------------


def decode_backend(device: torch.device, requested: str) -> str:
    """'triton' or 'reference' for a quantized KV cache on `device`; says why when the kernels cannot run."""
    if requested not in DECODE_REQUESTS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, DECODE_REQUESTS))}; got {requested!r}")
    if requested == "reference":
        return requested
    reasons = BACKENDS["triton"].decode_reasons(device)
    if device.type == "cpu":
        if requested == "auto":
            return "reference"
        if not reasons:
            return "triton"
        raise RuntimeError("backend 'triton' needs CUDA tensors (TRITON_INTERPRET=1 runs it on the CPU)")
    if reasons:
        raise RuntimeError(
            f"the quantized KV cache's kernels cannot run: {reasons[0]}; backend='reference' runs anywhere"
        )
    return "triton"


__all__ = [
    "AUTO_ORDER",
    "AUTO_SDPA",
    "AttentionCall",
    "BACKENDS",
    "HopperBackend",
    "REQUESTS",
    "SDPA_BACKENDS",
    "ReferenceBackend",
    "SdpaBackend",
    "TritonBackend",
    "backward",
    "backward_backend",
    "decode_backend",
    "device_capability",
    "forward",
    "interpreter_active",
    "select_backend",
    "triton_installed",
]
