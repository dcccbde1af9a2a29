"""Builds the Hopper backend's shared library (attention kernel and K/V preprocessing) with nvcc, on first
use (or ahead of time, below), into a cache folder keyed by the sources' hash.

The library holds plain CUDA C++ (no PyTorch headers), so one build serves every torch version and it
compiles in seconds; quantattn.hopper loads it with ctypes. `python -m quantattn.hopper.build` builds it
ahead of time (and prints where)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("attention.cu", "preprocess.cu", "common.cuh", "wgmma.cuh")
UNITS = ("attention.cu", "preprocess.cu")  # the translation units
LIB_NAME = "libquantattn_hopper.so"
# sm_90a: wgmma and setmaxnreg exist only for the architecture-specific target
NVCC_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC"]


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, /usr/local/cuda, or PATH."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("QUANTATTN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantattn"
    )
    return Path(base) / "hopper" / source_hash()


def compile_library(out_dir: str | os.PathLike, nvcc: str | None = None) -> Path:
    """Compile the kernel into out_dir/LIB_NAME; raises RuntimeError with the compiler's output on failure."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("no CUDA compiler (nvcc) found: set CUDA_HOME or put nvcc on PATH")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIB_NAME
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}"
    cmd = [nvcc, *NVCC_FLAGS, "-o", str(tmp), *(str(HERE / name) for name in UNITS)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stdout}{res.stderr}")
    os.replace(tmp, target)  # atomic: concurrent builders never see half a library
    return target


def library_path(build: bool = True) -> Path | None:
    """The library for these sources: QUANTATTN_HOPPER_LIB, the cache's, or a fresh build (build=True)
    when nvcc is there; None when there is none."""
    explicit = os.environ.get("QUANTATTN_HOPPER_LIB")
    if explicit:
        return Path(explicit)
    cached = cache_dir() / LIB_NAME
    if cached.exists():
        return cached
    if build and find_nvcc() is not None:
        return compile_library(cached.parent)
    return None


def main() -> int:
    path = compile_library(cache_dir())
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
