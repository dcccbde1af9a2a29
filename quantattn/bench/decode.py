"""Decode speed: quantattn.sageattn_decode on a quantized KV cache against torch SDPA on the bf16 K/V.

    python -m quantattn.bench.decode                  # B=8, Hq=32, Hkv=8, d=128, bf16, Nq 1 16, 4K..128K keys
    python -m quantattn.bench.decode --quick          # 4K 32K keys, fewer repeats
    python -m quantattn.bench.decode --device cpu     # a functional self-test on tiny shapes; numbers mean nothing

Decoding is memory-bound: the table gives microseconds per call, the bytes each call must read (K and V
once per kv head, plus q and the output) over its time (GB/s), and the speedup over the fastest SDPA
backend that accepts the call (cuDNN, flash, efficient, through torch.nn.attention.sdpa_kernel). SDPA
gets grouped-query K/V with enable_gqa=True where the backend takes it, else K/V expanded to the query
heads once, outside the timing (the JSON says which; its bytes still count the kv heads only). Each
implementation is timed eagerly (the host launches every call) and replayed from a CUDA graph (the
GPU's time alone); the speedup uses the graph times where both have one. `append` of one token to the
cache is timed too. CUDA events, median of repeats (quantattn/bench/timing.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

from quantattn.bench import timing
from quantattn.bench.cases import format_seq_len, parse_seq_len
from quantattn.bench.environment import run_metadata

EXIT_NO_GPU = 2
FORMAT = "quantattn-decode/1"
DEFAULT_OUT = Path("bench/results")
SEQ_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_SEQ_LENS = (4096, 32768)
NQS = (1, 16)
SDPA_BACKENDS = ("cudnn", "flash", "efficient")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantattn.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--nq", type=int, nargs="+", default=list(NQS), help="query tokens per call (default 1 16)")
    p.add_argument(
        "--seq-lens", type=parse_seq_len, nargs="+", metavar="N",
        help="keys in the cache, e.g. 4K 128K (default 4K 8K 16K 32K 64K 128K; --quick: 4K 32K)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="4K and 32K keys, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help=f"least timed calls (default {timing.MIN_REPEATS})")
    p.add_argument("--no-graphs", action="store_true", help="time eager calls only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--json", type=Path, default=None, help="output file (default OUT/<date>_decode_<gpu>.json)")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: a functional self-test of the benchmark (reference backend, tiny shapes); its numbers mean nothing",
    )  # fmt: skip
    return p


def settings_from(args: argparse.Namespace) -> dict:
    for name in ("batch", "heads", "kv_heads", "head_dim"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    for nq in args.nq:
        if not 1 <= nq <= 16:
            raise SystemExit(f"--nq takes 1 to 16 query tokens, got {nq}")
    seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else SEQ_LENS)
    repeats = args.repeats or (10 if args.quick else timing.MIN_REPEATS)
    return dict(
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, nqs=list(args.nq),
        seq_lens=list(seq_lens), min_repeats=repeats, graphs=not args.no_graphs and args.device == "cuda",
        device=args.device, dtype="bfloat16", layout="HND",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Bytes a call must read and write


def cache_bytes_read(b: int, hkv: int, n: int, d: int) -> int:
    """INT8 K and its per-token scale, FP8 V of the full 64-token blocks and their per-channel scales,
    the 16-bit tail, the smoothing vector."""
    full, tail = n // 64, n % 64
    return b * hkv * (n * (d + 4) + full * 64 * d + full * d * 4 + tail * d * 2 + d * 4)


def bf16_kv_bytes(b: int, hkv: int, n: int, d: int) -> int:
    return b * hkv * n * d * 2 * 2


def io_bytes(b: int, hq: int, nq: int, d: int) -> int:
    return 2 * b * hq * nq * d * 2  # q read, output written (bf16)


# ----------------------------------------------------------------------------------------------------
# Measuring


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def _sdpa_call(name: str, q, k, v):
    """A zero-argument SDPA call on `name`'s backend, and how it reads GQA; (None, reason) if it refuses."""
    from torch.nn.attention import sdpa_kernel

    F = torch.nn.functional
    group = q.shape[1] // k.shape[1]
    tries = [("enable_gqa", k, v, {"enable_gqa": True})] if group > 1 else [("same heads", k, v, {})]
    if group > 1:
        tries.append(("expanded", None, None, {}))
    reasons = []
    for how, kk, vv, kw in tries:
        if kk is None:
            kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        try:
            with sdpa_kernel(_sdpa_backend(name)):
                F.scaled_dot_product_attention(q, kk, vv, **kw)

            def call(kk=kk, vv=vv, kw=kw):
                with sdpa_kernel(_sdpa_backend(name)):
                    return F.scaled_dot_product_attention(q, kk, vv, **kw)

            return call, how
        except (RuntimeError, TypeError, ValueError) as exc:
            reasons.append(f"{how}: {str(exc).splitlines()[0][:160]}")
            del kk, vv
    return None, "; ".join(reasons)


