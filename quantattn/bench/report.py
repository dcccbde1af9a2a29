"""Benchmark results as data: the JSON document, its file names, merging, and the text table.

The document (format 1):
  metadata:        date, tag, device, versions, git commit, the exact command line, the settings
  implementations: name -> {kind, description, config, available, unavailable, kernel_only, ...}
  speed:           one record per (head_dim, causal, seq_len, implementation, timing), timing being
                   "whole" (the public call, bf16 in, bf16 out) or "kernel" (attention on quantized K/V);
                   median_ms, min_ms, p25_ms, p75_ms, repeats, warmups, input_sets, ops, tops, or "error",
                   or "skipped" when a time limit stopped the run first
  accuracy:        one record per (head_dim, causal, implementation, inputs) with cosine, rel_l1, rmse
                   against FP64 attention on the slice "shape", or "error"
Everything here is pure Python: tables and charts can be redrawn from the data on any machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from quantattn.bench.cases import causal_label, format_seq_len

FORMAT = 1
TIMINGS = ("whole", "kernel")


def new_result(metadata: dict, implementations: dict) -> dict:
    return {"format": FORMAT, "metadata": metadata, "implementations": implementations, "speed": [], "accuracy": []}


# ------------------------------------------------------------------------------------------------
# Files


def slug(text: str) -> str:
    """A file-name-safe version of text: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "run"


def output_stem(date: _dt.datetime, tag: str) -> str:
    return f"{date:%Y-%m-%d_%H%M%S}_{slug(tag)}"


def write_json(result: dict, path: Path) -> None:
    """Write atomically, so that a run killed mid-write leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def load(paths) -> dict:
    """One result, or several merged (later files win where they measured the same thing)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    docs = [json.loads(p.read_text()) for p in paths]
    for p, doc in zip(paths, docs, strict=True):
        if doc.get("format") != FORMAT:
            raise ValueError(f"{p}: not a quantattn benchmark result of format {FORMAT}")
    return docs[0] if len(docs) == 1 else merge(docs, [str(p) for p in paths])


def _speed_key(r):
    return (r["head_dim"], r["causal"], r["seq_len"], r["implementation"], r["timing"])


def _accuracy_key(r):
    return (r["head_dim"], r["causal"], r["implementation"], r["inputs"])


def merge(docs: list[dict], sources: list[str] | None = None) -> dict:
    implementations, speed, accuracy = {}, {}, {}
    for doc in docs:
        for name, info in doc["implementations"].items():
            if info.get("available") or name not in implementations:
                implementations[name] = info
        for r in doc["speed"]:
            if "skipped" not in r or _speed_key(r) not in speed:
                speed[_speed_key(r)] = r
        for r in doc["accuracy"]:
            accuracy[_accuracy_key(r)] = r
    metadata = dict(docs[0]["metadata"])
    metadata["merged_from"] = [
        {"source": src, **{k: d["metadata"].get(k) for k in ("date", "tag", "device", "command")}}
        for src, d in zip(sources or [None] * len(docs), docs, strict=True)
    ]
    result = new_result(metadata, implementations)
    result["speed"] = list(speed.values())
    result["accuracy"] = list(accuracy.values())
    return result


# ------------------------------------------------------------------------------------------------
# The table

CELL = 5  # TOPS as integers, as the README's tables (the JSON keeps every digit)


def _cell(record: dict | None) -> str:
    if record is None:
        return "-"
    if "error" in record:
        return "err"
    if "skipped" in record:
        return "skip"
    value = record["tops"]
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def panels(result: dict) -> list[tuple[int, bool]]:
    """(head_dim, causal) pairs present in the result, sorted."""
    keys = {(r["head_dim"], r["causal"]) for r in result["speed"]} | {
        (r["head_dim"], r["causal"]) for r in result["accuracy"]
    }
    return sorted(keys)


