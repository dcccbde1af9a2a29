"""Run-time compilation of the Hopper kernels with NVRTC, and their on-disk cache.

No nvcc and no host compiler: NVRTC (`libnvrtc`, which torch's CUDA wheels install as a dependency, and
every CUDA toolkit has) compiles the `.cu` sources of this folder to sm_90a machine code (a cubin) in a
second or two per kernel; quantattn/hopper/driver.py loads it through the CUDA driver. NVRTC is called
through ctypes rather than NVIDIA's Python bindings: its C API is the same in CUDA 12 and 13, so
whichever libnvrtc torch brought serves, where `cuda-bindings` must match its major version (a pip
resolver would give a CUDA-12 torch the 13.x bindings, which look for libnvrtc.so.13).

Each kernel instantiation (say the attention kernel at head_dim 128, causal, bf16) is its own program,
compiled on first use and cached as `<cache>/hopper/<sources hash>-<arch>-nvrtc<version>/<name>.cubin`.
The cache is trusted only where it cannot have been planted by someone else: every folder from
`<cache>` down is created 0700 and must be owned by the user and not group- or world-writable, and a
cubin is read only if it is a regular file owned by the user and writable by nobody else. Otherwise the
kernel is compiled again (a warning says why) and, where the folder is sound, the file replaced. Files
are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path

from quantattn import settings

logger = logging.getLogger("quantattn")

HERE = Path(__file__).resolve().parent
ARCH = "sm_90a"  # wgmma and setmaxnreg exist only for the architecture-specific target
# -default-device: constexpr helpers and lambdas without __device__ are device code (NVRTC has no host)
OPTIONS = (f"--gpu-architecture={ARCH}", "-std=c++17", "-default-device", f"--include-path={HERE}")


def sources() -> list[Path]:
    """Every CUDA source of the backend (the cache key hashes them all)."""
    return sorted([*HERE.glob("*.cu"), *HERE.glob("*.cuh")])


class CompileError(RuntimeError):
    """NVRTC refused a program: the message holds its log."""


# ---------------------------------------------------------------------------------------------
# libnvrtc


def _candidates() -> list[str]:
    """Where libnvrtc may be, most specific first: QUANTATTN_NVRTC, the nvidia wheels next to torch (CUDA
    12: nvidia/cuda_nvrtc/lib, CUDA 13: nvidia/cu13/lib), torch/lib, CUDA_HOME, then the loader's path."""
    found: list[str] = []
    if settings.current.nvrtc:
        found.append(settings.current.nvrtc)
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
    try:
        import torch

        found += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libnvrtc*.so*")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    found += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return [f for f in dict.fromkeys(found) if "builtins" not in os.path.basename(f) and ".alt." not in f]


def _load_nvrtc(path: str) -> ctypes.CDLL:
    # libnvrtc opens libnvrtc-builtins by its soname at compile time; loaded first from the same folder,
    # it is found whatever LD_LIBRARY_PATH says.
    if os.path.isabs(path):
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    return lib


class _Nvrtc:
    lib: ctypes.CDLL | None = None
    path: str | None = None
    version: tuple[int, int] = (0, 0)
    reason: str | None = None


_nvrtc_lock = threading.Lock()
_nvrtc: _Nvrtc | None = None


def nvrtc() -> _Nvrtc:
    """The loaded libnvrtc (first that loads and compiles for sm_90a), or why there is none."""
    global _nvrtc
    with _nvrtc_lock:
        if _nvrtc is not None:
            return _nvrtc
        state = _Nvrtc()
        tried = []
        for path in _candidates():
            try:
                lib = _load_nvrtc(path)
                major, minor = ctypes.c_int(), ctypes.c_int()
                lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
            except OSError as exc:
                tried.append(f"{path}: {exc}")
                continue
            if (major.value, minor.value) < (12, 3):
                tried.append(f"{path}: NVRTC {major.value}.{minor.value} is older than 12.3")
                continue
            state.lib, state.path, state.version = lib, path, (major.value, minor.value)
            break
        else:
            state.reason = (
                "no NVRTC library (libnvrtc, installed with torch's CUDA wheels or a CUDA toolkit) was found; "
                "set QUANTATTN_NVRTC to its path. Tried: " + "; ".join(tried[-4:])
            )
        _nvrtc = state
        return state


