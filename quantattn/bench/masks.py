"""`python -m quantattn.bench.masks`: the speed of masked attention, quantattn next to torch SDPA given
the same mask in the same run (needs a CUDA GPU).

Cases, bf16 HND [B, H, N, d]: no mask (the reference point); key padding given as per-batch lengths
(quantattn's fast path; SDPA gets the equivalent bool [B, 1, 1, N] mask); the same padding as a bool
[B, 1, 1, N] mask; a causal-and-padding bool mask [B, 1, N, N] (what transformers builds for a padded
batch); an additive bf16 [B, 1, N, N] bias. Half of the batch is padded to half its length. TOPS count
the dense work, 4 B H N^2 d, whatever the mask hides, so a faster masked call shows as higher TOPS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

from quantattn.bench import timing
from quantattn.bench.cases import format_seq_len
from quantattn.bench.environment import run_metadata, seq_len_arg
from quantattn.metrics import attention_ops, tops

CASES = ("none", "key_lengths", "bool [B,1,1,N]", "bool causal+padding [B,1,N,N]", "additive [B,1,N,N]")
EXIT_NO_GPU = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantattn.bench.masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", nargs="+", type=seq_len_arg, default=[4096, 16384], metavar="N")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="N = 4K only, fewer repeats")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def masks_for(case: str, b: int, n: int, device) -> dict:
    """quantattn's keyword arguments and SDPA's for one case (the same masking)."""
    lengths = torch.tensor([n if i % 2 == 0 else n // 2 for i in range(b)], dtype=torch.int32, device=device)
    padding = (torch.arange(n, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    if case == "none":
        return {"ours": {}, "sdpa": {}}
    if case == "key_lengths":
        return {"ours": {"key_lengths": lengths}, "sdpa": {"attn_mask": padding}}
    if case == "bool [B,1,1,N]":
        return {"ours": {"attn_mask": padding}, "sdpa": {"attn_mask": padding}}
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if case == "bool causal+padding [B,1,N,N]":
        mask = causal[None, None] & padding
        return {"ours": {"attn_mask": mask}, "sdpa": {"attn_mask": mask}}
    g = torch.Generator(device=device).manual_seed(0)
    bias = torch.randn(b, 1, n, n, generator=g, device=device).to(torch.bfloat16)
    return {"ours": {"attn_mask": bias}, "sdpa": {"attn_mask": bias}}


def run(args, argv: list[str]) -> dict:
    import quantattn

    dev = "cuda"
    settings = dict(min_repeats=10, max_repeats=30, target_s=0.1) if args.quick else {}
    seq_lens = [4096] if args.quick else args.seq_lens
    rows = []
    for n in seq_lens:
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (
            torch.randn(args.batch, args.heads, n, args.head_dim, generator=g, device=dev).bfloat16() for _ in range(3)
        )
        ops = attention_ops(args.batch, args.heads, n, n, args.head_dim, False)
        for case in CASES:
            kw = masks_for(case, args.batch, n, dev)
            ours = timing.measure(lambda q, k, v: quantattn.sageattn(q, k, v, **kw["ours"]), [(q, k, v)], **settings)
            sdpa = timing.measure(
                lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw["sdpa"]),
                [(q, k, v)],
                **settings,
            )
            rows.append({
                "seq_len": n, "case": case, "quantattn_ms": ours.median_ms, "sdpa_ms": sdpa.median_ms,
                "quantattn_tops": tops(ops, ours.median_ms), "sdpa_tops": tops(ops, sdpa.median_ms),
                "speedup": sdpa.median_ms / ours.median_ms,
            })  # fmt: skip
    return {
        "meta": {
            **run_metadata("quantattn.bench.masks", list(argv), dt.datetime.now()),
            "shape": f"B={args.batch} H={args.heads} d={args.head_dim} bf16 HND, default variant, SDPA default dispatch",
            "ops": "4*B*H*N^2*d (dense work, whatever the mask hides); TOPS = ops / median time",
        },
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| N | mask | quantattn ms | SDPA ms | quantattn TOPS | SDPA TOPS | speedup |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {format_seq_len(r['seq_len'])} | {r['case']} | {r['quantattn_ms']:.3f} | {r['sdpa_ms']:.3f} | "
            f"{r['quantattn_tops']:.0f} | {r['sdpa_tops']:.0f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m quantattn.bench.masks needs a CUDA GPU; none is visible here", file=sys.stderr)
        return EXIT_NO_GPU
    result = run(args, sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    name = result["meta"]["device"].replace(" ", "_")
    path = args.out / f"{stamp}_masks_{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
