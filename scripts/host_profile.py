"""Where the host time of one whole call goes (tiny problem, so the GPU waits on the host): microseconds
per call, then cProfile's top functions.

Run on the GPU machine: [BACKEND=hopper] python3 scripts/host_profile.py
(the Hopper backend takes the call at any length when asked for by name)
"""

import cProfile
import os
import pstats
import time

import torch

from quantattn import sageattn

backend = os.environ.get("BACKEND", "auto")
q, k, v = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
call = lambda: sageattn(q, k, v, backend=backend)  # noqa: E731
for _ in range(20):
    call()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(500):
    call()
torch.cuda.synchronize()
print(f"backend={backend}: {(time.perf_counter() - t0) / 500 * 1e6:.1f} us per whole call on [1, 1, 64, 128]")
prof = cProfile.Profile()
prof.enable()
for _ in range(300):
    call()
torch.cuda.synchronize()
prof.disable()
stats = pstats.Stats(prof)
stats.sort_stats("tottime").print_stats(25)
