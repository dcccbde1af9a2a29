"""A/B of builds of the native Hopper kernels: kernel-only TOPS, K/V preprocessing time and accuracy of
each build, every build in its own process, on one GPU in one run.

A build is LABEL[:SPEC], SPEC being what differs from this tree's quantattn/hopper sources:
  base                          the sources as they are
  mb3:-DQUANTATTN_PREP_MIN_BLOCKS=3
                                extra NVRTC options (here a preprocessor define), comma-separated
  old:SRC=/tmp/old              the .cu/.cuh files of another folder, e.g. an earlier commit's:
                                git archive <commit> quantattn/hopper | tar -x -C /tmp/old --strip-components=2
  old64:SRC=/tmp/old,-DFLAG=1   both
A source from another commit must keep this tree's kernel signatures and parameter structs (launch.py and
kernels.py are this tree's). Each build compiles into its own kernel cache under --cache (NVRTC, a few
seconds per kernel), so nothing is mixed with the user's cache.

Per build and round, one line: kernel-only TOPS of the attention kernel on K/V from the Hopper
preprocessing (B=4, H=32, bf16, d per --head-dims, N per --seq-lens; a "c" marks causal), the
preprocessing's GPU time at the longest N, and, in the first round, relative L1 against FP64 attention on
[1, 8, 4096, d] for normal inputs and for inputs with channel outliers. Rounds run the builds interleaved
(base, a, base, a, ...) so that a drift of the GPU's clocks shows as a spread, not as a difference.

Usage (H100/H200, repository root):
  python3 scripts/hopper_ab.py base "a:-DQUANTATTN_PREP_MIN_BLOCKS=3" [--head-dims 128 64] [--seq-lens 1K 4K 16K]
      [--causal off|on|both] [--rounds 2]

Reads internal modules (quantattn.hopper.compiler's OPTIONS and HERE, quantattn.hopper.launch's preprocess
and attention); scripts/ncu_one.py uses `use_build` to profile one build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_build(text: str) -> tuple[str, str | None, list[str]]:
    """'LABEL[:SPEC]' -> (label, source folder or None, extra NVRTC options)."""
    label, _, spec = text.partition(":")
    if not label or not label.replace("-", "_").isidentifier():
        raise argparse.ArgumentTypeError(
            f"a build is LABEL[:SPEC] with a plain LABEL (letters, digits, _ -), got {text!r}"
        )
    source, options = None, []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.startswith("SRC="):
            source = part[4:]
        elif part.startswith("-"):
            options.append(part)
        else:
            raise argparse.ArgumentTypeError(f"{text!r}: {part!r} is neither SRC=DIR nor an NVRTC option (-D...)")
    return label, source, options


def use_build(source: str | None, options: list[str]) -> None:
    """Make this process compile the Hopper kernels from `source` (a folder of .cu/.cuh files) with the
    extra NVRTC `options`. Call before the first kernel launch, with QUANTATTN_CACHE set to a folder of
    this build's own: the cache key does not see the options."""
    from quantattn.hopper import compiler

    if source is not None:
        folder = Path(source).resolve()
        if not (folder / "attention.cu").is_file():
            raise SystemExit(f"SRC={source}: no attention.cu there")
        compiler.HERE = folder
        compiler.OPTIONS = tuple(o for o in compiler.OPTIONS if not o.startswith("--include-path=")) + (
            f"--include-path={folder}",
        )
    compiler.OPTIONS = (*compiler.OPTIONS, *options)


def seq_len(text: str) -> int:
    """'4K' -> 4096, '4096' -> 4096."""
    return int(text[:-1]) * 1024 if text.upper().endswith("K") else int(text)


def seq_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ---- one build (the child process) -------------------------------------------------------------------


