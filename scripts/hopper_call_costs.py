"""What a Hopper call costs besides the GPU work, for the build of quantattn on PYTHONPATH:
  first   the first call in a fresh process (kernel compilation or cache load included), in seconds
  host    host time per whole call on a problem the GPU finishes at once, in µs (median of 5 x 300 calls)
  where   cProfile of 300 such calls: the top functions by own time
and, with --save FILE, the output of a fixed seeded call (d128 N2K bf16, causal off and on) for comparing
two builds bit for bit (--compare A B).

Usage (GPU machine): python3 scripts/hopper_call_costs.py first|host|where|--save F|--compare A B
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time

import torch


def first() -> None:
    t0 = time.perf_counter()
    import quantattn

    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t1 = time.perf_counter()
    quantattn.sageattn(q, k, v, backend="hopper")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"first call {t2 - t1:.2f} s (import + inputs {t1 - t0:.2f} s)")


def _tiny():
    import quantattn

    q, k, v = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return lambda: quantattn.sageattn(q, k, v, backend="hopper")


def host() -> None:
    call = _tiny()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(300):
            call()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / 300 * 1e6)
    print(f"host time per call {statistics.median(runs):.1f} us (runs {', '.join(f'{r:.1f}' for r in runs)})")


def where() -> None:
    call = _tiny()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        call()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def parts() -> None:
    """µs per call of each step of a Hopper launch, alone (the same tiny problem)."""
    import timeit

    from quantattn.config import QuantConfig
    from quantattn.hopper import driver, kernels, launch

    q, k, v = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv = launch.preprocess(k, v, QuantConfig())
    out = torch.empty_like(q)
    steps = {
        "sageattn (whole)": lambda: __import__("quantattn").sageattn(q, k, v, backend="hopper"),
        "launch.preprocess": lambda: launch.preprocess(k, v, QuantConfig()),
        "launch.attention": lambda: launch.attention(q, kv, False, 0.1, out),
        "attention_spec": lambda: kernels.attention_spec(128, False, "bf16"),
        "AttentionParams()": kernels.AttentionParams,
        "encode 3 maps": lambda: launch._encode_kv_maps(kernels.AttentionParams(), kv, 1, 64, 128),
        "ensure_context": lambda: driver.ensure_context(0),
        "current_stream": lambda: torch.cuda.current_stream(q.device).cuda_stream,
        "torch.empty x1": lambda: torch.empty(64, device="cuda"),
    }
    for name, fn in steps.items():
        fn()
        n = 2000
        t = min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6
        torch.cuda.synchronize()
        print(f"{name:20s} {t:7.1f} us")


def save(path: str) -> None:
    import quantattn

    g = torch.Generator(device="cuda").manual_seed(1234)
    q, k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    outs = {c: quantattn.sageattn(q, k, v, is_causal=c, backend="hopper") for c in (False, True)}
    torch.save({c: o.cpu() for c, o in outs.items()}, path)


def compare(a: str, b: str) -> None:
    x, y = torch.load(a), torch.load(b)
    for c in x:
        d = (x[c].float() - y[c].float()).abs()
        print(f"causal={c}: identical={torch.equal(x[c], y[c])} max|diff|={d.max().item():.3g}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    {"first": first, "host": host, "where": where, "parts": parts}.get(cmd, lambda: None)()
    if cmd == "--save":
        save(sys.argv[2])
    elif cmd == "--compare":
        compare(sys.argv[2], sys.argv[3])
