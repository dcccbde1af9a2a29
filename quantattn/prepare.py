"""From the arguments of a public call to one AttentionCall: validation, QuantConfig resolution, layout.

Every path runs these once per call: an eager call from quantattn/api.py, the autograd.Function's
forward (quantattn/autograd.py; validated by api.py before it), and the custom operators' real
implementations under torch.compile (quantattn/ops.py, whose fake implementations run the shape checks
while the graph is traced). Nothing here calls back up into those modules.
"""

from __future__ import annotations

import math

import torch

from quantattn import backends
from quantattn import validation as V
from quantattn.backends.capability import device_capability
from quantattn.calls import AttentionCall
from quantattn.config import PV_ACCUMS, QuantConfig

# keyword name (official package's where it has one) -> QuantConfig field
CONFIG_KEYWORDS = {
    "qk_quant_dtype": "qk_dtype",
    "qk_quant_gran": "qk_granularity",
    "pv_dtype": "pv_dtype",
    "pv_accum_dtype": "pv_accum",
    "smooth_k": "smooth_k",
    "smooth_q": "smooth_q",
    "smooth_v": "smooth_v",
}
DENSE_SHAPES = "[B, H, N, d] for 'HND', [B, N, H, d] for 'NHD'"
VARLEN_SHAPES = "[total_tokens, H, d]"

_SAGE2 = QuantConfig()
_SAGE1_FP32_ACC = QuantConfig(pv_dtype="fp16", pv_accum="fp32")


def default_config(device: torch.device) -> QuantConfig:
    """SageAttention2 (INT8 QK per token, FP8 PV, two-level accumulation) where FP8 runs, else SageAttention."""
    if device.type == "cuda" and device_capability(device) < (8, 9):
        return _SAGE1_FP32_ACC
    return _SAGE2


def check_choices(config, options: dict) -> None:
    """The keyword options are QuantConfig's (CONFIG_KEYWORDS) and config is a QuantConfig or None."""
    unknown = sorted(key for key in options if key not in CONFIG_KEYWORDS) if options else None
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {', '.join(unknown)}; accepted: config, backend, "
            + ", ".join(CONFIG_KEYWORDS)
        )
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a quantattn.QuantConfig, got {type(config).__name__}")


def resolve_config(device: torch.device, config: QuantConfig | None, options: dict) -> QuantConfig:
    check_choices(config, options)
    base = config if config is not None else default_config(device)
    if not options:
        return base
    changes = {CONFIG_KEYWORDS[key]: value for key, value in options.items() if value is not None}
    if "pv_accum" in changes and "pv_dtype" not in changes and changes["pv_accum"] not in PV_ACCUMS[base.pv_dtype]:
        # an accumulator that only one PV precision has names that precision
        owners = [pv for pv, accums in PV_ACCUMS.items() if changes["pv_accum"] in accums]
        if len(owners) == 1:
            changes["pv_dtype"] = owners[0]
    pv_dtype = changes.get("pv_dtype", base.pv_dtype)
    if pv_dtype != base.pv_dtype and "pv_accum" not in changes and pv_dtype in PV_ACCUMS:  # else QuantConfig says why
        changes["pv_accum"] = PV_ACCUMS[changes["pv_dtype"]][0]
    return base.replace(**changes) if changes else base


def _check_flags_and_scale(is_causal, return_lse, sm_scale) -> None:
    V.check_flag("is_causal", is_causal)
    V.check_flag("return_lse", return_lse)
    V.check_sm_scale(sm_scale)


def nhd_to_hnd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def dense_to_hnd(tensor_layout: str):
    return _same if tensor_layout == "HND" else nhd_to_hnd


def varlen_to_hnd(t: torch.Tensor) -> torch.Tensor:
    """[total, H, d] -> [1, H, total, d]"""
    return t.transpose(0, 1).unsqueeze(0)


