"""GPU time of the K/V preprocessing alone (one launch), against a copy of K and V as the bandwidth
yardstick, for a few tunings of the chunking: python3 scripts/preprocess_sweep.py"""

import torch

from quantattn.config import QuantConfig
from quantattn.kernels import launch


def gpu_ms(fn, reps=50):
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


cfg = QuantConfig()
print(
    f"{'N':>6} {'copy K,V ms':>12} {'max_chunks':>10} {'lag_chunks':>10} {'warps':>5} {'preprocess ms':>14} {'GB/s (r+w)':>11}"
)
for n in (1024, 4096, 16384):
    k, v = (torch.randn(4, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = torch.empty_like(k), torch.empty_like(v)
    copy = gpu_ms(lambda: (kc.copy_(k), vc.copy_(v)))
    seqs = launch.sequences(k, None, 0)
    for max_chunks, lag, warps in ((64, 512, 4), (64, 64, 4), (64, 4096, 4), (16, 512, 4), (64, 512, 8), (64, 512, 2)):
        if True:
            launch.MAX_CHUNKS, launch.LAG_CHUNKS, launch.PREPROCESS_WARPS = max_chunks, lag, warps
            ms = gpu_ms(lambda: launch.preprocess_kv(k, v, cfg, seqs))
            gbs = (k.numel() * 2 * 2 + k.numel() * 2 + k.numel() // 32 * 4) / ms / 1e6
            print(f"{n:>6} {copy:>12.3f} {max_chunks:>10} {lag:>10} {warps:>5} {ms:>14.3f} {gbs:>11.0f}")
