"""`python -m quantattn`: quantattn's speed and accuracy on one workload.

With an NVIDIA GPU: whole-call TOPS of quantattn's default variant next to torch SDPA (cuDNN and flash
backends) at B=4, H=32, N=4096, d=128 in bf16, then cosine and relative L1 against FP64 attention on a
[1, 8, N, d] slice, for N(0, 1) inputs and inputs with channel outliers.
Without one: the pure-PyTorch reference of every variant on CPU tensors, accuracy only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import quantattn
from quantattn.bench.timing import measure
from quantattn.cli_args import attention_run_bytes, check_fits, head_dim, positive_int
from quantattn.config import VARIANTS, QuantConfig
from quantattn.metrics import accuracy_metrics, attention_ops, make_qkv, tops
from quantattn.reference import attention_fp64

GPU_WORKLOAD = {"batch": 4, "heads": 32, "seq_len": 4096, "head_dim": 128}
# N=256: the reference emulates the FP8 tensor-core accumulation exactly, and at N=1024 its five
# variants took a minute of CPU time (N=256: seconds); the README sends new users here first.
CPU_WORKLOAD = {"batch": 1, "heads": 4, "seq_len": 256, "head_dim": 128}
ACCURACY_HEADS = 8  # the GPU accuracy slice is [1, 8, N, d], the benchmark protocol's slice (quantattn/bench/cases.py)
# Below this many bytes of q, k and v, timing rotates through several input sets, so that the
# inputs are not served from a warm L2 cache (50 MiB on H100).
ROTATION_BYTES = 256 << 20
MAX_INPUT_SETS = 8
INPUT_KINDS = ("normal", "outliers")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m quantattn",
        description="Speed (NVIDIA GPU only) and accuracy of quantattn's quantized attention on one workload. "
        f"Default workload: GPU {GPU_WORKLOAD}, CPU {CPU_WORKLOAD}; bf16, layout HND.",
    )
    parser.add_argument("--batch", type=positive_int, help="batch size")
    parser.add_argument("--heads", type=positive_int, help="attention heads")
    parser.add_argument("--seq-len", type=positive_int, help="sequence length (queries and keys)")
    parser.add_argument("--head-dim", type=head_dim, help="head dimension (1..256)")
    parser.add_argument("--causal", action="store_true", help="causal masking")
    parser.add_argument(
        "--variant",
        choices=("default", "all", *VARIANTS),
        help="quantattn variant: 'default' is sageattn's choice for the device, 'all' every variant in "
        "quantattn.config.VARIANTS (default: 'default' on a GPU, 'all' on the CPU)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    workload = {
        key: getattr(args, key) or default for key, default in (GPU_WORKLOAD if on_gpu else CPU_WORKLOAD).items()
    }
    b, h, n, d = (workload[key] for key in ("batch", "heads", "seq_len", "head_dim"))
    if on_gpu:  # the timed input sets and outputs, or the accuracy slice with its FP64 truth
        sets = max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / (3 * b * h * n * d * 2))))
        need = max(attention_run_bytes(b, h, n, n, d, input_sets=sets, fp64=False),
                   attention_run_bytes(1, min(h, ACCURACY_HEADS), n, n, d))  # fmt: skip
    else:
        need = attention_run_bytes(b, h, n, n, d)
    problem = check_fits(need, torch.device("cuda" if on_gpu else "cpu"), f"B={b}, H={h}, N={n}, d={d}")
    if problem:
        parser.error(problem)
    args.workload = workload
    return args


def chosen_variants(name: str, device: torch.device) -> dict[str, QuantConfig]:
    if name == "all":
        return dict(VARIANTS)
    if name == "default":
        return {"default": quantattn.default_config(device)}
    return {name: VARIANTS[name]}


def quantattn_fn(cfg: QuantConfig) -> Attention:
    def run(q, k, v, causal):
        # "quantized": auto's kernel, never torch's SDPA (which auto takes where it measured faster)
        return quantattn.sageattn(q, k, v, is_causal=causal, config=cfg, backend="quantized")

    return run


def sdpa_fn(backend=None) -> Attention:
    """torch SDPA, restricted to one backend (an SDPBackend) when given."""

    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def describe_failure(exc: Exception) -> str:
    """One line for the table; the traceback goes to stderr. Triton's compilation errors put the cause last."""
    traceback.print_exc(file=sys.stderr)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def accuracy_rows(
    impls: dict[str, Attention], shape: tuple[int, int, int, int], causal: bool, device: str
) -> list[dict]:
    """Each implementation against FP64 attention of the same (bf16) inputs, per input kind."""
    batch, heads, seq_len, head_dim = shape
    rows = []
    for kind in INPUT_KINDS:
        q, k, v = make_qkv(batch, heads, seq_len, head_dim, device=device, outliers=kind == "outliers")
        ref = attention_fp64(q, k, v, is_causal=causal)
        for name, fn in impls.items():
            row = {"implementation": name, "inputs": kind}
            try:
                row.update(accuracy_metrics(fn(q, k, v, causal), ref))
            except Exception as exc:  # one failing implementation must not hide the others' figures
                row["error"] = describe_failure(exc)
            rows.append(row)
    return rows


