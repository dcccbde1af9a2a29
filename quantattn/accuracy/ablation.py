"""The papers' ablations: one knob of the default variant changed at a time, against FP64 attention.

Each group of ABLATION_GROUPS compares the settings of one knob (QK precision, scale granularity, smooth
K, smooth Q, PV precision, PV accumulator, smooth V, FP16 accumulators) with everything else as in
quantattn's default (SageAttention2-8b: INT8 QK per token, FP8 PV with two-level accumulation, smooth
K), plus the papers' variants and torch SDPA in the input dtype for scale. Every setting runs on
N(0, 1) inputs and on inputs with the channel outliers of real models (quantattn.metrics), at each
head_dim and sequence length asked for, through the Triton kernels on a GPU or the reference
elsewhere. Metrics against FP64 attention of the same bf16 inputs: cosine similarity, relative L1,
RMSE and the worst row's relative L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantattn import guards, metrics
from quantattn.accuracy.speeds import SPEEDS
from quantattn.api import sageattn
from quantattn.config import SAGE1, SAGE1_FP16ACC, SAGE2_4B, SAGE2_8B, SAGE2PP, QuantConfig
from quantattn.reference import attention_fp64

INPUT_KINDS = ("normal", "outliers")
METRICS = ("cosine", "rel_l1", "rmse", "worst_row")


@dataclass(frozen=True)
class Setting:
    label: str
    config: QuantConfig | None  # None: torch SDPA in the input dtype
    variant: str | None = None  # the name in quantattn.VARIANTS (and SPEEDS), when it is one


def _s(label, cfg, variant=None):
    return Setting(label, cfg, variant)


SDPA = _s("torch SDPA (input dtype)", None, "sdpa")
INT8_FP16PV = QuantConfig(pv_dtype="fp16", pv_accum="fp32")

ABLATION_GROUPS: dict[str, tuple[Setting, ...]] = {
    "QK precision": (
        _s("INT8 (sage2-8b)", SAGE2_8B, "sage2-8b"),
        _s("INT4, smooth Q (sage2-4b)", SAGE2_4B, "sage2-4b"),
        _s("INT4, no smooth Q", QuantConfig(qk_dtype="int4")),
    ),
    "QK granularity (INT8)": (
        _s("per tensor", QuantConfig(qk_granularity="per_tensor")),
        _s("per block (64 rows / 64 keys)", QuantConfig(qk_granularity="per_block")),
        _s("per warp (16 rows / 64 keys)", QuantConfig(qk_granularity="per_warp")),
        _s("per thread (MMA fragment)", QuantConfig(qk_granularity="per_thread")),
        _s("per token (default)", SAGE2_8B, "sage2-8b"),
    ),
    "smooth K": (
        _s("on (default)", SAGE2_8B, "sage2-8b"),
        _s("off", QuantConfig(smooth_k=False)),
    ),
    "smooth Q": (
        _s("INT8, off (default)", SAGE2_8B, "sage2-8b"),
        _s("INT8, on", QuantConfig(smooth_q=True)),
        _s("INT4, off", QuantConfig(qk_dtype="int4")),
        _s("INT4, on (sage2-4b)", SAGE2_4B, "sage2-4b"),
    ),
    "PV precision": (
        _s("FP8 E4M3 (default)", SAGE2_8B, "sage2-8b"),
        _s("FP16", INT8_FP16PV),
        _s("BF16", QuantConfig(pv_dtype="bf16", pv_accum="fp32")),
    ),
    "PV accumulator (FP8)": (
        _s("two-level FP32 (default)", SAGE2_8B, "sage2-8b"),
        _s("one level, FP22", QuantConfig(pv_accum="fp32")),
    ),
    "smooth V": (
        _s("off, two-level (default)", SAGE2_8B, "sage2-8b"),
        _s("on, two-level", QuantConfig(smooth_v=True)),
        _s("off, one level FP22", QuantConfig(pv_accum="fp32")),
        _s("on, one level FP22", QuantConfig(pv_accum="fp32", smooth_v=True)),
    ),
    "FP16 accumulators": (
        _s("FP8 PV, FP32 (sage2-8b)", SAGE2_8B, "sage2-8b"),
        _s("FP8 PV, FP16 partials (sage2++)", SAGE2PP, "sage2++"),
        _s("FP16 PV, FP32 (sage1)", SAGE1, "sage1"),
        _s("FP16 PV, FP16 (sage1-fp16acc)", SAGE1_FP16ACC, "sage1-fp16acc"),
    ),
    "variants": (
        _s("sage1", SAGE1, "sage1"),
        _s("sage1-fp16acc", SAGE1_FP16ACC, "sage1-fp16acc"),
        _s("sage2-8b", SAGE2_8B, "sage2-8b"),
        _s("sage2-4b", SAGE2_4B, "sage2-4b"),
        _s("sage2++", SAGE2PP, "sage2++"),
        SDPA,
    ),
}

# The flat list of the first accuracy tool (quantattn.accuracy before the ablation tables), kept for `--variants`.
ABLATIONS = {
    "sage1": SAGE1,
    "sage1-fp16acc": SAGE1_FP16ACC,
    "sage2-8b": SAGE2_8B,
    "sage2-4b": SAGE2_4B,
    "sage2++": SAGE2PP,
    "sage2-8b per_thread": QuantConfig(qk_granularity="per_thread"),
    "sage2-8b per_warp": QuantConfig(qk_granularity="per_warp"),
    "sage2-8b per_block": QuantConfig(qk_granularity="per_block"),
    "sage2-8b per_tensor": QuantConfig(qk_granularity="per_tensor"),
    "sage2-8b fp22 (one level)": QuantConfig(pv_accum="fp32"),
    "sage2-8b smooth_v": QuantConfig(smooth_v=True),
    "sage2-8b smooth_q": QuantConfig(smooth_q=True),
    "sage2-8b no smooth_k": QuantConfig(smooth_k=False),
    "sage2-4b per_thread": QuantConfig(qk_dtype="int4", smooth_q=True, qk_granularity="per_thread"),
    "sage1 bf16 PV": QuantConfig(qk_granularity="per_block", pv_dtype="bf16", pv_accum="fp32"),
}


def groups_of_variants(names) -> dict[str, tuple[Setting, ...]]:
    """One group holding the named entries of ABLATIONS (the first tool's `--variants`)."""
    return {"selected": tuple(_s(n, ABLATIONS[n], n if n in SPEEDS else None) for n in names)}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"d={self.head_dim}, N={self.seq_len}"


def error_metrics(out: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return {**metrics.accuracy_metrics(out, truth), "worst_row": metrics.worst_row_rel_l1(out, truth)}


def run_setting(setting: Setting, q, k, v, causal: bool, backend: str) -> torch.Tensor:
    if setting.config is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return sageattn(q, k, v, is_causal=causal, config=setting.config, backend=backend)


def ablation_rows(groups, shapes, device, backends, causal=False, seed=0, dtype=torch.bfloat16, progress=None):
    """One row per (group, setting, backend, shape, input kind). A configuration that several groups
    share runs once per input; every backend sees the same inputs. "ran" names the configuration that
    actually ran where a guard routed the setting (quantattn.guards: FP16 PV on bf16 inputs runs BF16 PV)."""
    rows = []
    for shape in shapes:
        for kind in INPUT_KINDS:
            q, k, v = metrics.make_qkv(shape.batch, shape.heads, shape.seq_len, shape.head_dim, device=device,
                                       outliers=kind == "outliers", seed=seed, dtype=dtype)  # fmt: skip
            truth = attention_fp64(q, k, v, is_causal=causal, chunk=_fp64_chunk(shape))
            done: dict = {}
            for group, settings in groups.items():
                for setting in settings:
                    for backend in backends if setting.config is not None else ("torch",):
                        key = (setting.config, backend)
                        if key not in done:
                            try:
                                done[key] = error_metrics(run_setting(setting, q, k, v, causal, backend), truth)
                            except Exception as exc:  # one failing setting must not hide the others' figures
                                done[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                            if progress:
                                progress(f"{shape.label} {kind} {setting.label} {backend}")
                        ran = guards.routed_config(dtype, setting.config) if setting.config is not None else None
                        rows.append({
                            "group": group, "setting": setting.label, "variant": setting.variant,
                            "config": setting.config.name if setting.config is not None else "sdpa",
                            "ran": _changes(setting.config, ran) if ran is not None and ran != setting.config else None,
                            "backend": backend, "head_dim": shape.head_dim, "seq_len": shape.seq_len,
                            "batch": shape.batch, "heads": shape.heads, "causal": causal, "inputs": kind,
                            **done[key],
                        })  # fmt: skip
    return rows


def _fp64_chunk(shape: Shape) -> int:
    """Query rows per FP64 score block, so that one block stays near 256 MiB."""
    per_row = max(1, shape.batch * shape.heads * shape.seq_len * 8)
    return max(16, min(1024, (256 << 20) // per_row))


def _fmt(row, key, spec):
    if row is None:
        return ""
    if "error" in row:
        return "error"
    return format(row[key], spec)


def _label(rows, group, setting) -> str:
    ran = next((r["ran"] for r in rows if (r["group"], r["setting"]) == (group, setting) and r.get("ran")), None)
    return f"{setting} [guard: ran {ran}]" if ran else setting


def _changes(asked: QuantConfig, ran: QuantConfig) -> str:
    fields = [f for f in asked.__dataclass_fields__ if getattr(asked, f) != getattr(ran, f)]
    return ", ".join(f"{f}={getattr(ran, f)}" for f in fields)


def format_tables(rows: list[dict]) -> str:
    """One markdown table per shape: settings grouped by knob, both input kinds side by side."""
    out = []
    shapes = list(dict.fromkeys((r["head_dim"], r["seq_len"], r["batch"], r["heads"]) for r in rows))
    by = {(r["group"], r["setting"], r["backend"], r["head_dim"], r["seq_len"], r["inputs"]): r for r in rows}
    multi_backend = len({r["backend"] for r in rows if r["backend"] != "torch"}) > 1
    for d, n, b, h in shapes:
        out.append(f"\n### head_dim {d}, N {n} (B={b}, H={h})\n")
        head = ["knob", "setting"] + (["backend"] if multi_backend else [])
        for kind in INPUT_KINDS:
            head += [f"{kind} cosine", f"{kind} rel L1", f"{kind} RMSE", f"{kind} worst row"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        seen = list(dict.fromkeys((r["group"], r["setting"], r["backend"]) for r in rows))
        last_group = None
        for group, setting, backend in seen:
            cells = [group if group != last_group else "", _label(rows, group, setting)]
            cells += [backend] if multi_backend else []
            last_group = group
            for kind in INPUT_KINDS:
                r = by.get((group, setting, backend, d, n, kind))
                cells += [_fmt(r, "cosine", ".6f"), _fmt(r, "rel_l1", ".4f"), _fmt(r, "rmse", ".2e"),
                          _fmt(r, "worst_row", ".4f")]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out).lstrip("\n")


def format_summary(rows: list[dict], speeds: dict[str, float] | None = None) -> str:
    """Relative L1 (normal / outliers) of every setting at every shape, and the measured speed of the
    settings that are whole variants."""
    speeds = SPEEDS if speeds is None else speeds
    shapes = list(dict.fromkeys((r["head_dim"], r["seq_len"]) for r in rows))
    by = {(r["group"], r["setting"], r["backend"], r["head_dim"], r["seq_len"], r["inputs"]): r for r in rows}
    head = ["knob", "setting", "backend"] + [f"d={d} N={n}" for d, n in shapes] + ["TOPS (H100)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last_group = None
    for group, setting, backend in dict.fromkeys((r["group"], r["setting"], r["backend"]) for r in rows):
        variant = next(r["variant"] for r in rows if (r["group"], r["setting"]) == (group, setting))
        cells = [group if group != last_group else "", _label(rows, group, setting), backend]
        last_group = group
        for d, n in shapes:
            pair = [by.get((group, setting, backend, d, n, kind)) for kind in INPUT_KINDS]
            cells.append(" / ".join(_fmt(r, "rel_l1", ".4f") for r in pair))
        cells.append(f"{speeds[variant]:.0f}" if variant in speeds else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
