"""First look at the Hopper kernel on a GPU: correctness against the reference and the Triton kernel on
a few shapes, then kernel-only and whole-call TOPS next to the Triton path and SDPA (cuDNN).
Usage: python scripts/hopper_smoke.py [--quick]"""

from __future__ import annotations

import math
import sys
import time

import torch

import quantattn as qa
from quantattn import hopper
from quantattn.bench.timing import median_seconds
from quantattn.config import QuantConfig
from quantattn.hopper import launch as HL
from quantattn.kernels import launch as L
from quantattn.metrics import relative_l1
from quantattn.reference import attention_fp64


def correctness():
    print("== correctness (rel L1: hopper vs reference, triton vs reference, hopper vs fp64)")
    cases = [
        (1, 2, 128, 128, 128, False, 2),
        (1, 2, 256, 256, 128, False, 2),
        (1, 2, 1000, 1000, 128, True, 2),
        (2, 4, 77, 300, 64, True, 2),
        (2, 4, 300, 77, 128, True, 1),
        (1, 8, 4096, 4096, 128, False, 8),
        (1, 8, 4096, 4096, 64, True, 8),
    ]
    ok = True
    for b, hq, nq, nk, d, causal, hkv in cases:
        g = torch.Generator(device="cuda").manual_seed(nq + nk + d)
        q = torch.randn(b, hq, nq, d, generator=g, device="cuda").bfloat16()
        k = (
            torch.randn(b, hkv, nk, d, generator=g, device="cuda") + 2 * torch.randn(1, 1, 1, d, device="cuda")
        ).bfloat16()
        v = torch.randn(b, hkv, nk, d, generator=g, device="cuda").bfloat16()
        try:
            oh, lh = qa.sageattn(q, k, v, "HND", causal, return_lse=True, backend="hopper")
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            print(f"  {b, hq, nq, nk, d, causal, hkv}: FAILED {type(exc).__name__}: {exc}")
            ok = False
            continue
        ot, lt = qa.sageattn(q, k, v, "HND", causal, return_lse=True, backend="triton")
        orf = qa.sageattn(q, k, v, "HND", causal, backend="reference")
        o64 = attention_fp64(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), causal)
        e_h, e_t, e_64 = relative_l1(oh, orf), relative_l1(ot, orf), relative_l1(oh, o64)
        lse_err = (lh - lt).abs().max().item()
        nan = torch.isnan(oh).any().item()
        good = e_h < 0.1 * relative_l1(orf, o64) + 1e-4 and not nan and lse_err < 1e-2
        ok &= good
        print(
            f"  {'ok ' if good else 'BAD'} B{b} Hq{hq} Hkv{hkv} Nq{nq} Nk{nk} d{d} causal={causal}: "
            f"hopper {e_h:.5f} triton {e_t:.5f} (ref vs fp64 {relative_l1(orf, o64):.5f}, hopper vs fp64 {e_64:.5f}) "
            f"lse max diff {lse_err:.2e} nan={nan}"
        )
    return ok


def speed(quick):
    print("== speed (TOPS; B=4 H=32; whole call / kernel only)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = QuantConfig()
    rows = []
    shapes = (
        [(128, 4096, False), (128, 16384, False)]
        if quick
        else [
            (128, 1024, False),
            (128, 4096, False),
            (128, 8192, False),
            (128, 16384, False),
            (128, 16384, True),
            (64, 8192, False),
        ]
    )
    for d, n, causal in shapes:
        b, h = 4, 32
        q, k, v = (torch.randn(b, h, n, d, device="cuda").bfloat16() for _ in range(3))
        work = 4 * b * h * n * n * d / (2 if causal else 1)
        out = torch.empty_like(q)
        res = {}
        res["hopper whole"] = median_seconds(lambda: qa.sageattn(q, k, v, "HND", causal, backend="hopper"))
        kvh = HL.preprocess(k, v, cfg)
        res["hopper kernel"] = median_seconds(lambda: HL.attention(q, kvh, causal, 1 / math.sqrt(d), out))
        res["hopper preprocess"] = median_seconds(lambda: HL.preprocess(k, v, cfg))
        res["triton whole"] = median_seconds(lambda: qa.sageattn(q, k, v, "HND", causal, backend="triton"))
        kvt = L.preprocess_kv(k, v, cfg, L.sequences(k, None, 0))
        seqs = L.sequences(q, None, 0)
        res["triton kernel"] = median_seconds(lambda: L.attention(q, kvt, causal, 1 / math.sqrt(d), out, None, seqs))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            res["cudnn"] = median_seconds(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            )
        line = f"  d{d} N{n} causal={causal}: " + ", ".join(
            f"{name} {work / t / 1e12:.0f}" if "preprocess" not in name else f"{name} {t * 1e3:.3f} ms"
            for name, t in res.items()
        )
        print(line, flush=True)
        rows.append(line)
        torch.cuda.empty_cache()
    return rows


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t0 = time.time()
    reason = hopper.unavailable_reason()
    print("hopper available:", reason is None, reason or "", f"({time.time() - t0:.1f}s incl. build)", flush=True)
    if reason is not None:
        return 1
    ok = correctness()
    speed("--quick" in sys.argv)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
