"""Measured speed of each candidate, the order calibration prefers them in.

SPEEDS holds whole-call TOPS (bf16 in, bf16 out) measured on an NVIDIA H100 80GB HBM3 at
B=4, H=32, N=8K, head_dim 128, not causal (bench/results/2026-11-23_H100_variants_8k.json, written by
scripts/gpu_inspect.py at commit 634790c; torch 2.11, triton 3.6, CUDA 13.0). "sdpa" is torch's SDPA
in bf16 (the cuDNN backend): full precision, and on this GPU faster than every quantized variant.

Other GPUs order them differently (on RTX 40-class GPUs the FP8 and FP16-accumulator variants are several
times faster than bf16 attention): pass `speeds=` to calibration, or measure with `python -m
quantattn.bench` and read the result with `speeds_from_bench`.
"""

from __future__ import annotations

import json
from pathlib import Path

FULL_PRECISION = "sdpa"

SPEEDS: dict[str, float] = {
    "sdpa": 612.0,
    "sage2-8b": 565.0,
    "sage2++": 443.0,
    "sage1-fp16acc": 386.0,
    "sage1": 365.0,
    "sage2-4b": 344.0,
}
SPEEDS_SOURCE = (
    "NVIDIA H100 80GB HBM3, whole call, bf16 4x32x8Kx128, not causal, TOPS "
    "(bench/results/2026-11-23_H100_variants_8k.json)"
)

# benchmark implementation names that are full precision
_SDPA_NAMES = ("sdpa-cudnn", "sdpa-flash")


def speeds_from_bench(path, head_dim: int, seq_len: int, causal: bool = False) -> dict[str, float]:
    """Whole-call TOPS per candidate from a `python -m quantattn.bench` result file, at one shape.

    "sdpa" takes the faster of the benchmark's SDPA backends (the one torch would be told to use)."""
    doc = json.loads(Path(path).read_text())
    speeds: dict[str, float] = {}
    for r in doc.get("speed", []):
        if (r.get("head_dim"), r.get("seq_len"), r.get("causal"), r.get("timing")) != (
            head_dim,
            seq_len,
            causal,
            "whole",
        ):
            continue
        if "tops" not in r:
            continue
        name = FULL_PRECISION if r["implementation"] in _SDPA_NAMES else r["implementation"]
        speeds[name] = max(speeds.get(name, 0.0), float(r["tops"]))
    if not speeds:
        raise ValueError(f"{path}: no whole-call speed at head_dim {head_dim}, N {seq_len}, causal {causal}")
    return speeds
