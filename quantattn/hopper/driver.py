"""The few CUDA driver calls the Hopper backend makes, through ctypes on libcuda (which every NVIDIA
driver installs): load a cubin, set a kernel's attributes, encode TMA tensor maps, launch.

Kernels are loaded as context-independent libraries (cuLibraryLoadData, CUDA 12.0+): one load serves
every GPU, and a launch runs on the context current on the calling thread, the device torch made current.
Launches take the kernel's parameter struct (a ctypes Structure, quantattn/hopper/kernels.py) by address,
so one call copies it whole. Every call's result is checked; a failure raises with the driver's message.
"""

from __future__ import annotations

import ctypes
import functools

CUresult = ctypes.c_int
# CUfunction_attribute, CUlaunchAttributeID (cuda.h)
FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion
TENSOR_MAP_UINT8 = 0
TENSOR_MAP_FLOAT32 = 7
SWIZZLE_NONE, SWIZZLE_64B, SWIZZLE_128B = 0, 2, 3
L2_PROMOTION_256B = 3


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


class LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte union, of which clusterDim (x, y, z) and
    # programmaticStreamSerializationAllowed (x) are used
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("x", ctypes.c_uint), ("y", ctypes.c_uint),
                ("z", ctypes.c_uint), ("rest", ctypes.c_char * 52)]  # fmt: skip


class LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


_P = ctypes.c_void_p
_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
    "cuGetErrorString": [CUresult, ctypes.POINTER(ctypes.c_char_p)],
    "cuCtxGetCurrent": [ctypes.POINTER(_P)],
    "cuCtxSetCurrent": [_P],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_P), ctypes.c_int],
    "cuLibraryLoadData": [ctypes.POINTER(_P), ctypes.c_char_p, _P, _P, ctypes.c_uint, _P, _P, ctypes.c_uint],
    "cuLibraryGetKernel": [ctypes.POINTER(_P), _P, ctypes.c_char_p],
    "cuKernelSetAttribute": [ctypes.c_int, ctypes.c_int, _P, ctypes.c_int],
    "cuKernelGetFunction": [ctypes.POINTER(_P), _P],
    "cuOccupancyMaxActiveClusters": [ctypes.POINTER(ctypes.c_int), _P, ctypes.POINTER(LaunchConfig)],
    "cuLaunchKernel": [_P] + [ctypes.c_uint] * 7 + [_P, _P, _P],
    "cuLaunchKernelEx": [ctypes.POINTER(LaunchConfig), _P, _P, _P],
    "cuTensorMapEncodeTiled": [_P, ctypes.c_int, ctypes.c_uint, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int],
}  # fmt: skip


@functools.cache
def cuda() -> ctypes.CDLL:
    """libcuda with the signatures above (OSError where there is no NVIDIA driver)."""
    lib = ctypes.CDLL("libcuda.so.1")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, CUresult
    check(lib.cuInit(0), "cuInit")
    return lib


