"""The numerical specification: pure-PyTorch SageAttention that reproduces the kernels' quantization."""

from quantattn.reference.attention import (
    attention_fp64,
    attention_quantized,
    quantize_kv,
    quantize_q,
    sage_attention_reference,
    smooth_k,
    smooth_v,
)
from quantattn.reference.quant import (
    finite_trimmed_mean,
    quantize_int,
    quantize_v_fp8,
    round_to_fp8_e4m3,
    round_to_fp16,
    round_to_fp22,
    row_group_amax,
    smoothing_vector_k,
)

__all__ = [
    "attention_fp64",
    "attention_quantized",
    "finite_trimmed_mean",
    "quantize_kv",
    "quantize_int",
    "quantize_q",
    "quantize_v_fp8",
    "round_to_fp16",
    "round_to_fp22",
    "round_to_fp8_e4m3",
    "row_group_amax",
    "sage_attention_reference",
    "smooth_k",
    "smooth_v",
    "smoothing_vector_k",
]
