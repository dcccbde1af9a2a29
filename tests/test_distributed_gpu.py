"""Sequence parallelism on GPUs with the Triton kernels: NCCL between 2 GPUs of one host, and what one GPU allows.

The 2-GPU tests start one process per GPU (quantattn.distributed.testing.LocalGroup, NCCL with NVLink
multicast off: NCCL_NVLS_ENABLE=0) and skip where fewer than 2 GPUs are visible. The 1-GPU tests run the
ring's per-block kernel calls and lse merges in one process, and every mode on a group of one rank.
Bounds as in tests/test_distributed.py: Ulysses equals one call bit for bit; the ring's error
against FP64 attention is at most RING_VS_SINGLE times one call's plus twice the bfloat16 rounding of
the FP64 output; with float64 local attention the ring is exact to 1e-12.
"""

from __future__ import annotations

import os

import helpers
import pytest
import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before any NCCL communicator exists in this process tree

import torch.distributed as dist  # noqa: E402

import quantattn  # noqa: E402
from quantattn.distributed import (  # noqa: E402
    gather_sequence,
    ring_attention,
    shard_sequence,
    ulysses_attention,
    usp_attention,
    usp_groups,
)
from quantattn.distributed.testing import LocalGroup, simulated_ring  # noqa: E402
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.timeout(300),
]
_TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs of one host, {torch.cuda.device_count() if torch.cuda.is_available() else 0} visible",
)


def two_gpus(test):
    """Needs 2 GPUs, and them alone: one NCCL process per GPU (gpu_serial, not among xdist's workers)."""
    return pytest.mark.gpu_serial(_TWO_GPUS(test))


RING_VS_SINGLE = 1.2
EXACT = 1e-12
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}


def make(seed, b, h, n, d, dtype=torch.bfloat16, bias=0.0, device="cuda"):
    return helpers.make(seed, b, h, n, d, dtype=dtype, bias=bias, device=device)


def inputs(seed, hq=8, hkv=None, n=8192, d=128, layout="HND", dtype=torch.bfloat16):
    hkv = hkv or hq
    q, k, v = (
        make(seed, 1, hq, n, d, dtype),
        make(seed + 1, 1, hkv, n, d, dtype, 4.0),
        make(seed + 2, 1, hkv, n, d, dtype),
    )
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)) if layout == "NHD" else (q, k, v)


def to_hnd(t, layout):
    return t if layout == "HND" else t.transpose(1, 2)


def fp64_attention(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False):
    out, lse = attention_fp64(to_hnd(q, tensor_layout), to_hnd(k, tensor_layout), to_hnd(v, tensor_layout),
                              is_causal, sm_scale, True)  # fmt: skip
    return (to_hnd(out, tensor_layout), lse) if return_lse else to_hnd(out, tensor_layout)


def ring_bound(q, k, v, causal):
    """RING_VS_SINGLE x one call's error against FP64 attention + 2 x the bfloat16 rounding of FP64 attention."""
    truth = attention_fp64(q, k, v, causal)
    single = quantattn.sageattn(q, k, v, is_causal=causal)
    return truth, RING_VS_SINGLE * rel_l1(single, truth) + 2 * rel_l1(truth.to(q.dtype), truth)


# ----------------------------------------------------------------------------------------------------
# Worker side (one process per GPU)


def task_ulysses(layout, causal, hq, hkv):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = inputs(1, hq, hkv, layout=layout)
    want, want_lse = quantattn.sageattn(q, k, v, layout, causal, return_lse=True)
    s = 2 if layout == "HND" else 1
    local = [shard_sequence(t, rank, world, dim=s) for t in (q, k, v)]
    out, lse = ulysses_attention(*local, layout, causal, return_lse=True)
    got, got_lse = gather_sequence(out, dim=s), gather_sequence(lse, dim=2)
    return torch.equal(got, want), torch.equal(got_lse, want_lse)


def task_ring(causal, hq, hkv, layout="HND"):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = inputs(2, hq, hkv, layout=layout)
    s = 2 if layout == "HND" else 1
    local = [shard_sequence(t, rank, world, dim=s, zigzag=True) for t in (q, k, v)]
    out = ring_attention(*local, layout, causal, zigzag=True)
    got = to_hnd(gather_sequence(out, dim=s, zigzag=True), layout)
    truth, bound = ring_bound(*(to_hnd(t, layout) for t in (q, k, v)), causal)
    assert torch.isfinite(got).all()
    return rel_l1(got, truth), bound


