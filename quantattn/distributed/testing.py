"""A group of local processes joined by torch.distributed that runs functions on request.

Tests and the benchmark start the processes and the process group once, then run many functions on
every rank (`group.run(fn, *args)`), instead of paying a process start (an import of torch) per test.
Functions travel by reference (module and name, or file and name), so they must be module-level
functions; their return values and exceptions come back by rank.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import math
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import quantattn
from quantattn.distributed.merge import merge_into_
from quantattn.distributed.ring import plan_step
from quantattn.distributed.sharding import shard_sequence, unshard_sequence


def _function_ref(fn) -> tuple[str, str, str]:
    if not inspect.isfunction(fn) or "<locals>" in fn.__qualname__:
        raise TypeError(f"LocalGroup.run takes module-level functions, got {fn!r}")
    return fn.__module__, os.path.abspath(inspect.getfile(fn)), fn.__qualname__


_loaded_by_path: dict[str, object] = {}


def _resolve(ref: tuple[str, str, str]):
    module_name, path, qualname = ref
    module = None
    try:
        candidate = importlib.import_module(module_name)
        if os.path.abspath(getattr(candidate, "__file__", "") or "") == path:
            module = candidate
    except ImportError:
        pass
    if module is None:  # a test module pytest imported under a name this process cannot import
        module = _loaded_by_path.get(path)
        if module is None:
            spec = importlib.util.spec_from_file_location(f"_local_group_{len(_loaded_by_path)}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _loaded_by_path[path] = module
    return getattr(module, qualname)


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name in ("lo", "lo0")), None)


def _worker(rank, world_size, backend, init_file, timeout_s, env, tasks, results):
    os.environ.update(env)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and _loopback_interface():
        # every rank is on this machine: loopback works where the host name does not resolve (containers)
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while (task := tasks.get()) is not None:
        ref, args, kwargs = task
        try:
            results.put((rank, True, _resolve(ref)(*args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _tracebacks(failures: dict) -> str:
    return "".join(f"\n--- rank {r}:\n{tb}" for r, tb in sorted(failures.items()))


class LocalGroup:
    """`world_size` processes on this machine in one torch.distributed group ("gloo": CPU tensors;
    "nccl": rank r on GPU r). `env` is set in every process before the group starts (for NCCL, e.g.
    NCCL_NVLS_ENABLE=0). Calls that take longer than `timeout_s` end the group with TimeoutError."""

    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 60.0, env: dict | None = None):
        self.world_size, self.timeout_s = world_size, timeout_s
        self._dir = tempfile.mkdtemp(prefix="quantattn-group-")
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = []
        init_file = os.path.join(self._dir, "init")
        for rank in range(world_size):
            args = (rank, world_size, backend, init_file, timeout_s, dict(env or {}), self._tasks[rank], self._results)
            proc = ctx.Process(target=_worker, args=args, daemon=True)
            proc.start()
            self._procs.append(proc)
        try:
            self._collect("start the process group")
        except BaseException:
            self.close()
            raise

    def run(self, fn, *args, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; returns the results by rank. Raises RuntimeError with every
        failing rank's traceback when any rank raised."""
        if not self._procs:
            raise RuntimeError("this LocalGroup is closed")
        ref = _function_ref(fn)
        for q in self._tasks:
            q.put((ref, args, kwargs))
        return self._collect(fn.__qualname__)

    def _collect(self, what: str) -> list:
        results, failures = {}, {}
        deadline = time.monotonic() + self.timeout_s
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                answered = results.keys() | failures.keys()
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in answered]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"rank(s) {dead} died" if dead else f"no answer within {self.timeout_s:.0f} s"
                    raise TimeoutError(f"LocalGroup: {what}: {why}" + _tracebacks(failures)) from None
                continue
            (results if ok else failures)[rank] = value
        if failures:
            raise RuntimeError(f"LocalGroup: {what} failed on rank(s) {sorted(failures)}" + _tracebacks(failures))
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for q, proc in zip(self._tasks, procs, strict=False):
            if proc.is_alive():
                q.put(None)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()  # one of ours, blocked in a collective that will not complete
                proc.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def simulated_ring(q, k, v, world: int, causal: bool, **options):
    """Ring attention's per-block quantattn.sageattn calls and lse merges for every rank of a zig-zag
    ring of `world` ranks, in one process, from the whole sequences ([B, H, N, d]): what the ring
    computes, without the communication. Returns the whole output (q's dtype) and the float32 lse."""
    shards = [[shard_sequence(t, r, world, dim=2, zigzag=True) for t in (q, k, v)] for r in range(world)]
    outs, lses = [], []
    for rank in range(world):
        qr = shards[rank][0]
        acc = torch.zeros(qr.shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(qr.shape[:-1], -math.inf, device=q.device)
        for step in range(world):
            source = (rank - step) % world
            plan = plan_step(rank, source, qr.shape[2], causal, True)
            if plan is None:
                continue
            rows, keys = slice(plan.q_start, plan.q_end), slice(plan.k_start, plan.k_end)
            o, l = quantattn.sageattn(qr[:, :, rows], shards[source][1][:, :, keys], shards[source][2][:, :, keys],
                                      is_causal=plan.causal, return_lse=True, **options)  # fmt: skip
            merge_into_(acc[:, :, rows], acc_lse[:, :, rows], o, l)
        outs.append(acc.to(q.dtype))
        lses.append(acc_lse)
    return unshard_sequence(outs, dim=2, zigzag=True), unshard_sequence(lses, dim=2, zigzag=True)
