"""quantattn: quantized attention (SageAttention 1, 2 and 2++) for PyTorch."""

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

# The accuracy tools load on first use (quantattn.calibrate, from quantattn import load_plan, ...), so that
# `import quantattn` does not import the tools layer's accuracy package.
_LAZY = {
    "calibrate": "quantattn.accuracy.calibration",
    "load_plan": "quantattn.accuracy.calibration",
    "inspect_attention": "quantattn.accuracy.inspector",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'quantattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
