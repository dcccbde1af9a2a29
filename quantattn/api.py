"""Public API, name-compatible with the official `sageattention` package.

Every public function builds one QuantConfig and one AttentionCall and hands them to a backend.
"""

from __future__ import annotations

import math
import warnings

import torch

from quantattn import guards, ops
from quantattn import validation as V
from quantattn.backends import AttentionCall, SdpaBackend, device_capability, select_backend
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

_warned_cpu = False


_SAGE2 = QuantConfig()
_SAGE1_FP32_ACC = QuantConfig(pv_dtype="fp16", pv_accum="fp32")


def default_config(device: torch.device) -> QuantConfig:
    """SageAttention2 (INT8 QK per token, FP8 PV, two-level accumulation) where FP8 runs, else SageAttention."""
    if device.type == "cuda" and device_capability(device) < (8, 9):
        return _SAGE1_FP32_ACC
    return _SAGE2


def resolve_config(device: torch.device, config: QuantConfig | None, options: dict) -> QuantConfig:
    unknown = sorted(set(options) - set(CONFIG_KEYWORDS))
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {', '.join(unknown)}; accepted: config, backend, "
            + ", ".join(CONFIG_KEYWORDS)
        )
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a quantattn.QuantConfig, got {type(config).__name__}")
    base = config if config is not None else default_config(device)
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


def _run(call: AttentionCall, backend: str) -> torch.Tensor | None:
    """Route the call past numerics that cannot represent it (quantattn.guards: shapes and dtypes only, no
    GPU sync), choose the backend (so that a refused choice is refused even for empty inputs), run it.

    Returns None when the backend wrote call.out, or torch SDPA's HND output where backend="auto" gave the
    call to torch's SDPA (returned as it is rather than copied into call.out)."""
    global _warned_cpu
    call = guards.route(call)
    chosen = select_backend(call, backend)
    if not call.out.numel():
        return None
    if isinstance(chosen, SdpaBackend):
        return chosen.run(call)
    if chosen.name == "reference" and call.q.device.type == "cpu" and not _warned_cpu:
        _warned_cpu = True
        warnings.warn(
            "quantattn: CPU tensors run the pure-PyTorch reference of the quantized kernels: correct, slow; "
            "speed needs an NVIDIA GPU",
            stacklevel=3,
        )
    for part in guards.split(call):
        chosen.forward(part)
    return None


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    attn_mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    config: QuantConfig | None = None,
    backend: str = "auto",
    **options,
):
    """Quantized attention softmax(sm_scale * q k^T + mask) v, a drop-in for the official `sageattn`.

    q: [B, Hq, Nq, d] ("HND") or [B, Nq, Hq, d] ("NHD"); k, v: [B, Hkv, Nk, d] likewise, with Hq a
    multiple of Hkv (grouped-query attention). float16 or bfloat16; head_dim 1..256. Causal masking is
    bottom-right aligned when Nq != Nk (query i sees keys j <= i + Nk - Nq; rows that see no key give 0).
    Options: qk_quant_dtype ("int8", "int4"), qk_quant_gran, pv_dtype ("fp8", "fp16", "bf16"),
    pv_accum_dtype, smooth_k, smooth_q, smooth_v, or a whole `config`. backend: "auto" (the fastest quantized
    kernel for the device, or torch's SDPA where this GPU's speed table measured it faster for the shape: dense,
    no mask or lse, Nq == Nk; README "Backends"), "quantized" (auto's kernel, never torch's SDPA), or "hopper",
    "triton", "reference" (forced).
    attn_mask: SDPA's forms, always [B, Hq, Nq, Nk] order (whatever the layout) or broadcastable to it:
    bool (True attends) or float16/bfloat16/float32 added to the scores; combined with is_causal when both
    are given. key_lengths: int tensor [B], batch entry b attends to its first key_lengths[b] keys only
    (values clamped to [0, Nk]); the padding keys are skipped block by block and left out of the smoothing
    and the scales, as if absent. Query rows that see no key output zeros (SDPA gives NaN or zeros).
    Returns the output in q's layout and dtype, and with return_lse the float32 natural-log logsumexp
    [B, Hq, Nq] of the full-precision-equivalent scores.
    """
    if torch.compiler.is_compiling():  # one opaque custom op for Dynamo; eager calls skip the dispatcher
        return ops.sageattn(
            q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend, options, attn_mask, key_lengths
        )
    V.check_layout(tensor_layout)
    V.check_qkv(q, k, v, 4, "[B, H, N, d] for 'HND', [B, N, H, d] for 'NHD'")
    for name, value in (("is_causal", is_causal), ("return_lse", return_lse)):
        V.check_flag(name, value)
    V.check_sm_scale(sm_scale)
    to_hnd = (lambda t: t) if tensor_layout == "HND" else (lambda t: t.transpose(1, 2))
    qh, kh, vh = to_hnd(q), to_hnd(k), to_hnd(v)
    V.check_heads_and_dims(qh.shape, kh.shape, vh.shape)
    cfg = resolve_config(q.device, config, options)
    b, hq, nq, d = qh.shape
    mask_needs_grad = isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or mask_needs_grad):
        # a float mask that requires grad takes the same road: there is no mask gradient to give (yet)
        from quantattn.autograd import sageattn_with_grad  # quantized forward, exact-attention gradient

        return sageattn_with_grad(
            q, k, v, tensor_layout, is_causal, sm_scale, return_lse, cfg, backend, attn_mask, key_lengths
        )
    if attn_mask is not None:
        attn_mask = V.check_attn_mask(attn_mask, q, (b, hq, nq, kh.shape[2]))
    if key_lengths is not None:
        key_lengths = V.check_key_lengths(key_lengths, q, b, kh.shape[2])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device) if return_lse else None
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    call = AttentionCall(
        qh, kh, vh, cfg, is_causal, scale, to_hnd(out), lse, attn_mask=attn_mask, key_lengths=key_lengths
    )
    sdpa_out = _run(call, backend)
    if sdpa_out is not None:  # torch's SDPA took it (backend="auto"; never with return_lse): q's layout, contiguous
        return (sdpa_out if tensor_layout == "HND" else sdpa_out.transpose(1, 2)).contiguous()
    return (out, lse) if return_lse else out


