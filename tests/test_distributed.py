"""Sequence parallelism on CPU processes joined by gloo: Ulysses, ring and USP against one process.

One group of 4 processes serves the whole module (quantattn.distributed.testing.LocalGroup); tests of
2 ranks run in its pairs {0, 1} and {2, 3} at once. Each task builds the full inputs from a seed on
every rank, takes its shard, runs the distributed call and compares with a single-process call on
the full inputs; every rank's answer is checked.

What each mode must give:
- Ulysses computes every head exactly as one call does: equal, bit for bit (output and lse).
- Ring attention with float64 attention as the local computation equals float64 attention on the
  whole sequence to 1e-12: the schedule (which block meets which queries, under which mask) and the
  lse merge are exact.
- Ring attention with quantattn quantizes per K/V block, so it is not a single call's result: its error
  against FP64 attention is at most RING_VS_SINGLE times the single call's, plus twice the error of
  rounding the FP64 output to the input dtype (the partials come back in it); it equals, bit for bit,
  the same per-block calls and merges done in one process.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist

import quantattn
from quantattn.config import VARIANTS
from quantattn.distributed import (
    gather_sequence,
    merge_attention,
    ring_attention,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
    usp_attention,
    usp_groups,
)
from quantattn.distributed.ring import plan_step
from quantattn.distributed.testing import LocalGroup, simulated_ring
from quantattn.reference import attention_fp64

RING_VS_SINGLE = 1.2
EXACT = 1e-12
WORLD = 4

# ----------------------------------------------------------------------------------------------------
# Worker side: module-level functions that LocalGroup runs on every rank

_groups: dict = {}


def setup_worker() -> int:
    """Once per process: the pair groups, the USP groups, quiet CPU warnings."""
    warnings.filterwarnings("ignore", message="quantattn: CPU tensors run the pure-PyTorch reference")
    _groups[2], pairs = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    _groups["other_pair"] = pairs[1 - dist.get_rank() // 2]
    _groups[WORLD] = None
    _groups["usp"] = usp_groups(ulysses_size=2)
    return dist.get_rank()


def inputs(seed, hq=4, hkv=None, n=64, nk=None, d=32, dtype=torch.float16, k_bias=0.0, layout="HND"):
    """Full q [1, hq, n, d], k and v [1, hkv, nk, d] (HND, or transposed views for NHD), the same on every rank."""
    g = torch.Generator().manual_seed(seed)

    def rnd(h, m, bias=0.0):
        x = torch.randn(1, h, m, d, generator=g)
        return (x + bias * torch.randn(1, h, 1, d, generator=g)).to(dtype)

    q, k, v = rnd(hq, n), rnd(hkv or hq, nk or n, k_bias), rnd(hkv or hq, nk or n)
    return tuple(t.transpose(1, 2) for t in (q, k, v)) if layout == "NHD" else (q, k, v)


def seq_dim(layout):
    return 2 if layout == "HND" else 1


def to_hnd(t, layout):
    return t if layout == "HND" else t.transpose(1, 2)


def rel_l1(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum())


def fp64_attention(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False):
    """Exact attention with sageattn's signature (float64 out and lse): the local step of the exact tests."""
    out, lse = attention_fp64(to_hnd(q, tensor_layout), to_hnd(k, tensor_layout), to_hnd(v, tensor_layout),
                              is_causal, sm_scale, True)  # fmt: skip
    out = to_hnd(out, tensor_layout)
    return (out, lse) if return_lse else out


def shard_all(tensors, group, layout, zigzag):
    p, r = dist.get_world_size(group), dist.get_rank(group)
    return [shard_sequence(t, r, p, dim=seq_dim(layout), zigzag=zigzag) for t in tensors]


def task_ulysses(world, layout, causal, hq, hkv, variant, n=64, nk=None):
    group = _groups[world]
    q, k, v = inputs(11, hq, hkv, n, nk, layout=layout)
    cfg = VARIANTS[variant]
    want, want_lse = quantattn.sageattn(q, k, v, layout, causal, return_lse=True, config=cfg)
    out, lse = ulysses_attention(*shard_all((q, k, v), group, layout, False), layout, causal, return_lse=True,
                                 group=group, config=cfg)  # fmt: skip
    assert out.dtype == q.dtype and out.shape[seq_dim(layout)] == n // world
    got = gather_sequence(out, dim=seq_dim(layout), group=group)
    got_lse = gather_sequence(lse, dim=2, group=group)
    return torch.equal(got, want), torch.equal(got_lse, want_lse)


