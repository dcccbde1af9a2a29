"""`python -m quantattn.bench`: the benchmark protocol (quantattn/bench/cases.py) in one run (needs a CUDA GPU).

Every quantattn variant on the Triton kernels (whole call and kernel only), the default variant on the
native Hopper kernel (sage2-8b-hopper, where quantattn.hopper runs: sm_90), torch SDPA with the cuDNN and
the flash backend, and the official `sageattention` package where it is installed; TOPS per (head_dim,
causal, N), and cosine / relative L1 against FP64 attention next to them. Writes <out>/<date>_<tag>.json
(every number and the run's metadata) and a .png chart drawn from it; `--from-json` redraws table and
chart from saved results, on any machine, merging several files into one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from quantattn.bench import cases as C
from quantattn.bench import report, timing
from quantattn.bench.environment import positive_arg, run_metadata, seq_len_arg
from quantattn.bench.impls import ALL_NAMES, build
from quantattn.bench.runner import BrokenDevice, Runner, Settings
from quantattn.bench.workloads import workload_arg
from quantattn.cli_args import attention_run_bytes, check_fits, head_dim, non_negative_int

DEFAULT_OUT = Path("bench/results")
QUICK_TIMING = {"min_repeats": 30, "max_repeats": 100, "target_s": 0.1}
FULL_TIMING = {"min_repeats": timing.MIN_REPEATS, "max_repeats": timing.MAX_REPEATS, "target_s": timing.TARGET_S}
EXIT_NO_GPU = 2
EXIT_FAILED = 1
SPEED_TABLE_DEFAULT = Path("<auto's location>")  # --write-speed-table without a PATH


def _implementations(text: str) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown implementation {', '.join(unknown)}; choose from {', '.join(ALL_NAMES)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantattn.bench",
        description="Speed (TOPS, whole call and kernel only) and accuracy of quantattn's variants (Triton kernels, "
        "and the native Hopper kernel where it runs) next to torch SDPA (cuDNN, flash) and the official "
        "SageAttention, by the benchmark protocol (quantattn/bench/cases.py). Needs a CUDA GPU, except with --from-json.",
        epilog="Protocol defaults: bf16, HND, B=4, H=32, head_dim 64 128, N 1K..32K, causal off and on; CUDA-event "
        f"timing, {timing.WARMUPS} warm-ups after a compile call, median of >= {timing.MIN_REPEATS} repeats. "
        "--quick: head_dim 128, N 1K 4K 16K, causal off.",
    )
    p.add_argument("--head-dims", type=head_dim, nargs="+", metavar="D", help="head dimensions (default: 64 128)")
    p.add_argument(
        "--seq-lens",
        type=seq_len_arg,
        nargs="+",
        metavar="N",
        help="sequence lengths, e.g. 1K 4K 4096 (default: 1K 2K 4K 8K 16K 32K)",
    )
    p.add_argument("--batch", type=positive_arg, default=C.BATCH, help=f"batch size (default {C.BATCH})")
    p.add_argument("--heads", type=positive_arg, default=C.HEADS, help=f"attention heads (default {C.HEADS})")
    p.add_argument("--causal", choices=("off", "on", "both"), help="causal masking (default: both; --quick: off)")
    p.add_argument(
        "--variants", type=_implementations, nargs="+", metavar="NAME",
        help=f"implementations to run, from: {', '.join(ALL_NAMES)} (default: all)",
    )  # fmt: skip
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy slice")
    p.add_argument(
        "--quick", action="store_true", help="short run: head_dim 128, N 1K 4K 16K, causal off, fewer repeats"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--tag", help="name part of the output files (default: the GPU's name, plus '_quick')")
    p.add_argument(
        "--warmups",
        type=non_negative_int,
        default=timing.WARMUPS,
        help=f"warm-up calls after the compile call (default {timing.WARMUPS})",
    )
    p.add_argument(
        "--repeats",
        type=positive_arg,
        help=f"least number of timed calls (default {timing.MIN_REPEATS}; short calls get more)",
    )
    p.add_argument(
        "--stop-after", type=seconds_arg, metavar="SECONDS",
        help="measure nothing new after this many seconds; the rest is marked skipped and the table, JSON and chart "
        "are still written (for a command with a time limit)",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-seq-len",
        type=seq_len_arg,
        default=C.ACCURACY_SEQ_LEN,
        help="N of the accuracy slice [1, 8, N, d] (default 4K)",
    )
    p.add_argument(
        "--from-json", type=Path, nargs="+", metavar="FILE",
        help="measure nothing: print the table of saved results and draw their chart (several files are merged and the "
        "merge is saved too); no GPU needed",
    )  # fmt: skip
    p.add_argument(
        "--write-speed-table", nargs="?", const=SPEED_TABLE_DEFAULT, type=Path, metavar="PATH",
        help="also write the speed table that backend='auto' reads (where torch SDPA beat quantattn's whole call) "
        "from this run's results, or with --from-json from the given files (each one run, of one GPU model); PATH: "
        "a .json file or a folder (default: the location auto reads first, $QUANTATTN_SPEED_TABLE_DIR or "
        "~/.cache/quantattn/speed_tables/)",
    )  # fmt: skip
    p.add_argument(
        "--workloads", action="store_true",
        help="instead of the protocol grid: the real models' attention shapes (quantattn/bench/workloads.py: Flux, SD3.5, Wan2.1, "
        "HunyuanVideo, Llama-3-8B, Qwen2.5-7B), quantattn's whole call (the Hopper kernel where it runs) against "
        "cuDNN SDPA and backend='auto', back-to-back timing; JSON and a markdown table",
    )  # fmt: skip
    p.add_argument(
        "--workload", type=workload_arg, action="append", metavar="B,Hq,Hkv,N,d,causal",
        help="a workload of your own, e.g. 1,32,8,16K,128,1 (repeatable); with --workloads it is added to the "
        "built-in list, alone only the given ones run",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: a functional check of the benchmark itself with wall-clock timing and tiny shapes (kernel-only "
        "timing needs TRITON_INTERPRET=1); its numbers mean nothing",
    )  # fmt: skip
    return p


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, got {text}")
    return value


def memory_problem(settings: Settings) -> str | None:
    """Whether the largest case (its rotated input sets, outputs and quantized K/V) or the accuracy slice
    [1, 8, N, d] with its FP64 truth would not fit: checked before anything is allocated."""
    device = torch.device(settings.device)
    d, n = max(settings.head_dims), max(settings.seq_lens)
    case = C.Case(d, False, n, settings.batch, settings.heads)
    need = attention_run_bytes(settings.batch, settings.heads, n, n, d, input_sets=case.input_sets, fp64=False)
    if settings.accuracy:
        n_acc = settings.accuracy_seq_len
        need = max(need, attention_run_bytes(1, 8, n_acc, n_acc, d))
    return check_fits(need, device, f"the largest case (B={settings.batch}, H={settings.heads}, N={n}, d={d})")


def settings_from(args: argparse.Namespace) -> Settings:
    t = QUICK_TIMING if args.quick else FULL_TIMING
    min_repeats = args.repeats if args.repeats is not None else t["min_repeats"]
    return Settings(
        head_dims=tuple(args.head_dims or (C.QUICK_HEAD_DIMS if args.quick else C.HEAD_DIMS)),
        seq_lens=tuple(args.seq_lens or (C.QUICK_SEQ_LENS if args.quick else C.SEQ_LENS)),
        causals=C.parse_causal(args.causal) if args.causal else (C.QUICK_CAUSALS if args.quick else C.CAUSALS),
        batch=args.batch,
        heads=args.heads,
        accuracy=not args.no_accuracy,
        accuracy_seq_len=args.accuracy_seq_len,
        warmups=args.warmups,
        min_repeats=min_repeats,
        max_repeats=max(min_repeats, t["max_repeats"]),
        target_s=t["target_s"],
        stop_after_s=args.stop_after,
        device=args.device,
    )


def chosen_names(args: argparse.Namespace) -> list[str]:
    if not args.variants:
        return list(ALL_NAMES)
    return [n for group in args.variants for n in group]


# ------------------------------------------------------------------------------------------------


def collect_metadata(argv: list[str], settings: Settings, tag: str, date: dt.datetime) -> dict:
    meta = run_metadata("quantattn.bench", argv, date, on_gpu=settings.device == "cuda")
    return {
        **meta,
        "tag": tag,
        "argv": [sys.executable, *sys.argv],
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "dtype": "bfloat16",
        "layout": "HND",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "ops": "4*B*H*N^2*d, halved when causal; TOPS = ops / median time",
    }


def default_tag(args: argparse.Namespace) -> str:
    if args.tag:
        return args.tag
    base = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu-selftest"
    base = base.replace("NVIDIA ", "")
    return f"{base}_quick" if args.quick else base


def draw(json_paths, png_path: Path) -> None:
    from quantattn.bench.chart import plot

    try:
        plot(json_paths, png_path)
        print(f"chart: {png_path}")
    except ImportError as exc:
        print(f"chart skipped: {exc}. Redraw it later from the JSON: python -m quantattn.bench --from-json FILE")
    except Exception as exc:  # noqa: BLE001  the data is saved; a chart problem must not hide that
        print(f"chart failed ({type(exc).__name__}: {exc}); the JSON holds every number")


def write_speed_table(target: Path, docs: list[dict], sources: list[str]) -> int:
    """--write-speed-table: the table of these runs (quantattn.bench.speed_table), at the chosen path."""
    from quantattn.bench import speed_table

    try:
        table = speed_table.table_from_results(docs, sources)
    except ValueError as exc:
        print(f"no speed table written: {exc}", file=sys.stderr)
        return EXIT_FAILED
    path = speed_table.resolve_path(None if target == SPEED_TABLE_DEFAULT else target, table["device"])
    speed_table.write_table(table, path)
    print(f"\n{speed_table.describe(table)}\nspeed table: {path}")
    return 0


def from_json(args: argparse.Namespace) -> int:
    import json

    from quantattn.bench import workloads as W

    docs = [json.loads(Path(p).read_text()) for p in args.from_json]
    if any(d.get("kind") == W.KIND for d in docs):  # --workloads results: their tables
        print("\n\n".join(W.format_markdown(d) if d.get("kind") == W.KIND else f"{p}: not a workloads result"
                            for p, d in zip(args.from_json, docs, strict=True)))  # fmt: skip
        return 0
    if args.write_speed_table is not None:
        docs = [report.load(p) for p in args.from_json]  # one run each: ratios are taken within a run
        if write_speed_table(args.write_speed_table, docs, [str(p) for p in args.from_json]):
            return EXIT_FAILED
    result = report.load(args.from_json)
    print(report.format_table(result))
    if len(args.from_json) > 1:
        stem = report.output_stem(dt.datetime.now().astimezone(), args.tag or "merged")
        json_path = args.out / f"{stem}.json"
        report.write_json(result, json_path)
        print(f"\nmerged results: {json_path}")
        draw(json_path, args.out / f"{stem}.png")
    else:
        stem = args.from_json[0].stem + (f"_{report.slug(args.tag)}" if args.tag else "")
        print()
        draw(args.from_json[0], args.out / f"{stem}.png")
    return 0


# protocol-grid options that mean nothing to --workloads / --workload (each workload names its own shape)
GRID_OPTIONS = {
    "head_dims": "--head-dims", "seq_lens": "--seq-lens", "causal": "--causal", "variants": "--variants",
    "quick": "--quick", "from_json": "--from-json", "write_speed_table": "--write-speed-table",
    "no_accuracy": "--no-accuracy", "stop_after": "--stop-after", "repeats": "--repeats",
}  # fmt: skip


def workload_conflicts(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot run the workloads mode, or None."""
    given = [flag for dest, flag in GRID_OPTIONS.items() if getattr(args, dest) not in (None, False)]
    given += [flag for flag, value, default in (("--batch", args.batch, C.BATCH), ("--heads", args.heads, C.HEADS))
              if value != default]  # fmt: skip
    if given:
        return f"{', '.join(given)} cannot be combined with --workloads/--workload (each workload names its shape)"
    if args.workloads and args.device == "cpu":
        return "--workloads runs real models' sizes: CUDA only (--device cpu takes small --workload shapes)"
    return None


