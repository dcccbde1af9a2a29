"""The backward kernels on a real GPU, at real sizes, against FP64 autograd.

Bound as on the CPU (tests/cpu/test_backward.py): max |error| of each gradient at most twice that of
plain PyTorch autograd in the input dtype, plus twice the rounding of the FP64 gradient to the dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

import quantattn
from quantattn.kernels.backward_launch import attention_backward
from quantattn.reference.backward import attention_backward_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DEV = "cuda"


def make(seed, hq, hkv, nq, nk, d, dtype, b=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d), (b, hq, nq, d))
    return tuple(torch.randn(*s, generator=g, device=DEV).to(dtype) for s in shapes)


def plain_grads(q, k, v, do, causal, sm_scale, dtype):
    """torch autograd of attention in `dtype` (softmax in float32 at least), GQA heads expanded."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    group = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    s = (qq @ kk.transpose(-1, -2)) * sm_scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        hidden = torch.arange(nk, device=DEV)[None, :] > torch.arange(nq, device=DEV)[:, None] + (nk - nq)
        s = s.masked_fill(hidden, -math.inf)
    p = torch.softmax(s.to(torch.promote_types(dtype, torch.float32)), -1).nan_to_num(0.0)
    out = p.to(dtype) @ vv
    return torch.autograd.grad(out, leaves, do.to(dtype))


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def assert_accurate(q, k, v, do, causal, sm_scale, grads):
    truth = plain_grads(q, k, v, do, causal, sm_scale, torch.float64)
    plain = plain_grads(q, k, v, do, causal, sm_scale, q.dtype)
    for name, g, t, p in zip("qkv", grads, truth, plain, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        bound = 2 * max_err(p, t) + 2 * max_err(t.to(q.dtype), t) + 1e-6
        assert max_err(g, t) <= bound, f"d{name}: {max_err(g, t):.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [1024, 4096])
def test_sageattn_gradients_match_fp64(dtype, causal, d, n):
    q, k, v, do = make(d + n, 4, 2, n, n, d, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*leaves, is_causal=causal)
    out.backward(do)
    assert_accurate(q, k, v, do, causal, 1.0 / math.sqrt(d), [t.grad for t in leaves])


@pytest.mark.parametrize("nq, nk", [(1000, 3000), (3000, 1000), (1, 777), (65, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_unequal_lengths_odd_dims_and_nhd(nq, nk, causal):
    q, k, v, do = make(nq + nk, 8, 1, nq, nk, 96, torch.bfloat16)
    nhd = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*nhd, "NHD", is_causal=causal, sm_scale=0.2)
    out.backward(do.transpose(1, 2))
    assert_accurate(q, k, v, do, causal, 0.2, [t.grad.transpose(1, 2) for t in nhd])


def test_kernels_match_the_reference_backward():
    q, k, v, do = make(1, 4, 2, 2048, 1500, 128, torch.bfloat16)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_backward(q, k, v, do, True, 0.1, dq, dk, dv)
    ref = attention_backward_reference(q, k, v, do, True, 0.1)
    plain = plain_grads(q, k, v, do, True, 0.1, torch.bfloat16)
    for g, r, p in zip((dq, dk, dv), ref, plain, strict=True):
        rel = float((g.double() - r.double()).abs().sum() / r.double().abs().sum())
        rel_plain = float((p.double() - r.double()).abs().sum() / r.double().abs().sum())
        assert rel <= rel_plain, (rel, rel_plain)


@pytest.mark.gpu_serial  # reads the allocator's peak
def test_backward_memory_is_linear_in_n():
    """32K tokens: an Nq x Nk float32 matrix per head would be 4 GiB; the backward may allocate only the
    gradients and 8 bytes of row statistics per query and head (plus allocator rounding)."""
    b, h, n, d = 1, 2, 32768, 128
    q, k, v, do = make(2, h, h, n, n, d, torch.bfloat16, b)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*leaves, is_causal=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(do)
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
    allowed = grads + 8 * b * h * n + (4 << 20)
    assert torch.cuda.max_memory_allocated() - before <= allowed
    assert all(torch.isfinite(t.grad).all() for t in leaves)
