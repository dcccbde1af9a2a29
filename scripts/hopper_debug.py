"""Debug builds of the Hopper kernel (-D macros) against the reference on a few shapes, each in its own
process (the library is loaded once per process). Usage: python scripts/hopper_debug.py"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

VARIANTS = {"base": []}
CHECK = r"""
import torch, quantattn as qa
from quantattn.reference import attention_fp64
def rel(a, b):
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum()).item()
from quantattn.config import QuantConfig
for dtype in (torch.float16, torch.bfloat16):
  for smooth in (True, False):
    cfg = QuantConfig(smooth_k=smooth)
    g = torch.Generator(device="cuda").manual_seed(40)
    q = torch.randn(2, 8, 1000, 128, generator=g, device="cuda").to(dtype)
    k = (torch.randn(2, 2, 1500, 128, generator=g, device="cuda") + 4 * torch.randn(2, 2, 1, 128, generator=g, device="cuda")).to(dtype)
    v = torch.randn(2, 2, 1500, 128, generator=g, device="cuda").to(dtype)
    oh = qa.sageattn(q, k, v, "HND", False, config=cfg, backend="hopper")
    oh2 = qa.sageattn(q, k, v, "HND", False, config=cfg, backend="hopper")
    ot = qa.sageattn(q, k, v, "HND", False, config=cfg, backend="triton")
    orf = qa.sageattn(q, k, v, "HND", False, config=cfg, backend="reference")
    o64 = attention_fp64(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), False)
    rows = ((oh.double() - orf.double()).abs().sum(-1) / orf.double().abs().sum(-1)).flatten()
    print(f"   {dtype} smooth_k={smooth}: hopper-ref {rel(oh, orf):.5f} triton-ref {rel(ot, orf):.5f} ref-fp64 {rel(orf, o64):.5f} hopper-fp64 {rel(oh, o64):.5f} deterministic={torch.equal(oh, oh2)} worst rows {rows.topk(3).values.tolist()} median row {rows.median().item():.5f}", flush=True)
"""


def main():
    from quantattn.hopper import build

    for name, flags in VARIANTS.items():
        out = tempfile.mkdtemp()
        cmd = [build.find_nvcc(), *build.NVCC_FLAGS, *flags, "-o", os.path.join(out, build.LIB_NAME),
               str(build.HERE / "attention.cu")]  # fmt: skip
        subprocess.run(cmd, check=True)
        print(f"== {name}", flush=True)
        env = dict(os.environ, QUANTATTN_HOPPER_LIB=os.path.join(out, build.LIB_NAME))
        subprocess.run([sys.executable, "-c", CHECK], env=env, check=False)


if __name__ == "__main__":
    main()
