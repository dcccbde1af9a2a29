"""Where the host time of one whole call goes (tiny problem, so the GPU waits on the host).

Run on the GPU machine: python3 scripts/host_profile.py
"""

import cProfile
import pstats

import torch

from quantattn import sageattn

q, k, v = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(20):
    sageattn(q, k, v)
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(300):
    sageattn(q, k, v)
torch.cuda.synchronize()
prof.disable()
stats = pstats.Stats(prof)
stats.sort_stats("tottime").print_stats(25)
