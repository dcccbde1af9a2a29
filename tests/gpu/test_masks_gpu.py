"""On the GPU: attention masks and key lengths in the kernels (FP8 and FP16 PV), and long
contexts (256K keys, memory that grows linearly).

Kernel results are held to the reference variant they implement, as in test_kernels_gpu.py: within a
tenth of the reference's own error against FP64 attention under the same mask.
"""

from __future__ import annotations

import math

import pytest
import torch

import quantattn
from quantattn.config import SAGE1, QuantConfig
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DEV = "cuda"
KERNEL_VS_REFERENCE = 0.1
CONFIGS = [QuantConfig(), QuantConfig(pv_dtype="fp16", pv_accum="fp32"), SAGE1, QuantConfig(pv_accum="fp32+fp16")]


def rnd(seed, *shape, bias=0.0, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=DEV)
    if bias:
        x = x + bias * torch.randn(*shape[:-2], 1, shape[-1], generator=g, device=DEV)
    return x.to(dtype)


def qkv(seed, b=2, hq=8, hkv=2, nq=1024, nk=1536, d=128, dtype=torch.bfloat16):
    return (
        rnd(seed, b, hq, nq, d, dtype=dtype),
        rnd(seed + 1, b, hkv, nk, d, bias=4.0, dtype=dtype),
        rnd(seed + 2, b, hkv, nk, d, bias=1.0, dtype=dtype),
    )


def check(q, k, v, cfg, mask_for_truth=None, **kw):
    out = quantattn.sageattn(q, k, v, config=cfg, backend="triton", **kw)
    ref = quantattn.sageattn(q, k, v, config=cfg, backend="reference", **kw)
    truth_mask = kw.get("attn_mask") if mask_for_truth is None else mask_for_truth
    truth = attention_fp64(q, k, v, kw.get("is_causal", False), attn_mask=truth_mask, chunk=256)
    assert torch.isfinite(out).all(), "NaN/Inf in the kernel's output"
    err_ref = rel_l1(ref, truth)
    assert rel_l1(out, ref) <= KERNEL_VS_REFERENCE * err_ref + 1e-5, (cfg.name, rel_l1(out, ref), err_ref)
    return out, err_ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask(cfg, causal):
    dtype = torch.float16 if cfg.pv_accum == "fp32+fp16" else torch.bfloat16
    q, k, v = qkv(1, dtype=dtype)
    g = torch.Generator(device=DEV).manual_seed(2)
    mask = torch.rand(2, 8, 1024, 1536, generator=g, device=DEV) < 0.5
    mask[0, 3, 100] = False  # a row that sees nothing: zeros
    out, _ = check(q, k, v, cfg, attn_mask=mask, is_causal=causal)
    assert (out[0, 3, 100] == 0).all()


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c.name)
def test_additive_mask_broadcast_over_heads(cfg):
    q, k, v = qkv(3)
    g = torch.Generator(device=DEV).manual_seed(4)
    bias = (3 * torch.randn(2, 1, 1024, 1536, generator=g, device=DEV)).bfloat16()
    bias[..., 1000:] = -math.inf
    check(q, k, v, cfg, attn_mask=bias)


def test_transformers_padding_mask_matches_key_lengths():
    """transformers' left-padding-free right padding as a bool [B, 1, N, N] mask, and the same padding
    as key_lengths (the fast path): both close to FP64 under the mask."""
    n = 2048
    q, k, v = qkv(5, nq=n, nk=n)
    lengths = torch.tensor([n, 1300], device=DEV, dtype=torch.int32)
    pad = torch.arange(n, device=DEV)[None, :] < lengths[:, None]
    causal = torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
    mask = causal[None, None] & pad[:, None, None, :]
    out_mask, _ = check(q, k, v, QuantConfig(), attn_mask=mask)
    out_len, _ = check(q, k, v, QuantConfig(), mask_for_truth=mask, key_lengths=lengths, is_causal=True)
    truth = attention_fp64(q, k, v, attn_mask=mask, chunk=256)
    rows = torch.arange(n, device=DEV) < 1300  # rows past the padding of batch 1 see only real keys too
    for out in (out_mask, out_len):
        assert rel_l1(out[1][:, rows], truth[1][:, rows]) < 0.05


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c.name)
def test_key_lengths_skip_garbage_padding(cfg):
    q, k, v = qkv(6, nq=512, nk=4096)
    lengths = torch.tensor([4096 - 1000, 77], device=DEV)
    k[0, :, 3096:], v[1, :, 77:] = math.nan, math.inf
    pad = (torch.arange(4096, device=DEV)[None, :] < lengths[:, None])[:, None, None, :]
    check(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0, 0.0), cfg, mask_for_truth=pad, key_lengths=lengths)
    out = quantattn.sageattn(q, k, v, config=cfg, key_lengths=lengths)
    assert torch.equal(out, quantattn.sageattn(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0, 0.0), config=cfg,
                                               key_lengths=lengths))  # fmt: skip


def test_masked_call_captures_in_a_cuda_graph():
    q, k, v = qkv(7, nq=256, nk=512)
    mask = torch.rand(2, 1, 256, 512, device=DEV) < 0.7
    lengths = torch.tensor([512, 300], device=DEV, dtype=torch.int32)
    eager = quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    lengths.fill_(100)  # new lengths, same graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths))


# ----------------------------------------------------------------------------------------------------
# Long contexts


@pytest.mark.gpu_serial  # 256K keys
@pytest.mark.parametrize("causal", [False, True])
def test_256k_keys(causal):
    """The last 512 queries against 262144 keys with channel bias in K and V, against the reference."""
    q = rnd(10, 1, 4, 512, 128, bias=1.0)
    k, v = rnd(11, 1, 2, 262144, 128, bias=8.0), rnd(12, 1, 2, 262144, 128, bias=2.0)
    check(q, k, v, QuantConfig(), is_causal=causal)


@pytest.mark.gpu_serial  # 256K x 256K and its FP64 truth
def test_256k_by_256k_one_head_is_finite_and_accurate():
    """A full 256K x 256K causal call of one head against FP64 attention on its last 2048 queries
    (FP64 on all of them would take minutes), within twice the error at 8K."""
    n = 262144
    q, k, v = rnd(13, 1, 1, n, 128), rnd(14, 1, 1, n, 128, bias=4.0), rnd(15, 1, 1, n, 128)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    tail = slice(n - 2048, n)
    truth = attention_fp64(q[:, :, tail], k, v, is_causal=True, chunk=256)
    short = quantattn.sageattn(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True)
    err_8k = rel_l1(short, attention_fp64(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True))
    assert rel_l1(out[:, :, tail], truth) <= 2 * err_8k, (rel_l1(out[:, :, tail], truth), err_8k)


@pytest.mark.gpu_serial  # reads the allocator's peak up to 256K keys
def test_memory_grows_linearly_with_length():
    """Peak extra memory of a call (beyond its inputs and output) at 32K, 64K, 128K and 256K tokens: the
    ratio between consecutive lengths stays at 2 (no N^2 buffer anywhere)."""
    peaks = []
    for n in (32768, 65536, 131072, 262144):
        q, k, v = (rnd(16 + i, 1, 4, n, 128) for i in range(3))
        out = torch.empty_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = quantattn.sageattn(q, k, v)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v, out
    ratios = [b / a for a, b in zip(peaks, peaks[1:], strict=False)]
    assert all(1.7 < r < 2.3 for r in ratios), (peaks, ratios)