def task_ring_exact(world, layout, causal, zigzag, hq=4, hkv=None, nk=None, usp=False):
    """Ring (or USP) attention with float64 local attention against float64 attention: max |difference|."""
    group = _groups["usp"] if usp else _groups[world]
    q, k, v = (t.double() for t in inputs(12, hq, hkv, 48, nk, layout=layout))
    want, want_lse = fp64_attention(q, k, v, layout, causal, None, True)
    if usp:
        shards = [shard_sequence(t, dist.get_rank(), WORLD, dim=seq_dim(layout), zigzag=zigzag, ulysses_size=2)
                  for t in (q, k, v)]  # fmt: skip
        out, lse = usp_attention(*shards, layout, causal, None, True, groups=group, zigzag=zigzag,
                                 attention=fp64_attention)  # fmt: skip
        gather = dict(group=None, zigzag=zigzag, ulysses_size=2)
    else:
        out, lse = ring_attention(*shard_all((q, k, v), group, layout, zigzag), layout, causal, None, True,
                                  group=group, zigzag=zigzag, attention=fp64_attention)  # fmt: skip
        gather = dict(group=group, zigzag=zigzag)
    got, got_lse = gather_sequence(out, dim=seq_dim(layout), **gather), gather_sequence(lse, dim=2, **gather)
    assert got.dtype == torch.float64
    return float((got - want).abs().max()), float((got_lse - want_lse).abs().max())


def task_ring_quantized(world, causal, variant, dtype, hq=4, hkv=None):
    group = _groups[world]
    q, k, v = inputs(13, hq, hkv, 128, d=64, dtype=dtype, k_bias=4.0)
    cfg = VARIANTS[variant]
    out, lse = ring_attention(*shard_all((q, k, v), group, "HND", True), "HND", causal, None, True, group=group,
                              zigzag=True, config=cfg)  # fmt: skip
    got, got_lse = (
        gather_sequence(out, dim=2, group=group, zigzag=True),
        gather_sequence(lse, dim=2, group=group, zigzag=True),
    )
    sim, sim_lse = simulated_ring(q, k, v, world, causal, config=cfg)
    truth, true_lse = attention_fp64(q, k, v, causal, None, True)
    single, single_lse = quantattn.sageattn(q, k, v, is_causal=causal, return_lse=True, config=cfg)
    bound = RING_VS_SINGLE * rel_l1(single, truth) + 2 * rel_l1(truth.to(dtype), truth)
    return {
        "equals_simulation": torch.equal(got, sim) and torch.equal(got_lse, sim_lse),
        "ring_error": rel_l1(got, truth),
        "bound": bound,
        "lse_vs_single": float((got_lse - single_lse).abs().max()),
        "single_lse_vs_fp64": float((single_lse.double() - true_lse).abs().max()),
    }


def task_usp_quantized(layout):
    """USP of 2 x 2 ranks with quantattn: within the ring bound, and equal to the ring of the Ulysses heads."""
    groups = _groups["usp"]
    q, k, v = inputs(14, 4, 2, 64, layout=layout)
    shards = [shard_sequence(t, dist.get_rank(), WORLD, dim=seq_dim(layout), zigzag=True, ulysses_size=2)
              for t in (q, k, v)]  # fmt: skip
    out = usp_attention(*shards, layout, True, groups=groups, zigzag=True)
    got = gather_sequence(out, dim=seq_dim(layout), zigzag=True, ulysses_size=2)
    truth = attention_fp64(to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout), True)
    single = to_hnd(quantattn.sageattn(q, k, v, layout, True), layout)
    bound = RING_VS_SINGLE * rel_l1(single, truth) + 2 * rel_l1(truth.half(), truth)
    return rel_l1(to_hnd(got, layout), truth), bound