def _graphed(fn, device: str):
    """fn captured in a CUDA graph (after a warm-up call), as a replay function; None if capture fails."""
    if device != "cuda":
        return None, "no CUDA graphs on the CPU"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except Exception as exc:  # noqa: BLE001  a backend that cannot be captured is reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _time_us(fn, settings) -> dict:
    t = timing.measure(fn, [()], min_repeats=settings["min_repeats"], device=settings["device"])
    return {"median_us": t.median_ms * 1e3, "p25_us": t.p25_ms * 1e3, "p75_us": t.p75_ms * 1e3, "repeats": t.repeats}


def _rel_l1(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum())


def measure_case(settings: dict, nq: int, n: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Every implementation on one (Nq, keys) case; returns (speed records, append record)."""
    import quantattn

    dev = settings["device"]
    b, hq, hkv, d = settings["batch"], settings["heads"], settings["kv_heads"], settings["head_dim"]
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, device=dev).bfloat16()
    k = torch.randn(b, hkv, n, d, generator=g, device=dev).bfloat16()
    v = torch.randn(b, hkv, n, d, generator=g, device=dev).bfloat16()
    backend = "auto" if dev == "cuda" else "reference"
    cache = quantattn.QuantizedKVCache.from_kv(k, v, capacity=n + 4096, backend=backend)
    case = dict(nq=nq, n_keys=n, batch=b, heads=hq, kv_heads=hkv, head_dim=d)
    io = io_bytes(b, hq, nq, d)
    records = []

    def decode():
        return quantattn.sageattn_decode(q, cache, backend=backend)

    ours = decode()
    impls = [("quantattn", decode, cache_bytes_read(b, hkv, n, d) + io, {"cache_nbytes": cache.nbytes})]
    refused = []
    for name in SDPA_BACKENDS:
        call, how = _sdpa_call(name, q, k, v)
        if call is None:
            refused.append({**case, "impl": f"sdpa-{name}", "unavailable": how})
            continue
        impls.append((f"sdpa-{name}", call, bf16_kv_bytes(b, hkv, n, d) + io, {"gqa": how}))
    for name, fn, nbytes, extra in impls:
        rec = {**case, "impl": name, "bytes": nbytes, **extra}
        try:
            if name != "quantattn":
                rec["rel_l1_quantattn_vs_this"] = _rel_l1(ours, fn())
            rec["eager"] = _time_us(fn, settings)
            if settings["graphs"]:
                replay, why = _graphed(fn, dev)
                rec["graph"] = _time_us(replay, settings) if replay else {"error": why}
        except Exception as exc:  # noqa: BLE001  one failing implementation must not end the run
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        for mode in ("eager", "graph"):
            if "median_us" in rec.get(mode, {}):
                rec[mode]["gbps"] = nbytes / (rec[mode]["median_us"] * 1e-6) / 1e9
        records.append(rec)
    records += refused
    _add_speedups(records)

    k1, v1 = k[:, :, :1].clone(), v[:, :, :1].clone()
    append = {**case, "impl": "quantattn.append(1 token)"}
    try:
        append["eager"] = _time_us(lambda: cache.append(k1, v1), settings)
    except Exception as exc:  # noqa: BLE001
        append["error"] = f"{type(exc).__name__}: {exc}"
    return records, append


def _add_speedups(records: list[dict]) -> None:
    """speedup of quantattn over the fastest SDPA backend, per timing mode."""
    ours = next((r for r in records if r["impl"] == "quantattn"), None)
    if ours is None:
        return
    for mode in ("eager", "graph"):
        times = [r[mode]["median_us"] for r in records if r["impl"] != "quantattn" and "median_us" in r.get(mode, {})]
        if times and "median_us" in ours.get(mode, {}):
            best = min(times)
            ours[mode]["speedup_vs_best_sdpa"] = best / ours[mode]["median_us"]
            ours[mode]["best_sdpa"] = next(
                r["impl"] for r in records if "median_us" in r.get(mode, {}) and r[mode]["median_us"] == best
            )


# ----------------------------------------------------------------------------------------------------
# Output


def format_table(result: dict) -> str:
    lines = [f"{'Nq':>3} {'keys':>5} {'implementation':<26} {'eager us':>9} {'graph us':>9} {'GB/s':>7} {'speedup':>8}"]
    for r in result["speed"] + result["append"]:
        eager, graph = r.get("eager", {}), r.get("graph", {})
        best = graph if "median_us" in graph else eager
        cells = [
            f"{r['nq']:>3}", f"{format_seq_len(r['n_keys']):>5}", f"{r['impl']:<26}",
            f"{eager['median_us']:>9.1f}" if "median_us" in eager else f"{'-':>9}",
            f"{graph['median_us']:>9.1f}" if "median_us" in graph else f"{'-':>9}",
            f"{best['gbps']:>7.0f}" if "gbps" in best else f"{'-':>7}",
            f"{best['speedup_vs_best_sdpa']:>7.2f}x" if "speedup_vs_best_sdpa" in best else f"{'':>8}",
        ]  # fmt: skip
        note = r.get("unavailable") or r.get("error") or (f"gqa: {r['gqa']}" if "gqa" in r else "")
        lines.append(" ".join(cells) + (f"  {note[:90]}" if note else ""))
    return "\n".join(lines)


def collect_metadata(argv: list[str], settings: dict, date: dt.datetime) -> dict:
    return {
        **run_metadata("quantattn.bench.decode", argv, date, on_gpu=settings["device"] == "cuda"),
        "settings": settings,
        "bytes": "quantattn: INT8 K + scales, FP8 V + block scales, 16-bit tail; SDPA: bf16 K and V of the kv "
        "heads; both plus q and the output",
    }


def default_json_path(out: Path, date: dt.datetime, device_name: str) -> Path:
    from quantattn.bench.report import slug

    return out / f"{date:%Y-%m-%d_%H%M%S}_decode_{slug(device_name.replace('NVIDIA ', ''))}.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "python -m quantattn.bench.decode measures decode speed and needs a CUDA GPU: torch.cuda.is_available() "
            f"is False (torch {torch.__version__}, built with CUDA {torch.version.cuda}). Nothing was measured. "
            "`--device cpu` runs a functional self-test on tiny shapes.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    settings = settings_from(args)
    date = dt.datetime.now().astimezone()
    meta = collect_metadata(argv, settings, date)
    result = {"format": FORMAT, "metadata": meta, "speed": [], "append": []}
    print(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | B={settings['batch']} "
        f"Hq={settings['heads']} Hkv={settings['kv_heads']} d={settings['head_dim']} bf16"
    )
    for nq in settings["nqs"]:
        for n in settings["seq_lens"]:
            speed, append = measure_case(settings, nq, n)
            result["speed"] += speed
            result["append"].append(append)
            if settings["device"] == "cuda":
                torch.cuda.empty_cache()
    print(format_table(result))
    path = args.json or default_json_path(args.out, date, meta["device"])
    from quantattn.bench.report import write_json

    write_json(result, path)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
