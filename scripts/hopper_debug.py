"""The case that once looked like a Hopper kernel bug: GQA 1000 x 1500, d128, K with channel outliers, both
16-bit dtypes, smooth K on and off. Prints the Hopper and Triton kernels' distance to the reference (they
stray alike in bfloat16 without smooth K), FP64 errors, and whether two Hopper calls agree bit for bit.
Usage (GPU): python scripts/hopper_debug.py"""

from __future__ import annotations

import torch

import quantattn as qa
from quantattn.config import QuantConfig
from quantattn.reference import attention_fp64


def rel(a, b):
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum()).item()


def main():
    for dtype in (torch.float16, torch.bfloat16):
        for smooth in (True, False):
            cfg = QuantConfig(smooth_k=smooth)
            g = torch.Generator(device="cuda").manual_seed(40)
            q = torch.randn(2, 8, 1000, 128, generator=g, device="cuda").to(dtype)
            k = torch.randn(2, 2, 1500, 128, generator=g, device="cuda")
            k = (k + 4 * torch.randn(2, 2, 1, 128, generator=g, device="cuda")).to(dtype)
            v = torch.randn(2, 2, 1500, 128, generator=g, device="cuda").to(dtype)
            run = {b: qa.sageattn(q, k, v, config=cfg, backend=b) for b in ("hopper", "triton", "reference")}
            again = qa.sageattn(q, k, v, config=cfg, backend="hopper")
            o64 = attention_fp64(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), False)
            ref = run["reference"]
            print(
                f"{dtype} smooth_k={smooth}: hopper-ref {rel(run['hopper'], ref):.5f} "
                f"triton-ref {rel(run['triton'], ref):.5f} ref-fp64 {rel(ref, o64):.5f} "
                f"hopper-fp64 {rel(run['hopper'], o64):.5f} deterministic={torch.equal(run['hopper'], again)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
