"""The native Hopper backend: a CUDA C++ attention kernel (wgmma, TMA, one warpgroup per CTA and several
CTAs per SM) for sm_90, and the K/V preprocessing it reads (one launch: a cluster of CTAs per head that
keeps K and V in shared memory up to 2K keys, a ticketed two-phase kernel beyond).

Optional: it needs an H100/H200-class GPU and a CUDA compiler (nvcc) the first time (see build.py);
everything else runs the Triton kernels. QUANTATTN_HOPPER=0 keeps backend="auto" off it.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_ARGTYPES = (
    [ctypes.c_void_p] + [ctypes.c_int64] * 3  # q and its strides
    + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]  # K, k_scale, V^T
    + [ctypes.c_void_p] * 3  # k_mean, v_max, v_min
    + [ctypes.c_void_p] + [ctypes.c_int64] * 3  # out
    + [ctypes.c_void_p] + [ctypes.c_int64] * 2  # lse
    + [ctypes.c_int] * 8  # batch, hq, hkv, nq, nk, head_dim, is_bf16, causal
    + [ctypes.c_float] * 2  # qk_scale, sm_scale
    + [ctypes.c_void_p]  # stream
)  # fmt: skip
_PREPROCESS_ARGTYPES = (
    [ctypes.c_void_p] + [ctypes.c_int64] * 3  # k and its strides
    + [ctypes.c_void_p] + [ctypes.c_int64] * 3  # v and its strides
    + [ctypes.c_int] * 6  # h, n, heads, n_chunks, blocks_per_chunk, lag
    + [ctypes.c_void_p] * 5 + [ctypes.c_int64]  # partials, stats, sync, kq, k_scale, its row stride
    + [ctypes.c_void_p, ctypes.c_int64]  # V^T and its padded key count
    + [ctypes.c_int] * 3  # head_dim, is_bf16, smooth_k
    + [ctypes.c_void_p]  # stream
)  # fmt: skip

_RESIDENT_ARGTYPES = (
    [ctypes.c_void_p] + [ctypes.c_int64] * 3  # k and its strides
    + [ctypes.c_void_p] + [ctypes.c_int64] * 3  # v and its strides
    + [ctypes.c_int] * 3  # h, n, heads
    + [ctypes.c_void_p] * 3 + [ctypes.c_int64]  # stats, kq, k_scale, its row stride
    + [ctypes.c_void_p, ctypes.c_int64]  # V^T and its padded key count
    + [ctypes.c_int] * 3  # head_dim, is_bf16, smooth_k
    + [ctypes.c_void_p]  # stream
)  # fmt: skip

ERRORS = {
    -1: "the CUDA driver has no cuTensorMapEncodeTiled",
    -2: "a TMA tensor map was refused (alignment or strides)",
    -3: "the kernel's shared-memory size was refused",
    -4: "the kernel launch failed",
    -5: "unsupported arguments",
    -6: "the GPU cannot run the preprocessing's cluster of CTAs",
}
CLUSTER_REFUSED = -6  # the resident preprocessing's answer when the ticketed one must take the call


class _State:
    lib = None
    preprocess = None
    resident = None
    resident_max_keys = 0
    reason: str | None = None


@functools.cache
def _load() -> _State:
    state = _State()
    try:
        from quantattn.hopper.build import library_path

        path = library_path(build=True)
        if path is None:
            state.reason = "the Hopper kernel is not built and no CUDA compiler (nvcc) was found"
            return state
        lib = ctypes.CDLL(str(path))
        fn = lib.quantattn_hopper_attention
        fn.argtypes = _ARGTYPES
        fn.restype = ctypes.c_int
        state.lib = fn
        pre = getattr(lib, "quantattn_hopper_preprocess", None)  # None: a library built before it existed
        if pre is not None:
            pre.argtypes = _PREPROCESS_ARGTYPES
            pre.restype = ctypes.c_int
            state.preprocess = pre
        resident = getattr(lib, "quantattn_hopper_preprocess_resident", None)
        if resident is not None:
            resident.argtypes = _RESIDENT_ARGTYPES
            resident.restype = ctypes.c_int
            state.resident = resident
            state.resident_max_keys = int(lib.quantattn_hopper_resident_max_keys())
    except (OSError, RuntimeError) as exc:
        state.reason = f"the Hopper kernel could not be built or loaded: {exc}"
    return state


@functools.cache
def _device_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return f"needs compute capability 9.0 (H100/H200), this GPU has {major}.{minor}"
    return None


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the Hopper backend cannot run here (None when it can)."""
    if os.environ.get("QUANTATTN_HOPPER", "1") == "0":
        return "QUANTATTN_HOPPER=0"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (CUDA is not available)"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    reason = _device_reason(index)
    if reason is not None:
        return reason
    return _load().reason


def available(device: torch.device | None = None) -> bool:
    return unavailable_reason(device) is None


def kernel():
    """The ctypes function of the attention kernel (loads or builds the library)."""
    state = _load()
    if state.lib is None:
        raise RuntimeError(state.reason)
    return state.lib


def preprocess_kernel():
    """The ctypes function of the K/V preprocessing (loads or builds the library), or None when the
    library (QUANTATTN_HOPPER_LIB) has none."""
    state = _load()
    if state.lib is None:
        raise RuntimeError(state.reason)
    return state.preprocess


def resident_preprocess_kernel():
    """The ctypes function of the resident K/V preprocessing (heads of at most `resident_max_keys()` keys,
    one cluster of CTAs per head), or None when the library has none."""
    state = _load()
    if state.lib is None:
        raise RuntimeError(state.reason)
    return state.resident


def resident_max_keys() -> int:
    """The most keys per head the resident preprocessing takes (0 without it)."""
    state = _load()
    return state.resident_max_keys if state.resident is not None else 0
