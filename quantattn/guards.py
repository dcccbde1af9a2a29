"""Guards: calls whose requested numerics cannot represent them go to a safe variant, decided from shapes,
dtypes and flags only.

`sageattn` and `sageattn_varlen` pass every call through `route` and `split` (in backends.forward). Both look at
nothing but shapes, dtypes and the configuration, so they cost a few attribute reads and never wait for
the GPU. Problems that depend on the values (a huge V, a tiny one, a token outlier) cannot be routed
without reading the values, which would synchronize with the GPU on every call: those are handled
inside the numerics instead (the output is saturated to its dtype's range, statistics ignore
non-finite elements), or documented in docs/accuracy.md ("Guards") with what quantattn does.

ROUTES lists every route: its name, when it applies, and what the call runs instead. A route
changes numerics only where the requested ones fail; `explain(q, k, v, cfg)` says which routes a call
would take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantattn.calls import MAX_GRID_Y, AttentionCall, grid_parts
from quantattn.config import QuantConfig


@dataclass(frozen=True)
class NumericsRoute:
    name: str
    why: str
    applies: Callable[[torch.dtype, QuantConfig], bool]
    safe: Callable[[QuantConfig], QuantConfig]


ROUTES = (
    NumericsRoute(
        "bf16 inputs, FP16 PV -> BF16 PV",
        "V from bfloat16 inputs may lie outside float16's range (|V| > 65504 becomes Inf, |V| < 6e-8 becomes "
        "0): BF16 PV has the input's range, runs at the same tensor-core rate, and P keeps 8 bits, twice "
        "the 4 bits of the default FP8 P. Only the FP32 accumulator: an FP16 accumulator (fp16+fp32) is "
        "an explicit choice of its range (docs/accuracy.md).",
        lambda dtype, cfg: dtype == torch.bfloat16 and cfg.pv_dtype == "fp16" and cfg.pv_accum == "fp32",
        lambda cfg: cfg.replace(pv_dtype="bf16"),
    ),
)


def routed_config(dtype: torch.dtype, cfg: QuantConfig) -> QuantConfig:
    """The configuration a call with inputs of `dtype` runs when it asks for `cfg`."""
    for r in ROUTES:
        if r.applies(dtype, cfg):
            cfg = r.safe(cfg)
    return cfg


def route(call: AttentionCall) -> AttentionCall:
    """The call with the configuration it can safely run (itself when no route applies)."""
    cfg = routed_config(call.q.dtype, call.cfg)
    return call if cfg is call.cfg else dataclasses.replace(call, cfg=cfg)


def explain(dtype: torch.dtype, cfg: QuantConfig) -> list[str]:
    """The routes a call with inputs of `dtype` and this configuration takes, each with its reason."""
    return [f"{r.name}: {r.why}" for r in ROUTES if r.applies(dtype, cfg)]


def split(call: AttentionCall) -> tuple[AttentionCall, ...]:
    """The call cut into calls of at most MAX_GRID_Y (sequence, query head) pairs.

    The kernels launch one program row per (sequence, head) on the grid's second dimension, which CUDA
    caps at 65535 (a batch of 2048 images with 32 heads passes it). Sequences are independent (each is
    smoothed and quantized on its own), so the parts compute exactly what the whole would."""
    count = call.cu_seqlens_q.numel() - 1 if call.is_varlen else call.q.shape[0]
    runs = grid_parts(count, call.q.shape[1])
    if len(runs) == 1:
        return (call,)
    parts = []
    for s, e in runs:
        if call.is_varlen:
            # the offsets are absolute rows of the packed tensors: a slice of them addresses its sequences
            part = dataclasses.replace(call, cu_seqlens_q=call.cu_seqlens_q[s : e + 1],
                                       cu_seqlens_k=call.cu_seqlens_k[s : e + 1])  # fmt: skip
        else:
            rows = slice(s, e)
            part = dataclasses.replace(
                call, q=call.q[rows], k=call.k[rows], v=call.v[rows], out=call.out[rows],
                **{name: _rows(getattr(call, name), rows) for name in ("lse", "attn_mask", "key_lengths")},
            )  # fmt: skip
        parts.append(part)
    return tuple(parts)


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return t[rows] if t is not None else None


__all__ = ["MAX_GRID_Y", "ROUTES", "NumericsRoute", "explain", "route", "routed_config", "split"]