def run_workloads(args: argparse.Namespace, argv: list[str]) -> int:
    from quantattn.bench import workloads as W

    chosen = W.chosen(args.workloads, args.workload)
    date = dt.datetime.now().astimezone()
    tag = default_tag(args) + "_workloads"
    meta = run_metadata("quantattn.bench", argv, date, on_gpu=args.device == "cuda")
    meta.update(tag=tag, dtype="bfloat16", layout="HND", warmups=max(0, args.warmups))
    json_path = args.out / f"{report.output_stem(date, tag)}.json"
    print(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
        f"commit {(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''}\n"
        f"{len(chosen)} workload(s), bf16 HND; results: {json_path}",
        flush=True,
    )
    doc = W.new_document(meta)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a job's time limit: still print what was measured
    try:
        W.run(doc, chosen, lambda: report.write_json(doc, json_path), args.device, max(0, args.warmups))
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        report.write_json(doc, json_path)
    print(f"\nresults: {json_path}\n")
    print(W.format_markdown(doc))
    failed = any(
        "error" in res for rec in doc["workloads"] for name, res in rec["results"].items() if name != "sdpa-cudnn"
    )
    return EXIT_FAILED if failed or len(doc["workloads"]) < len(chosen) else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    workloads = args.workloads or args.workload
    if workloads:
        conflict = workload_conflicts(args)
        if conflict:
            p.error(conflict)
    if args.from_json:
        return from_json(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "python -m quantattn.bench measures speed and needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Nothing was measured.\n"
            "Without a GPU: `python -m quantattn.bench --from-json FILE` redraws saved results; "
            "`python -m quantattn` checks accuracy on the CPU.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    if workloads:
        return run_workloads(args, argv)
    settings = settings_from(args)
    problem = memory_problem(settings)
    if problem:
        parser().error(problem)
    impls = build(chosen_names(args), device=settings.device)
    date = dt.datetime.now().astimezone()
    tag = default_tag(args)
    meta = collect_metadata(argv, settings, tag, date)
    stem = report.output_stem(date, tag)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"

    print(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
        f"commit {(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''} | "
        f"sources {meta['source_sha256']}"
    )
    print(
        f"head_dim {' '.join(map(str, settings.head_dims))} | N {' '.join(map(C.format_seq_len, settings.seq_lens))} | "
        f"causal {' '.join(map(C.causal_label, settings.causals))} | B={settings.batch} H={settings.heads} bf16 HND | "
        f"{settings.warmups} warm-ups, >= {settings.min_repeats} repeats"
    )
    for impl in impls:
        state = "" if impl.available else f"  -- NOT RUN: {impl.unavailable}"
        print(f"  {impl.name:<15} {impl.description}{state}")
    print(f"results: {json_path}", flush=True)

    result = report.new_result(meta, {impl.name: impl.as_dict() for impl in impls})
    runner = Runner(settings, impls, result, lambda: report.write_json(result, json_path))
    broken = None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a job's time limit: still print what was measured
    try:
        runner.run()
    except BrokenDevice as exc:
        broken = exc
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(report.format_table(result))
    print(f"\nresults: {json_path}")
    draw(json_path, png_path)
    failed = any(
        "error" in r
        for r in result["speed"] + result["accuracy"]
        if result["implementations"][r["implementation"]]["kind"] == "quantattn"
    )
    if broken is not None:
        print(f"the run stopped early: {broken}", file=sys.stderr)
    if args.write_speed_table is not None and settings.device == "cuda":
        failed = write_speed_table(args.write_speed_table, [result], [str(json_path)]) != 0 or failed
    return EXIT_FAILED if failed or broken is not None else 0
