"""Scaling of sequence-parallel quantattn: the time of one call on 1 GPU against P GPUs, per mode.

    python -m quantattn.distributed.bench --out DIR            # 2 GPUs of this host (NCCL)
    python -m quantattn.distributed.bench --device cpu ...     # self-test on gloo processes (numbers mean nothing)

One process per GPU (quantattn.distributed.testing.LocalGroup, NCCL with NVLink multicast off:
NCCL_NVLS_ENABLE=0). For every sequence length and mask: rank 0 times quantattn.sageattn on the whole
sequence while the other ranks wait (the 1-GPU time), then every rank times each mode on its shards
(the P-GPU time: the slowest rank's, from a barrier to the end of its call, host included).
speedup = t1 / tP, efficiency = speedup / P. Each mode's gathered output is compared with the 1-GPU
output (Ulysses must equal it; ring attention quantizes per K/V block and differs slightly).
With one GPU the P-GPU rows cannot run; the modes then run on a group of one (their overhead over a
plain call) and the JSON lists what was not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

FORMAT = "quantattn-distributed/1"
MODES = ("ulysses", "ring")


def _parser() -> argparse.ArgumentParser:
    from quantattn.bench.cases import parse_seq_len

    p = argparse.ArgumentParser(prog="python -m quantattn.distributed.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world-size", type=int, default=2, help="GPUs (or CPU processes) to spread over (default 2)")
    p.add_argument("--seq-lens", nargs="+", type=parse_seq_len, default=[64 * 1024, 128 * 1024, 256 * 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", choices=("off", "on", "both"), default="both")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one untimed call (default 3)")
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    p.add_argument("--tag", default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds the whole measurement may take (default 900)")
    return p


# ----------------------------------------------------------------------------------------------------
# On every rank


def _time_ms(fn, repeats: int, device: torch.device, across_ranks: bool):
    """(median over `repeats` of the time of fn(), the result of a first untimed call);
    across_ranks: the slowest rank's time, from a barrier."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = fn()  # compilation, first-touch allocations
    samples = []
    for _ in range(repeats):
        sync()
        if across_ranks:
            dist.barrier()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        if across_ranks:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(elapsed.item() * 1e3)
    return statistics.median(samples), first


