"""GPU time of the K/V preprocessing alone (one launch) for the Hopper layout: the Triton kernel and the
CUDA ones (quantattn/hopper/preprocess.cu: ticketed, and resident where it takes the length), against a
copy of K and V as the bandwidth yardstick.
Usage (GPU): [CONFIGS="64:512 16:512"] [SEQ_LENS="1024 2048"] python3 scripts/preprocess_sweep.py [head_dim ...]
(CONFIGS: the ticketed preprocessing's MAX_CHUNKS:LAG_CHUNKS settings to time, one column each)"""

import math
import os
import sys

import torch

from quantattn import hopper, settings
from quantattn.bench.timing import median_seconds
from quantattn.config import QuantConfig
from quantattn.hopper import launch as hopper_launch
from quantattn.kernels import launch


def main(head_dims):
    cfg = QuantConfig()
    default = f"{hopper_launch.MAX_CHUNKS}:{hopper_launch.LAG_CHUNKS}"
    configs = [tuple(int(v) for v in x.split(":")) for x in os.environ.get("CONFIGS", default).split()]
    head = f"{'d':>4} {'N':>6} {'copy K,V us':>12} {'Triton us':>10}"
    head += "".join(f" {'CUDA ' + str(c) + ':' + str(lag):>13}" for c, lag in configs)
    print(head + f" {'resident':>9} {'best GB/s':>10} {'speed-up':>9}")
    seq_lens = [int(x) for x in os.environ.get("SEQ_LENS", "1024 2048 4096 8192 16384 32768").split()]
    for d in head_dims:
        for n in seq_lens:
            k, v = (torch.randn(4, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            kc, vc = torch.empty_like(k), torch.empty_like(v)
            copy = median_seconds(lambda: (kc.copy_(k), vc.copy_(v)))
            seqs = launch.sequences(k, None, 0)
            tri = median_seconds(lambda: launch.preprocess_kv(k, v, cfg, seqs, wgmma_order=True))
            times = []
            os.environ["QUANTATTN_HOPPER_RESIDENT"] = "0"
            settings.reload()  # quantattn reads the environment once
            for hopper_launch.MAX_CHUNKS, hopper_launch.LAG_CHUNKS in configs:
                times.append(median_seconds(lambda: hopper_launch.preprocess(k, v, cfg, seqs)))
            os.environ["QUANTATTN_HOPPER_RESIDENT"] = "1"
            settings.reload()  # quantattn reads the environment once
            resident = math.nan
            if n <= hopper.resident_max_keys():
                resident = median_seconds(lambda: hopper_launch.preprocess(k, v, cfg, seqs))
            cuda = min(times + ([resident] if resident == resident else []))
            moved = k.numel() * (2 + 2 + 1 + 1) + k.numel() // d * 4  # read K, V; write INT8 K, FP8 V, scales
            cols = "".join(f" {t * 1e6:>13.1f}" for t in times)
            print(
                f"{d:>4} {n:>6} {copy * 1e6:>12.1f} {tri * 1e6:>10.1f}{cols} {resident * 1e6:>9.1f}"
                f" {moved / cuda / 1e9:>10.0f} {tri / cuda:>8.2f}x"
            )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [128, 64])
