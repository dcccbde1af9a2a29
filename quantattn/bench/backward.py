"""`python -m quantattn.bench.backward`: forward + backward speed of quantattn next to torch SDPA (needs a GPU).

Times one training step of attention, `out = attention(q, k, v)` then the gradients of q, k and v for a
fixed upstream gradient (torch.autograd.grad, so nothing accumulates), for quantattn (its quantized
forward and exact backward, quantattn/autograd.py) and torch SDPA with the cuDNN and the flash backend.
bf16, HND, B=4, H=32, head_dim 64 and 128, N 1K..16K, causal off and on; CUDA events, median of the
repeats (quantattn/bench/timing.py). TOPS = FLOPs / median time with FLOPs = 4 B H N^2 d x 3.5 (1 for the
forward, 2.5 for the backward), halved when causal. A small accuracy check sits next to the speeds: each
implementation's gradients against float32 SDPA (math backend) on [1, H, 1K, d].
Writes the numbers and the run's metadata as JSON (--out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

from quantattn.bench import cases as C
from quantattn.bench import report, timing
from quantattn.bench.environment import positive_arg, run_metadata, seq_len_arg

FORMAT = "backward-1"
EXIT_NO_GPU = 2
IMPLEMENTATIONS = ("quantattn", "sdpa-cudnn", "sdpa-flash")
SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION"}
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQ_LENS = (1024, 4096, 16384)
BACKWARD_FLOPS_FACTOR = 2.5  # the backward's matrix products, in units of the forward's
CHECK_SEQ_LEN = 1024


def flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """Forward + backward: 4 B H N^2 d (1 + 2.5), halved when causal."""
    ops = 4.0 * batch * heads * seq_len * seq_len * head_dim * (1.0 + BACKWARD_FLOPS_FACTOR)
    return ops / 2 if causal else ops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantattn.bench.backward",
        description="Forward + backward speed (TOPS) of quantattn next to torch SDPA (cuDNN, flash). Needs a CUDA GPU.",
        epilog="Defaults: bf16, HND, B=4, H=32, head_dim 64 128, N 1K..16K, causal off and on; FLOPs = "
        "4*B*H*N^2*d*(1 + 2.5), halved when causal. --quick: head_dim 128, N 1K 4K 16K, causal off and on, "
        "fewer repeats.",
    )
    p.add_argument("--head-dims", type=positive_arg, nargs="+", metavar="D", help="head dimensions (default: 64 128)")
    p.add_argument("--seq-lens", type=seq_len_arg, nargs="+", metavar="N", help="sequence lengths (default 1K..16K)")
    p.add_argument("--batch", type=positive_arg, default=C.BATCH, help=f"batch size (default {C.BATCH})")
    p.add_argument("--heads", type=positive_arg, default=C.HEADS, help=f"attention heads (default {C.HEADS})")
    p.add_argument("--causal", choices=("off", "on", "both"), default="both", help="causal masking (default both)")
    p.add_argument(
        "--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS), metavar="NAME",
        help=f"implementations, from {', '.join(IMPLEMENTATIONS)} (default: all)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="short run: head_dim 128, N 1K 4K 16K, fewer repeats")
    p.add_argument("--no-check", action="store_true", help="skip the gradient accuracy check")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<date>_backward_<gpu>.json)")
    return p


def settings(args: argparse.Namespace) -> dict:
    return {
        "head_dims": list(args.head_dims or ((128,) if args.quick else C.HEAD_DIMS)),
        "seq_lens": list(args.seq_lens or (QUICK_SEQ_LENS if args.quick else SEQ_LENS)),
        "causals": list(C.parse_causal(args.causal)),
        "batch": args.batch,
        "heads": args.heads,
        "implementations": list(args.impls),
        "timing": {"min_repeats": 10, "max_repeats": 30, "target_s": 0.2}
        if args.quick
        else {"min_repeats": timing.MIN_REPEATS, "max_repeats": 100, "target_s": 0.5},
    }


def training_step(name: str):
    """attention forward + gradients of q, k, v: fn(q, k, v, do, causal)."""
    if name == "quantattn":
        import quantattn

        def attend(q, k, v, causal):
            return quantattn.sageattn(q, k, v, is_causal=causal)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name])

        def attend(q, k, v, causal):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def step(q, k, v, do, causal):
        return torch.autograd.grad(attend(q, k, v, causal), (q, k, v), do)

    return step


def _inputs(batch, heads, n, d, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(batch, heads, n, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def check_gradients(name: str, heads: int, d: int, causal: bool) -> dict:
    """rel L1 of each gradient against float32 SDPA (math backend) on [1, heads, 1K, d]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, do = _inputs(1, heads, CHECK_SEQ_LEN, d, seed=1)
    grads = training_step(name)(q, k, v, do, causal)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    truth = torch.autograd.grad(out, leaves, do.float())
    rel = {
        f"d{n}_rel_l1": float((g.float() - t).abs().sum() / t.abs().sum())
        for n, g, t in zip("qkv", grads, truth, strict=True)
    }
    return {"implementation": name, "head_dim": d, "causal": causal, "seq_len": CHECK_SEQ_LEN, **rel}


