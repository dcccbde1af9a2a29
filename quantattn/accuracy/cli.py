"""`python -m quantattn.accuracy`: the ablation tables (stdout, JSON, PNG); see quantattn.accuracy.ablation."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import quantattn
from quantattn.accuracy.ablation import ABLATION_GROUPS, ABLATIONS, Shape, ablation_rows, format_summary, format_tables
from quantattn.accuracy.ablation import groups_of_variants as _variants_group
from quantattn.bench.cases import parse_seq_len
from quantattn.cli_args import attention_run_bytes, check_fits, head_dim, positive_int, shape_arg

GPU_DEFAULTS = {"head_dims": (64, 128), "seq_lens": (1024, 4096, 16384), "batch": 1, "heads": 8}
# the reference's tiled loop is slow on a CPU: shorter sequences and fewer heads (~2 minutes on 2 cores)
CPU_DEFAULTS = {"head_dims": (64, 128), "seq_lens": (256, 1024), "batch": 1, "heads": 2}


def _length(text: str) -> int:
    """A sequence length as the benchmark reads it: 4096 or 4K."""
    try:
        return parse_seq_len(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantattn.accuracy",
        description="Accuracy ablations of quantattn against FP64 attention: one knob of the default variant "
        "changed at a time, on N(0,1) inputs and inputs with channel outliers. Runs the Triton kernels on a GPU "
        "and the PyTorch reference elsewhere. Defaults: GPU "
        f"{GPU_DEFAULTS}; CPU {CPU_DEFAULTS}.",
    )
    p.add_argument("--head-dims", type=head_dim, nargs="+", help="head dimensions (1..256)")
    p.add_argument("--seq-lens", type=_length, nargs="+", help="sequence lengths (queries = keys), e.g. 1K 4096")
    p.add_argument("--batch", type=positive_int)
    p.add_argument("--heads", type=positive_int)
    p.add_argument(
        "--shape", type=shape_arg, help="one shape B,H,N,d instead of --head-dims/--seq-lens/--batch/--heads"
    )
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--groups", nargs="+", metavar="GROUP", help=f"knobs to run (default all): {list(ABLATION_GROUPS)}")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help=f"instead of the groups, these ('all': every one): {list(ABLATIONS)}",
    )
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    p.add_argument("--with-reference", action="store_true", help="also run the reference on the same inputs")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows and metadata to this file")
    p.add_argument("--png", type=Path, metavar="PATH", help="draw the chart into this file (needs matplotlib)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write DIR/accuracy_ablation.{json,png}")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def metadata(argv, device: str, backends: list[str], dtype: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "quantattn": quantattn.__version__,
        "commit": commit,
        "command": "python -m quantattn.accuracy " + " ".join(argv),
        "backends": backends,
        "dtype": {"bf16": "bfloat16", "fp16": "float16"}[dtype],
        "layout": "HND",
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parser()
    args = cli.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    if args.shape:
        shapes = [Shape(*args.shape)]
    else:
        b, h = args.batch or defaults["batch"], args.heads or defaults["heads"]
        shapes = [Shape(b, h, n, d) for d in args.head_dims or defaults["head_dims"]
                  for n in args.seq_lens or defaults["seq_lens"]]  # fmt: skip
    largest = max(shapes, key=lambda s: attention_run_bytes(s.batch, s.heads, s.seq_len, s.seq_len, s.head_dim))
    need = attention_run_bytes(largest.batch, largest.heads, largest.seq_len, largest.seq_len, largest.head_dim)
    b, h, n, d = largest.batch, largest.heads, largest.seq_len, largest.head_dim
    problem = check_fits(need, torch.device(device), f"B={b}, H={h}, N={n}, d={d}")
    if problem:
        cli.error(problem)
    if args.variants == ["all"]:
        args.variants = list(ABLATIONS)
    if args.variants:
        unknown = [v for v in args.variants if v not in ABLATIONS]
        if unknown:
            cli.error(f"unknown variants {unknown}; known: {list(ABLATIONS)}")
        groups = _variants_group(args.variants)
    else:
        unknown = [g for g in args.groups or () if g not in ABLATION_GROUPS]
        if unknown:
            cli.error(f"unknown groups {unknown}; known: {list(ABLATION_GROUPS)}")
        groups = {g: ABLATION_GROUPS[g] for g in args.groups or ABLATION_GROUPS}
    backend = args.backend if args.backend != "auto" else ("triton" if device == "cuda" else "reference")
    backends = [backend] + (["reference"] if args.with_reference and backend != "reference" else [])
    start = time.perf_counter()

    def progress(msg):
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="quantattn: CPU tensors")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        rows = ablation_rows(groups, shapes, device, backends, causal=args.causal, dtype=dtype, progress=progress)
    meta = metadata(argv, device, backends, args.dtype)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(f"quantattn accuracy ablation against FP64 attention: backend {backend}, device {meta['device']}, "
          f"{args.dtype} inputs{', causal' if args.causal else ''}; 'outliers': per-channel offsets in Q, K, V\n")  # fmt: skip
    print("## Relative L1 (normal / outliers)\n")
    print(format_summary(rows))
    print("\n## Every metric\n")
    print(format_tables(rows))
    json_path, png_path = args.json, args.png
    if args.out:
        json_path = json_path or args.out / "accuracy_ablation.json"
        png_path = png_path or args.out / "accuracy_ablation.png"
    doc = {"format": "quantattn-accuracy-ablation/1", "metadata": meta,
           "groups": {g: [s.label for s in settings] for g, settings in groups.items()}, "rows": rows}  # fmt: skip
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {json_path}")
    if png_path:
        from quantattn.accuracy.chart import plot

        try:
            print(f"wrote {plot(rows, png_path, _title(meta))}")
        except ImportError as exc:
            print(f"no chart: {exc}", file=sys.stderr)
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(
            f"error: {r['setting']} ({r['backend']}, d={r['head_dim']}, N={r['seq_len']}): {r['error']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _title(meta: dict) -> str:
    return f"quantattn ablation vs FP64 | {meta['device']} | {', '.join(meta['backends'])} | {meta['date'][:10]}"
