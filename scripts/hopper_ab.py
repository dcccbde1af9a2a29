"""Kernel-only TOPS and accuracy of the Hopper library that QUANTATTN_HOPPER_LIB names, for A/B runs of
kernel variants built with different -D flags (one process per library).
Usage: [AB_HEAD_DIM=64] QUANTATTN_HOPPER_LIB=lib.so python scripts/hopper_ab.py LABEL [N ...]"""

from __future__ import annotations

import math
import os
import sys

import torch

import quantattn as qa
from quantattn.bench.timing import median_seconds
from quantattn.config import QuantConfig
from quantattn.hopper import launch as HL
from quantattn.metrics import relative_l1
from quantattn.reference import attention_fp64


def accuracy():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 128, generator=g, device="cuda").bfloat16() for _ in range(3))
    k_out = k + 10 * torch.randn(1, 1, 1, 128, generator=g, device="cuda").bfloat16()
    res = []
    for kk in (k, k_out):
        o = qa.sageattn(q, kk, v, "HND", False, backend="hopper")
        ref = qa.sageattn(q, kk, v, "HND", False, backend="reference")
        res += [relative_l1(o, attention_fp64(q, kk, v, False)), relative_l1(o, ref), bool(torch.isnan(o).any())]
    return res


def kernel_tops(n, causal, cfg, b=4, h=32, d=128):
    q, k, v = (torch.randn(b, h, n, d, device="cuda").bfloat16() for _ in range(3))
    out = torch.empty_like(q)
    kvh = HL.preprocess(k, v, cfg)
    t = median_seconds(lambda: HL.attention(q, kvh, causal, 1 / math.sqrt(d), out))
    return 4 * b * h * n * n * d / (2 if causal else 1) / t / 1e12


def main():
    label = sys.argv[1]
    ns = [int(x) for x in sys.argv[2:]] or [1024, 4096, 8192, 16384]
    d = int(os.environ.get("AB_HEAD_DIM", "128"))
    acc = accuracy()
    cfg = QuantConfig()
    cells = []
    for n, causal in [(n, False) for n in ns] + [(16384, True)]:
        cells.append(f"{n // 1024}K{'c' if causal else ''} {kernel_tops(n, causal, cfg, d=d):.0f}")
        torch.cuda.empty_cache()
    print(
        f"{label:>10}: d{d} kernel TOPS " + " ".join(cells) + f" | rel L1 vs fp64 {acc[0]:.4f}/{acc[3]:.4f}"
        f" vs ref {acc[1]:.4f}/{acc[4]:.4f} nan {acc[2] or acc[5]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
