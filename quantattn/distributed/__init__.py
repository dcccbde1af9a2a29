"""Sequence parallelism for quantattn on torch.distributed: attention over a sequence sharded across ranks.

- `ulysses_attention`: all-to-all from sequence shards to head shards, local attention, all-to-all back.
  Same result as one call on the whole sequence; needs the query heads divisible by the ranks.
- `ring_attention`: K/V blocks passed around the ring (point-to-point, overlapped with the computation),
  partials merged exactly by their lse; any head count; zig-zag layout for balanced causal work.
- `usp_attention` (with `usp_groups`): Ulysses inside groups of ranks, a ring across the groups.
- `shard_sequence`, `unshard_sequence`, `gather_sequence`: the layouts each mode expects.
- `merge_attention`: the exact lse merge of partial attentions.

docs/distributed.md says when to use which, with measured scaling.
"""

from quantattn.distributed.merge import merge_attention
from quantattn.distributed.ring import ring_attention
from quantattn.distributed.sharding import gather_sequence, shard_sequence, unshard_sequence
from quantattn.distributed.ulysses import ulysses_attention
from quantattn.distributed.usp import UspGroups, usp_attention, usp_groups

__all__ = [
    "UspGroups",
    "gather_sequence",
    "merge_attention",
    "ring_attention",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
    "usp_attention",
    "usp_groups",
]