def check(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        cuda().cuGetErrorString(res, ctypes.byref(msg))
        raise DriverError(f"{what} failed: {msg.value.decode() if msg.value else 'error'} ({res})")


def driver_version() -> int:
    v = ctypes.c_int()
    check(cuda().cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
    return v.value


def ensure_context(device: int) -> None:
    """A current context on this thread (torch makes the device's primary context current when it first
    runs CUDA work on a thread; a thread that has not yet gets it here)."""
    ctx = _P()
    check(cuda().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        check(cuda().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        check(cuda().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def load_library(cubin: bytes) -> int:
    lib = _P()
    check(cuda().cuLibraryLoadData(ctypes.byref(lib), cubin, None, None, 0, None, None, 0), "cuLibraryLoadData")
    return lib.value


def get_kernel(library: int, name: str) -> int:
    kernel = _P()
    check(cuda().cuLibraryGetKernel(ctypes.byref(kernel), library, name.encode()), f"cuLibraryGetKernel({name})")
    return kernel.value


def set_attribute(kernel: int, attribute: int, value: int, device: int) -> None:
    check(cuda().cuKernelSetAttribute(attribute, value, kernel, device), "cuKernelSetAttribute")


def launch(kernel: int, grid: tuple[int, int, int], threads: int, shared_bytes: int, stream: int, *params) -> None:
    """kernel<<<grid, threads, shared_bytes, stream>>>(*params), each a ctypes object (the kernels take
    one parameter struct)."""
    args = (ctypes.c_void_p * len(params))(*[ctypes.addressof(x) for x in params])
    check(cuda().cuLaunchKernel(kernel, *grid, threads, 1, 1, shared_bytes, stream, args, None), "cuLaunchKernel")


@functools.lru_cache(maxsize=64)
def _config(grid: tuple[int, int, int], threads: int, shared_bytes: int, stream: int | None, attr_id: int, x: int):
    """A launch configuration with one attribute (built once per shape and stream: the driver reads it at
    each launch and keeps nothing)."""
    attr = LaunchAttribute(id=attr_id, x=x, y=1, z=1)
    cfg = LaunchConfig(shared_bytes=shared_bytes, stream=stream, attrs=ctypes.pointer(attr), num_attrs=1)
    cfg.grid[:] = grid
    cfg.block[:] = (threads, 1, 1)
    cfg._attr = attr  # kept alive with cfg
    return cfg


def cluster_config(grid: int, threads: int, shared_bytes: int, stream: int | None, cluster: int):
    """The launch configuration of a 1-D grid in clusters of `cluster` CTAs."""
    return _config((grid, 1, 1), threads, shared_bytes, stream, LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, cluster)


def launch_after_prior_grid(
    kernel: int, grid: tuple[int, int, int], threads: int, shared_bytes: int, stream: int, params
) -> None:
    """A launch that may start before the kernel before it in the stream has ended (programmatic dependent
    launch): once every CTA of that kernel has executed `griddepcontrol.launch_dependents` or ended. The
    kernel must execute `griddepcontrol.wait` before it reads what that kernel writes, and before it
    writes anything (common.cuh: wait_for_prior_grid)."""
    cfg = _config(grid, threads, shared_bytes, stream, LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1)
    _launch_ex(cfg, kernel, params)


def launch_cluster(kernel: int, grid: int, threads: int, shared_bytes: int, stream: int, cluster: int, params) -> None:
    """A 1-D launch in clusters of `cluster` CTAs."""
    _launch_ex(cluster_config(grid, threads, shared_bytes, stream, cluster), kernel, params)


def _launch_ex(cfg: LaunchConfig, kernel: int, params) -> None:
    """cuLaunchKernelEx with a configuration from _config and the kernel's one parameter struct."""
    args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    check(cuda().cuLaunchKernelEx(ctypes.byref(cfg), kernel, args, None), "cuLaunchKernelEx")


def max_active_clusters(kernel: int, threads: int, shared_bytes: int, cluster: int) -> int:
    """How many clusters of `cluster` CTAs the current GPU can hold at once (0: it cannot run one)."""
    fn = _P()
    check(cuda().cuKernelGetFunction(ctypes.byref(fn), kernel), "cuKernelGetFunction")
    cfg = cluster_config(cluster, threads, shared_bytes, None, cluster)
    n = ctypes.c_int()
    res = cuda().cuOccupancyMaxActiveClusters(ctypes.byref(n), fn, ctypes.byref(cfg))
    return n.value if res == 0 else 0


_encoded: dict[tuple, bytes] = {}


def encode_tiled(
    out_address: int,
    dtype: int,
    base: int,
    dims: tuple[int, ...],
    strides_bytes: tuple[int, ...],
    box: tuple[int, ...],
    swizzle: int,
) -> None:
    """cuTensorMapEncodeTiled into the 128 bytes at out_address: a tensor of `dims` (innermost first),
    with byte strides of the outer dimensions, loaded in boxes of `box` elements.

    A map is a pure function of these arguments, and the caching allocator hands the same buffers to
    call after call, so maps are remembered (the driver's encode plus ctypes' argument arrays cost ~10 µs
    on the host, a copy 1)."""
    key = (dtype, base, dims, strides_bytes, box, swizzle)
    cached = _encoded.get(key)
    if cached is None:
        rank = len(dims)
        res = cuda().cuTensorMapEncodeTiled(
            out_address, dtype, rank, base,
            (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides_bytes),
            (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)),
            0, swizzle, L2_PROMOTION_256B, 0,
        )  # fmt: skip
        check(res, f"cuTensorMapEncodeTiled(dims={dims}, strides={strides_bytes}, box={box})")
        if len(_encoded) >= 1024:
            _encoded.clear()
        _encoded[key] = ctypes.string_at(out_address, 128)
    else:
        ctypes.memmove(out_address, cached, 128)
