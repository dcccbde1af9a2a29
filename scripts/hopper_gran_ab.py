"""A/B of the Hopper kernel's QK scale granularity, per token (default) against per thread (the scales
fold into the exponent's FFMA), in one process: kernel-only TOPS at B=4 H=32 (not causal), and relative
L1 / cosine against FP64 on [1, 8, 4096, d], normal inputs and channel outliers, causal off and on. With BASELINE=path/to/attention.cu (an older
source of the same kernel signature <D, CAUSAL, T, PER_THREAD>), its per-token kernel is timed in the
same run too.

Usage (GPU machine): python3 scripts/hopper_gran_ab.py [N ...]   (default 1K 4K 16K; head_dim 128 and 64)
"""

from __future__ import annotations

import os
import sys

import torch
import triton

import quantattn as qa
from quantattn.config import QuantConfig
from quantattn.hopper import compiler, driver, kernels, launch
from quantattn.metrics import cosine_similarity, make_qkv, relative_l1
from quantattn.reference import attention_fp64

CONFIGS = {"per_token": QuantConfig(), "per_thread": QuantConfig(qk_granularity="per_thread")}


def kernel_tops(n: int, d: int, cfg: QuantConfig) -> float:
    q, k, v = (torch.randn(4, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv = launch.preprocess(k, v, cfg)
    out = torch.empty_like(q)
    ms = triton.testing.do_bench(lambda: launch.attention(q, kv, False, d**-0.5, out), warmup=50, rep=400,
                                 return_mode="median")  # fmt: skip
    return 4 * 4 * 32 * n * n * d / (ms * 1e-3) / 1e12


def baseline_tops(path: str, n: int, d: int) -> float:
    """Kernel-only TOPS of the per-token kernel compiled from an older source."""
    name = f"quantattn_hopper::sage_attention_hopper<{d}, false, quantattn_hopper::bf16, false>"
    cubin, lowered = compiler.compile_cubin(open(path).read(), name, "attention.cu")
    kernel = driver.get_kernel(driver.load_library(cubin), lowered)
    smem = kernels.attention_smem_bytes(d)
    driver.set_attribute(kernel, driver.FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem, 0)
    real_load = kernels.load
    kernels.load = lambda spec, device: kernel if spec.source == "attention.cu" else real_load(spec, device)
    try:
        return kernel_tops(n, d, CONFIGS["per_token"])
    finally:
        kernels.load = real_load


def main() -> None:
    ns = [int(a.rstrip("K")) * (1024 if a.endswith("K") else 1) for a in sys.argv[1:]] or [1024, 4096, 16384]
    print("kernel only, TOPS (B4 H32 bf16, not causal); run twice, interleaved")
    for d in (128, 64):
        for n in ns:
            cells = []
            for _ in range(2):
                for name, cfg in CONFIGS.items():
                    cells.append(f"{name} {kernel_tops(n, d, cfg):6.1f}")
            if os.environ.get("BASELINE"):
                cells.append(f"baseline {baseline_tops(os.environ['BASELINE'], n, d):6.1f}")
            print(f"d{d} N{n:6d}: " + " | ".join(cells))
    print("accuracy against FP64 [1, 8, 4096, d]: relative L1 / cosine")
    for d in (128, 64):
        for outliers in (False, True):
            q, k, v = make_qkv(1, 8, 4096, d, device="cuda", outliers=outliers)
            for causal in (False, True):
                truth = attention_fp64(q, k, v, causal)
                cells = []
                for name, cfg in CONFIGS.items():
                    out = qa.sageattn(q, k, v, is_causal=causal, config=cfg, backend="hopper")
                    cells.append(f"{name} {relative_l1(out, truth):.5f} / {cosine_similarity(out, truth):.6f}")
                label = f"d{d} {'outliers' if outliers else 'normal  '} {'causal' if causal else 'full  '}"
                print(f"{label}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
