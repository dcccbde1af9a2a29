"""What the machine offers, looked up cheaply: the facts backends declare their capabilities against."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, looked up once per device (it is on every call's path)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def interpreter_active() -> bool:
    """Triton's own switch (Triton reads it, not quantattn.settings): kernels run on the CPU through its
    interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fp8_reason(device: torch.device, what: str) -> str | None:
    """Why FP8 cannot run on this CUDA device (None from compute capability 8.9: Ada, Hopper)."""
    cap = device_capability(device)
    if cap < (8, 9):
        return f"{what} needs compute capability >= 8.9 (Ada, Hopper), this GPU has {cap[0]}.{cap[1]}"
    return None
