"""Ulysses sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): trade sequence shards for heads.

Each of the P ranks holds every head of 1/P of the tokens. One all-to-all gives each rank the whole
sequence of 1/P of the heads; it runs ordinary attention on those (any quantattn variant: every head is
computed exactly as a single call on the whole sequence computes it, because no quantization group
spans two heads), and a second all-to-all returns the output to sequence shards.
"""

from __future__ import annotations

import math

import torch

from quantattn import validation as V
from quantattn.distributed.collectives import all_to_all_start, check_same_shards, size_and_rank


def head_and_seq_dims(tensor_layout: str) -> tuple[int, int]:
    return (1, 2) if tensor_layout == "HND" else (2, 1)


def check_shard_tensors(caller: str, q, k, v, tensor_layout: str, group, check_shards: bool) -> None:
    """Local checks that cannot differ between ranks once the shapes agree, after the shape consensus."""
    V.check_layout(tensor_layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if check_shards:
        check_same_shards(caller, group, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{caller}: {name} must be 4-D ([B, H, N, d] for 'HND', [B, N, H, d] for 'NHD'), got shape "
                f"{tuple(t.shape)}"
            )
    h, s = head_and_seq_dims(tensor_layout)
    hq, hkv = q.shape[h], k.shape[h]
    if v.shape[h] != hkv or k.shape[s] != v.shape[s]:
        raise ValueError(f"{caller}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{caller}: the query heads ({hq}) must be a multiple of the key/value heads ({hkv})")


def kv_heads_for_ranks(hq: int, hkv: int, world: int) -> int:
    """How many kv heads the all-to-all scatters: lcm(Hkv, P), the fewest copies of the kv heads that
    give every rank whole kv heads whose grouped-query mapping (query head h reads kv head h // (Hq/Hkv))
    still holds on the rank's own heads. Hkv itself when P divides it. Hq is a multiple of both Hkv and
    P, so of their lcm: the copies of each kv head go to ranks whose query heads read it."""
    return math.lcm(hkv, world)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    group=None,
    attention=None,
    check_shards: bool = True,
    **options,
):
    """Attention over a sequence sharded across the ranks of `group`, by all-to-all over heads.

    q: this rank's shard, [B, Hq, N/P, d] ("HND") or [B, N/P, Hq, d] ("NHD"); k, v: [B, Hkv, Nk/P, d]
    likewise. Rank r holds tokens [r N/P, (r+1) N/P) (shard_sequence(..., zigzag=False)). Hq must be a
    multiple of P; kv heads are split when P divides Hkv and copied as few times as needed otherwise.
    Causal masking is bottom-right aligned on the whole sequences, as in quantattn.sageattn.
    attention: the local attention, called with the whole sequence of Hq/P heads (default
    quantattn.sageattn); it receives tensor_layout, is_causal, sm_scale, return_lse and **options
    (config=, backend=, qk_quant_gran=, ... for sageattn) as keywords.
    check_shards: first check (one small all_gather) that every rank holds shards of one shape.
    Returns this rank's output shard in q's layout and dtype, and with return_lse the lse shard [B, Hq, N/P].
    """
    world, _ = size_and_rank(group)
    check_shard_tensors("ulysses_attention", q, k, v, tensor_layout, group, check_shards)
    h, s = head_and_seq_dims(tensor_layout)
    hq, hkv = q.shape[h], k.shape[h]
    if hq % world:
        raise ValueError(
            f"ulysses_attention: the query heads ({hq}) must be divisible by the number of ranks ({world}); "
            "ring_attention takes any number of heads, usp_attention splits the ranks between the two"
        )
    if attention is None:
        from quantattn.api import sageattn as attention
    copies = kv_heads_for_ranks(hq, hkv, world) // hkv
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=h), v.repeat_interleave(copies, dim=h)
    pending = [all_to_all_start(t, h, s, group) for t in (q, k, v)]
    q_heads, k_heads, v_heads = (finish() for finish in pending)
    result = attention(
        q_heads, k_heads, v_heads, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
        return_lse=return_lse, **options,
    )  # fmt: skip
    out, lse = result if return_lse else (result, None)
    pending = [all_to_all_start(out, s, h, group)]
    if return_lse:
        pending.append(all_to_all_start(lse, 2, 1, group))
    out, *lse = (finish() for finish in pending)
    return (out, lse[0]) if return_lse else out
