"""Kernel-only TOPS of the default variant over tile shapes (a tuning sweep for docs/perf-notes.md).

Run on the GPU machine: python3 scripts/gpu_tune.py
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_inspect import median_ms  # noqa: E402

from quantattn import settings  # noqa: E402
from quantattn.config import QuantConfig  # noqa: E402
from quantattn.kernels import launch  # noqa: E402


def main():
    cfg = QuantConfig()
    tiles = [(128, 8, 3), (128, 8, 2), (128, 8, 4), (128, 4, 3), (64, 4, 3)]
    print(f"{'d':>4} {'N':>6} {'BN':>4} {'BM,warps,stages':>16} {'kernel TOPS':>11}")
    for d, n in ((128, 1024), (128, 8192), (64, 8192)):
        b, h = 4, 32
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
        out = torch.empty_like(q)
        seqs = launch.sequences(q, None, 0)
        for bn, tile in itertools.product((64, 128), tiles):
            os.environ["QUANTATTN_EXPERIMENT_KV_BLOCK"] = str(bn)
            os.environ["QUANTATTN_TILE"] = ",".join(map(str, tile))
            settings.reload()  # quantattn reads the environment once
            try:
                ms = median_ms(lambda: launch.attention(q, kv, False, d**-0.5, out, None, seqs), reps=20)
                tops = f"{4 * b * h * n * n * d / ms / 1e9:.0f}"
            except Exception as e:  # out of shared memory or registers for this tile
                tops = f"fails: {type(e).__name__}"
            print(f"{d:>4} {n:>6} {bn:>4} {str(tile):>16} {tops:>11}", flush=True)


if __name__ == "__main__":
    main()
