"""GPU facts for the notes: which MMA instructions each PV mode compiles to, the cost of the exact
rounding helpers, and one speed line per variant (whole call and kernel only, 4 x 32 x 8K x 128).

Run on the GPU machine: python3 scripts/gpu_inspect.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

import torch

from quantattn import sageattn, settings
from quantattn.config import VARIANTS
from quantattn.kernels import launch


def median_ms(fn, warmup=3, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def mma_instructions(ptx: str) -> list[str]:
    found = re.findall(r"\b((?:wgmma\.mma_async|mma)\.[\w.]+)", ptx)
    return sorted(set(found))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, h, n, d = 4, 32, args.seq, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.half() for t in (q, k, v))
    flops = 4 * b * h * n * n * d
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [b, h, n, d], "rows": []}
    print(f"{report['device']}  torch {torch.__version__}  shape {b}x{h}x{n}x{d} bf16, not causal")
    print(f"{'variant':<16} {'whole TOPS':>10} {'kernel TOPS':>11} {'regs':>5} {'spills':>6}  mma instructions")
    for name, cfg in VARIANTS.items():
        qi, ki, vi = (qh, kh, vh) if cfg.pv_accum == "fp16+fp32" else (q, k, v)
        whole = median_ms(lambda: sageattn(qi, ki, vi, config=cfg, backend="quantized"))
        kv = launch.preprocess_kv(ki, vi, cfg, launch.sequences(ki, None, 0))
        out = torch.empty_like(qi)
        seqs = launch.sequences(qi, None, 0)
        ck = launch.attention(qi, kv, False, d**-0.5, out, None, seqs, k=ki)
        kern = median_ms(lambda: launch.attention(qi, kv, False, d**-0.5, out, None, seqs, k=ki))
        mmas = mma_instructions(ck.asm["ptx"])
        row = {
            "variant": name,
            "config": cfg.name,
            "whole_tops": flops / whole / 1e9,
            "kernel_tops": flops / kern / 1e9,
            "n_regs": ck.n_regs,
            "n_spills": ck.n_spills,
            "mma": mmas,
        }
        report["rows"].append(row)
        print(
            f"{name:<16} {row['whole_tops']:>10.0f} {row['kernel_tops']:>11.0f} {ck.n_regs:>5} {ck.n_spills:>6}  {' '.join(mmas)}"
        )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            print(f"{label:<16} {flops / ms / 1e9:>10.0f}")
            report["rows"].append({"variant": label, "whole_tops": flops / ms / 1e9})
        except RuntimeError as e:
            print(f"{label}: unavailable ({str(e)[:80]})")
    # host-side cost of one whole call: a tiny problem, timed on the host clock with a sync per call
    import time

    tq, tk, tv = (torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(20):
        sageattn(tq, tk, tv, backend="quantized")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        sageattn(tq, tk, tv, backend="quantized")
    torch.cuda.synchronize()
    report["host_us_per_call"] = (time.perf_counter() - t0) / 200 * 1e6
    print(f"whole call on [1, 1, 64, 128]: {report['host_us_per_call']:.0f} us per call (host-bound)")
    # cost of the exact rounding helpers (the interpreter's path) on the GPU, default variant
    cfg = VARIANTS["sage2-8b"]
    kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
    out = torch.empty_like(q)
    seqs = launch.sequences(q, None, 0)
    costs = {}
    for flag in ("0", "1", "0"):
        os.environ["QUANTATTN_EXACT_CASTS"] = flag
        settings.reload()  # quantattn reads the environment once
        costs.setdefault(flag, []).append(median_ms(lambda: launch.attention(q, kv, False, d**-0.5, out, None, seqs)))
    os.environ["QUANTATTN_EXACT_CASTS"] = "0"
    settings.reload()  # quantattn reads the environment once
    print(f"exact-cast helpers: hardware casts {costs['0']} ms, helpers {costs['1']} ms (kernel only)")
    report["exact_casts_ms"] = costs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
