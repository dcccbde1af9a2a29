"""quantattn's entry points as PyTorch custom operators: the form torch.compile traces.

Dynamo cannot see through a Triton launch, and must not trace quantattn's validation, QuantConfig
resolution or device queries. Under torch.compile, `sageattn` and `sageattn_varlen` therefore call
`torch.ops.quantattn.sageattn` / `sageattn_varlen` (api.py checks `torch.compiler.is_compiling()`
first thing), which the graph holds as one opaque node. The fake implementations give the output
shapes from the input shapes, and run the eager checks while the graph is traced, so a bad call fails
at compile time with the eager message. The real implementations validate and resolve the call once
(quantattn/prepare.py, which api.py skips under torch.compile) and run it as an eager call does, so a
compiled call computes exactly what an eager one does. Eager calls never come here: the dispatcher
would add microseconds of host time to every call.

A QuantConfig cannot cross the operator boundary, so it travels as its fields (`config_<field>`,
None when no config was given), and the keyword options as the fields they set (None when not given);
the implementations rebuild both and resolve them exactly as the eager call does. Both operators always
return the log-sum-exp too, as a zero-size tensor when it was not asked for.
"""

from __future__ import annotations

import dataclasses

import torch

from quantattn import autograd, prepare
from quantattn import validation as V
from quantattn.config import QuantConfig

FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))
_FIELD_TYPES = {f.name: "bool" if isinstance(f.default, bool) else "str" for f in dataclasses.fields(QuantConfig)}
_CHOICES_SCHEMA = ", ".join(
    [f"{_FIELD_TYPES[f]}? config_{f}" for f in FIELDS] + [f"{_FIELD_TYPES[f]}? {f}" for f in FIELDS]
)
_TAIL = f"bool is_causal, float? sm_scale, bool return_lse, str backend, {_CHOICES_SCHEMA}) -> (Tensor, Tensor)"
DENSE_SCHEMA = f"(Tensor q, Tensor k, Tensor v, str tensor_layout, Tensor? attn_mask, Tensor? key_lengths, {_TAIL}"
VARLEN_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
    f"SymInt max_seqlen_k, {_TAIL}"
)


# ---- flattening (traced by Dynamo: plain Python on constants) -------------------------------------


def flatten_choices(config, options: dict) -> tuple:
    """config's fields (or Nones), then each field an option sets (or None), in FIELDS order."""
    prepare.check_choices(config, options)
    configured = tuple(getattr(config, f) for f in FIELDS) if config is not None else (None,) * len(FIELDS)
    chosen = {prepare.CONFIG_KEYWORDS[key]: value for key, value in options.items()}
    return configured + tuple(chosen.get(f) for f in FIELDS)


def unflatten_choices(choices) -> tuple[QuantConfig | None, dict]:
    """The (config, options) that flatten_choices was given (options that were None are dropped,
    which resolve_config does too)."""
    configured, chosen = choices[: len(FIELDS)], choices[len(FIELDS) :]
    config = None if configured[0] is None else QuantConfig(**dict(zip(FIELDS, configured, strict=True)))
    field_keyword = {field: keyword for keyword, field in prepare.CONFIG_KEYWORDS.items()}
    options = {field_keyword[f]: value for f, value in zip(FIELDS, chosen, strict=True) if value is not None}
    return config, options


def sageattn(
    q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend, options, attn_mask=None, key_lengths=None
):
    """api.sageattn under torch.compile: the same arguments, as one operator call."""
    out, lse = torch.ops.quantattn.sageattn(
        q, k, v, tensor_layout, attn_mask, key_lengths, is_causal, sm_scale, return_lse, backend,
        *flatten_choices(config, options),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def sageattn_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse, config,
    backend, options,
):  # fmt: skip
    """api.sageattn_varlen under torch.compile: the same arguments, as one operator call."""
    out, lse = torch.ops.quantattn.sageattn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse, backend,
        *flatten_choices(config, options),
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ---- the operators (their bodies run eagerly, never under Dynamo) --------------------------------


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("quantattn::sageattn", mutates_args=(), schema=DENSE_SCHEMA)
def _sageattn_op(q, k, v, tensor_layout, attn_mask, key_lengths, is_causal, sm_scale, return_lse, backend, *choices):
    config, options = unflatten_choices(choices)
    cfg = prepare.check_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, options)
    res = prepare.run_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, cfg, backend, attn_mask,
                            key_lengths)  # fmt: skip
    return res if return_lse else (res, _no_lse(q))


@_sageattn_op.register_fake
def _sageattn_fake(q, k, v, tensor_layout, attn_mask, key_lengths, is_causal, sm_scale, return_lse, backend, *choices):
    V.check_layout(tensor_layout)
    V.check_qkv(q, k, v, 4, prepare.DENSE_SHAPES)
    V.check_sm_scale(sm_scale)
    qs, ks, vs = (prepare.dense_hnd_shape(t.shape, tensor_layout) for t in (q, k, v))
    V.check_heads_and_dims(qs, ks, vs)
    if attn_mask is not None:
        V.check_attn_mask(attn_mask, q, (*qs[:3], ks[2]))
    if key_lengths is not None:
        V.check_key_lengths(key_lengths, q, qs[0], ks[2])
    config, options = unflatten_choices(choices)
    prepare.resolve_config(q.device, config, options)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(qs[:3], dtype=torch.float32) if return_lse else _no_lse(q)
    return out, lse


@torch.library.custom_op("quantattn::sageattn_varlen", mutates_args=(), schema=VARLEN_SCHEMA)
def _sageattn_varlen_op(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse, backend,
    *choices,
):  # fmt: skip
    config, options = unflatten_choices(choices)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse)
    res = prepare.run_varlen(*args, prepare.check_varlen(*args, config, options), backend)
    return res if return_lse else (res, _no_lse(q))


@_sageattn_varlen_op.register_fake
def _sageattn_varlen_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse, backend,
    *choices,
):  # fmt: skip
    # the offsets' values are data: the real implementation checks them
    V.check_qkv(q, k, v, 3, prepare.VARLEN_SHAPES)
    V.check_sm_scale(sm_scale)
    V.check_heads_and_dims(*(prepare.varlen_hnd_shape(t.shape) for t in (q, k, v)))
    config, options = unflatten_choices(choices)
    prepare.resolve_config(q.device, config, options)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32) if return_lse else _no_lse(q)
    return out, lse


# The dense operator's backward (compiled training): quantattn/autograd.py's exact-attention gradient.
autograd.register_operator_autograd()
