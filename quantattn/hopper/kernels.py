"""The Hopper kernels as Python sees them: each instantiation's name, launch shape and parameter struct,
compiled on first use (quantattn/hopper/compiler.py) and launched through the driver (driver.py).

The parameter structs mirror `Params` in attention.cu and preprocess.cu field for field (natural
alignment on both sides; tests/test_hopper.py round-trips every field through the GPU).
Shared-memory sizes are the kernels' own formulas, which the sources static_assert.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

from quantattn.hopper import compiler, driver

ATTENTION_THREADS = 128
ATTENTION_BLOCK_M = 64  # query rows per CTA
PREPROCESS_THREADS = 256
RESIDENT_KEYS = 128  # keys per CTA of the resident preprocessing
MAX_CLUSTER = 16  # a non-portable cluster size, which the H100 allows
RESIDENT_MAX_KEYS = RESIDENT_KEYS * MAX_CLUSTER
ELEMENT = {"bfloat16": "bf16", "float16": "f16"}  # torch dtype name -> the kernels' element type


def attention_smem_bytes(d: int) -> int:
    """attention.cu's smem_bytes<D>(): K/V stages, Q, key scales, V factors, barriers, alignment slack."""
    return 580 * d + 2080


def resident_smem_bytes(d: int) -> int:
    """preprocess.cu's sizeof(ResidentSmem<D>)."""
    return 520 * d + 7168


class TensorMap(ctypes.Structure):
    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


_I64, _I32, _F32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class AttentionParams(ctypes.Structure):
    """attention.cu's Params (576 bytes: 524 of fields, padded to the tensor maps' 64-byte alignment)."""

    _fields_ = [
        ("tm_k", TensorMap), ("tm_v", TensorMap), ("tm_ks", TensorMap),
        ("q", _PTR), ("q_sb", _I64), ("q_sh", _I64), ("q_sm", _I64),
        ("o", _PTR), ("o_sb", _I64), ("o_sh", _I64), ("o_sm", _I64),
        ("lse", _PTR), ("l_sb", _I64), ("l_sh", _I64),
        ("k_mean", _PTR), ("v_max", _PTR), ("v_min", _PTR),
        ("hq", _I32), ("hkv", _I32), ("nq", _I32), ("nk", _I32),
        ("qk_scale", _F32), ("sm_scale", _F32), ("overlap", _I32),
        ("_pad", ctypes.c_char * 52),
    ]  # fmt: skip


class PreprocessParams(ctypes.Structure):
    """preprocess.cu's prep::Params, for both preprocessings (the resident one ignores the scratch)."""

    _fields_ = [
        ("k", _PTR), ("k_sb", _I64), ("k_sh", _I64), ("k_sn", _I64),
        ("v", _PTR), ("v_sb", _I64), ("v_sh", _I64), ("v_sn", _I64),
        ("h", _I32), ("n", _I32), ("heads", _I32), ("n_chunks", _I32), ("blocks_per_chunk", _I32), ("lag", _I32),
        ("part", _PTR), ("stats", _PTR), ("sync", _PTR),
        ("kq", _PTR), ("k_scale", _PTR), ("ks_stride", _I64), ("vq", _PTR), ("n_pad", _I64),
    ]  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One kernel instantiation: where it is, what it is called, what it needs at launch."""

    key: str  # the cache file's name
    source: str
    name: str  # the C++ name expression NVRTC instantiates
    shared_bytes: int = 0  # dynamic shared memory
    non_portable_cluster: bool = False


@functools.cache
def attention_spec(d: int, causal: bool, element: str, per_thread: bool = False) -> Spec:
    """per_thread: QK scales of the "per_thread" granularity, else "per_token"."""
    return Spec(
        f"attention_d{d}_{'causal' if causal else 'full'}_{element}{'_per_thread' if per_thread else ''}",
        "attention.cu",
        f"quantattn_hopper::sage_attention_hopper<{d}, {str(causal).lower()}, quantattn_hopper::{element}, "
        f"{str(per_thread).lower()}>",
        shared_bytes=attention_smem_bytes(d),
    )


@functools.cache
def preprocess_spec(d: int, element: str, smooth_k: bool, resident: bool, per_thread: bool = False) -> Spec:
    """per_thread: K scales of the "per_thread" granularity, else "per_token"."""
    kernel = "preprocess_kv_resident" if resident else "preprocess_kv"
    return Spec(
        f"{kernel}_d{d}_{element}{'_smooth' if smooth_k else ''}{'_per_thread' if per_thread else ''}",
        "preprocess.cu",
        f"quantattn_hopper::prep::{kernel}<{d}, quantattn_hopper::{element}, {str(smooth_k).lower()}, "
        f"{str(per_thread).lower()}>",
        shared_bytes=resident_smem_bytes(d) if resident else 0,
        non_portable_cluster=resident,
    )


def all_specs() -> list[Spec]:
    """Every instantiation the backend may launch (what `python -m quantattn.hopper.build` compiles)."""
    specs = []
    for d in (64, 128):
        for element in ELEMENT.values():
            specs += [attention_spec(d, c, element, pt) for c in (False, True) for pt in (False, True)]
            flags = [(s, r, pt) for s in (False, True) for r in (False, True) for pt in (False, True)]
            specs += [preprocess_spec(d, element, s, r, pt) for s, r, pt in flags]
    return specs


class _Loaded:
    def __init__(self, kernel: int):
        self.kernel = kernel
        self.configured: set[int] = set()  # devices whose attributes are set


_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_loaded: dict[str, _Loaded] = {}
_cluster_fits: dict[tuple[str, int, int], bool] = {}  # (spec key, device, cluster size) -> can run


def load(spec: Spec, device: int) -> int:
    """The kernel handle of `spec`, compiled or read from the cache once per process, its attributes set
    once per device."""
    loaded = _loaded.get(spec.key)
    if loaded is None:
        with _lock:
            key_lock = _key_locks.setdefault(spec.key, threading.Lock())
        with key_lock:  # one compilation per kernel, whatever the threads
            loaded = _loaded.get(spec.key)
            if loaded is None:
                cubin, lowered = compiler.cached_cubin(spec.key, spec.source, spec.name)
                try:
                    library = driver.load_library(cubin)
                except driver.DriverError:  # a damaged cache file: compile it again
                    cubin, lowered = compiler.cached_cubin(spec.key, spec.source, spec.name, refresh=True)
                    library = driver.load_library(cubin)
                loaded = _Loaded(driver.get_kernel(library, lowered))
                _loaded[spec.key] = loaded
    if device not in loaded.configured:
        with _lock:
            if spec.shared_bytes > 48 * 1024:
                driver.set_attribute(
                    loaded.kernel, driver.FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, spec.shared_bytes, device
                )
            if spec.non_portable_cluster:
                driver.set_attribute(loaded.kernel, driver.FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1, device)
            loaded.configured.add(device)
    return loaded.kernel


def cluster_fits(spec: Spec, device: int, cluster: int) -> bool:
    """Whether the GPU can run `spec` in clusters of `cluster` CTAs (asked once per size and device)."""
    fits = _cluster_fits.get((spec.key, device, cluster))
    if fits is None:
        n = driver.max_active_clusters(load(spec, device), PREPROCESS_THREADS, spec.shared_bytes, cluster)
        fits = _cluster_fits[(spec.key, device, cluster)] = n > 0
    return fits
