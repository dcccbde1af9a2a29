"""The decode kernels on a real GPU at decoding sizes (4K to 128K keys), against the reference and FP64.

The reference runs on the GPU on the cache the kernels built, so the attention kernel is checked alone.
Its Q quantization is the reference's bit for bit (correctly rounded divisions, no FMA contraction:
kernels/decode.py `_quantize_rows`), so what remains is the hardware's exp2 (ex2.approx), float32
summation order, and the P V product's accumulator, which the reference models: the FP8 tensor-core
one (FP22) at 64 packed rows, and true FP32 at 16 rows on Hopper, where Triton lowers the FP8 product
to FP16 MMAs (decode_launch.pv_accumulates_in_fp32; decode_reference(fp32_pv=True)). The bound, a
tenth of the reference's own error against FP64, is that of tests/test_kernels_gpu.py;
test_pv_product_is_the_one_the_reference_models checks the compiled MMA against that rule. The lse
bound (1e-3) is ~100x the exp2/summation differences; Q's INT8 values rounding differently (before
`_quantize_rows`) moved rows' lse by up to 8e-3.
"""

from __future__ import annotations

import functools
import os
import re

import helpers
import pytest
import torch
from helpers import GPU

import quantattn
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64
from quantattn.reference import decode as R

pytestmark = GPU

KERNEL_VS_REFERENCE = 0.1
DEV = "cuda"


make = functools.partial(helpers.make, device=DEV)


def qkv(seed, b, hq, hkv, nq, nk, d, outliers=False, dtype=torch.bfloat16):
    q = make(seed, b, hq, nq, d, dtype=dtype, bias=2.0 if outliers else 0.0)
    k = make(seed + 1, b, hkv, nk, d, dtype=dtype, bias=8.0 if outliers else 0.0)
    v = make(seed + 2, b, hkv, nk, d, dtype=dtype, bias=2.0 if outliers else 0.0)
    return q, k, v