def task_ring_exact(causal, zigzag):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = (t.double() for t in inputs(3, 4, 2, n=2048, d=64))
    want, want_lse = attention_fp64(q, k, v, causal, None, True)
    local = [shard_sequence(t, rank, world, dim=2, zigzag=zigzag) for t in (q, k, v)]
    out, lse = ring_attention(*local, "HND", causal, None, True, zigzag=zigzag, attention=fp64_attention)
    got, got_lse = gather_sequence(out, dim=2, zigzag=zigzag), gather_sequence(lse, dim=2, zigzag=zigzag)
    return float((got - want).abs().max()), float((got_lse - want_lse).abs().max())


def task_usp_degenerate(ulysses_size):
    """USP on 2 GPUs is Ulysses (2 x 1) or a ring (1 x 2): it must give exactly that mode's result."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = usp_groups(ulysses_size)
    q, k, v = inputs(4, 8, 2, n=4096)
    local = [shard_sequence(t, rank, world, dim=2, zigzag=True, ulysses_size=ulysses_size) for t in (q, k, v)]
    out = usp_attention(*local, is_causal=True, groups=groups, zigzag=True)
    plain = (
        ulysses_attention(*local, is_causal=True)
        if ulysses_size == world
        else ring_attention(*local, is_causal=True, zigzag=True)
    )
    return torch.equal(out, plain)


def task_mismatched_shards():
    q, k, v = inputs(5, n=1024 if dist.get_rank() == 0 else 2048)
    try:
        ring_attention(q, k, v)
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------
# 2 GPUs


@pytest.fixture(scope="module")
def nccl_pair():
    with LocalGroup(2, "nccl", timeout_s=240, env=NCCL_ENV) as group:
        yield group


@two_gpus
@pytest.mark.parametrize(
    "layout,causal,hq,hkv", [("HND", False, 8, 8), ("HND", True, 8, 8), ("HND", True, 8, 2), ("NHD", True, 8, 1)]
)
def test_ulysses_equals_one_gpu(nccl_pair, layout, causal, hq, hkv):
    assert nccl_pair.run(task_ulysses, layout, causal, hq, hkv) == [(True, True)] * 2


@two_gpus
@pytest.mark.parametrize("causal,hq,hkv,layout", [(False, 8, 8, "HND"), (True, 8, 8, "HND"), (True, 8, 2, "NHD")])
def test_ring_is_as_accurate_as_one_gpu(nccl_pair, causal, hq, hkv, layout):
    for err, bound in nccl_pair.run(task_ring, causal, hq, hkv, layout):
        assert err <= bound, (err, bound)


@two_gpus
@pytest.mark.parametrize("causal,zigzag", [(False, True), (True, True), (True, False)])
def test_ring_over_nccl_is_exact_with_fp64_attention(nccl_pair, causal, zigzag):
    for out_err, lse_err in nccl_pair.run(task_ring_exact, causal, zigzag):
        assert out_err <= EXACT and lse_err <= EXACT


@two_gpus
@pytest.mark.parametrize("ulysses_size", [1, 2])
def test_usp_on_two_gpus(nccl_pair, ulysses_size):
    assert nccl_pair.run(task_usp_degenerate, ulysses_size) == [True, True]


@two_gpus
def test_mismatched_shards_fail_on_both_gpus(nccl_pair):
    messages = nccl_pair.run(task_mismatched_shards)
    assert messages[0] == messages[1] and "one shape" in messages[0]


# ----------------------------------------------------------------------------------------------------
# 1 GPU: the ring's kernel calls and merges in one process; each mode on a group of one


@pytest.mark.parametrize("world,causal", [(2, True), (4, True), (4, False)])
def test_ring_blocks_with_kernels_in_one_process(world, causal):
    """Ring attention's per-block kernel calls (with the kernels' lse) merged as the ring merges them."""
    q, k, v = inputs(6, 8, 2)
    got, _ = simulated_ring(q, k, v, world, causal)
    truth, bound = ring_bound(q, k, v, causal)
    assert rel_l1(got, truth) <= bound


def task_group_of_one():
    q, k, v = inputs(7, 8, 2)
    want, want_lse = quantattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    results = []
    for fn, layout in ((ulysses_attention, {}), (ring_attention, {"zigzag": True})):
        out, lse = fn(q, k, v, is_causal=True, return_lse=True, **layout)
        results.append(torch.equal(out, want) and torch.equal(lse, want_lse))
    return results


@pytest.mark.gpu_serial  # its own NCCL process on the GPU
def test_modes_on_a_group_of_one_gpu():
    """P = 1 over NCCL: both modes reduce to one call, exactly."""
    with LocalGroup(1, "nccl", timeout_s=240, env=NCCL_ENV) as group:
        assert group.run(task_group_of_one) == [[True, True]]
