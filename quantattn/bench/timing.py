"""Median time of a call: CUDA events around each call, after a compile call and warm-ups.

The first call compiles (Triton JIT) and is never timed; `warmups` more calls follow, then the timed
repeats. Calls rotate through the given argument sets so that small problems are not timed out of a warm
L2. The repeat count is at least `min_repeats` (30 by the protocol) and grows for short calls, whose
spread is larger, until the timed calls take about `target_s` (at most `max_repeats`).

On the CPU (the benchmark's own test mode) the same loop runs with a wall clock.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

WARMUPS = 3
MIN_REPEATS = 30
MAX_REPEATS = 200
TARGET_S = 0.3


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    warmups: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: Sequence[float], warmups: int) -> Timing:
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return Timing(statistics.median(s), s[0], q[0], q[2], len(s), warmups)


def repeat_count(estimate_ms: float, min_repeats: int, max_repeats: int, target_s: float) -> int:
    if estimate_ms <= 0 or not math.isfinite(estimate_ms):
        return max_repeats
    return max(min_repeats, min(max_repeats, math.ceil(target_s * 1e3 / estimate_ms)))


def warm_up(fn, arg_sets, warmups: int, clock) -> float:
    """One call (compilation, autotuning, first-touch allocations), then `warmups` timed calls over the
    argument sets: milliseconds per call (NaN without warm-ups)."""
    fn(*arg_sets[0])
    clock.sync()
    start = clock.mark()
    for i in range(warmups):
        fn(*arg_sets[(i + 1) % len(arg_sets)])
    stop = clock.mark()
    clock.sync()
    return clock.elapsed_ms(start, stop) / warmups if warmups else math.nan


def measure(
    fn: Callable[..., object],
    arg_sets: Sequence[tuple],
    *,
    warmups: int = WARMUPS,
    min_repeats: int = MIN_REPEATS,
    max_repeats: int = MAX_REPEATS,
    target_s: float = TARGET_S,
    device: str = "cuda",
) -> Timing:
    """Time fn(*arg_sets[i % len(arg_sets)]); see the module docstring."""
    if not arg_sets:
        raise ValueError("measure needs at least one argument set")
    max_repeats = max(max_repeats, min_repeats)
    clock = make_clock(device)
    estimate = warm_up(fn, arg_sets, warmups, clock)
    repeats = repeat_count(estimate, min_repeats, max_repeats, target_s)
    marks = []
    for i in range(repeats):
        args = arg_sets[(warmups + 1 + i) % len(arg_sets)]
        before = clock.mark()
        fn(*args)
        marks.append((before, clock.mark()))
    clock.sync()
    return summarize([clock.elapsed_ms(a, b) for a, b in marks], warmups)


def make_clock(device: str = "cuda"):
    """CUDA events on the GPU, a wall clock elsewhere: mark(), sync(), elapsed_ms(a, b)."""
    return _CudaClock() if device == "cuda" else _WallClock()


def median_seconds(fn: Callable[[], object], **kwargs) -> float:
    """Median time of fn() in seconds, by `measure`'s protocol (for scripts that time a closure)."""
    return measure(fn, [()], **kwargs).median_ms * 1e-3


class _CudaClock:
    @staticmethod
    def mark():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def sync():
        torch.cuda.synchronize()

    @staticmethod
    def elapsed_ms(a, b) -> float:
        return a.elapsed_time(b)


class _WallClock:
    @staticmethod
    def mark():
        return time.perf_counter()

    @staticmethod
    def sync():
        pass

    @staticmethod
    def elapsed_ms(a, b) -> float:
        return (b - a) * 1e3