def check(q, cache, k, v, causal=False):
    out, lse = quantattn.sageattn_decode(q, cache, is_causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = quantattn.sageattn_decode(q, cache, is_causal=causal, return_lse=True, backend="reference")
    truth, truth_lse = attention_fp64(q, k, v, is_causal=causal, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err_ref, err_kernel = rel_l1(ref, truth), rel_l1(out, ref)
    assert err_kernel <= KERNEL_VS_REFERENCE * err_ref + 1e-5, (err_kernel, err_ref)
    assert rel_l1(out, truth) <= 1.1 * err_ref + 1e-4
    assert (lse - ref_lse).abs().max() < 1e-3
    assert (lse.double() - truth_lse).abs().max() < 0.1
    return out


@pytest.mark.parametrize("nq", [1, 4, 16])
@pytest.mark.parametrize("nk", [4096, 32768, pytest.param(131072, marks=pytest.mark.gpu_serial)])
def test_decode_matches_reference_gqa_32_8(nq, nk):
    b = 2 if nk <= 32768 else 1
    q, k, v = qkv(1, b, 32, 8, nq, nk, 128, outliers=True)
    cache = quantattn.QuantizedKVCache.from_kv(k, v)
    assert cache.backend == "triton"
    check(q, cache, k, v, causal=nq > 1)


@pytest.mark.parametrize(("d", "dtype"), [(64, torch.float16), (72, torch.bfloat16), (256, torch.bfloat16)])
def test_head_dims_tails_and_splits(d, dtype):
    q, k, v = qkv(2, 2, 8, 2, 3, 5000 + 37, d, dtype=dtype)  # a 37-key 16-bit tail, several splits
    check(q, quantattn.QuantizedKVCache.from_kv(k, v), k, v, causal=True)


def test_mqa_many_rows():
    q, k, v = qkv(3, 1, 32, 1, 16, 8192, 128)  # 512 packed rows: eight row tiles per kv head
    check(q, quantattn.QuantizedKVCache.from_kv(k, v), k, v, causal=True)


def test_append_kernel_builds_the_reference_cache():
    _, k, v = qkv(4, 2, 8, 8, 1, 3000, 128, outliers=True)
    kernel = quantattn.QuantizedKVCache.from_kv(k[:, :, :1000], v[:, :, :1000], capacity=1024)
    ref = quantattn.QuantizedKVCache.from_kv(k[:, :, :1000], v[:, :, :1000], backend="reference")
    for lo, hi in [(1000, 1001), (1001, 1030), (1030, 1100), (1100, 1300), (1300, 3000)]:
        kernel.append(k[:, :, lo:hi], v[:, :, lo:hi])
        ref.append(k[:, :, lo:hi], v[:, :, lo:hi])
    n, full = 3000, 3000 // 64
    x, y = kernel.buffers, ref.buffers
    # The same bytes, as under the interpreter: the kernel divides with div.rn (Triton's `/` is
    # div.full.f32, up to 2 ulp off, which flipped 0.08% of the FP8 V bytes: bf16 V scaled by
    # 448 / amax often lands exactly on an E4M3 rounding tie), is compiled without FMA contraction
    # (x * inv + ROUND_MAGIC fused into one fma rounds K's near-ties differently), and the hardware's
    # E4M3 cast rounds as the reference's (test_kernels_gpu.py checks it). The scales may differ by an
    # ulp: PyTorch's CUDA `tensor / 127.0` multiplies by the reciprocal.
    assert torch.equal(x.k_mean, y.k_mean)
    assert torch.equal(x.k[:, :, :n], y.k[:, :, :n])
    torch.testing.assert_close(x.k_scale[:, :, :n], y.k_scale[:, :, :n], rtol=1e-6, atol=0)
    assert torch.equal(x.v[..., : full * 64].view(torch.uint8), y.v[..., : full * 64].view(torch.uint8))
    torch.testing.assert_close(x.v_scale[:, :, :full], y.v_scale[:, :, :full], rtol=1e-6, atol=0)
    assert torch.equal(x.v_tail[:, :, : n % 64], y.v_tail[:, :, : n % 64])


@pytest.mark.skipif(os.environ.get("QUANTATTN_DIRECT_LAUNCH", "1") == "0", reason="reads the launchers' kernels")
@pytest.mark.parametrize("nq", [1, 16])
def test_pv_product_is_the_one_the_reference_models(nq):
    """Nq = 1 packs 4 rows (a 16-row tile), Nq = 16 packs 64: the compiled P V product is an FP8 MMA
    exactly where decode_launch.pv_accumulates_in_fp32 says it is not FP32 (Hopper at 16 rows converts
    to FP16 and sums in FP32), and the decode and append kernels contract nothing into FMAs."""
    from quantattn.kernels import decode_launch as L

    q, k, v = qkv(10, 1, 32, 8, nq, 4096, 128)
    cache = quantattn.QuantizedKVCache.from_kv(k, v)
    L.launch_decode.compiled.clear()
    L.launch_append.compiled.clear()
    quantattn.sageattn_decode(q, cache)
    cache.append(k[:, :, :64], v[:, :, :64])
    decode = [c.asm["ptx"] for c, _ in L.launch_decode.compiled.values()]
    append = [c.asm["ptx"] for c, _ in L.launch_append.compiled.values()]
    assert decode and append
    fp8_mma = all(re.search(r"mma[\w.]*\.e4m3\.e4m3", ptx) for ptx in decode)
    assert fp8_mma != L.reference_rows_in_fp32(q, 8, cache.config)
    assert not any("fma.rn.f32" in ptx for ptx in decode + append)


def test_token_by_token_appends_equal_one_from_kv():
    q, k, v = qkv(5, 2, 32, 8, 1, 4096 + 200, 128)
    whole = quantattn.QuantizedKVCache.from_kv(k, v)
    grown = quantattn.QuantizedKVCache.from_kv(k[:, :, :4096], v[:, :, :4096], k_mean=whole.k_mean)
    for i in range(4096, 4296):
        grown.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert torch.equal(quantattn.sageattn_decode(q, grown), quantattn.sageattn_decode(q, whole))


def test_as_accurate_as_sageattn_on_outliers():
    q, k, v = qkv(6, 2, 32, 8, 16, 8192, 128, outliers=True)
    truth = attention_fp64(q, k, v, is_causal=True)
    out = quantattn.sageattn_decode(q, quantattn.QuantizedKVCache.from_kv(k, v), is_causal=True)
    main = quantattn.sageattn(q, k, v, is_causal=True)
    assert rel_l1(out, truth) <= 1.5 * rel_l1(main, truth)


def test_decode_step_has_no_host_sync_and_captures_in_a_cuda_graph():
    """append + decode, the typical decode step: no synchronization, and a captured step replays to the
    eager step's result. (The graph bakes in that step's cache length: each length needs its own graph.)"""
    q, k, v = qkv(7, 2, 32, 8, 1, 4097, 128)
    n = 4000
    k1, v1 = k[:, :, n : n + 1].clone(), v[:, :, n : n + 1].clone()
    eager = quantattn.QuantizedKVCache.from_kv(k[:, :, :n], v[:, :, :n], capacity=8192)
    graphed = quantattn.QuantizedKVCache.from_kv(k[:, :, :n], v[:, :, :n], capacity=8192)
    scratch = quantattn.QuantizedKVCache.from_kv(k[:, :, :n], v[:, :, :n], capacity=8192)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager.append(k1, v1)
        want = quantattn.sageattn_decode(q, eager, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scratch.append(k1, v1)  # compiles the kernels for these shapes outside the capture
    quantattn.sageattn_decode(q, scratch, return_lse=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.append(k1, v1)
        got = quantattn.sageattn_decode(q, graphed, return_lse=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu_serial  # reads the allocator's peak
def test_memory_of_the_cache_and_of_a_call():
    b, hkv, hq, d, n = 8, 8, 32, 128, 32768
    _, k, v = qkv(8, b, hkv, hkv, 1, n, d)
    cache = quantattn.QuantizedKVCache.from_kv(k, v, capacity=n)
    per_token_head = cache.nbytes / (b * hkv * n)
    assert per_token_head < (2 * d + 4 + 4 * d / 64) * 1.01 + 1  # ~264 bytes at d = 128 (bf16 K/V: 512)
    q = make(9, b, hq, 16, d)
    quantattn.sageattn_decode(q, cache)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = quantattn.sageattn_decode(q, cache)
    torch.cuda.synchronize()
    rows = (hq // hkv) * 16
    splits = R.cdiv(R.cdiv(n, 64), R.blocks_per_split(n, b * hkv, rows))
    workspace = b * hkv * max(rows, 16) * splits * (d + 2) * 4
    assert torch.cuda.max_memory_allocated() - base <= out.numel() * 2 + workspace + (1 << 20)
