"""`python -m quantattn.bench --workloads`: real models' attention shapes against cuDNN, whole call, back to back.

Per workload (B, Hq, Hkv, N, d, causal; bf16, HND, Nq = Nk), in one run:
  - quantattn: the whole `sageattn` call, forced onto the native Hopper kernel where it runs, else
    backend="quantized" (auto's quantized kernel; never torch's SDPA, which backend="auto" may take);
  - sdpa-cudnn: torch SDPA restricted to cuDNN (grouped K/V heads with enable_gqa=True, or repeated outside
    the timing where cuDNN refuses that);
  - auto: `sageattn(backend="auto")`, and the path it took (torch SDPA by the speed table, or the kernel).
Timing ("same-run figures": every implementation timed in one run): CUDA events around groups of up to 20 back-to-back calls after a
compile call and warm-ups, the per-call time of each group, median over the groups; inputs rotate through
several sets where one set would stay in L2. Writes JSON (run metadata as the protocol benchmark's) and
prints a markdown table last.

Parsing, records and the table are pure Python (CPU tests); only `run` needs the GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from quantattn.bench import timing
from quantattn.bench.cases import MAX_SETS, MIN_SETS, ROTATE_BELOW_SEQ_LEN, ROTATION_BYTES, parse_seq_len
from quantattn.metrics import attention_ops
from quantattn.validation import MAX_HEAD_DIM

KIND = "quantattn workloads"
FORMAT = 1
CALLS_PER_GROUP = 20  # back-to-back calls between two events
MAX_GROUP_S = 0.5  # fewer calls per group for long calls
MIN_GROUPS, MAX_GROUPS = 10, 30
TARGET_S = 1.0  # timed seconds per (workload, implementation), within MIN_GROUPS..MAX_GROUPS
IMPLEMENTATIONS = ("quantattn", "sdpa-cudnn", "auto")


@dataclass(frozen=True)
class Workload:
    """One attention call of a model: q [batch, heads_q, seq_len, head_dim], k and v with heads_kv heads."""

    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    causal: bool

    @property
    def shape(self) -> str:
        heads = f"H{self.heads_q}" if self.heads_q == self.heads_kv else f"H{self.heads_q}/{self.heads_kv}"
        return f"B{self.batch} {heads} N{self.seq_len} d{self.head_dim}" + (" causal" if self.causal else "")

    @property
    def ops(self) -> float:
        return attention_ops(self.batch, self.heads_q, self.seq_len, self.seq_len, self.head_dim, self.causal)

    @property
    def set_bytes(self) -> int:
        """Bytes of one bf16 (q, k, v) set."""
        return 2 * self.batch * self.seq_len * self.head_dim * (self.heads_q + 2 * self.heads_kv)

    @property
    def input_sets(self) -> int:
        """Sets the timing rotates through (the protocol benchmark's rule: none once a set outgrows L2 by far)."""
        if self.seq_len >= ROTATE_BELOW_SEQ_LEN and self.set_bytes >= ROTATION_BYTES:
            return 1
        return max(MIN_SETS, min(MAX_SETS, math.ceil(ROTATION_BYTES / max(self.set_bytes, 1))))


# The real models the benchmark times (bf16 HND; a video model's N is its latent tokens, text included).
BUILTIN = (
    Workload("Flux 1024 px", 1, 24, 24, 4608, 128, False),
    Workload("SD3.5", 2, 24, 24, 4250, 64, False),
    Workload("Wan2.1-14B 480p", 1, 40, 40, 32760, 128, False),
    Workload("HunyuanVideo 720p", 1, 24, 24, 119056, 128, False),
    Workload("Llama-3-8B prefill 8K", 1, 32, 8, 8192, 128, True),
    Workload("Llama-3-8B prefill 32K", 1, 32, 8, 32768, 128, True),
    Workload("Qwen2.5-7B 4x2K", 4, 28, 4, 2048, 128, True),
)

_FIELDS = ("B", "Hq", "Hkv", "N", "d", "causal")
_TRUE, _FALSE = ("1", "true", "yes", "on", "causal"), ("0", "false", "no", "off")


def parse_workload(text: str) -> Workload:
    """'B,Hq,Hkv,N,d,causal' (N may be '4K'; causal 1/0, true/false, on/off) -> Workload; ValueError says
    which field is wrong."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != len(_FIELDS):
        raise ValueError(f"a workload is B,Hq,Hkv,N,d,causal (6 comma-separated fields), got {text!r}")
    values = {}
    for field, part in zip(_FIELDS[:5], parts[:5], strict=True):
        try:
            values[field] = parse_seq_len(part) if field == "N" else int(part)
        except ValueError:
            raise ValueError(f"workload {text!r}: {field} must be a positive integer, got {part!r}") from None
        if values[field] < 1:
            raise ValueError(f"workload {text!r}: {field} must be a positive integer, got {part!r}")
    causal = parts[5].lower()
    if causal not in _TRUE + _FALSE:
        raise ValueError(f"workload {text!r}: causal must be 1/0, true/false or on/off, got {parts[5]!r}")
    if values["Hq"] % values["Hkv"]:
        raise ValueError(f"workload {text!r}: Hq ({values['Hq']}) must be a multiple of Hkv ({values['Hkv']})")
    if values["d"] > MAX_HEAD_DIM:
        raise ValueError(f"workload {text!r}: d must be at most {MAX_HEAD_DIM}, got {values['d']}")
    b, hq, hkv, n, d = (values[f] for f in _FIELDS[:5])
    return Workload(f"custom {text.strip()}", b, hq, hkv, n, d, causal in _TRUE)


def workload_arg(text: str) -> Workload:
    """argparse type for --workload."""
    try:
        return parse_workload(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def chosen(builtin: bool, custom: Sequence[Workload] | None) -> list[Workload]:
    """--workloads runs the built-in list; each --workload adds one (alone, only those run)."""
    return [*(BUILTIN if builtin else ()), *(custom or ())]


# ---- timing ------------------------------------------------------------------------------------------


def time_back_to_back(
    fn: Callable[..., object],
    arg_sets: Sequence[tuple],
    *,
    warmups: int = timing.WARMUPS,
    device: str = "cuda",
    calls_per_group: int = CALLS_PER_GROUP,
    min_groups: int = MIN_GROUPS,
    max_groups: int = MAX_GROUPS,
    target_s: float = TARGET_S,
) -> dict:
    """Per-call time of fn over back-to-back groups (events around each group, never around one call)."""
    clock = timing.make_clock(device)
    estimate_s = timing.warm_up(fn, arg_sets, warmups, clock) * 1e-3 if warmups else 0.0
    per_group = calls_per_group
    if estimate_s > 0:
        per_group = max(1, min(calls_per_group, int(MAX_GROUP_S / estimate_s)))
    groups = max_groups if estimate_s <= 0 else math.ceil(target_s / (estimate_s * per_group))
    groups = max(min_groups, min(max_groups, groups))
    marks, call = [], warmups + 1
    for _ in range(groups):
        before = clock.mark()
        for _ in range(per_group):
            fn(*arg_sets[call % len(arg_sets)])
            call += 1
        marks.append((before, clock.mark()))
    clock.sync()
    per_call_us = sorted(clock.elapsed_ms(a, b) * 1e3 / per_group for a, b in marks)
    return {
        "us": statistics.median(per_call_us), "min_us": per_call_us[0], "max_us": per_call_us[-1],
        "groups": groups, "calls_per_group": per_group, "warmups": warmups,
    }  # fmt: skip


# ---- implementations ---------------------------------------------------------------------------------


def quantattn_backend(w: Workload, device: str) -> str:
    """ "hopper" where the native kernel runs this head_dim, else "quantized" (never torch's SDPA)."""
    if device != "cuda":
        return "quantized"
    from quantattn.bench.impls import hopper_unavailable

    if hopper_unavailable(device) is not None:
        return "quantized"
    from quantattn.hopper.launch import HEAD_DIMS

    return "hopper" if w.head_dim in HEAD_DIMS else "quantized"


def _sdpa_cudnn(w: Workload, device: str, sets):
    """(fn, arg sets, note): cuDNN SDPA (any SDPA on the CPU), GQA by enable_gqa or repeated K/V."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from quantattn.backends.sdpa import ORIGINAL_SDPA, SDPA_HAS_GQA

    restrict = (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) if device == "cuda" else contextlib.nullcontext
    gqa = w.heads_q != w.heads_kv

    def run(q, k, v, enable_gqa):
        with restrict():
            if enable_gqa:
                return ORIGINAL_SDPA(q, k, v, is_causal=w.causal, enable_gqa=True)
            return ORIGINAL_SDPA(q, k, v, is_causal=w.causal)

    if gqa and SDPA_HAS_GQA:
        try:
            q, k, v = sets[0]
            run(q, k, v, True)
            return run, [(q, k, v, True) for q, k, v in sets], "enable_gqa=True"
        except RuntimeError:
            pass  # cuDNN refuses grouped heads in this torch: repeat them, outside the timing
    if gqa:
        group = w.heads_q // w.heads_kv
        sets = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) for q, k, v in sets]
        return run, [(*s, False) for s in sets], "K/V heads repeated before timing"
    return run, [(*s, False) for s in sets], None


def _inputs(w: Workload, device: str):
    sets = []
    for i in range(w.input_sets):
        gen = torch.Generator(device=device).manual_seed(2000 + i)

        def draw(heads):
            shape = (w.batch, heads, w.seq_len, w.head_dim)
            return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)

        sets.append((draw(w.heads_q), draw(w.heads_kv), draw(w.heads_kv)))
    return sets


def measure(w: Workload, device: str = "cuda", warmups: int = timing.WARMUPS, log=print) -> dict:
    """One workload's record: every implementation timed on the same inputs (GPU, or small ones on the CPU)."""
    import quantattn
    from quantattn.backends.sdpa import fallbacks

    rec = {**asdict(w), "shape": w.shape, "ops": w.ops, "input_sets": w.input_sets, "results": {}}
    sets = _inputs(w, device)
    backend = quantattn_backend(w, device)
    refused = None
    if backend == "hopper":
        try:
            quantattn.sageattn(*sets[0], is_causal=w.causal, backend="hopper")
        except Exception as exc:  # noqa: BLE001  other failures are recorded when the call is timed
            if isinstance(exc, RuntimeError) and "cannot run this call" in str(exc):
                backend, refused = "quantized", str(exc)  # the Hopper backend refuses this shape

    def quantized(q, k, v):
        return quantattn.sageattn(q, k, v, is_causal=w.causal, backend=backend)

    def auto(q, k, v):
        return quantattn.sageattn(q, k, v, is_causal=w.causal, backend="auto")

    for name in IMPLEMENTATIONS:
        try:
            if name == "quantattn":
                res = time_back_to_back(quantized, sets, warmups=warmups, device=device)
                res["backend"] = backend
                if refused:
                    res["hopper_refused"] = refused
            elif name == "sdpa-cudnn":
                fn, arg_sets, note = _sdpa_cudnn(w, device, sets)
                res = time_back_to_back(fn, arg_sets, warmups=warmups, device=device)
                if note:
                    res["note"] = note
            else:
                before = sum(fallbacks.values())
                auto(*sets[0])
                took_sdpa = sum(fallbacks.values()) > before
                res = time_back_to_back(auto, sets, warmups=warmups, device=device)
                res["path"] = "torch SDPA" if took_sdpa else "quantattn kernel"
        except Exception as exc:  # noqa: BLE001  one failure must not end the run
            res = {"error": f"{type(exc).__name__}: {exc}".strip()}
            if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        rec["results"][name] = res
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()
    add_ratios(rec)
    log(format_row_text(rec))
    return rec


def add_ratios(rec: dict) -> dict:
    """speedup_vs_cudnn = cuDNN time / quantattn time (> 1: quantattn faster); auto_vs_best = auto's time
    over the faster of the two (1.0: auto chose well)."""
    r = rec["results"]
    q, c, a = (r.get(n, {}).get("us") for n in IMPLEMENTATIONS)
    rec["speedup_vs_cudnn"] = c / q if q and c else None
    rec["auto_vs_best"] = a / min(q, c) if a and q and c else None
    return rec


# ---- the document and the table ----------------------------------------------------------------------


def new_document(metadata: dict) -> dict:
    timing_info = {
        "calls_per_group": CALLS_PER_GROUP, "max_group_s": MAX_GROUP_S, "groups": [MIN_GROUPS, MAX_GROUPS],
        "target_s": TARGET_S, "statistic": "median over groups of (group time / calls in the group)",
    }  # fmt: skip
    return {"format": FORMAT, "kind": KIND, "metadata": {**metadata, "timing": timing_info}, "workloads": []}


def _us(res: dict | None) -> str:
    if not res:
        return "-"
    if "error" in res:
        return "error"
    return f"{res['us']:.0f}"


def format_row_text(rec: dict) -> str:
    r = rec["results"]
    speed = f"{rec['speedup_vs_cudnn']:.2f}x" if rec.get("speedup_vs_cudnn") else "-"
    return (
        f"{rec['name']} ({rec['shape']}): quantattn {_us(r.get('quantattn'))} us, cuDNN {_us(r.get('sdpa-cudnn'))} us, "
        f"{speed}; auto {_us(r.get('auto'))} us ({r.get('auto', {}).get('path', '-')})"
    )


def format_markdown(doc: dict) -> str:
    """The run's markdown table: one row per workload, then the errors. "auto / faster": auto's time over the
    faster of quantattn and cuDNN (about 1.00 when auto took the faster path)."""
    meta = doc.get("metadata", {})
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "cuda") if meta.get(k))
    lines = [
        f"Real models' attention shapes, {meta.get('device', 'unknown device')}"
        + (f" ({versions})" if versions else "")
        + ", bf16 HND, whole call, per-call time of back-to-back calls (median over groups)",
        "",
        "| workload | shape | quantattn µs | cuDNN µs | quantattn speed over cuDNN | auto µs (path) | auto / faster |",
        "|---|---|---|---|---|---|---|",
    ]
    errors = []
    for rec in doc["workloads"]:
        r = rec["results"]
        quant = r.get("quantattn", {})
        q_cell = _us(quant) + (f" ({quant['backend']})" if "backend" in quant else "")
        cudnn = r.get("sdpa-cudnn", {})
        c_cell = _us(cudnn) + (f" ({cudnn['note']})" if "note" in cudnn else "")
        speed = f"{rec['speedup_vs_cudnn']:.2f}×" if rec.get("speedup_vs_cudnn") else "-"
        auto = r.get("auto", {})
        a_cell = _us(auto) + (f" ({auto['path']})" if "path" in auto else "")
        best = f"{rec['auto_vs_best']:.2f}" if rec.get("auto_vs_best") else "-"
        lines.append(f"| {rec['name']} | {rec['shape']} | {q_cell} | {c_cell} | {speed} | {a_cell} | {best} |")
        errors += [f"{rec['name']}, {n}: {res['error']}" for n, res in r.items() if "error" in res]
    lines += [f"\n! {e.splitlines()[0][:200]}" for e in errors]
    return "\n".join(lines)


def run(doc: dict, workloads: Sequence[Workload], save: Callable[[], None], device: str = "cuda",
        warmups: int = timing.WARMUPS, log=print) -> dict:  # fmt: skip
    """Measure every workload into doc["workloads"], calling save() after each; returns doc."""
    for w in workloads:
        log(f"{w.name}: {w.shape}, {w.input_sets} input set(s)")
        doc["workloads"].append(measure(w, device, warmups, log))
        save()
    return doc
