"""A few launches of one quantattn kernel, for Nsight Compute (ncu) to profile: nothing else runs on the
GPU between the inputs' creation and the launches, so `-s 1 -c 1` catches the second launch, warm.

Kernels (--kernel):
  hopper         the native Hopper attention kernel on K/V from the Hopper preprocessing (default)
  hopper-prep    the Hopper K/V preprocessing (resident up to 2K keys, two-phase beyond)
  triton         the Triton attention kernel (default variant) on K/V from the Triton preprocessing; also
                 prints the compiled kernel's registers and spills
  triton-prep    the Triton K/V preprocessing
Shape: B H N D (default 1 32 8192 128), bf16, HND, not causal unless --causal. --build LABEL:SPEC
(hopper kinds only) compiles the Hopper kernels as scripts/hopper_ab.py does, e.g. "a:-DFLAG=1"; give
QUANTATTN_CACHE a folder of its own then.

Usage (GPU machine, repository root), e.g. the sections an A/B of Hopper kernels reads:
  ncu -k regex:sage_attention_hopper -s 1 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \\
      --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \\
      --section SourceCounters -o /tmp/ncu_hopper python3 scripts/ncu_one.py --kernel hopper 1 32 8192 128
  ncu -i /tmp/ncu_hopper.ncu-rep --page details          (--page source --csv --print-source sass: per line)
Kernel-name filters: regex:sage_attention_hopper, regex:preprocess_kv (both preprocessings),
regex:sage_attention (Triton's attention kernel too).

Reads internal modules (quantattn.hopper.launch, quantattn.kernels.launch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/ncu_one.py", description=__doc__.split("\n")[0])
    p.add_argument("shape", type=int, nargs="*", metavar="B H N D", help="default 1 32 8192 128")
    p.add_argument("--kernel", choices=("hopper", "hopper-prep", "triton", "triton-prep"), default="hopper")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--build", metavar="LABEL:SPEC", help="Hopper kernels built as scripts/hopper_ab.py does")
    p.add_argument("--launches", type=int, default=2, help="launches of the kernel (default 2)")
    args = p.parse_args(argv)
    if args.shape and len(args.shape) != 4:
        p.error("the shape is four integers: B H N D")
    b, h, n, d = args.shape or (1, 32, 8192, 128)
    if args.build:
        if not args.kernel.startswith("hopper"):
            p.error("--build applies to the Hopper kernels only")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hopper_ab import parse_build, use_build

        _, source, options = parse_build(args.build)
        use_build(source, options)

    from quantattn.config import QuantConfig

    cfg = QuantConfig()
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    if args.kernel.startswith("hopper"):
        from quantattn.hopper import launch as HL

        kv = HL.hopper_preprocess(k, v, cfg)
        torch.cuda.synchronize()
        for _ in range(args.launches):
            if args.kernel == "hopper":
                HL.hopper_attention(q, kv, args.causal, d**-0.5, out)
            else:
                HL.hopper_preprocess(k, v, cfg)
    else:
        from quantattn.kernels import launch as L

        seqs_k, seqs_q = L.sequences(k, None, 0), L.sequences(q, None, 0)
        kv = L.triton_preprocess_kv(k, v, cfg, seqs_k)
        torch.cuda.synchronize()
        for _ in range(args.launches):
            if args.kernel == "triton":
                compiled = L.triton_attention(q, kv, args.causal, d**-0.5, out, None, seqs_q, k=k)
            else:
                L.triton_preprocess_kv(k, v, cfg, seqs_k)
        if args.kernel == "triton":
            print(f"attention kernel: {compiled.n_regs} registers, {compiled.n_spills} spills")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
