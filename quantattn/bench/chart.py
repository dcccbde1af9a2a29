"""The papers' bar chart, drawn from a result JSON: TOPS per sequence length, one bar per implementation,
one panel per (head_dim, causal).

Each bar is the whole call (solid); for implementations with a kernel-only time, a lighter bar behind it
reaches the kernel-only TOPS, so the gap between the two is what quantization and launches cost.
matplotlib is optional (quantattn[bench]); without it `plot` raises ImportError and the CLI says so.
"""

from __future__ import annotations

from pathlib import Path

from quantattn.bench.cases import causal_label, format_seq_len
from quantattn.bench.report import load, panels

KERNEL_ALPHA = 0.35


def plot(json_path, png_path, title: str | None = None) -> Path:
    """Draw the chart of the result(s) in json_path (a path or a list of paths, merged) into png_path."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(f"the benchmark chart needs matplotlib (pip install matplotlib): {exc}") from exc

    result = load(json_path)
    boxes = [p for p in panels(result) if any(_speed_of(result, *p))]
    if not boxes:
        raise ValueError(f"{json_path}: no speed measurements to plot")
    names = [n for n, info in result["implementations"].items() if info.get("available")]
    names = [n for n in names if any(r["implementation"] == n and "tops" in r for r in result["speed"])]
    head_dims = sorted({d for d, _ in boxes})
    causals = sorted({c for _, c in boxes})
    seq_lens_all = sorted({r["seq_len"] for r in result["speed"]})
    panel_width = max(6.0, 0.17 * len(seq_lens_all) * max(1, len(names)) + 1.5)
    fig = Figure(figsize=(panel_width * len(causals), 3.8 * len(head_dims) + 0.8), layout="constrained")
    axes = fig.subplots(len(head_dims), len(causals), squeeze=False)
    colors = _colors(len(names))
    for row, head_dim in enumerate(head_dims):
        for col, causal in enumerate(causals):
            ax = axes[row][col]
            if (head_dim, causal) not in boxes:
                ax.set_visible(False)
                continue
            _panel(ax, result, head_dim, causal, names, colors)
    meta = result.get("metadata", {})
    shape = _shape(result)
    fig.suptitle(
        title or " | ".join(s for s in (meta.get("device"), shape, "bf16, HND", (meta.get("date") or "")[:10]) if s),
        fontsize=11,
    )
    handles = [Patch(color=colors[i], label=n) for i, n in enumerate(names)]
    handles += [
        Patch(facecolor="0.3", label="solid: whole call"),
        Patch(facecolor="0.3", alpha=KERNEL_ALPHA, label="light: kernel only (quantized K/V)"),
    ]
    ncol = max(1, min(len(handles), 6, int(panel_width * len(causals) // 2.3)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    return png_path


def _speed_of(result, head_dim, causal):
    return [r for r in result["speed"] if r["head_dim"] == head_dim and r["causal"] == causal and "tops" in r]


def _panel(ax, result, head_dim, causal, names, colors):
    recs = _speed_of(result, head_dim, causal)
    seq_lens = sorted({r["seq_len"] for r in recs})
    tops = {(r["seq_len"], r["implementation"], r["timing"]): r["tops"] for r in recs}
    slot = 0.85 / max(1, len(names))
    top = max(r["tops"] for r in recs)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * slot for j in range(len(seq_lens))]
        kernel = [tops.get((n, name, "kernel")) for n in seq_lens]
        whole = [tops.get((n, name, "whole")) for n in seq_lens]
        for x, k in zip(xs, kernel, strict=True):
            if k is not None:
                ax.bar(x, k, slot, color=colors[i], alpha=KERNEL_ALPHA, linewidth=0)
                ax.text(x, k + top * 0.01, _label(k), ha="center", va="bottom", rotation=90, fontsize=5.5, color="0.4")
        for x, w, k in zip(xs, whole, kernel, strict=True):
            if w is not None:
                ax.bar(x, w, slot, color=colors[i], linewidth=0)
                if k is None or k - w > 0.08 * top:  # else the kernel-only label would sit on it
                    ax.text(x, w + top * 0.01, _label(w), ha="center", va="bottom", rotation=90, fontsize=5.5)
    ax.set_xticks(range(len(seq_lens)), [format_seq_len(n) for n in seq_lens])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TOPS")
    ax.set_ylim(0, top * 1.18)
    ax.set_title(f"head_dim {head_dim}, causal {causal_label(causal)}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _shape(result):
    shapes = sorted({(r.get("batch"), r.get("heads")) for r in result["speed"]})
    return f"B={shapes[0][0]}, H={shapes[0][1]}" if len(shapes) == 1 and shapes[0][0] is not None else ""