def _inputs(settings: dict, n: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(n)
    b, h, d = settings["batch"], settings["heads"], settings["head_dim"]
    hkv = settings["kv_heads"] or h
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    return tuple(torch.randn(b, heads, n, d, generator=g, device=device).to(dtype) for heads in (h, hkv, hkv))


def run_rank(settings: dict) -> dict:
    """Every measurement of the benchmark, on this rank; rank 0's return value holds the records."""
    if settings["device"] == "cpu":
        warnings.filterwarnings("ignore", message="quantattn: CPU tensors run the pure-PyTorch reference")
    device = torch.device("cuda", torch.cuda.current_device()) if settings["device"] == "cuda" else torch.device("cpu")
    records = []
    for n in settings["seq_lens"]:
        for causal in settings["causal"]:
            for record in _measure(settings, n, causal, device):
                records.append(record)
                if settings.get("partial_json"):  # what a later failure would otherwise lose
                    Path(settings["partial_json"]).write_text(json.dumps(records, indent=1) + "\n")
                print(f"[rank 0] {record}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"records": records}


def _measure(settings: dict, n: int, causal: bool, device: torch.device):
    """The 1-GPU call, then each mode, on one sequence length and mask; yields rank 0's records."""
    import quantattn
    from quantattn.distributed import gather_sequence, ring_attention, shard_sequence, ulysses_attention

    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = _inputs(settings, n, device)
    single, t1 = None, None
    if rank == 0:
        t1, single = _time_ms(lambda: quantattn.sageattn(q, k, v, is_causal=causal), settings["repeats"], device, False)
    dist.barrier()
    ring = functools.partial(ring_attention, zigzag=True)  # the layout shard_sequence gives it below
    modes = {"ulysses": (ulysses_attention, False), "ring": (ring, True)}
    for name in settings["modes"]:
        fn, zigzag = modes[name]
        local = [shard_sequence(t, rank, world, dim=2, zigzag=zigzag) for t in (q, k, v)]
        tp, out = _time_ms(lambda: fn(*local, is_causal=causal), settings["repeats"], device, True)  # noqa: B023
        gathered = gather_sequence(out, dim=2, zigzag=zigzag)
        if rank == 0:
            diff = (gathered.float() - single.float()).abs()  # float32: 4 bytes a value at 256K tokens
            yield {
                "mode": name, "world_size": world, "seq_len": n, "causal": causal, "t1_ms": t1, "tp_ms": tp,
                "speedup": t1 / tp, "efficiency": t1 / tp / world,
                "equal_to_single": bool(torch.equal(gathered, single)),
                "rel_l1_vs_single": float(diff.sum() / single.float().abs().sum()),
                "max_abs_vs_single": float(diff.max()),
            }  # fmt: skip
            del diff
        del out, gathered


# ----------------------------------------------------------------------------------------------------
# The launching process


def _metadata(argv: list[str], settings: dict, worker_env: dict) -> dict:
    from quantattn.bench.environment import run_metadata

    on_gpu = settings["device"] == "cuda"
    meta = run_metadata("quantattn.distributed.bench", argv, dt.datetime.now(), on_gpu=on_gpu)
    if on_gpu:
        meta["gpus_visible"] = torch.cuda.device_count()
    else:
        meta["device"] = f"cpu ({platform.machine()}), self-test on gloo: numbers mean nothing"
    return {
        **meta,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
        "worker_env": worker_env,
        "settings": settings,
        "dtype": "bfloat16" if settings["device"] == "cuda" else "float16",
        "layout": "HND",
        "variant": "quantattn default (sageattn with no options)",
        "timing": "median of repeats; one repeat = the slowest rank's time from a barrier to its call's end",
    }


def format_table(doc: dict) -> str:
    from quantattn.bench.cases import format_seq_len

    lines = [
        f"{'mode':8} {'P':>2} {'N':>6} {'causal':>6} {'1 GPU ms':>10} {'P GPUs ms':>10} {'speedup':>8} "
        f"{'effic.':>7} {'rel L1 vs 1 GPU':>16}"
    ]
    for r in doc["records"]:
        head = (
            f"{r['mode']:8} {r['world_size']:>2} {format_seq_len(r['seq_len']):>6} {'on' if r['causal'] else 'off':>6}"
        )
        if "error" in r:
            lines.append(f"{head} {r['error']}")
            continue
        same = " (equal)" if r.get("equal_to_single") else ""
        lines.append(
            f"{head} {r['t1_ms']:10.2f} {r['tp_ms']:10.2f} {r['speedup']:8.2f} {r['efficiency']:7.1%} "
            f"{r['rel_l1_vs_single']:9.2e}{same}"
        )
    lines += [f"not run: {why}" for why in doc["not_run"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from quantattn.distributed import bench as this  # by its module name, so that worker processes import it
    from quantattn.distributed.testing import LocalGroup

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    not_run = []
    world = args.world_size
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device visible; `--device cpu` runs the self-test on gloo processes", file=sys.stderr)
            return 2
        visible = torch.cuda.device_count()
        if visible < world:
            not_run.append(
                f"the {world}-GPU rows: {visible} GPU(s) visible; the modes ran on {visible} rank(s) instead "
                f"(with 1, their overhead over a plain call)"
            )
            world = visible
    settings = {
        "device": args.device,
        "seq_lens": args.seq_lens,
        "causal": [c == "on" for c in (("off", "on") if args.causal == "both" else (args.causal,))],
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "modes": args.modes,
        "repeats": args.repeats,
        "world_size": world,
        "partial_json": None,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        settings["partial_json"] = str(args.out / "distributed_partial.json")
    # NVLink multicast off: on a shared host it can take GPUs out of service
    env = {"NCCL_NVLS_ENABLE": "0"} if args.device == "cuda" else {"OMP_NUM_THREADS": "1"}
    backend = "nccl" if args.device == "cuda" else "gloo"
    started = time.perf_counter()
    with LocalGroup(world, backend, timeout_s=args.timeout, env=env) as group:
        rank0 = group.run(this.run_rank, settings)[0]
    doc = {
        "format": FORMAT,
        "metadata": _metadata(argv, settings, env),
        "records": rank0["records"],
        "not_run": not_run,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(format_table(doc))
    if args.out is not None:
        tag = args.tag or doc["metadata"]["device"].replace("NVIDIA ", "").split(" ")[0]
        path = args.out / f"{dt.datetime.now():%Y-%m-%d_%H%M%S}_distributed_{tag}_x{world}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        Path(settings["partial_json"]).unlink(missing_ok=True)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
