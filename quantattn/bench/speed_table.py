"""Speed tables (quantattn.backends.speed_table) from `python -m quantattn.bench` results.

For every quantattn implementation of the results that names its backend (the Triton variants,
sage2-8b-hopper) and every measured (head_dim, causal, N): the ratio of its whole-call median time to the
fastest torch SDPA backend's in the same run (same file, same B and H). SDPA is marked faster where the
ratio exceeds 1 + margin. Several result files of one GPU model may be given: a point measured in several
runs takes the mean of its runs' ratios. Pure Python: runs anywhere, on saved results.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from quantattn.backends import speed_table as T
from quantattn.bench.impls import HOPPER, HOPPER_VARIANT, SDPA_NAMES
from quantattn.config import VARIANTS
from quantattn.guards import routed_config

RULE = (
    "ratio = quantattn whole-call median time / the fastest torch SDPA backend's in the same run (mean over runs); "
    "sdpa_faster where ratio > 1 + margin; sdpa_fastest: that SDPA backend (torch's name), which the fallback runs"
)


def _config_of(name: str):
    """The QuantConfig a benchmark implementation ran, as the dispatch sees it for bf16 inputs."""
    variant = HOPPER_VARIANT if name == HOPPER else name
    cfg = VARIANTS.get(variant)
    return None if cfg is None else routed_config(torch.bfloat16, cfg)


def _run_ratios(doc: dict) -> dict[tuple, tuple[float, str]]:
    """(backend, implementation, head_dim, causal, N) -> (whole-call time / best SDPA time, that SDPA
    backend's torch name), for one run."""
    whole = [r for r in doc["speed"] if r.get("timing") == "whole" and "median_ms" in r]
    best_sdpa: dict[tuple, tuple[float, str]] = {}
    for r in whole:
        sdpa = SDPA_NAMES.get(r["implementation"])
        if sdpa is not None and doc["implementations"].get(r["implementation"], {}).get("kind") == "sdpa":
            key = (r["head_dim"], r["causal"], r["seq_len"], r.get("batch"), r.get("heads"))
            best_sdpa[key] = min(best_sdpa.get(key, (float("inf"), "")), (r["median_ms"], sdpa))
    ratios = {}
    for r in whole:
        info = doc["implementations"].get(r["implementation"], {})
        if info.get("kind") != "quantattn" or not info.get("backend"):
            continue
        best = best_sdpa.get((r["head_dim"], r["causal"], r["seq_len"], r.get("batch"), r.get("heads")))
        if best and best[0] > 0:
            key = (info["backend"], r["implementation"], r["head_dim"], r["causal"], r["seq_len"])
            ratios[key] = (r["median_ms"] / best[0], best[1])
    return ratios


def table_from_results(docs: list[dict], sources: list[str] | None = None, margin: float = 0.0) -> dict:
    """A speed-table document from one or more benchmark results of one GPU model."""
    if not docs:
        raise ValueError("no benchmark results given")
    sources = sources or [f"result {i}" for i in range(len(docs))]
    devices = {d["metadata"].get("device") for d in docs}
    if len(devices) != 1 or None in devices:
        raise ValueError(f"the results must come from one GPU model, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.startswith("cpu"):
        raise ValueError("these results were measured on the CPU (--device cpu): they say nothing about a GPU")
    runs: dict[tuple, list[tuple[float, str]]] = {}
    for doc in docs:
        for key, measured in _run_ratios(doc).items():
            runs.setdefault(key, []).append(measured)
    grouped: dict[tuple, dict[int, tuple[float, str]]] = {}
    for (backend, impl, head_dim, causal, n), values in runs.items():
        fastest = [sdpa for _, sdpa in values]
        grouped.setdefault((backend, impl, head_dim, causal), {})[n] = (
            statistics.fmean(ratio for ratio, _ in values),
            max(dict.fromkeys(fastest), key=fastest.count),  # the SDPA backend most runs found fastest
        )
    entries = []
    for (backend, impl, head_dim, causal), points in sorted(grouped.items(), key=lambda kv: tuple(map(str, kv[0]))):
        cfg = _config_of(impl)
        if cfg is None:
            continue  # an implementation this quantattn does not know (older results): no entry
        seq_lens = sorted(points)
        entries.append({
            "backend": backend, "implementation": impl, "config_name": cfg.name, "config": asdict(cfg),
            "head_dim": head_dim, "causal": causal, "seq_lens": seq_lens,
            "ratios": [round(points[n][0], 4) for n in seq_lens],
            "sdpa_faster": [points[n][0] > 1.0 + margin for n in seq_lens],
            "sdpa_fastest": [points[n][1] for n in seq_lens],
        })  # fmt: skip
    if not entries:
        raise ValueError("the results hold no quantattn whole call next to a torch SDPA time of the same run")
    meta = docs[0]["metadata"]
    return {
        "format": T.FORMAT,
        "kind": T.KIND,
        "device": device,
        "compute_capability": meta.get("compute_capability"),
        "rule": RULE,
        "margin": margin,
        "sources": [
            {
                "file": src,
                **{k: d["metadata"].get(k) for k in ("date", "torch", "triton", "cuda", "git_commit", "command")},
            }
            for src, d in zip(sources, docs, strict=True)
        ],  # fmt: skip
        "entries": entries,
    }


def default_path(device_name: str) -> Path:
    """Where `auto` looks first for this GPU model's table (quantattn.backends.speed_table.user_dir)."""
    return T.user_dir() / f"{T.normalized_name(device_name)}.json"


def resolve_path(target: Path | None, device_name: str) -> Path:
    """--write-speed-table's argument: nothing (the user location), a folder (the GPU's file name in it)
    or a .json file."""
    if target is None:
        return default_path(device_name)
    target = Path(target).expanduser()
    if target.suffix == ".json":
        return target
    return target / f"{T.normalized_name(device_name)}.json"


def write_table(table: dict, path: Path) -> Path:
    T.check_document(table, str(path))
    T.SpeedTable(table, str(path))  # every entry loads (its config is valid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
    T.reload()  # this process's next auto call reads it
    return path


def describe(table: dict) -> str:
    """One line per entry: where SDPA takes the calls."""
    lines = [f"speed table for {table['device']} ({RULE}; margin {table['margin']})"]
    for e in table["entries"]:
        spans = T.sdpa_spans(e["seq_lens"], e["sdpa_faster"], "", e["sdpa_fastest"])
        where = "; ".join(s.reason.lstrip(", ") for s in spans) or "never"
        ratios = " ".join(f"{T.seq_len_text(n)}:{r:.2f}" for n, r in zip(e["seq_lens"], e["ratios"], strict=True))
        lines.append(
            f"  {e['backend']:<7} {e['implementation']:<15} d={e['head_dim']:<3} causal {'on ' if e['causal'] else 'off'}"
            f"  SDPA at {where}  (ratios {ratios})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m quantattn.bench.speed_table RESULTS.json ... [--out PATH]`: the table of saved results."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m quantattn.bench.speed_table",
        description="Write the speed table that backend='auto' reads, from `python -m quantattn.bench` results "
        "(one GPU model; each file one run). The shipped tables: --out quantattn/backends/speed_tables/",
    )
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS.json")
    p.add_argument(
        "--out", type=Path,
        help="a .json file or a folder (the GPU's file name in it); default: where auto looks first "
        "($QUANTATTN_SPEED_TABLE_DIR or ~/.cache/quantattn/speed_tables/)",
    )  # fmt: skip
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="SDPA only where the whole call is slower by more than this (0.05: 5%%)",
    )
    args = p.parse_args(argv)
    if args.margin < 0:
        p.error(f"--margin must be >= 0, got {args.margin}")
    from quantattn.bench import report

    try:
        docs = [report.load(path) for path in args.results]
        table = table_from_results(docs, [str(path) for path in args.results], args.margin)
    except (OSError, ValueError, KeyError) as exc:
        print(f"no speed table written: {exc}", file=sys.stderr)
        return 1
    path = write_table(table, resolve_path(args.out, table["device"]))
    print(f"{describe(table)}\nspeed table: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
