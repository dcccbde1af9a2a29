"""Accuracy table of the variants against FP64 attention: `python -m quantattn.accuracy`.

Runs each variant through the chosen backend ("reference" anywhere, "triton" on a GPU) on normal and
channel-outlier inputs and prints cosine similarity and relative L1, as the papers report them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from quantattn import metrics
from quantattn.api import sageattn
from quantattn.config import VARIANTS, QuantConfig
from quantattn.reference import attention_fp64

# The variants of the papers plus one knob changed at a time from the default (SageAttention2-8b).
ABLATIONS = {
    **VARIANTS,
    "sage2-8b per_thread": QuantConfig(qk_granularity="per_thread"),
    "sage2-8b per_warp": QuantConfig(qk_granularity="per_warp"),
    "sage2-8b per_block": QuantConfig(qk_granularity="per_block"),
    "sage2-8b per_tensor": QuantConfig(qk_granularity="per_tensor"),
    "sage2-8b fp22 (one level)": QuantConfig(pv_accum="fp32"),
    "sage2-8b smooth_v": QuantConfig(smooth_v=True),
    "sage2-8b smooth_q": QuantConfig(smooth_q=True),
    "sage2-8b no smooth_k": QuantConfig(smooth_k=False),
    "sage2-4b per_thread": QuantConfig(qk_dtype="int4", smooth_q=True, qk_granularity="per_thread"),
    "sage1 bf16 PV": QuantConfig(qk_granularity="per_block", pv_dtype="bf16", pv_accum="fp32"),
}


def accuracy_rows(names, shape, device, backends, seed=0):
    """One row per (variant, backend, input kind); every backend sees the same inputs."""
    b, h, n, d = shape
    rows = []
    for kind in ("normal", "outliers"):
        q, k, v = metrics.make_qkv(b, h, n, d, device=device, outliers=kind == "outliers", seed=seed)
        truth = attention_fp64(q, k, v)
        for name in names:
            for backend in backends:
                out = sageattn(q, k, v, config=ABLATIONS[name], backend=backend)
                rows.append({"variant": name, "backend": backend, "inputs": kind, "config": ABLATIONS[name].name,
                             **metrics.accuracy_metrics(out, truth)})  # fmt: skip
    return rows


def format_table(rows) -> str:
    keys = list(dict.fromkeys((r["variant"], r["backend"]) for r in rows))
    by = {(r["variant"], r["backend"], r["inputs"]): r for r in rows}
    lines = [
        "| variant | backend | normal cosine | normal rel L1 | outliers cosine | outliers rel L1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, backend in keys:
        cells = []
        for kind in ("normal", "outliers"):
            r = by.get((name, backend, kind))
            cells += [f"{r['cosine']:.6f}", f"{r['rel_l1']:.4f}"] if r else ["", ""]
        lines.append(f"| {name} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantattn.accuracy", description=__doc__)
    parser.add_argument("--shape", default="1,8,4096,128", help="B,H,N,d (default 1,8,4096,128)")
    parser.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    parser.add_argument(
        "--with-reference", action="store_true", help="also run the reference on the same inputs, row by row"
    )
    parser.add_argument("--variants", nargs="*", default=list(ABLATIONS), help=f"from: {', '.join(ABLATIONS)}")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = tuple(int(x) for x in args.shape.split(","))
    unknown = [v for v in args.variants if v not in ABLATIONS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    backend = args.backend if args.backend != "auto" else ("triton" if device == "cuda" else "reference")
    import warnings

    warnings.filterwarnings("ignore", message="quantattn: CPU tensors")
    backends = [backend] + (["reference"] if args.with_reference and backend != "reference" else [])
    rows = accuracy_rows(args.variants, shape, device, backends)
    print(f"accuracy against FP64 attention, shape {shape}, backend {backend}, device {device}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "backend": backend, "device": device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
