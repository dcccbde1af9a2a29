"""What every benchmark command records about its run (device, versions, code, command), and the argument
types they share, so that results from `python -m quantattn.bench`, `.bench.masks`, `.bench.decode`,
`.bench.backward` and `quantattn.distributed.bench` name their run the same way."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

from quantattn.bench.cases import parse_seq_len


def git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def source_digest() -> str:
    """SHA-256 of quantattn's Python sources: names the code measured where git is absent (a copied tree)."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_metadata(module: str, argv: list[str], date: dt.datetime, on_gpu: bool = True) -> dict:
    """Date, device, versions, git commit and source digest, and the command `python -m <module> <argv>`."""
    import quantattn

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        device = {
            "device": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    else:
        device = {
            "device": f"cpu ({platform.processor() or platform.machine()}), benchmark self-test: numbers mean nothing"
        }
    commit, dirty = git_state()
    return {
        "date": date.isoformat(timespec="seconds"),
        **device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "quantattn": quantattn.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "source_sha256": source_digest(),
        "command": shlex.join(["python", "-m", module, *argv]),
        "cwd": os.getcwd(),
    }


def seq_len_arg(text: str) -> int:
    """argparse type: '4K' or '4096'."""
    try:
        return parse_seq_len(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_arg(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
