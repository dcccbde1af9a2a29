"""The native Hopper backend: a CUDA C++ attention kernel (wgmma, TMA, one warpgroup per CTA and several
CTAs per SM) for sm_90, and the K/V preprocessing it reads (one launch: a cluster of CTAs per head that
keeps K and V in shared memory up to 2K keys, a ticketed two-phase kernel beyond).

It needs an H100/H200-class GPU, the NVIDIA driver and NVRTC (installed with torch's CUDA wheels): the
kernels are compiled at run time, on first use, and cached (compiler.py); no nvcc, no host compiler.
Everything else runs the Triton kernels. QUANTATTN_HOPPER=0 keeps backend="auto" off it.
"""

from __future__ import annotations

import functools

import torch

from quantattn import settings


@functools.cache
def _toolchain_reason() -> str | None:
    """Why the kernels cannot be compiled or launched here (no NVRTC, no driver), or None."""
    from quantattn.hopper import compiler, driver

    try:
        driver.cuda()
    except (OSError, driver.DriverError) as exc:
        return f"the CUDA driver (libcuda.so.1) could not be loaded: {exc}"
    if driver.driver_version() < 12030:
        return f"needs a CUDA 12.3+ driver for the Hopper kernels, this one is {driver.driver_version()}"
    return compiler.nvrtc().reason


@functools.cache
def _device_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return f"needs compute capability 9.0 (H100/H200), this GPU has {major}.{minor}"
    return None


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the Hopper backend cannot run here (None when it can)."""
    if not settings.current.hopper:
        return "QUANTATTN_HOPPER=0"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (CUDA is not available)"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _device_reason(index) or _toolchain_reason()


def available(device: torch.device | None = None) -> bool:
    return unavailable_reason(device) is None
