"""Triton kernels: `quant` (K/V statistics and quantization), `attention` (the one attention kernel
body), `common` (device helpers shared by both), `launch` (buffers, grids and flags; no numerics)."""
