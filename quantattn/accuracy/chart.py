"""The ablation chart, drawn from the rows (or the JSON file) of an ablation run: relative L1 against
FP64 attention of every setting, grouped by knob, one bar per sequence length, one panel per
(head_dim, input kind). matplotlib is optional (quantattn[bench]); without it `plot` raises ImportError."""

from __future__ import annotations

import json
from pathlib import Path

from quantattn.accuracy.ablation import INPUT_KINDS


def plot(rows_or_path, png_path, title: str | None = None) -> Path:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError as exc:
        raise ImportError(f"the accuracy chart needs matplotlib (pip install matplotlib): {exc}") from exc

    doc = json.loads(Path(rows_or_path).read_text()) if isinstance(rows_or_path, (str, Path)) else None
    rows = doc["rows"] if doc is not None else rows_or_path
    backend = next((r["backend"] for r in rows if r["backend"] != "torch"), "torch")
    rows = [r for r in rows if r["backend"] in (backend, "torch") and "rel_l1" in r]
    if not rows:
        raise ValueError("no accuracy figures to plot")
    labels = list(dict.fromkeys((r["group"], r["setting"]) for r in rows))
    head_dims = sorted({r["head_dim"] for r in rows})
    seq_lens = sorted({r["seq_len"] for r in rows})
    by = {(r["group"], r["setting"], r["head_dim"], r["seq_len"], r["inputs"]): r["rel_l1"] for r in rows}
    fig = Figure(figsize=(7.0 * len(INPUT_KINDS), 0.22 * len(labels) * len(head_dims) + 1.6), layout="constrained")
    axes = fig.subplots(len(head_dims), len(INPUT_KINDS), squeeze=False)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    height = 0.8 / len(seq_lens)
    for i, d in enumerate(head_dims):
        for j, kind in enumerate(INPUT_KINDS):
            ax = axes[i][j]
            for s, n in enumerate(seq_lens):
                ys = [y + (s - (len(seq_lens) - 1) / 2) * height for y in range(len(labels))]
                xs = [by.get((g, lab, d, n, kind)) for g, lab in labels]
                pts = [(y, x) for y, x in zip(ys, xs, strict=True) if x is not None and x > 0]
                ax.barh([p[0] for p in pts], [p[1] for p in pts], height=height, color=colors[s % len(colors)],
                        label=f"N={n}")  # fmt: skip
            ax.set_yticks(range(len(labels)), [f"{g}: {lab}" if k == 0 or labels[k - 1][0] != g else lab
                                               for k, (g, lab) in enumerate(labels)], fontsize=6)  # fmt: skip
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(axis="x", which="both", alpha=0.3)
            ax.set_title(f"head_dim {d}, {kind} inputs", fontsize=9)
            ax.set_xlabel("relative L1 vs FP64 (log)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    meta = (doc or {}).get("metadata", {})
    fig.suptitle(title or f"quantattn ablation, {backend} backend, {meta.get('device', '')}".rstrip(", "), fontsize=10)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path