def dense_hnd_shape(shape, tensor_layout: str) -> tuple:
    """(B, H, N, d) of a dense tensor's shape in `tensor_layout` (no view made: shapes only)."""
    return shape if tensor_layout == "HND" else (shape[0], shape[2], shape[1], shape[3])


def varlen_hnd_shape(shape) -> tuple:
    """(H, total, d) of a packed [total, H, d] shape."""
    return (shape[1], shape[0], shape[2])


def default_scale(sm_scale, d: int) -> float:
    return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)


# ---- dense calls (sageattn) -------------------------------------------------------------------------


def check_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, options) -> QuantConfig:
    """Everything of a dense call but its mask and key lengths (which check_dense_call takes); returns the
    resolved configuration."""
    V.check_layout(tensor_layout)
    V.check_qkv(q, k, v, 4, DENSE_SHAPES)
    _check_flags_and_scale(is_causal, return_lse, sm_scale)
    if tensor_layout == "HND":
        V.check_heads_and_dims(q.shape, k.shape, v.shape)
    else:
        V.check_heads_and_dims(dense_hnd_shape(q.shape, "NHD"), dense_hnd_shape(k.shape, "NHD"),
                               dense_hnd_shape(v.shape, "NHD"))  # fmt: skip
    return resolve_config(q.device, config, options)


def run_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, cfg, backend, attn_mask=None,
              key_lengths=None):  # fmt: skip
    """A dense call that check_dense passed: its mask and key lengths checked, its output allocated, the
    backend run. Returns the output in q's layout (and the lse with return_lse)."""
    to_hnd = dense_to_hnd(tensor_layout)
    qh, kh, vh = to_hnd(q), to_hnd(k), to_hnd(v)
    b, hq, nq, d = qh.shape
    if attn_mask is not None:
        attn_mask = V.check_attn_mask(attn_mask, q, (b, hq, nq, kh.shape[2]))
    if key_lengths is not None:
        key_lengths = V.check_key_lengths(key_lengths, q, b, kh.shape[2])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device) if return_lse else None
    call = AttentionCall(
        qh, kh, vh, cfg, is_causal, default_scale(sm_scale, d), to_hnd(out), lse, attn_mask=attn_mask,
        key_lengths=key_lengths,
    )  # fmt: skip
    sdpa_out = backends.forward(call, backend)
    if sdpa_out is not None:  # torch's SDPA took it (backend="auto"; never with return_lse): q's layout, contiguous
        return to_hnd(sdpa_out).contiguous()
    return (out, lse) if return_lse else out


# ---- varlen calls (sageattn_varlen) -------------------------------------------------------------------


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse,
                 config, options) -> QuantConfig:  # fmt: skip
    """Every argument of a varlen call (the offsets are read: one host sync); returns the resolved
    configuration."""
    V.check_qkv(q, k, v, 3, VARLEN_SHAPES)
    _check_flags_and_scale(is_causal, return_lse, sm_scale)
    V.check_heads_and_dims(varlen_hnd_shape(q.shape), varlen_hnd_shape(k.shape), varlen_hnd_shape(v.shape))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        # before check_cu_seqlens reads the offsets: a device that cannot be read (meta) must not hide this
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {cu.device}")
    V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, max_seqlen_q, "max_seqlen_q")
    V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel() - 1, max_seqlen_k, "max_seqlen_k")
    return resolve_config(q.device, config, options)


def run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse,
               cfg, backend):  # fmt: skip
    """A varlen call that check_varlen passed: output allocated, the backend run (never torch's SDPA)."""
    qh, kh, vh = varlen_to_hnd(q), varlen_to_hnd(k), varlen_to_hnd(v)
    hq, total_q, d = qh.shape[1:]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(1, hq, total_q, dtype=torch.float32, device=q.device) if return_lse else None
    call = AttentionCall(
        qh, kh, vh, cfg, is_causal, default_scale(sm_scale, d), varlen_to_hnd(out), lse,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
    )  # fmt: skip
    backends.forward(call, backend)  # varlen calls never go to torch's SDPA: the backend wrote out
    return (out, lse[0]) if return_lse else out
