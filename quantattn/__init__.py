"""quantattn: quantized attention (SageAttention 1, 2 and 2++) for PyTorch."""

from quantattn.accuracy.calibration import calibrate, load_plan
from quantattn.accuracy.inspector import inspect_attention
from quantattn.api import (
    default_config,
    sageattn,
    sageattn_qk_int8_pv_fp8_cuda,
    sageattn_qk_int8_pv_fp8_cuda_sm90,
    sageattn_qk_int8_pv_fp8_triton,
    sageattn_qk_int8_pv_fp16_cuda,
    sageattn_qk_int8_pv_fp16_triton,
    sageattn_varlen,
)
from quantattn.config import VARIANTS, QuantConfig
from quantattn.integrations.torch_sdpa import attach, patch, patched, sdpa, unpatch
from quantattn.kvcache import QuantizedKVCache, sageattn_decode

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "QuantizedKVCache",
    "VARIANTS",
    "attach",
    "calibrate",
    "default_config",
    "inspect_attention",
    "load_plan",
    "patch",
    "patched",
    "sageattn",
    "sageattn_decode",
    "sageattn_qk_int8_pv_fp16_cuda",
    "sageattn_qk_int8_pv_fp16_triton",
    "sageattn_qk_int8_pv_fp8_cuda",
    "sageattn_qk_int8_pv_fp8_cuda_sm90",
    "sageattn_qk_int8_pv_fp8_triton",
    "sageattn_varlen",
    "sdpa",
    "unpatch",
]
