"""The measuring loop: accuracy on the [1, 8, 4096, d] slice, then speed, case group by case group.

A group is one (head_dim, seq_len): its input sets are drawn once, serve causal off and on, and are freed
before the next group (at N = 32K, d = 128 one bf16 tensor is 1 GiB). Results are written to the JSON
after every group, so a run that is stopped keeps what it measured.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantattn.bench import cases as C
from quantattn.bench import timing
from quantattn.bench.impls import Implementation
from quantattn.metrics import accuracy_metrics, make_qkv
from quantattn.reference import attention_fp64


@dataclass
class Settings:
    head_dims: tuple[int, ...] = C.HEAD_DIMS
    seq_lens: tuple[int, ...] = C.SEQ_LENS
    causals: tuple[bool, ...] = C.CAUSALS
    batch: int = C.BATCH
    heads: int = C.HEADS
    accuracy: bool = True
    accuracy_seq_len: int = C.ACCURACY_SEQ_LEN
    warmups: int = timing.WARMUPS
    min_repeats: int = timing.MIN_REPEATS
    max_repeats: int = timing.MAX_REPEATS
    target_s: float = timing.TARGET_S
    stop_after_s: float | None = None
    device: str = "cuda"


class BrokenDevice(RuntimeError):
    """A CUDA error that leaves the context unusable (an illegal address, say): nothing more can run."""


class Runner:
    def __init__(self, settings: Settings, impls: list[Implementation], result: dict, save: Callable[[], None]):
        self.s = settings
        self.impls = [i for i in impls if i.available]
        self.result = result
        self.save = save
        self.start = time.perf_counter()
        self.stopped = False
        self._tracebacks_shown = set()

    # --------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            for head_dim in self.s.head_dims:
                if self.s.accuracy:
                    for causal in self.s.causals:
                        self.accuracy(head_dim, causal)
                    self.save()
                for _, _, group in C.enumerate_cases(
                    (head_dim,), self.s.seq_lens, self.s.causals, self.s.batch, self.s.heads
                ):
                    self.speed_group(group)
                    self.save()
        except BrokenDevice as exc:
            print(f"\nstopped: {exc}", file=sys.stderr)
            raise
        finally:
            self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def _error(self, impl: Implementation, what: str, exc: BaseException) -> str:
        message = f"{type(exc).__name__}: {exc}".strip()
        if impl.kind == "quantattn" and (impl.name, type(exc)) not in self._tracebacks_shown:
            self._tracebacks_shown.add((impl.name, type(exc)))
            traceback.print_exc(file=sys.stderr)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        elif self.s.device == "cuda" and not _device_usable():
            raise BrokenDevice(f"{impl.name} {what} left the CUDA context unusable: {message}") from exc
        return message

    # --------------------------------------------------------------------------------------------
    def impls_for(self, head_dim: int) -> list[Implementation]:
        """The implementations that run this head dim (the others are left out of its cases)."""
        return [i for i in self.impls if i.runs(head_dim)]

    # --------------------------------------------------------------------------------------------
    def accuracy(self, head_dim: int, causal: bool) -> None:
        shape = [C.ACCURACY_BATCH, C.ACCURACY_HEADS, self.s.accuracy_seq_len, head_dim]
        for kind in C.INPUT_KINDS:
            q, k, v = make_qkv(*shape, device=self.s.device, outliers=kind == "outliers", seed=0)
            ref = attention_fp64(q, k, v, is_causal=causal)
            summary = []
            for impl in self.impls_for(head_dim):
                rec = {
                    "head_dim": head_dim, "causal": causal, "implementation": impl.name,
                    "inputs": kind, "shape": shape,
                }  # fmt: skip
                try:
                    rec.update(accuracy_metrics(impl.whole(q, k, v, causal), ref))
                    summary.append(f"{impl.name} {rec['cosine']:.6f}/{rec['rel_l1']:.4f}")
                except Exception as exc:  # noqa: BLE001  one failing implementation must not end the run
                    rec["error"] = self._error(impl, "accuracy", exc)
                    summary.append(f"{impl.name} error")
                self.result["accuracy"].append(rec)
            del q, k, v, ref
            self._log(
                f"accuracy d={head_dim} causal {C.causal_label(causal)} {kind} (cosine/rel L1): " + ", ".join(summary)
            )

    # --------------------------------------------------------------------------------------------
    def speed_group(self, group: list[C.Case]) -> None:
        impls = self.impls_for(group[0].head_dim)
        if self._time_is_up():
            for case in group:
                for impl in impls:
                    self._skip(case, impl, 0)
            return
        sets = self._input_sets(group[0])
        try:
            for case in group:
                for impl in impls:
                    self.speed_case(case, impl, sets)
        finally:
            del sets
            if self.s.device == "cuda":
                torch.cuda.empty_cache()

    def _time_is_up(self) -> bool:
        if self.s.stop_after_s is not None and self.elapsed() > self.s.stop_after_s:
            if not self.stopped:
                self._log(f"time limit of {self.s.stop_after_s:.0f} s reached: the remaining cases are skipped")
            self.stopped = True
        return self.stopped

    def _input_sets(self, case: C.Case) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        sets = []
        for i in range(case.input_sets):
            gen = torch.Generator(device=self.s.device).manual_seed(1000 + i)
            sets.append(
                tuple(torch.randn(shape, generator=gen, device=self.s.device, dtype=torch.bfloat16) for _ in range(3))
            )
        return sets

    def _base(self, case: C.Case, impl: Implementation, timing_kind: str, n_sets: int) -> dict:
        return {
            "head_dim": case.head_dim, "causal": case.causal, "seq_len": case.seq_len,
            "batch": case.batch, "heads": case.heads, "implementation": impl.name,
            "timing": timing_kind, "input_sets": n_sets, "ops": case.ops,
        }  # fmt: skip

    def _skip(self, case: C.Case, impl: Implementation, n_sets: int) -> None:
        for t in ("whole", "kernel") if impl.prepare_kernel else ("whole",):
            self.result["speed"].append({**self._base(case, impl, t, n_sets), "skipped": "time limit"})

    def _measure(self, fn, arg_sets) -> timing.Timing:
        return timing.measure(
            fn, arg_sets, warmups=self.s.warmups, min_repeats=self.s.min_repeats,
            max_repeats=self.s.max_repeats, target_s=self.s.target_s, device=self.s.device,
        )  # fmt: skip

    def speed_case(self, case: C.Case, impl: Implementation, sets) -> None:
        if self._time_is_up():
            self._skip(case, impl, len(sets))
            return
        cells = []
        rec = self._base(case, impl, "whole", len(sets))
        try:
            t = self._measure(impl.whole, [(q, k, v, case.causal) for q, k, v in sets])
            rec.update(t.as_dict(), tops=case.tops(t.median_ms))
            cells.append(f"whole {rec['tops']:7.1f}")
        except Exception as exc:  # noqa: BLE001
            rec["error"] = self._error(impl, "whole call", exc)
            cells.append("whole  error")
        self.result["speed"].append(rec)
        if impl.prepare_kernel is not None:
            rec = self._base(case, impl, "kernel", len(sets))
            prepared = None
            try:
                prepared = [impl.prepare_kernel(q, k, v, case.causal) for q, k, v in sets]
                t = self._measure(prepared[0][0], [args for _, args in prepared])
                rec.update(t.as_dict(), tops=case.tops(t.median_ms))
                cells.append(f"kernel {rec['tops']:7.1f}")
            except Exception as exc:  # noqa: BLE001
                rec["error"] = self._error(impl, "kernel only", exc)
                cells.append("kernel  error")
            finally:
                del prepared
            self.result["speed"].append(rec)
        self._log(
            f"d={case.head_dim} causal {C.causal_label(case.causal):3} N={C.format_seq_len(case.seq_len):>4} "
            f"{impl.name:<15} " + "  ".join(cells) + " TOPS"
        )


def _device_usable() -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False