def speed_rows(impls: dict[str, Attention], shape: tuple[int, int, int, int], causal: bool) -> list[dict]:
    """Whole-call time of each implementation from bf16 inputs to bf16 output."""
    batch, heads, seq_len, head_dim = shape
    set_bytes = 3 * batch * heads * seq_len * head_dim * 2
    n_sets = max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)))
    input_sets = [make_qkv(batch, heads, seq_len, head_dim, device="cuda", seed=i) for i in range(n_sets)]
    ops = attention_ops(batch, heads, seq_len, seq_len, head_dim, causal)
    rows = []
    for name, fn in impls.items():
        row = {"implementation": name}
        try:
            ms = measure(lambda q, k, v, fn=fn: fn(q, k, v, causal), input_sets).median_ms
            row.update(ms=ms, tops=tops(ops, ms))
        except Exception as exc:  # as in accuracy_rows
            row["error"] = describe_failure(exc)
        rows.append(row)
    return rows


def sdpa_backends() -> dict[str, Attention]:
    return {
        "torch SDPA cuDNN (bf16)": sdpa_fn(SDPBackend.CUDNN_ATTENTION),
        "torch SDPA flash (bf16)": sdpa_fn(SDPBackend.FLASH_ATTENTION),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); a row holding "error" shows it after its label ("s") columns."""
    labels = [key for key, _, spec in columns if spec == "s"]
    lines = [
        [str(row[key]) for key in labels] + [row["error"]]
        if "error" in row
        else [format(row[key], spec) for key, _, spec in columns]
        for row in rows
    ]
    widths = [len(header) for _, header, _ in columns]
    for line, row in zip(lines, rows, strict=True):
        for i, cell in enumerate(line if "error" not in row else line[: len(labels)]):
            widths[i] = max(widths[i], len(cell))
    table = [[header for _, header, _ in columns], *lines]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip() for line in table)


ACCURACY_COLUMNS = [
    ("implementation", "implementation", "s"),
    ("inputs", "inputs", "s"),
    ("cosine", "cosine", ".6f"),
    ("rel_l1", "rel L1", ".4f"),
    ("rmse", "RMSE", ".2e"),
]
SPEED_COLUMNS = [("implementation", "implementation", "s"), ("ms", "ms", ".3f"), ("tops", "TOPS", ".1f")]


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "quantattn": quantattn.__version__,
        "commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    workload = args.workload
    shape = (workload["batch"], workload["heads"], workload["seq_len"], workload["head_dim"])
    variants = chosen_variants(args.variant or ("default" if on_gpu else "all"), device)
    env = environment(device)
    print(f"quantattn {env['quantattn']} | torch {env['torch']} | triton {env['triton']} | device: {env['device']}")
    desc = "B={}, H={}, N={}, d={}".format(*shape) + ", bf16" + (", causal" if args.causal else "")
    for label, cfg in variants.items():
        print(f"variant {label}: {cfg.name}")

    impls = {f"quantattn {label}": quantattn_fn(cfg) for label, cfg in variants.items()}
    result = {"environment": env, "workload": {**workload, "causal": args.causal, "dtype": "bfloat16"}}
    if on_gpu:
        print(f"\nSpeed, whole call ({desc}); median of CUDA-event timings after warm-ups:")
        result["speed"] = speed_rows({**impls, **sdpa_backends()}, shape, args.causal)
        print(format_table(result["speed"], SPEED_COLUMNS))
        slice_shape = (1, min(workload["heads"], ACCURACY_HEADS), workload["seq_len"], workload["head_dim"])
        impls["torch SDPA (bf16)"] = sdpa_fn()
    else:
        print(
            "\nNo NVIDIA GPU: running the pure-PyTorch reference of the quantized kernels on CPU tensors "
            "(the numerics the kernels are tested against). Speed needs a GPU: nothing is timed here."
        )
        slice_shape = shape
    slice_desc = "B={}, H={}, N={}, d={}".format(*slice_shape)
    print(f"\nAccuracy against FP64 attention ({slice_desc}); 'outliers': per-channel offsets added to Q, K, V:")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="quantattn: CPU tensors run the pure-PyTorch reference")
        result["accuracy"] = accuracy_rows(impls, slice_shape, args.causal, device.type)
    print(format_table(result["accuracy"], ACCURACY_COLUMNS))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    failed = [
        row
        for row in result.get("speed", []) + result["accuracy"]
        if "error" in row and row["implementation"].startswith("quantattn")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
