"""The backward kernels through the Triton interpreter, against the float32 reference backward.

The kernels multiply 16-bit operands (P and dS rounded to the input dtype, as FlashAttention does) with
FP32 accumulation; the reference keeps P and dS in float32. Both must meet tests/cpu/test_backward.py's
bound against FP64 autograd (twice plain PyTorch autograd's error in the input dtype, plus rounding),
and the kernel must be at least as close to the reference (relative L1) as that plain run is: the
final rounding to the dtype dominates both, so a tighter fraction would test the seed. Small tiles
(16 and 32 rows) so that several blocks, the causal diagonal and the partial last blocks all run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import quantattn
from quantattn import calls
from quantattn.kernels import backward_launch as BL
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference.backward import attention_backward_reference

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on machines without a GPU (tests/gpu covers the GPU)",
    ),
]

TILE = (32, 16, 4, 1)  # BLOCK_M, BLOCK_N, warps, stages


def make(seed, hq, hkv, nq, nk, d, dtype, b=1):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d), (b, hq, nq, d))
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in shapes)


def kernel_grads(q, k, v, do, causal, sm_scale, grad_lse=None, tile=TILE):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BL.attention_backward(q, k, v, do, causal, sm_scale, dq, dk, dv, grad_lse, tile)
    return dq, dk, dv


def plain_grads(q, k, v, do, causal, sm_scale, dtype, grad_lse=None):
    """torch autograd of attention computed in `dtype` (softmax in float32 at least)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    group = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    s = (qq @ kk.transpose(-1, -2)) * sm_scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + (nk - nq), -math.inf)
    s = s.to(torch.promote_types(dtype, torch.float32))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    loss = ((p.to(dtype) @ vv) * do.to(dtype)).sum()
    if grad_lse is not None:
        lse = torch.logsumexp(s, -1)
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def check(q, k, v, do, causal, sm_scale, grads, grad_lse=None):
    truth = plain_grads(q, k, v, do, causal, sm_scale, torch.float64, grad_lse)
    plain = plain_grads(q, k, v, do, causal, sm_scale, q.dtype, grad_lse)
    ref = attention_backward_reference(q, k, v, do, causal, sm_scale, grad_lse)
    for name, g, t, p, r in zip("qkv", grads, truth, plain, ref, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        bound = 2 * max_err(p, t) + 2 * max_err(t.to(q.dtype), t) + 1e-6
        assert max_err(g, t) <= bound, f"d{name}: {max_err(g, t):.3e} > {bound:.3e}"
        assert rel_l1(g, r) <= rel_l1(p, r), f"d{name}: rel L1 to the reference {rel_l1(g, r):.3e} > {rel_l1(p, r):.3e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "hq, hkv, nq, nk, d, dtype",
    [
        (2, 2, 80, 80, 16, torch.bfloat16),
        (2, 1, 48, 80, 40, torch.float16),  # GQA, Nq < Nk, head_dim padded to 64
        (4, 2, 72, 33, 16, torch.bfloat16),  # GQA, Nq > Nk: causal rows that see no key
    ],
    ids=["mha-80-bf16", "gqa-48x80-d40-fp16", "gqa-72x33-bf16"],
)
def test_kernels_match_reference(causal, hq, hkv, nq, nk, d, dtype):
    q, k, v, do = make(nq + nk + d, hq, hkv, nq, nk, d, dtype)
    sm_scale = 1.0 / math.sqrt(d)
    grads = kernel_grads(q, k, v, do, causal, sm_scale)
    check(q, k, v, do, causal, sm_scale, grads)
    if causal and nq > nk:
        assert torch.all(grads[0][:, :, : nq - nk] == 0)


@pytest.mark.parametrize("tile", [(16, 32, 4, 1), (64, 64, 4, 1)], ids=["bm16-bn32", "bm64-bn64"])
@pytest.mark.parametrize(
    "hq, hkv, nq, nk, d, dtype",
    [(2, 2, 50, 70, 1, torch.float16), (1, 1, 20, 36, 256, torch.bfloat16)],
    ids=["d1-fp16", "d256-bf16"],
)
def test_other_tiles_and_head_dims(tile, hq, hkv, nq, nk, d, dtype):
    q, k, v, do = make(nq * d, hq, hkv, nq, nk, d, dtype)
    grads = kernel_grads(q, k, v, do, True, 1.0 / math.sqrt(d), tile=tile)
    check(q, k, v, do, True, 1.0 / math.sqrt(d), grads)


def test_lse_gradient_custom_scale_and_batches_in_parts(monkeypatch):
    q, k, v, do = make(5, 2, 1, 40, 24, 16, torch.bfloat16, b=2)
    g_lse = torch.randn(2, 2, 40, generator=torch.Generator().manual_seed(50))
    monkeypatch.setattr(calls, "MAX_GRID_Y", 2)  # one launch per batch entry: the split path
    grads = kernel_grads(q, k, v, do, True, 0.4, g_lse)
    check(q, k, v, do, True, 0.4, grads, g_lse)


def test_sageattn_backward_runs_the_kernels_in_nhd():
    q, k, v, do = make(6, 2, 1, 24, 40, 32, torch.bfloat16)
    nhd = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*nhd, "NHD", is_causal=True, backend="triton")
    out.backward(do.transpose(1, 2))
    grads = [t.grad.transpose(1, 2) for t in nhd]
    want = kernel_grads(q, k, v, do, True, 1.0 / math.sqrt(32), tile=None)
    for a, b in zip(grads, want, strict=True):
        assert torch.equal(a, b)
    check(q, k, v, do, True, 1.0 / math.sqrt(32), grads)