def metadata(argv: list[str], s: dict, date: dt.datetime) -> dict:
    return {
        **run_metadata("quantattn.bench.backward", argv, date),
        "dtype": "bfloat16",
        "layout": "HND",
        "settings": s,
        "flops": "4*B*H*N^2*d*(1 + 2.5), halved when causal; TOPS = flops / median time of forward + backward",
    }


def format_table(result: dict) -> str:
    s = result["metadata"]["settings"]
    names = s["implementations"]
    lines = []
    for d in s["head_dims"]:
        for causal in s["causals"]:
            lines.append(f"\nhead_dim {d}, causal {C.causal_label(causal)}: forward + backward TOPS (median ms)")
            lines.append(f"{'N':>6} " + " ".join(f"{n:>22}" for n in names))
            for n in s["seq_lens"]:
                cells = []
                for name in names:
                    r = next(
                        (r for r in result["speed"] if (r["implementation"], r["head_dim"], r["causal"],
                                                        r["seq_len"]) == (name, d, causal, n)),
                        None,
                    )  # fmt: skip
                    if r is None:
                        cells.append("-")
                    elif "error" in r:
                        cells.append("error")
                    else:
                        cells.append(f"{r['tops']:.0f} ({r['median_ms']:.2f})")
                lines.append(f"{C.format_seq_len(n):>6} " + " ".join(f"{c:>22}" for c in cells))
    for r in result["check"]:
        if "error" in r:
            lines.append(f"check {r['implementation']} d={r['head_dim']} causal={r['causal']}: error {r['error']}")
        else:
            rels = ", ".join(f"{k.split('_')[0]} {v:.2e}" for k, v in r.items() if k.endswith("rel_l1"))
            lines.append(f"check {r['implementation']:<11} d={r['head_dim']} causal={C.causal_label(r['causal'])}: "
                         f"rel L1 vs float32 SDPA: {rels}")  # fmt: skip
    return "\n".join(lines)


def run(result: dict, save) -> None:
    """Time every case of the settings into result["speed"], calling save() after each (settings'
    "device" may be "cpu": the CPU tests' functional check, with wall-clock timing)."""
    s = result["metadata"]["settings"]
    t = s["timing"]
    device = s.get("device", "cuda")
    for d in s["head_dims"]:
        for causal in s["causals"]:
            for n in s["seq_lens"]:
                args = _inputs(s["batch"], s["heads"], n, d, device=device)
                for name in s["implementations"]:
                    rec = {"implementation": name, "head_dim": d, "causal": causal, "seq_len": n,
                           "batch": s["batch"], "heads": s["heads"],
                           "flops": flops(s["batch"], s["heads"], n, d, causal)}  # fmt: skip
                    try:
                        step = training_step(name)
                        measured = timing.measure(step, [(*args, causal)], **t, device=device)
                        rec.update(measured.as_dict(), tops=rec["flops"] / (measured.median_ms * 1e-3) / 1e12)
                    except Exception as exc:  # noqa: BLE001  one failing backend must not end the run
                        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    result["speed"].append(rec)
                    said = rec["error"] if "error" in rec else f"{rec['median_ms']:.3f} ms, {rec['tops']:.0f} TOPS"
                    print(f"d={d} causal={C.causal_label(causal)} N={C.format_seq_len(n)} {name}: {said}", flush=True)
                    save()
                del args
                if device == "cuda":
                    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "python -m quantattn.bench.backward measures GPU speed and needs a CUDA GPU: torch.cuda.is_available() "
            f"is False (torch {torch.__version__}, built with CUDA {torch.version.cuda}). Nothing was measured.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    s = settings(args)
    date = dt.datetime.now().astimezone()
    meta = metadata(argv, s, date)
    gpu = meta["device"].replace("NVIDIA ", "")
    out = args.out or Path("bench/results") / f"{date:%Y-%m-%d_%H%M%S}_backward_{report.slug(gpu)}.json"
    result = {"format": FORMAT, "metadata": meta, "speed": [], "check": []}
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | results: {out}", flush=True)
    try:
        run(result, lambda: report.write_json(result, out))
        if not args.no_check:
            for d in s["head_dims"]:
                for causal in s["causals"]:
                    for name in s["implementations"]:
                        try:
                            result["check"].append(check_gradients(name, s["heads"], d, causal))
                        except Exception as exc:  # noqa: BLE001
                            result["check"].append({"implementation": name, "head_dim": d, "causal": causal,
                                                    "error": f"{type(exc).__name__}: {exc}"[:200]})  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    report.write_json(result, out)
    print(format_table(result))
    print(f"\nresults: {out}")
    return 1 if any("error" in r for r in result["speed"] if r["implementation"] == "quantattn") else 0


if __name__ == "__main__":
    sys.exit(main())