def measure_length(d: int, n: int, causals: list[bool], with_prep: bool, b: int = 4, h: int = 32) -> list[str]:
    """Kernel-only TOPS at one (d, N) per causal setting, and the preprocessing's time if asked."""
    from quantattn.bench.timing import median_seconds
    from quantattn.config import QuantConfig
    from quantattn.hopper import launch

    cfg = QuantConfig()
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv = launch.hopper_preprocess(k, v, cfg)
    out = torch.empty_like(q)
    cells = []
    for causal in causals:
        t = median_seconds(lambda: launch.hopper_attention(q, kv, causal, d**-0.5, out))
        ops = 4 * b * h * n * n * d / (2 if causal else 1)
        cells.append(f"d{d} {seq_label(n)}{'c' if causal else ''} {ops / t / 1e12:.0f}")
    if with_prep:
        cells.append(f"d{d} prep {median_seconds(lambda: launch.hopper_preprocess(k, v, cfg)) * 1e6:.0f} us")
    return cells


def accuracy_cells(d: int) -> list[str]:
    """Relative L1 of the Hopper backend against FP64 attention on [1, 8, 4096, d], normal and outliers."""
    from quantattn import sageattn
    from quantattn.metrics import make_qkv, relative_l1
    from quantattn.reference import attention_fp64

    cells = []
    for outliers in (False, True):
        q, k, v = make_qkv(1, 8, 4096, d, device="cuda", outliers=outliers, seed=0)
        o = sageattn(q, k, v, backend="hopper")
        nan = " NaN" if torch.isnan(o).any() else ""
        cells.append(f"d{d} {'outliers' if outliers else 'normal'} {relative_l1(o, attention_fp64(q, k, v)):.4f}{nan}")
    return cells


def measure_build(label: str, head_dims: list[int], seq_lens: list[int], causals: list[bool], accuracy: bool) -> str:
    cells = []
    for d in head_dims:
        for n in seq_lens:
            cells += measure_length(d, n, causals, with_prep=n == seq_lens[-1])
            torch.cuda.empty_cache()
    line = f"{label:>10}: kernel TOPS " + ", ".join(cells)
    if accuracy:
        line += " | rel L1 vs FP64 " + ", ".join(c for d in head_dims for c in accuracy_cells(d))
    return line


# ---- the driver --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/hopper_ab.py", description=__doc__.split("\n")[0])
    p.add_argument("builds", nargs="+", type=parse_build, metavar="LABEL[:SPEC]")
    p.add_argument("--head-dims", type=int, nargs="+", default=[128], choices=(64, 128))
    p.add_argument("--seq-lens", type=seq_len, nargs="+", default=[1024, 4096, 8192, 16384], metavar="N")
    p.add_argument("--causal", choices=("off", "on", "both"), default="off")
    p.add_argument("--rounds", type=int, default=2, help="passes over the builds, interleaved (default 2)")
    p.add_argument("--cache", default="/tmp/quantattn-ab", help="parent of each build's kernel cache")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one build, in this process
    p.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    causals = {"off": [False], "on": [True], "both": [False, True]}[args.causal]
    if args.child:
        ((label, source, options),) = args.builds
        use_build(source, options)
        print(measure_build(label, args.head_dims, args.seq_lens, causals, args.accuracy), flush=True)
        return 0
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    common = ["--head-dims", *map(str, args.head_dims), "--seq-lens", *map(str, args.seq_lens), "--causal", args.causal]
    failed = 0
    for r in range(args.rounds):
        for label, source, options in args.builds:
            spec = ",".join([*([f"SRC={source}"] if source else []), *options])
            env = {**os.environ, "QUANTATTN_CACHE": os.path.join(args.cache, label)}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            cmd = [sys.executable, __file__, "--child", *(["--accuracy"] if r == 0 else []), *common,
                   f"{label}:{spec}" if spec else label]  # fmt: skip
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode:
                failed += 1
                print(f"{label:>10}: FAILED (exit {res.returncode})\n{res.stderr[-3000:]}", flush=True)
            else:
                print(res.stdout.strip(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
