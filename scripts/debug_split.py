"""Reproduce a kernel fault: the attention kernel with two channel slabs and FP16 PV on bf16/fp16 V."""

import sys

import torch

from quantattn.config import VARIANTS, QuantConfig
from quantattn.kernels import launch

b, h, n = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (4, 32, 4096)
for d in (80, 160):
    for dtype in (torch.float16, torch.bfloat16):
        for cfg in (
            VARIANTS["sage1"],
            QuantConfig(pv_dtype="fp16", pv_accum="fp32"),
            QuantConfig(pv_dtype="bf16", pv_accum="fp32"),
        ):
            if cfg.pv_dtype == "bf16" and dtype == torch.float16:
                continue
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
            out = torch.empty_like(q)
            try:
                kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
                launch.attention(q, kv, False, d**-0.5, out, None, launch.sequences(q, None, 0), k=k)
                torch.cuda.synchronize()
                print(d, dtype, cfg.name, "ok", torch.isfinite(out).all().item(), flush=True)
            except Exception as e:  # noqa: BLE001
                print(d, dtype, cfg.name, "FAULT", str(e).splitlines()[0], flush=True)
                sys.exit(1)