def _check(lib: ctypes.CDLL, res: int, what: str) -> None:
    if res != 0:
        raise CompileError(f"NVRTC {what}: {lib.nvrtcGetErrorString(res).decode()}")


def compile_cubin(source: str, name_expression: str, filename: str = "quantattn.cu") -> tuple[bytes, str]:
    """source compiled for sm_90a: the cubin and the lowered (mangled) name of `name_expression`, the
    kernel instantiation to export (e.g. "quantattn_hopper::sage_attention_hopper<128, false, ...>")."""
    state = nvrtc()
    if state.lib is None:
        raise CompileError(state.reason)
    lib = state.lib
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None), "create")
    try:
        _check(lib, lib.nvrtcAddNameExpression(prog, name_expression.encode()), "name expression")
        opts = [o.encode() for o in OPTIONS]
        res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CompileError(
                f"NVRTC {state.version[0]}.{state.version[1]} could not compile {name_expression}:\n"
                f"{log.value.decode(errors='replace')}"
            )
        lowered = ctypes.c_char_p()
        _check(lib, lib.nvrtcGetLoweredName(prog, name_expression.encode(), ctypes.byref(lowered)), "lowered name")
        mangled = lowered.value.decode()
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw, mangled
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------------------------
# The cache


def cache_root() -> Path:
    """QUANTATTN_CACHE, else $XDG_CACHE_HOME/quantattn, else ~/.cache/quantattn."""
    if settings.current.cache_dir:
        return Path(settings.current.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quantattn"


def source_hash() -> str:
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update("\0".join(OPTIONS[:3]).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    major, minor = nvrtc().version
    return cache_root() / "hopper" / f"{source_hash()}-{ARCH}-nvrtc{major}.{minor}"


def _unsafe_reason(st: os.stat_result, what: str) -> str | None:
    if st.st_uid != os.getuid():
        return f"{what} is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(path: Path) -> str | None:
    """Create `path` (0700) and check every folder from the cache root down: None when it is safe to
    trust, else why not."""
    root = cache_root()
    try:
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                try:
                    folder.mkdir(mode=0o700)  # each folder quantattn creates is the user's alone
                except FileExistsError:  # another thread or process made it first: checked below
                    pass
    except OSError as exc:
        return f"cannot create {path}: {exc}"
    chain = [path, *[p for p in path.parents if p == root or root in p.parents]]
    for folder in chain:
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode):
            return f"{folder} is not a folder (a symbolic link?)"
        reason = _unsafe_reason(st, str(folder))
        if reason:
            return reason
    return None


def read_cached(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) if it exists and is safe, (None, why not) if it exists and is not,
    (None, None) if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot open {path}: {exc}"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the file opened, not whatever the name points to now
        if not stat.S_ISREG(st.st_mode):
            return None, f"{path} is not a regular file"
        reason = _unsafe_reason(st, str(path))
        if reason:
            return None, reason
        return f.read(), None


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MARK = b"\0quantattn lowered name\0"  # a cache file: the cubin, MARK, the kernel's lowered name
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("quantattn: %s", message)


def cached_cubin(key: str, source_file: str, name_expression: str, refresh: bool = False) -> tuple[bytes, str]:
    """The cubin and lowered name of one kernel instantiation: from the cache where it is there and safe,
    else compiled (and stored where the cache folder is safe). `key` names the file; refresh=True
    compiles again whatever the cache holds (the driver refused the cached bytes)."""
    folder = cache_dir()
    path = folder / f"{key}.cubin"
    unsafe = private_dir(folder)
    if unsafe is None and not refresh:
        data, reason = read_cached(path)
        if data is not None:
            cubin, _, lowered = data.rpartition(MARK)
            if cubin and lowered:
                return cubin, lowered.decode()
            reason = f"{path} is not a cubin written by quantattn"
        if reason:
            _warn_once(f"not using the cached Hopper kernel: {reason}; compiling it again")
    elif unsafe is not None:
        _warn_once(f"the Hopper kernel cache is not used: {unsafe}; kernels are compiled in memory each run")
    source = (HERE / source_file).read_text()
    cubin, lowered = compile_cubin(source, name_expression, source_file)
    if unsafe is None:
        try:
            write_atomic(path, cubin + MARK + lowered.encode())
        except OSError as exc:
            _warn_once(f"could not write the Hopper kernel cache ({exc})")
    return cubin, lowered