def format_table(result: dict) -> str:
    """One block per (head_dim, causal); a row per implementation: TOPS per N for the whole call and the
    kernel alone, then cosine and relative L1 against FP64 for normal and outlier inputs."""
    speed = {_speed_key(r): r for r in result["speed"]}
    accuracy = {_accuracy_key(r): r for r in result["accuracy"]}
    meta = result.get("metadata", {})
    lines = []
    header = meta.get("device", "unknown device")
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "cuda") if meta.get(k))
    lines.append(
        f"{header}" + (f" | {versions}" if versions else "") + (f" | {meta['date']}" if meta.get("date") else "")
    )
    for name, info in result["implementations"].items():
        if not info.get("available"):
            lines.append(f"{name}: {info.get('unavailable')}")
    names = list(result["implementations"])
    width = max([len(n) for n in names] + [len("implementation")])
    for head_dim, causal in panels(result):
        recs = [r for r in result["speed"] if r["head_dim"] == head_dim and r["causal"] == causal]
        seq_lens = sorted({r["seq_len"] for r in recs})
        shape = _shape_note(recs)
        acc_recs = [r for r in result["accuracy"] if r["head_dim"] == head_dim and r["causal"] == causal]
        acc_shape = next((r["shape"] for r in acc_recs if "shape" in r), None)
        lines.append("")
        lines.append(
            f"head_dim {head_dim}, causal {causal_label(causal)}{shape}: TOPS = 4*B*H*N^2*d"
            + (" / 2" if causal else "")
            + " / median time"
            + (f"; accuracy vs FP64 on [{', '.join(map(str, acc_shape))}]" if acc_shape else "")
        )
        group = max(len(seq_lens) * (CELL + 1) - 1, len("kernel only TOPS"))
        cols = [" " * width, "whole call TOPS".ljust(group), "kernel only TOPS".ljust(group)]
        if acc_recs:
            cols += ["normal inputs".ljust(17), "channel outliers"]
        lines.append("  ".join(cols).rstrip())
        ns = " ".join(format_seq_len(n).rjust(CELL) for n in seq_lens).ljust(group)
        cols = ["implementation".ljust(width), ns, ns]
        if acc_recs:
            cols += ["  cosine   rel L1", "  cosine   rel L1"]
        lines.append("  ".join(cols).rstrip())
        errors = []
        for name in names:
            info = result["implementations"][name]
            if not info.get("available"):
                continue
            row = [name.ljust(width)]
            for timing in TIMINGS:
                cells = [speed.get((head_dim, causal, n, name, timing)) for n in seq_lens]
                row.append(" ".join(_cell(c).rjust(CELL) for c in cells).ljust(group))
                errors += [(timing, c) for c in cells if c is not None and "error" in c]
            if acc_recs:
                for kind in ("normal", "outliers"):
                    a = accuracy.get((head_dim, causal, name, kind))
                    if a is None:
                        row.append(f"{'-':>8} {'-':>8}")
                    elif "error" in a:
                        row.append(f"{'err':>8} {'err':>8}")
                        errors.append(("accuracy", a))
                    else:
                        row.append(f"{a['cosine']:8.6f} {a['rel_l1']:8.4f}")
            lines.append("  ".join(row).rstrip())
        lines += _error_lines(errors)
    skipped = sum(1 for r in result["speed"] if "skipped" in r)
    if skipped:
        lines.append(f"\n{skipped} measurement(s) skipped: the time limit (--stop-after) was reached.")
    return "\n".join(lines)


def _error_lines(errors: list[tuple[str, dict]]) -> list[str]:
    """One line per (implementation, message): '! sdpa-cudnn whole N=1K 2K, accuracy normal: <message>'."""
    grouped: dict[tuple[str, str], dict[str, list[str]]] = {}
    for what, rec in errors:
        where = format_seq_len(rec["seq_len"]) if "seq_len" in rec else str(rec.get("inputs"))
        places = grouped.setdefault((rec["implementation"], _first_line(rec["error"])), {})
        places.setdefault(what, []).append(where)
    lines = []
    for (name, message), places in grouped.items():
        where = ", ".join(f"{what} {'N=' if what != 'accuracy' else ''}{' '.join(ws)}" for what, ws in places.items())
        lines.append(f"  ! {name} {where}: {message}")
    return lines


def _shape_note(recs: list[dict]) -> str:
    shapes = sorted({(r.get("batch"), r.get("heads")) for r in recs})
    if len(shapes) == 1 and shapes[0][0] is not None:
        return f" (B={shapes[0][0]}, H={shapes[0][1]}, bf16, HND)"
    return ""


def _first_line(text: str, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
