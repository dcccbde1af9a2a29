"""Compile every Hopper kernel ahead of time into the cache (`python -m quantattn.hopper.build`), so that
no first call waits for NVRTC; prints the cache folder and how long each kernel took. Needs NVRTC, not a
GPU."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from quantattn.hopper import compiler, kernels


def build_all(workers: int = 4) -> list[tuple[str, float]]:
    """(kernel, seconds) for every instantiation, compiled (or found) in the cache, in parallel threads
    (NVRTC compiles different programs concurrently)."""

    def one(spec: kernels.Spec) -> tuple[str, float]:
        t0 = time.perf_counter()
        compiler.cached_cubin(spec.key, spec.source, spec.name)
        return spec.key, time.perf_counter() - t0

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, kernels.all_specs()))


def main() -> int:
    state = compiler.nvrtc()
    if state.lib is None:
        print(f"quantattn.hopper.build: {state.reason}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    for key, seconds in build_all():
        print(f"{key:42s} {seconds:6.2f} s")
    print(
        f"{len(kernels.all_specs())} kernels in {time.perf_counter() - t0:.1f} s, NVRTC {state.version[0]}.{state.version[1]}"
    )
    print(compiler.cache_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
