"""Unified sequence parallelism (USP, Fang and Zhao 2024): Ulysses inside groups of U ranks, a ring across them.

The P = R U ranks form R groups of U consecutive ranks (on one host, so the all-to-all runs on its fast
links); rank i of every group joins one ring of R ranks (the point-to-point traffic, which can cross
hosts and overlaps the computation). Ulysses turns each group's sequence shards into the group's whole
ring shard for H/U heads, then ring attention runs over the ring for those heads. Ulysses alone caps P
at the head count, a ring alone passes all of K/V through every rank; USP takes the heads it can and
rings the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from quantattn.distributed.collectives import size_and_rank
from quantattn.distributed.ring import ring_attention
from quantattn.distributed.ulysses import ulysses_attention


class UspGroups(NamedTuple):
    ulysses: dist.ProcessGroup  # this rank's U consecutive ranks
    ring: dist.ProcessGroup  # the ranks at this rank's position in every Ulysses group
    ulysses_size: int
    ring_size: int


def usp_groups(ulysses_size: int) -> UspGroups:
    """Create the process groups of USP over the default group (every rank must call it, in the same order
    as its other new_group calls). Rank g is Ulysses rank g % U of ring position g // U, which is the
    layout shard_sequence(..., ulysses_size=U) gives."""
    world, rank = size_and_rank(None)
    if ulysses_size < 1 or world % ulysses_size:
        raise ValueError(f"ulysses_size ({ulysses_size}) must divide the number of ranks ({world})")
    rings = world // ulysses_size
    ulysses_ranks = [list(range(i * ulysses_size, (i + 1) * ulysses_size)) for i in range(rings)]
    ring_ranks = [list(range(i, world, ulysses_size)) for i in range(ulysses_size)]
    ulysses, _ = dist.new_subgroups_by_enumeration(ulysses_ranks)
    ring, _ = dist.new_subgroups_by_enumeration(ring_ranks)
    return UspGroups(ulysses, ring, ulysses_size, rings)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    groups: UspGroups,
    zigzag: bool | None = None,
    attention=None,
    check_shards: bool = True,
    **options,
):
    """Attention over a sequence sharded in USP's layout (shard_sequence(..., zigzag=zigzag,
    ulysses_size=groups.ulysses_size)); shapes and options as in ulysses_attention and ring_attention
    (zigzag, required with is_causal, as there).
    Hq must be a multiple of the Ulysses size. Returns this rank's output shard, and the lse with return_lse."""
    if not isinstance(groups, UspGroups):
        raise TypeError(f"groups must be the UspGroups that usp_groups() returns, got {type(groups).__name__}")

    def ring_over_groups(q, k, v, **kwargs):
        return ring_attention(
            q, k, v, group=groups.ring, zigzag=zigzag, attention=attention, check_shards=check_shards, **kwargs
        )

    return ulysses_attention(
        q, k, v, tensor_layout, is_causal, sm_scale, return_lse, group=groups.ulysses,
        attention=ring_over_groups, check_shards=check_shards, **options,
    )  # fmt: skip