def task_raises(case):
    """The error each rank raises for a bad call, as (type name, message)."""
    group = _groups[WORLD]
    rank = dist.get_rank()
    try:
        if case == "heads_not_divisible":
            q, k, v = inputs(1, hq=6, n=64)
            ulysses_attention(*shard_all((q, k, v), group, "HND", False), group=group)
        elif case == "mismatched_shards":
            q, k, v = inputs(1, n=16 if rank == 2 else 32)  # one rank holds a shorter shard
            ring_attention(q, k, v, group=group)
        elif case == "odd_zigzag":
            q, k, v = inputs(1, n=7)
            ring_attention(q, k, v, is_causal=True, group=group, zigzag=True)
        elif case == "causal_cross_lengths":
            q, k, v = inputs(1, n=8, nk=16)
            ring_attention(q, k, v, is_causal=True, group=group, zigzag=True)
        elif case == "causal_layout_unsaid":  # contiguous shards read as zig-zag gave a wrong result (0.72 off)
            q, k, v = inputs(1, n=8)
            ring_attention(*shard_all((q, k, v), group, "HND", False), is_causal=True, group=group)
        elif case == "bad_layout":
            q, k, v = inputs(1, n=8)
            ulysses_attention(q, k, v, "BHND", group=group)
        elif case == "not_a_member":
            q, k, v = inputs(1, n=8)
            ring_attention(q, k, v, group=_groups["other_pair"])
        elif case == "bad_option":
            q, k, v = inputs(1, n=8)
            ring_attention(q, k, v, group=group, qk_quant_dtype="int3")
    except Exception as e:  # noqa: BLE001  the test compares what every rank raised
        return type(e).__name__, str(e)
    return None


def task_fail_on_one_rank():
    if dist.get_rank() == 1:
        raise KeyError("only rank 1")
    return dist.get_rank()


# ----------------------------------------------------------------------------------------------------
# Test side

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def group():
    with LocalGroup(WORLD, "gloo", timeout_s=60, env={"OMP_NUM_THREADS": "1"}) as g:
        assert g.run(setup_worker) == list(range(WORLD))
        yield g


ULYSSES_CASES = [
    # world, layout, causal, hq, hkv, variant
    (2, "HND", True, 4, 4, "sage2-8b"),
    (4, "NHD", False, 8, 2, "sage1"),  # kv heads copied to lcm(2, 4) = 4, one per rank
    (4, "HND", True, 8, 1, "sage2++"),  # one kv head for all
    (4, "HND", True, 12, 6, "sage2-4b"),  # lcm(6, 4) = 12: each rank's 3 query heads read 3 distinct kv heads
    (2, "NHD", True, 4, 2, "sage1-fp16acc"),  # kv heads split, one per rank
]


@pytest.mark.parametrize("case", ULYSSES_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ulysses_equals_single_call(group, case):
    assert all(r == (True, True) for r in group.run(task_ulysses, *case))


@pytest.mark.parametrize("causal", [False, True])
def test_ulysses_cross_attention_lengths(group, causal):
    """Nq != Nk: causal stays bottom-right aligned on the whole sequences."""
    assert all(r == (True, True) for r in group.run(task_ulysses, 2, "HND", causal, 4, 2, "sage2-8b", 32, 96))


RING_EXACT_CASES = [
    # world, layout, causal, zigzag, hq, hkv, nk
    (2, "HND", True, True, 4, None, None),
    (4, "HND", True, True, 4, 2, None),
    (4, "NHD", True, True, 6, 3, None),
    (4, "HND", True, False, 4, None, None),  # causal on contiguous shards: correct, unbalanced
    (4, "HND", False, True, 4, 1, None),
    (2, "NHD", False, False, 2, None, 80),  # cross attention: other key lengths
]


@pytest.mark.parametrize("case", RING_EXACT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ring_schedule_and_merge_are_exact(group, case):
    world, layout, causal, zigzag, hq, hkv, nk = case
    for out_err, lse_err in group.run(task_ring_exact, world, layout, causal, zigzag, hq, hkv, nk):
        assert out_err <= EXACT and lse_err <= EXACT


@pytest.mark.parametrize(
    "world,causal,variant,dtype",
    [(4, True, "sage2-8b", torch.float16), (2, False, "sage1", torch.bfloat16), (4, False, "sage2++", torch.bfloat16)],
)
def test_ring_with_quantattn(group, world, causal, variant, dtype):
    for r in group.run(task_ring_quantized, world, causal, variant, dtype):
        assert r["equals_simulation"], "the distributed ring differs from its per-block calls in one process"
        assert r["ring_error"] <= r["bound"], r
        # lse is the unsmoothed logsumexp whatever the blocks: as close to the single call's as that is to FP64
        assert r["lse_vs_single"] <= 2 * r["single_lse_vs_fp64"] + 1e-3, r


def test_ring_gqa_with_quantattn(group):
    for r in group.run(task_ring_quantized, 4, True, "sage2-8b", torch.float16, 8, 2):
        assert r["equals_simulation"] and r["ring_error"] <= r["bound"], r


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_usp_exact_schedule(group, layout):
    for out_err, lse_err in group.run(task_ring_exact, WORLD, layout, True, True, 4, 2, usp=True):
        assert out_err <= EXACT and lse_err <= EXACT


def test_usp_with_quantattn(group):
    for err, bound in group.run(task_usp_quantized, "NHD"):
        assert err <= bound


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("heads_not_divisible", "ValueError", "query heads \\(6\\) must be divisible by the number of ranks \\(4\\)"),
        ("mismatched_shards", "ValueError", "every rank of the group must hold shards of one shape.*rank 2: q \\(1, 4, 16, 32\\)"),
        ("odd_zigzag", "ValueError", "zig-zag shards hold two equal chunks"),
        ("causal_layout_unsaid", "ValueError", "with is_causal, say how the sequence was sharded: zigzag=True"),
        ("causal_cross_lengths", "ValueError", "query and key shards must have one length, got 8 and 16"),
        ("bad_layout", "ValueError", "tensor_layout must be 'HND'"),
        ("bad_option", "ValueError", "qk_quant_dtype must be one of"),
        ("not_a_member", "ValueError", "is not a member of the given process group"),
    ],
)  # fmt: skip
def test_bad_calls_raise_the_same_error_on_every_rank(group, case, error, match):
    import re

    answers = group.run(task_raises, case)  # returns only when no rank is left waiting in a collective
    for answer in answers:
        assert answer is not None and answer[0] == error and re.search(match, answer[1]), answer


