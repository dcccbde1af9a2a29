"""GPU time of each kernel (and memset) of the Hopper backend's whole call, from the CUDA profiler's
activity records, so that host time cannot leak in; resident preprocessing on and off. Also the whole
call's event time with the launches queued behind a GPU sleep (pure GPU time) and without (as the
benchmark times it).

Run on the GPU machine: [SEQ_LENS="1024 2048"] python3 scripts/gpu_kernel_times.py [head_dim ...]
"""

import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from quantattn import sageattn, settings

CALLS = 20


def kernel_us(fn) -> dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name[:60]] += e.device_time / CALLS
    return dict(total)


def queued_us(fn) -> float:
    """Event time of CALLS calls queued behind a sleep: the GPU never waits on the host."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / CALLS


def main(head_dims):
    seq_lens = [int(x) for x in os.environ.get("SEQ_LENS", "1024 2048 4096").split()]
    for d in head_dims:
        for n in seq_lens:
            q, k, v = (torch.randn(4, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * 4 * 32 * n * n * d
            for resident in ("1", "0"):
                os.environ["QUANTATTN_HOPPER_RESIDENT"] = resident
                settings.reload()  # quantattn reads the environment once
                fn = lambda: sageattn(q, k, v, backend="hopper")  # noqa: E731
                times = kernel_us(fn)
                queued = queued_us(fn)
                parts = ", ".join(f"{name.split('<')[0].split('(')[0]} {us:.1f}" for name, us in sorted(times.items()))
                print(
                    f"d={d} N={n} resident={resident}: queued whole call {queued:.1f} us ({flops / queued / 1e6:.0f} TOPS);"
                    f" kernels: {parts}",
                    flush=True,
                )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [128])
