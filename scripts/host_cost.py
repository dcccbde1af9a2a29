"""Host time of one whole call on a tiny problem (the GPU waits on the host), with Triton's own launch
path and with quantattn's direct launch; then where the direct path's time goes (cProfile).

Run on the GPU machine: python3 scripts/host_cost.py
"""

import cProfile
import os
import pstats
import time

import torch

from quantattn import sageattn, settings


def us_per_call(fn, calls=500):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


q, k, v = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
# "quantized": the kernels' host cost (backend="auto" hands a call this small to torch SDPA by the speed table)
call = lambda: sageattn(q, k, v, backend="quantized")  # noqa: E731
for flag in ("0", "1", "0", "1"):
    os.environ["QUANTATTN_DIRECT_LAUNCH"] = flag
    settings.reload()  # quantattn reads the environment once
    print(f"QUANTATTN_DIRECT_LAUNCH={flag}: {us_per_call(call):.1f} us per whole call on [1, 1, 64, 128]")
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(300):
    call()
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
