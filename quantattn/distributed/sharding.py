"""Where each rank's tokens come from: split a full sequence into rank shards, and put it back together.

Three layouts, all of equal shards:
- contiguous (Ulysses, and ring attention without masking): rank r holds tokens [r N/P, (r+1) N/P);
- zig-zag (causal ring attention): the sequence is cut into 2P chunks and rank r holds chunks r and
  2P-1-r, one early and one late, so that under a causal mask every rank has the same work at every
  ring step;
- USP (`ulysses_size` U > 1): the P = R U ranks form R ring positions of U consecutive ranks; ring
  position i = rank // U holds the zig-zag (or contiguous) shard i of R, split contiguously among its U
  ranks (Ulysses gathers it back before the ring runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from quantattn.distributed.collectives import size_and_rank


def _check_layout(n: int, world_size: int, zigzag: bool, ulysses_size: int) -> int:
    """Number of ring positions R; raises when n tokens cannot be split into the layout's equal parts."""
    if ulysses_size < 1 or world_size % ulysses_size:
        raise ValueError(f"ulysses_size ({ulysses_size}) must divide the number of ranks ({world_size})")
    rings = world_size // ulysses_size
    # equal ring chunks (2R zig-zag, R contiguous), each ring shard split into U equal parts
    multiple = math.lcm(2 * rings if zigzag else rings, world_size)
    if n % multiple:
        layout = f"{'zig-zag' if zigzag else 'contiguous'} over {rings} ring position(s)"
        if ulysses_size > 1:
            layout += f", each split among {ulysses_size} Ulysses ranks"
        raise ValueError(
            f"a sequence of {n} tokens cannot be split into equal shards ({layout}); pad it to a multiple of "
            f"{multiple} tokens (with a causal mask, tokens padded at the end are never seen by the real ones)"
        )
    return rings


def _ring_chunks(rank: int, rings: int, zigzag: bool) -> list[int]:
    """Indices of the chunks (of 2R when zig-zag, R otherwise) that ring position `rank` holds, in order."""
    return [rank, 2 * rings - 1 - rank] if zigzag else [rank]


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, *, dim: int, zigzag: bool = False, ulysses_size: int = 1
) -> torch.Tensor:
    """Rank `rank`'s shard of the full sequence x along `dim` (2 for "HND" tensors, 1 for "NHD"), as a
    contiguous copy. See the module docstring for the layouts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = x.shape[dim]
    rings = _check_layout(n, world_size, zigzag, ulysses_size)
    ring_pos, ulysses_rank = divmod(rank, ulysses_size)
    chunks = x.chunk(2 * rings if zigzag else rings, dim)
    ring_shard = torch.cat([chunks[i] for i in _ring_chunks(ring_pos, rings, zigzag)], dim)
    return ring_shard.chunk(ulysses_size, dim)[ulysses_rank].contiguous()


def unshard_sequence(
    shards: Sequence[torch.Tensor], *, dim: int, zigzag: bool = False, ulysses_size: int = 1
) -> torch.Tensor:
    """The full sequence from every rank's shard (`shards[r]` from rank r): the inverse of shard_sequence."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_sequence needs at least one shard")
    sizes = {s.shape[dim] for s in shards}
    if len(sizes) != 1:
        raise ValueError(f"shards must have one length along dim {dim}, got {sorted(sizes)}")
    rings = _check_layout(sizes.pop() * world_size, world_size, zigzag, ulysses_size)
    chunks: dict[int, torch.Tensor] = {}
    for ring_pos in range(rings):
        group = shards[ring_pos * ulysses_size : (ring_pos + 1) * ulysses_size]
        ring_shard = torch.cat(list(group), dim)
        held = _ring_chunks(ring_pos, rings, zigzag)
        for index, part in zip(held, ring_shard.chunk(len(held), dim), strict=True):
            chunks[index] = part
    return torch.cat([chunks[i] for i in range(len(chunks))], dim)


def gather_sequence(
    x: torch.Tensor, *, dim: int, group=None, zigzag: bool = False, ulysses_size: int = 1
) -> torch.Tensor:
    """All ranks' shards of `group` gathered (torch.distributed.all_gather) into the full sequence, on every rank."""
    world, _ = size_and_rank(group)
    x = x.contiguous()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x, group=group)
    return unshard_sequence(shards, dim=dim, zigzag=zigzag, ulysses_size=ulysses_size)
