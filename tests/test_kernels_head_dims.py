"""Head dims between powers of two run as two channel slabs (80 = 64 + 32, 160 = 128 + 32, ...):
through the interpreter, the same numbers as one padded slab (integer QK sums are exact and every
output channel is its own PV product), and the reference's."""

from __future__ import annotations

import pytest
import torch
from helpers import INTERPRETER

import quantattn as qa
from quantattn import settings
from quantattn.config import QuantConfig
from quantattn.kernels.launch import head_dim_slabs
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

pytestmark = INTERPRETER

CONFIGS = [
    QuantConfig(),
    QuantConfig(qk_granularity="per_thread", pv_dtype="fp16", pv_accum="fp32"),
    QuantConfig(qk_granularity="per_tensor", smooth_v=True),
    QuantConfig(qk_granularity="per_warp", smooth_q=True, pv_accum="fp32+fp16"),
]


def qkv(seed, d):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 70, d, generator=g)
    k = torch.randn(1, 1, 90, d, generator=g) + 3 * torch.randn(1, 1, 1, d, generator=g)
    v = torch.randn(1, 1, 90, d, generator=g)
    q[0, 1, 5, d - 1] = float("nan")  # a NaN in the second slab stays in its row
    return q.to(torch.float16), k.to(torch.float16), v.to(torch.float16)


def test_split_rule():
    assert [head_dim_slabs(d) for d in (64, 72, 80, 96, 100, 128, 160, 192, 200, 256)] == [
        (64, 0), (64, 32), (64, 32), (64, 32), (128, 0), (128, 0), (128, 32), (128, 64), (256, 0), (256, 0)
    ]  # fmt: skip


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("d", [80, 160, 192])
def test_two_slabs_equal_one_padded_slab_and_match_the_reference(cfg, d, monkeypatch):
    q, k, v = qkv(d, d)
    causal = not cfg.smooth_q
    split, split_lse = qa.sageattn(q, k, v, is_causal=causal, return_lse=True, config=cfg, backend="triton")
    monkeypatch.setenv("QUANTATTN_SPLIT_HEAD_DIM", "0")
    settings.reload()  # quantattn reads the environment once
    whole, whole_lse = qa.sageattn(q, k, v, is_causal=causal, return_lse=True, config=cfg, backend="triton")
    assert torch.equal(split.isnan(), whole.isnan()) and torch.equal(split.nan_to_num(), whole.nan_to_num())
    assert torch.allclose(split_lse, whole_lse, rtol=1e-6, atol=1e-5, equal_nan=True)
    rows = ~torch.isnan(split).any(-1)
    assert rows.sum() == rows.numel() - 1  # only the row with the NaN
    ref = qa.sageattn(q, k, v, is_causal=causal, config=cfg, backend="reference")
    truth = attention_fp64(q, k, v, is_causal=causal)
    assert rel_l1(split[rows], ref[rows]) <= 0.05 * rel_l1(ref[rows], truth[rows]) + 1e-6
