"""The attention kernel's masks (bool, additive, broadcast) and key lengths, through the interpreter,
against the reference that implements them (tests/interpreter/test_kernels.py explains the bound)."""

from __future__ import annotations

import math
import os

import pytest
import torch

import quantattn as qa
from quantattn.config import QuantConfig
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on machines without a GPU (tests/gpu covers the GPU)",
    ),
]

KERNEL_VS_REFERENCE = 0.05
B, HQ, HKV, NQ, NK, D = 2, 2, 1, 80, 150, 32


def make(seed, *shape, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers:
        x = x + 4 * torch.randn(*shape[:-2], 1, shape[-1], generator=g)
    return x.to(torch.bfloat16)


def qkv(seed):
    return make(seed, B, HQ, NQ, D), make(seed + 1, B, HKV, NK, D, outliers=True), make(seed + 2, B, HKV, NK, D)


def both(q, k, v, **kw):
    return (qa.sageattn(q, k, v, backend=b, **kw) for b in ("triton", "reference"))


def assert_matches(out, ref, truth):
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf"
    assert rel_l1(out, ref) <= KERNEL_VS_REFERENCE * rel_l1(ref, truth) + 1e-6, (rel_l1(out, ref), rel_l1(ref, truth))


def keep(seed, *shape, p=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(),
        QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32"),
        QuantConfig(smooth_q=True, qk_granularity="per_warp"),
    ],  # fmt: skip
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("causal", [False, True])
def test_bool_and_additive_masks_match_the_reference(cfg, causal):
    q, k, v = qkv(1)
    masks = {
        "bool": keep(2, B, HQ, NQ, NK),
        "additive": (2 * torch.randn(B, 1, NQ, NK, generator=torch.Generator().manual_seed(3))).bfloat16(),
    }
    masks["bool"][0, 1, 9] = False  # a row that sees no key
    for mask in masks.values():
        out, ref = both(q, k, v, attn_mask=mask, is_causal=causal, config=cfg)
        assert_matches(out, ref, attention_fp64(q, k, v, is_causal=causal, attn_mask=mask))
    assert (out[0, 1, 9] == 0).all() or not masks["bool"][0, 1, 9].any()


def test_broadcast_key_padding_mask_and_lse():
    q, k, v = qkv(4)
    mask = (torch.arange(NK) < torch.tensor([NK, 70])[:, None])[:, None, None, :]  # [B, 1, 1, Nk]: stride-0 dims
    (out, lse), (ref, ref_lse) = both(q, k, v, attn_mask=mask, return_lse=True)
    truth, truth_lse = attention_fp64(q, k, v, attn_mask=mask, return_lse=True)
    assert_matches(out, ref, truth)
    assert (lse - ref_lse).abs().max() < 1e-4 and (ref_lse.double() - truth_lse).abs().max() < 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_key_lengths_match_the_reference_and_skip_the_padding(causal):
    q, k, v = qkv(5)
    lengths = torch.tensor([NK - 21, 64], dtype=torch.int32)
    k[0, :, NK - 21 :], v[1, :, 64:] = math.nan, math.inf  # garbage in the padding is never read
    out, ref = both(q, k, v, key_lengths=lengths, is_causal=causal)
    pad = (torch.arange(NK) < lengths[:, None])[:, None, None, :]
    assert_matches(out, ref, attention_fp64(q, k.nan_to_num(0), v.nan_to_num(0, 0, 0), is_causal=causal, attn_mask=pad))


def test_key_lengths_zero_and_past_the_end():
    q, k, v = qkv(6)
    (out, lse), _ = both(q, k, v, key_lengths=torch.tensor([0, NK + 5]), return_lse=True)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert torch.equal(out[1], qa.sageattn(q[1:], k[1:], v[1:], backend="triton")[0])
