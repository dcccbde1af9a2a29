"""One object that names every numerical choice of a SageAttention variant.

The group sizes below define the numerics: the reference and the kernels read them from here, so a
kernel's tile shape can change without changing what it computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

QK_DTYPES = ("int8", "int4")
QK_GRANULARITIES = ("per_tensor", "per_block", "per_warp", "per_thread", "per_token")
PV_DTYPES = ("fp8", "fp16", "bf16")
# Accumulators per PV precision. "a+b": the matrix product accumulates in `b` over one key block
# (or one 64-key chunk for the FP16 accumulator), and the partials are added into an `a` buffer.
PV_ACCUMS = {
    "fp8": ("fp32+fp32", "fp32", "fp32+fp16"),
    "fp16": ("fp32", "fp16+fp32"),
    "bf16": ("fp32",),
}

QMAX = {"int8": 127.0, "int4": 7.0}

# exp(x) = exp2(x * LOG2E): the kernels and the reference fold LOG2E into the score scale and use exp2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Group sizes (rows of Q, keys of K) that share one scale.
Q_BLOCK_ROWS = 64  # per_block Q groups, and the blocks smooth-Q averages over
Q_WARP_ROWS = 16  # per_warp Q groups
Q_THREAD_TILE = 16  # per_thread: a thread holds rows r and r+8 of each 16-row MMA tile
K_BLOCK_KEYS = 64  # per_block (and per_warp) K groups; per_thread splits each into 4 groups

# FP8 E4M3 ranges. SageAttention2 scales P (in [0, 1]) by 448 and V per channel to 448.
# SageAttention2++ accumulates 64 products in FP16 (two m16n8k32 MMAs), so it narrows the ranges
# to P <= 224 and |V| <= 4.5: 64 * 224 * 4.5 = 64512 < 65504, the largest FP16 value.
FP8_MAX = 448.0
P_SCALE = {"fp32+fp32": 448.0, "fp32": 448.0, "fp32+fp16": 224.0}
V_RANGE = {"fp32+fp32": 448.0, "fp32": 448.0, "fp32+fp16": 4.5}
FP16_ACCUM_KEYS = 64  # keys summed in one FP16 partial (2++), before it joins the FP32 buffer
# Keys per online-softmax step. Part of the numerics: P is quantized against the running maximum of
# its step, and a fresh (second-level) PV accumulator spans one step. FP8 PV with FP32 accumulators
# takes 128 keys a step (fastest on the H100, docs/perf-notes.md); FP16 accumulators keep 64, so that one
# partial never sums more than FP16_ACCUM_KEYS products, and FP16/BF16 PV keeps 64 (at 128 its P and V
# tiles spill registers).
KV_BLOCK = 128
KV_BLOCK_16BIT_PV = 64
FP8_MMA_KEYS = 32  # keys one FP8 MMA (m16n8k32) reduces: the FP22 accumulator rounds after each
FP16_MMA_KEYS = 16  # keys one FP16 MMA (m16n8k16) reduces


@dataclass(frozen=True)
class QuantConfig:
    """What a SageAttention variant computes.

    qk_dtype: "int8" or "int4" quantization of Q and K.
    qk_granularity: which elements share one scale ("per_tensor", "per_block", "per_warp",
        "per_thread", "per_token"; see docs/numerics.md).
    pv_dtype: "fp8" (SageAttention2), "fp16" or "bf16" (SageAttention).
    pv_accum: accumulator of the PV product (see PV_ACCUMS).
    smooth_k / smooth_q / smooth_v: subtract the trimmed token mean of K (docs/numerics.md), the block mean
    of Q, the token mean of V.
    """

    qk_dtype: str = "int8"
    # per_token: one scale per query row and per key, the finest group; Triton picks the kernel's
    # thread layout itself, so per-thread groups cost the same and are less accurate (see docs)
    qk_granularity: str = "per_token"
    pv_dtype: str = "fp8"
    pv_accum: str = "fp32+fp32"
    smooth_k: bool = True
    smooth_q: bool = False
    smooth_v: bool = False

    def __post_init__(self):
        _check_choice("qk_quant_dtype", self.qk_dtype, QK_DTYPES)
        _check_choice("qk_quant_gran", self.qk_granularity, QK_GRANULARITIES)
        _check_choice("pv_dtype", self.pv_dtype, PV_DTYPES)
        _check_choice(f"pv_accum_dtype (with pv_dtype={self.pv_dtype!r})", self.pv_accum, PV_ACCUMS[self.pv_dtype])
        for name in ("smooth_k", "smooth_q", "smooth_v"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def qmax(self) -> float:
        return QMAX[self.qk_dtype]

    @property
    def is_fp8_pv(self) -> bool:
        return self.pv_dtype == "fp8"

    @property
    def p_scale(self) -> float:
        return P_SCALE[self.pv_accum] if self.is_fp8_pv else 1.0

    @property
    def v_range(self) -> float:
        return V_RANGE[self.pv_accum]

    @property
    def kv_block(self) -> int:
        if self.pv_accum in ("fp32+fp16", "fp16+fp32"):
            return FP16_ACCUM_KEYS
        return KV_BLOCK if self.is_fp8_pv else KV_BLOCK_16BIT_PV

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        smooth = "".join(s for s, on in (("k", self.smooth_k), ("q", self.smooth_q), ("v", self.smooth_v)) if on)
        return f"qk_{self.qk_dtype}_{self.qk_granularity}_pv_{self.pv_dtype}_{self.pv_accum}" + (
            f"_smooth_{smooth}" if smooth else ""
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


# The variants of the papers, by the names the docs and the benchmark use.
SAGE1 = QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32")
SAGE1_FP16ACC = QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp16+fp32")
SAGE2_8B = QuantConfig()
SAGE2_4B = QuantConfig(qk_dtype="int4", smooth_q=True)
SAGE2PP = QuantConfig(pv_accum="fp32+fp16")
VARIANTS = {
    "sage1": SAGE1,
    "sage1-fp16acc": SAGE1_FP16ACC,
    "sage2-8b": SAGE2_8B,
    "sage2-4b": SAGE2_4B,
    "sage2++": SAGE2PP,
}