def sageattn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    config: QuantConfig | None = None,
    backend: str = "auto",
    **options,
):
    """Quantized attention over packed sequences, like flash-attn's varlen API.

    q: [total_q, Hq, d], k, v: [total_k, Hkv, d]; sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1]
    of q attending rows cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v. Each sequence is smoothed and
    quantized on its own, exactly as if it were called alone. Returns [total_q, Hq, d] and, with
    return_lse, the float32 logsumexp [Hq, total_q].
    """
    if torch.compiler.is_compiling():  # one opaque custom op for Dynamo; eager calls skip the dispatcher
        return ops.sageattn_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse, config,
            backend, options,
        )  # fmt: skip
    V.check_qkv(q, k, v, 3, "[total_tokens, H, d]")
    for name, value in (("is_causal", is_causal), ("return_lse", return_lse)):
        V.check_flag(name, value)
    V.check_sm_scale(sm_scale)
    to_hnd = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  [total, H, d] -> [1, H, total, d]
    qh, kh, vh = to_hnd(q), to_hnd(k), to_hnd(v)
    V.check_heads_and_dims(qh.shape[1:], kh.shape[1:], vh.shape[1:])
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        # before check_cu_seqlens reads the offsets: a device that cannot be read (meta) must not hide this
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {cu.device}")
    V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, max_seqlen_q, "max_seqlen_q")
    V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel() - 1, max_seqlen_k, "max_seqlen_k")
    cfg = resolve_config(q.device, config, options)
    hq, total_q, d = qh.shape[1:]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        from quantattn.autograd import VARLEN_ERROR

        raise NotImplementedError(VARLEN_ERROR)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(1, hq, total_q, dtype=torch.float32, device=q.device) if return_lse else None
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    call = AttentionCall(
        qh, kh, vh, cfg, is_causal, scale, to_hnd(out), lse,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
    )  # fmt: skip
    _run(call, backend)  # varlen calls never go to torch's SDPA: the backend wrote out
    return (out, lse[0]) if return_lse else out


# The official package's explicit entry points, with its positional order, so that calls written for it
# (positional or keyword) mean the same here. The `_cuda` names run quantattn's Triton kernels.


def sageattn_qk_int8_pv_fp16_triton(
    q, k, v, tensor_layout="HND", quantization_backend="triton", is_causal=False, sm_scale=None,
    smooth_k=True, return_lse=False, **options,
):  # fmt: skip
    """SageAttention: INT8 QK per block, FP16 PV with an FP32 accumulator, smooth K.

    quantization_backend ("triton" or "cuda" in the official package) is accepted and has no effect:
    quantattn has one quantization path."""
    if quantization_backend not in ("triton", "cuda"):
        raise ValueError(f"quantization_backend must be 'triton' or 'cuda', got {quantization_backend!r}")
    options = {"qk_quant_gran": "per_block", "pv_dtype": "fp16", "pv_accum_dtype": "fp32", **options}
    return sageattn(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, smooth_k=smooth_k, **options)


def _official_cuda_entry(
    pv_dtype, q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, pv_accum_dtype, smooth_k, smooth_v,
    return_lse, options,
):  # fmt: skip
    """The official `_cuda` entry points differ only in their PV precision and defaults."""
    options = {"pv_dtype": pv_dtype, **options}  # an explicit pv_dtype keyword still wins
    return sageattn(
        q, k, v, tensor_layout, is_causal, sm_scale, return_lse, qk_quant_gran=qk_quant_gran,
        pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k, smooth_v=smooth_v, **options,
    )  # fmt: skip


def sageattn_qk_int8_pv_fp16_cuda(
    q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
    pv_accum_dtype="fp32", smooth_k=True, smooth_v=False, return_lse=False, **options,
):  # fmt: skip
    """SageAttention with the official CUDA entry's defaults: per-thread INT8 QK, FP16 PV, FP32 accumulator."""
    return _official_cuda_entry(
        "fp16", q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, pv_accum_dtype, smooth_k, smooth_v,
        return_lse, options,
    )  # fmt: skip


def sageattn_qk_int8_pv_fp8_cuda(
    q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
    pv_accum_dtype="fp32+fp32", smooth_k=True, smooth_v=False, return_lse=False, **options,
):  # fmt: skip
    """SageAttention2: per-thread INT8 QK, FP8 PV with two-level FP32 accumulation."""
    return _official_cuda_entry(
        "fp8", q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, pv_accum_dtype, smooth_k, smooth_v,
        return_lse, options,
    )  # fmt: skip


def sageattn_qk_int8_pv_fp8_cuda_sm90(
    q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
    pv_accum_dtype="fp32+fp32", smooth_k=True, return_lse=False, **options,
):  # fmt: skip
    """SageAttention2 as the official Hopper entry point takes it (no smooth_v argument)."""
    return sageattn_qk_int8_pv_fp8_cuda(
        q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, pv_accum_dtype, smooth_k,
        return_lse=return_lse, **options,
    )  # fmt: skip


sageattn_qk_int8_pv_fp8_triton = sageattn_qk_int8_pv_fp8_cuda