def test_group_reports_a_failing_rank_and_stays_usable(group):
    with pytest.raises(RuntimeError, match="(?s)failed on rank\\(s\\) \\[1\\].*KeyError: 'only rank 1'"):
        group.run(task_fail_on_one_rank)
    assert group.run(seq_dim, "NHD") == [1] * WORLD


def test_distributed_calls_need_a_process_group():
    q, k, v = inputs(1, n=8)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed process group"):
        ring_attention(q, k, v)


# ----------------------------------------------------------------------------------------------------
# Single-process pieces: layouts, the merge, the ring's schedule


@pytest.mark.parametrize(
    "world,zigzag,ulysses", [(1, False, 1), (3, False, 1), (4, True, 1), (4, True, 2), (6, False, 3)]
)
def test_shard_and_unshard_are_inverse(world, zigzag, ulysses):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)  # [B, N, ...]: dim 1
    shards = [shard_sequence(x, r, world, dim=1, zigzag=zigzag, ulysses_size=ulysses) for r in range(world)]
    assert all(s.shape == (2, 24 // world, 3) and s.is_contiguous() for s in shards)
    assert torch.equal(unshard_sequence(shards, dim=1, zigzag=zigzag, ulysses_size=ulysses), x)


def test_zigzag_and_usp_layouts_hold_the_documented_chunks():
    x = torch.arange(16)
    assert shard_sequence(x, 1, 4, dim=0, zigzag=True).tolist() == [2, 3, 12, 13]  # chunks 1 and 6 of 8
    # USP 2 x 2: ring position 1 holds chunks 1 and 2 of 4 (tokens 4..11), its Ulysses ranks split them
    assert shard_sequence(x, 2, 4, dim=0, zigzag=True, ulysses_size=2).tolist() == [4, 5, 6, 7]
    assert shard_sequence(x, 3, 4, dim=0, zigzag=True, ulysses_size=2).tolist() == [8, 9, 10, 11]


def test_shard_rejects_uneven_splits():
    with pytest.raises(ValueError, match="cannot be split into equal shards.*multiple of 8 tokens"):
        shard_sequence(torch.zeros(12), 0, 4, dim=0, zigzag=True)
    with pytest.raises(ValueError, match="ulysses_size \\(3\\) must divide the number of ranks \\(4\\)"):
        shard_sequence(torch.zeros(12), 0, 4, dim=0, ulysses_size=3)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_merge_of_fp64_partials_is_exact(layout):
    """Attention over 5 disjoint random key sets, one of them empty for some rows, merged = attention over all."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    want, want_lse = attention_fp64(q, k, v, False, None, True)
    part = torch.randint(0, 5, (40,), generator=g)
    part[part == 4] = 3  # set 4 is empty
    outs, lses = [], []
    for i in range(5):
        keys = (part == i).nonzero()[:, 0]
        o, l = attention_fp64(q, k[:, :, keys], v[:, :, keys], False, None, True)
        if not len(keys):
            o, l = torch.zeros_like(q), torch.full(q.shape[:-1], -math.inf, dtype=torch.float64)
        outs.append(o if layout == "HND" else o.transpose(1, 2))
        lses.append(l)
    out, lse = merge_attention(outs, lses, layout)
    assert out.dtype == lse.dtype == torch.float64
    assert (to_hnd(out, layout) - want).abs().max() <= EXACT and (lse - want_lse).abs().max() <= EXACT


def test_merge_rows_without_keys_and_nan():
    inf, nan = math.inf, math.nan
    outs = [torch.tensor([[[[1.0], [2.0], [3.0], [4.0]]]]), torch.tensor([[[[5.0], [6.0], [7.0], [8.0]]]])]
    lses = [torch.tensor([[[-inf, -inf, 0.0, nan]]]), torch.tensor([[[-inf, 1.0, 0.0, 0.0]]])]
    out, lse = merge_attention(outs, lses)
    assert out[0, 0, :, 0].tolist()[:3] == [0.0, 6.0, 5.0] and math.isnan(out[0, 0, 3, 0])
    assert lse[0, 0, 0] == -inf and lse[0, 0, 1] == 1.0 and lse[0, 0, 2] == pytest.approx(math.log(2))
    assert math.isnan(lse[0, 0, 3])
    with pytest.raises(ValueError, match="one lse per output"):
        merge_attention(outs, lses[:1])


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("zigzag", [False, True])
def test_causal_ring_schedule_covers_the_mask_once(world, zigzag):
    """Every (query, key) pair the causal mask allows is computed exactly once over the ring, no other;
    with zig-zag every rank computes the same number of pairs at every step."""
    n = 4  # tokens per shard
    total = world * n
    tokens = [shard_sequence(torch.arange(total), r, world, dim=0, zigzag=zigzag) for r in range(world)]
    seen = torch.zeros(total, total, dtype=torch.int64)
    for step in range(world):
        work = []
        for rank in range(world):
            source = (rank - step) % world
            plan = plan_step(rank, source, n, True, zigzag)
            if plan is None:
                work.append(0)
                continue
            qs = tokens[rank][plan.q_start : plan.q_end]
            ks = tokens[source][plan.k_start : plan.k_end]
            allowed = ks[None, :] <= qs[:, None]
            if plan.causal:  # the local, bottom-right mask the call applies must be the global one
                local = torch.arange(len(ks))[None, :] <= torch.arange(len(qs))[:, None] + len(ks) - len(qs)
                assert torch.equal(local, allowed)
            else:
                assert allowed.all(), "a block computed without a mask holds keys after its queries"
            seen[qs[:, None].expand(-1, len(ks))[allowed], ks[None, :].expand(len(qs), -1)[allowed]] += 1
            work.append(len(qs) * len(ks) // (2 if plan.causal else 1))  # a causal block costs half
        if zigzag:
            assert len(set(work)) == 1, (step, work)
    assert torch.equal(seen, torch.tril(torch.ones(total, total, dtype=torch.int64)))


# ----------------------------------------------------------------------------------------------------
# The scaling benchmark, end to end on gloo processes (its numbers mean nothing on a CPU)


def test_benchmark_selftest_writes_its_table_and_json(tmp_path, capsys):
    import json

    from quantattn.distributed import bench

    argv = ["--device", "cpu", "--world-size", "2", "--seq-lens", "64", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "16", "--repeats", "1", "--out", str(tmp_path), "--tag", "selftest"]  # fmt: skip
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("*_distributed_selftest_x2.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == bench.FORMAT and doc["metadata"]["command"].startswith("python -m quantattn.distributed")
    assert doc["not_run"] == []
    rows = {(r["mode"], r["causal"]): r for r in doc["records"]}
    assert set(rows) == {(m, c) for m in ("ulysses", "ring") for c in (False, True)}
    assert all(r["world_size"] == 2 and r["tp_ms"] > 0 and r["t1_ms"] > 0 for r in rows.values())
    assert rows[("ulysses", True)]["equal_to_single"] and rows[("ulysses", False)]["equal_to_single"]
    assert rows[("ring", True)]["rel_l1_vs_single"] < 0.1
    table = capsys.readouterr().out
    assert "ulysses   2     64     on" in table and "(equal)" in table and str(path) in table
    assert not list(tmp_path.glob("*partial*"))
