"""Ring attention (Liu et al. 2023): K/V blocks travel around the ring, partial outputs merge by lse.

Each of the P ranks keeps its query shard and, at step s, attends the K/V shard that started on rank
r - s; before computing it starts passing that block on to rank r + 1 (torch.distributed point-to-point),
so the transfer overlaps the computation. Partials merge exactly with their logsumexp (merge.py).

Numerics: each partial is one quantattn call on one K/V block, so smooth K subtracts the block's (trimmed) mean and
V's FP8 scales are the block's, not the whole sequence's. The merged result is attention of the same
operands, quantized per block: not bitwise a single call's, as accurate (tests/test_distributed.py
bounds it by the single call's own error against FP64 attention). The partial outputs come back in the
input dtype and are merged in float32.

Causal masking with the zig-zag layout (sharding.py): rank r holds chunks r and 2P-1-r of 2P, in this
order. The block of rank j < r holds chunk j, before both query chunks, and chunk 2P-1-j, after both: all
queries attend its first half, unmasked. The block of rank j > r lies after chunk r and before chunk
2P-1-r: the second query half attends all of it, unmasked. The own block is ordinary causal attention (a
shard's tokens are in increasing order). Every step is then 2 (N/2P)^2 query-key pairs on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantattn.distributed.collectives import ring_pass_start, size_and_rank
from quantattn.distributed.merge import merge_into_
from quantattn.distributed.ulysses import check_shard_tensors, head_and_seq_dims


@dataclass(frozen=True)
class StepPlan:
    """What one ring step computes: query rows [q_start, q_end) against keys [k_start, k_end) of the
    block held at that step, with or without a (bottom-right = diagonal, Nq = Nk) causal mask."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


def plan_step(rank: int, source: int, n: int, is_causal: bool, zigzag: bool, nk: int | None = None) -> StepPlan | None:
    """The work of `rank` on the K/V block that started on rank `source`; None when it has none.
    n, nk: tokens per query and key shard (one length when is_causal)."""
    if not is_causal:
        return StepPlan(0, n, 0, n if nk is None else nk, False)
    if source == rank:
        return StepPlan(0, n, 0, n, True)
    if not zigzag:
        return StepPlan(0, n, 0, n, False) if source < rank else None
    half = n // 2
    if source < rank:
        return StepPlan(0, n, 0, half, False)
    return StepPlan(half, n, 0, n, False)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    group=None,
    zigzag: bool | None = None,
    attention=None,
    check_shards: bool = True,
    **options,
):
    """Attention over a sequence sharded across the ranks of `group`, by passing K/V blocks around the ring.

    q: this rank's shard, [B, Hq, n, d] ("HND") or [B, n, Hq, d] ("NHD"); k, v: [B, Hkv, nk, d] likewise,
    any head counts quantattn.sageattn takes (grouped-query attention included).
    zigzag: how the sequence was sharded, required with is_causal (the shards cannot tell, and the wrong
    one gives a wrong result): True for the zig-zag layout (shard_sequence(..., zigzag=True)), which
    balances the causal work; False for contiguous shards (rank r: tokens [r n, (r+1) n)), where rank r has
    r + 1 blocks of work and the last rank sets the pace. Without is_causal any layout works (the result
    does not depend on where the keys are), and nk may differ from n.
    attention: the local attention, called once per step with return_lse=True (default quantattn.sageattn,
    whose lse is what the merge needs: natural log, of the unsmoothed scores); it receives tensor_layout,
    is_causal, sm_scale, return_lse and **options (config=, backend=, qk_quant_gran=, ...) as keywords.
    check_shards: first check (one small all_gather) that every rank holds shards of one shape.
    Returns this rank's output in q's layout and dtype, and with return_lse the lse [B, Hq, n]
    (float32; the partials' dtype when that is wider).
    """
    world, rank = size_and_rank(group)
    check_shard_tensors("ring_attention", q, k, v, tensor_layout, group, check_shards)
    h, s = head_and_seq_dims(tensor_layout)
    n, nk = q.shape[s], k.shape[s]
    if is_causal and n != nk:
        raise ValueError(f"ring_attention: with is_causal, query and key shards must have one length, got {n} and {nk}")
    if zigzag is not None and not isinstance(zigzag, bool):
        raise TypeError(f"ring_attention: zigzag must be True, False or None, got {zigzag!r}")
    if is_causal and zigzag is None:
        raise ValueError(
            "ring_attention: with is_causal, say how the sequence was sharded: zigzag=True for "
            "shard_sequence(..., zigzag=True) (balanced causal work), zigzag=False for contiguous shards (rank r "
            "holds tokens [r n, (r+1) n)); the tensors cannot tell, and the wrong layout gives a wrong result"
        )
    if is_causal and zigzag and n % 2:
        raise ValueError(f"ring_attention: zig-zag shards hold two equal chunks, so an even length; got {n}")
    if attention is None:
        from quantattn.api import sageattn as attention
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    b, hq = q.shape[0], q.shape[h]
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hq, n), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = (k.contiguous(), v.contiguous())  # point-to-point sends need dense tensors
    for step in range(world):
        finish_pass = ring_pass_start(kv, group) if step < world - 1 else None
        plan = plan_step(rank, (rank - step) % world, n, is_causal, zigzag, nk)
        if plan is not None:
            rows, keys = slice(plan.q_start, plan.q_end), slice(plan.k_start, plan.k_end)
            q_part = q[:, rows] if s == 1 else q[:, :, rows]
            k_part, v_part = ((t[:, keys] if s == 1 else t[:, :, keys]) for t in kv)
            part_out, part_lse = attention(
                q_part, k_part, v_part, tensor_layout=tensor_layout, is_causal=plan.causal, sm_scale=sm_scale,
                return_lse=True, **options,
            )  # fmt: skip
            acc_out = out[:, rows] if s == 1 else out[:, :, rows]
            merge_into_(acc_out, lse[:, :, rows], part_out, part_lse, tensor_layout)
        if finish_pass is not None:
            kv = finish_pass()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
