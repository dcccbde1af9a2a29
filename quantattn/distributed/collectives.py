"""What the sequence-parallel modes take from torch.distributed: group facts, the all-to-all that turns a
sequence-sharded tensor into a head-sharded one and back, one ring pass of K/V blocks, and the check
that every rank holds shards of one shape.

The check runs before any data moves and gives every rank the same facts, so a bad call fails on every
rank with the same message instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

MAX_DIMS = 6
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}


def size_and_rank(group) -> tuple[int, int]:
    """(number of ranks, this process's rank) in `group` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "quantattn.distributed needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group: 'nccl' for CUDA tensors, 'gloo' for CPU tensors)"
        )
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"this process (rank {dist.get_rank()}) is not a member of the given process group")
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, group_rank: int) -> int:
    """The default group's rank of `group`'s rank `group_rank` (what point-to-point calls take)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _signature(tensors: dict[str, torch.Tensor]) -> list[int]:
    sig = []
    for t in tensors.values():
        shape = list(t.shape)[:MAX_DIMS]
        sig += [t.dim(), *shape, *[-1] * (MAX_DIMS - len(shape)), _DTYPE_CODES.get(t.dtype, 0)]
    return sig


def _describe(names, sig: list[int]) -> str:
    parts, width = [], MAX_DIMS + 2
    for i, name in enumerate(names):
        ndim, *shape = sig[i * width : i * width + MAX_DIMS + 1]
        dtype = _DTYPE_NAMES.get(sig[i * width + width - 1], "other dtype")
        parts.append(f"{name} {tuple(shape[:ndim])} {dtype}")
    return ", ".join(parts)


def check_same_shards(caller: str, group, **tensors: torch.Tensor) -> None:
    """Raise ValueError on every rank unless every rank of `group` passed tensors of one shape and dtype.

    One small all_gather (and a host synchronization); `check_shards=False` in the public functions skips it.
    """
    world, _ = size_and_rank(group)
    if world == 1:
        return
    device = next(iter(tensors.values())).device
    mine = torch.tensor(_signature(tensors), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    sigs = [g.tolist() for g in gathered]
    if any(s != sigs[0] for s in sigs):
        ranks = "; ".join(f"rank {r}: {_describe(tensors, s)}" for r, s in enumerate(sigs))
        raise ValueError(
            f"{caller}: every rank of the group must hold shards of one shape and dtype (the sequence split "
            f"into equal parts, see quantattn.distributed.shard_sequence); got {ranks}"
        )


def all_to_all_start(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> Callable[[], torch.Tensor]:
    """Start the all-to-all that splits `scatter_dim` into one equal part per rank (part i goes to rank i)
    and concatenates the parts received along `gather_dim`, in rank order. Returns a function that waits
    and gives the result: scatter_dim shrinks P-fold, gather_dim grows P-fold.

    With scatter_dim = heads and gather_dim = sequence, a sequence shard of every head becomes the whole
    sequence of 1/P of the heads (Ulysses), and the reverse call undoes it.
    """
    world, _ = size_and_rank(group)
    if world == 1:
        return lambda: x
    send = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        # axis 0 is now the source rank; it goes just before the gather axis and merges with it
        return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)

    return finish


def ring_pass_start(tensors: tuple[torch.Tensor, ...], group) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Start sending `tensors` to the next rank of the ring and receiving the previous rank's into fresh
    buffers (one batch of torch.distributed point-to-point operations). Returns a function that waits and
    gives the received tensors."""
    world, rank = size_and_rank(group)
    send_to, recv_from = global_rank(group, (rank + 1) % world), global_rank(group, (rank - 1) % world)
    received = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, recv_from, group) for t in received]
    works = dist.batch_isend_irecv(ops)

    def finish() -> tuple[torch.Tensor, ...]:
        for work in works:
            work.wait()
        return received

    return finish
