"""Public API, name-compatible with the official `sageattention` package: the entry layer.

Each public function validates its arguments and resolves its QuantConfig once (quantattn/prepare.py),
then runs the call one of three ways, none of which comes back here:
- eager, no gradient to record: prepare.run_dense / run_varlen build one AttentionCall and hand it to the
  backend registry (quantattn/backends) directly, off the PyTorch dispatcher (it would add host time);
- eager, inputs that require grad: the autograd.Function of quantattn/autograd.py, whose forward is that
  same run_dense;
- under torch.compile: the custom operators of quantattn/ops.py, one per entry point.
"""

from __future__ import annotations

import torch

from quantattn import autograd, ops, prepare
from quantattn.config import QuantConfig
from quantattn.prepare import CONFIG_KEYWORDS, default_config, resolve_config  # noqa: F401  public here too


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
    cfg = prepare.check_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, options)
    if autograd.needs_grad(q, k, v, attn_mask):
        # a float mask that requires grad takes the same road: there is no mask gradient to give (yet)
        return autograd.sageattn_with_grad(
            q, k, v, tensor_layout, is_causal, sm_scale, return_lse, cfg, backend, attn_mask, key_lengths
        )
    return prepare.run_dense(
        q, k, v, tensor_layout, is_causal, sm_scale, return_lse, cfg, backend, attn_mask, key_lengths
    )


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
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, sm_scale, return_lse)
    cfg = prepare.check_varlen(*args, config, options)
    if autograd.needs_grad(q, k, v):
        raise NotImplementedError(autograd.VARLEN_ERROR)
    return prepare.run_varlen(*args, cfg, backend)


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
