"""What the command-line tools check before they allocate anything: sizes, and whether the run fits.

`python -m quantattn`, `python -m quantattn.accuracy` and `python -m quantattn.bench` read sizes with the
argparse types below (a clear "error: argument --heads: ..." instead of a traceback or a table of NaN),
and call `check_fits` with `attention_run_bytes` before the first tensor is made, so an absurd size ends
with a message instead of an attempt to allocate terabytes.
"""

from __future__ import annotations

import argparse
import os

import torch

from quantattn.validation import MAX_HEAD_DIM

GiB = 2**30


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


def head_dim(text: str) -> int:
    """argparse type: a head dimension quantattn takes, 1..256."""
    value = positive_int(text)
    if value > MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {MAX_HEAD_DIM} (quantattn's largest head_dim), got {value}"
        )
    return value


def shape_arg(text: str) -> tuple[int, int, int, int]:
    """argparse type: "B,H,N,d", each positive, d at most 256."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"must be four comma-separated sizes B,H,N,d, got {text!r}")
    *sizes, d = parts
    return (*(positive_int(p) for p in sizes), head_dim(d))


def attention_run_bytes(b: int, h: int, nq: int, nk: int, d: int, *, input_sets: int = 1, fp64: bool = True,
                        chunk: int = 1024) -> int:  # fmt: skip
    """A generous estimate of the memory one measurement of attention [B, H, Nq, d] x [B, H, Nk, d] holds at
    its peak: the 16-bit inputs (input_sets of them), two 16-bit outputs, quantattn's quantized K and V
    (under 4 bytes per K/V element, quantattn.memory), and with fp64 the FP64 ground truth: q, k, v and its
    output in float64 and one chunk of scores and probabilities [B, H, chunk, Nk]."""
    q_elems, kv_elems = b * h * nq * d, b * h * nk * d
    total = input_sets * 2 * (q_elems + 2 * kv_elems) + 2 * 2 * q_elems + 4 * kv_elems
    if fp64:
        total += 8 * (2 * q_elems + 2 * kv_elems) + 2 * 8 * b * h * min(chunk, nq) * nk
    return total


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` now (a CUDA GPU's free memory, or the host's available memory), or None
    where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, device: torch.device, what: str) -> str | None:
    """None when `need` bytes fit in what `device` has free, else the message that says so."""
    free = available_bytes(device)
    if free is None or need <= free:
        return None
    where = "GPU" if device.type == "cuda" else "host"
    return (
        f"{what} needs about {need / GiB:,.1f} GiB, and the {where} has {free / GiB:,.1f} GiB free: "
        "choose smaller sizes"
    )
