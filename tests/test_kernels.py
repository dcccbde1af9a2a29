"""Every Triton kernel against the reference variant it implements, through the interpreter.

Kernel and reference quantize identically (same groups, same rounding, same IEEE divisions), so
they differ only where an accumulation order or an exp2 ulp tips one FP8/FP16 rounding: the bound
KERNEL_VS_REFERENCE is a small fraction of the reference's own quantization error, which a kernel
using any other group, scale or accumulator would exceed by far (test_bound_is_tight).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import triton
import triton.language as tl
from helpers import INTERPRETER, make

import quantattn as qa
from quantattn import settings
from quantattn.config import QuantConfig
from quantattn.kernels.common import to_fp8_e4m3
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64, round_to_fp8_e4m3, smoothing_vector_k

pytestmark = INTERPRETER

KERNEL_VS_REFERENCE = 0.05  # fraction of the reference's error against FP64


def run_both(q, k, v, cfg, **kw):
    out = qa.sageattn(q, k, v, config=cfg, backend="triton", **kw)
    ref = qa.sageattn(q, k, v, config=cfg, backend="reference", **kw)
    return out, ref


def assert_matches(out, ref, truth):
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf"
    err_ref = rel_l1(ref, truth)
    err_kernel = rel_l1(out, ref)
    assert err_kernel <= KERNEL_VS_REFERENCE * err_ref + 1e-6, (err_kernel, err_ref)


CONFIGS = [
    QuantConfig(),
    QuantConfig(pv_accum="fp32"),
    QuantConfig(pv_accum="fp32+fp16"),
    QuantConfig(smooth_v=True),
    QuantConfig(qk_dtype="int4", smooth_q=True),
    QuantConfig(smooth_q=True, qk_granularity="per_warp"),
    QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32"),
    QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp16+fp32"),
    QuantConfig(qk_granularity="per_token", pv_dtype="bf16", pv_accum="fp32", smooth_v=True),
    QuantConfig(pv_dtype="fp16", pv_accum="fp32", smooth_k=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("causal", [False, True])
def test_variant_matches_reference(cfg, causal):
    dtype = torch.float16 if cfg.pv_accum == "fp16+fp32" else torch.bfloat16
    q = make(1, 1, 4, 130, 64, dtype=dtype)
    k = make(2, 1, 2, 200, 64, dtype=dtype, outliers=True)
    v = make(3, 1, 2, 200, 64, dtype=dtype)
    out, ref = run_both(q, k, v, cfg, is_causal=causal)
    assert_matches(out, ref, attention_fp64(q, k, v, is_causal=causal))


@pytest.mark.parametrize("gran", ["per_tensor", "per_block", "per_warp", "per_thread", "per_token"])
@pytest.mark.parametrize("qk_dtype", ["int8", "int4"])
def test_granularity_matches_reference(gran, qk_dtype):
    cfg = QuantConfig(qk_granularity=gran, qk_dtype=qk_dtype)
    q, k, v = (make(s, 1, 2, 150, 64) for s in (4, 5, 6))
    out, ref = run_both(q, k, v, cfg)
    assert_matches(out, ref, attention_fp64(q, k, v))


@pytest.mark.parametrize("d", [40, 96, 128])
def test_head_dims(d):
    q, k, v = (make(s, 1, 2, 70, d) for s in (7, 8, 9))
    out, ref = run_both(q, k, v, QuantConfig())
    assert_matches(out, ref, attention_fp64(q, k, v))


def test_nhd_noncontiguous_and_lse():
    base = make(10, 1, 96, 4, 128)
    q = base[..., ::2]  # [1, 96, 4, 64] with a channel stride of 2 (the launcher makes it unit)
    k = make(11, 1, 80, 2, 64).transpose(0, 0)
    v = make(12, 2, 80, 2, 64)[1:]
    (out, lse), (ref, ref_lse) = run_both(q, k, v, QuantConfig(), tensor_layout="NHD", return_lse=True, is_causal=True)
    truth, truth_lse = attention_fp64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True, None, True)
    assert_matches(out.transpose(1, 2), ref.transpose(1, 2), truth)
    assert out.shape == q.shape and out.is_contiguous()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-4
    assert (ref_lse[finite].double() - truth_lse[finite]).abs().max() < 0.1


def test_varlen_matches_reference_loop():
    lens_q, lens_k = [70, 0, 150, 1], [90, 20, 130, 64]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = make(13, sum(lens_q), 4, 64)
    k = make(14, sum(lens_k), 2, 64)
    v = make(15, sum(lens_k), 2, 64)
    for cfg in (QuantConfig(), QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32")):
        args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
        out, lse = qa.sageattn_varlen(*args, is_causal=True, return_lse=True, config=cfg, backend="triton")
        ref, ref_lse = qa.sageattn_varlen(*args, is_causal=True, return_lse=True, config=cfg, backend="reference")
        assert torch.isfinite(out).all()
        assert rel_l1(out, ref) < 2e-3
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-4


def test_nan_in_one_query_row_stays_in_that_row():
    q, k, v = (make(s, 1, 2, 128, 64) for s in (16, 17, 18))
    q[0, 1, 5, 3] = float("nan")
    q[0, 0, 70, 0] = float("inf")
    out = qa.sageattn(q, k, v, backend="triton")
    bad = torch.zeros(1, 2, 128, dtype=torch.bool)
    bad[0, 1, 5] = bad[0, 0, 70] = True
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize(
    "cfg", [QuantConfig(pv_dtype="fp16", pv_accum="fp32"), QuantConfig(pv_dtype="bf16", pv_accum="fp32")],
    ids=lambda c: c.name,
)  # fmt: skip
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_v_element_reaches_its_channel_with_16_bit_pv(cfg, bad):
    """Where the interpreter can show it (16-bit P.V): a NaN or Inf in V[j, c] makes channel c of every row
    that attends key j non-finite, and nothing else, as the reference does."""
    q, k, v = (make(s, 1, 2, 64, 32) for s in (40, 41, 42))
    v[0, 1, 10, 3] = bad
    out = qa.sageattn(q, k, v, config=cfg, backend="triton")
    ref = qa.sageattn(q, k, v, config=cfg, backend="reference")
    assert not torch.isfinite(out[0, 1, :, 3]).any()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.isfinite(out).sum() == out.numel() - 64


def test_fp8_pv_under_the_interpreter_says_what_it_cannot_check(monkeypatch):
    """FP8 P.V loses NaN/Inf in the interpreter's tl.dot: the call says so (once), and the GPU suite
    (tests/test_kernels_gpu.py::test_a_non_finite_v_element_reaches_its_channel) checks it instead."""
    from quantattn.kernels import launch

    monkeypatch.setattr(launch, "_said_interpreter_fp8_pv", False)
    q, k, v = (make(s, 1, 1, 16, 32) for s in (43, 44, 45))
    with pytest.warns(UserWarning, match="FP8 P.V products lose NaN and Inf"):
        qa.sageattn(q, k, v, backend="triton")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        qa.sageattn(q, k, v, backend="triton")  # said once per process
    assert not [w for w in later if "FP8 P.V" in str(w.message)]
    monkeypatch.setattr(launch, "_said_interpreter_fp8_pv", False)
    with warnings.catch_warnings(record=True) as fp16:
        warnings.simplefilter("always")
        qa.sageattn(q, k, v, config=QuantConfig(pv_dtype="fp16", pv_accum="fp32"), backend="triton")
    assert not [w for w in fp16 if "FP8 P.V" in str(w.message)]  # 16-bit P.V keeps NaN: nothing to say


def test_poisoned_output_is_fully_written():
    from quantattn.kernels import launch

    q, k, v = (make(s, 2, 2, 100, 64) for s in (19, 20, 21))
    cfg = QuantConfig()
    kv = launch.triton_preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 2, 100), float("nan"))
    launch.triton_attention(q, kv, False, 0.125, out, lse, launch.sequences(q, None, 0), k=k)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_empty_and_single_token():
    q, k, v = (make(s, 1, 2, 1, 64) for s in (22, 23, 24))
    out, ref = run_both(q, k, v, QuantConfig())
    assert torch.allclose(out.float(), ref.float(), atol=1e-2)
    out = qa.sageattn(q, k[:, :, :0], v[:, :, :0], backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


def test_bound_is_tight():
    """A kernel quantizing with one scale per head instead of per token, or to INT4, fails the bound."""
    q, k, v = (make(s, 1, 2, 256, 64) for s in (25, 26, 27))
    truth = attention_fp64(q, k, v)
    ref = qa.sageattn(q, k, v, backend="reference")
    for wrong in (QuantConfig(qk_granularity="per_tensor"), QuantConfig(qk_dtype="int4")):
        out = qa.sageattn(q, k, v, config=wrong, backend="triton")
        assert rel_l1(out, ref) > KERNEL_VS_REFERENCE * rel_l1(ref, truth)


@triton.jit
def _fp8_cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, to_fp8_e4m3(tl.load(X + offs), True))


def _round_e4m3_with_kernel_helper(x):
    n = triton.next_power_of_2(x.numel())
    xp = torch.nn.functional.pad(x, (0, n - x.numel()))
    y = torch.empty(n, dtype=torch.float8_e4m3fn)
    _fp8_cast_kernel[(1,)](xp, y, n)
    return y[: x.numel()].float()


def test_fp8_rounding_helper_is_exact_in_the_interpreter():
    g = torch.Generator().manual_seed(28)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2  # ties between neighbours (sorted halves)
    x = torch.cat([
        torch.randn(4096, generator=g), 448 * torch.rand(2048, generator=g), torch.rand(1024, generator=g) / 64,
        grid, mids.sort().values, torch.tensor([1.9507, 0.1239, 449.0, 500.0, -1e6, 1e-12, float("nan"), float("inf")]),
    ])  # fmt: skip
    got = _round_e4m3_with_kernel_helper(x)
    want = round_to_fp8_e4m3(x)
    same = (got == want) & (torch.signbit(got) == torch.signbit(want)) | (torch.isnan(got) & torch.isnan(want))
    assert same.all(), x[~same][:10]
    assert not math.isnan(got[-4].item()) and got[-4].item() == -448.0


def test_smooth_q_with_two_query_blocks_per_tile(monkeypatch):
    """A 128-row tile holds two smooth-Q blocks, each with its own correction row (the GPU's tile for
    FP16 PV); the interpreter's default tile holds one."""
    monkeypatch.setenv("QUANTATTN_TILE", "128,4,1")
    settings.reload()  # quantattn reads the environment once
    cfg = QuantConfig(smooth_q=True, pv_dtype="fp16", pv_accum="fp32")
    q, k, v = make(33, 1, 2, 200, 64), make(34, 1, 2, 150, 64, outliers=True), make(35, 1, 2, 150, 64)
    out, ref = run_both(q, k, v, cfg, is_causal=True)
    assert_matches(out, ref, attention_fp64(q, k, v, is_causal=True))


@pytest.mark.parametrize("varlen", [False, True])
def test_preprocessing_in_chunks_of_several_blocks(monkeypatch, varlen):
    """Long sequences are split into at most MAX_CHUNKS chunks of several 64-key blocks each; with
    MAX_CHUNKS = 2 short inputs take that path. Statistics and quantized K/V must not change."""
    from quantattn.kernels import launch

    k, v = (make(s, 1, 2, 300, 64, outliers=True) for s in (40, 41))
    cfg = QuantConfig()
    if varlen:
        cu = torch.tensor([0, 70, 300], dtype=torch.int32)
        seqs = launch.Sequences(2, 0, 230, cu)
    else:
        seqs = launch.sequences(k, None, 0)
    whole = launch.triton_preprocess_kv(k, v, cfg, seqs)
    monkeypatch.setattr(launch, "MAX_CHUNKS", 2)
    chunked = launch.triton_preprocess_kv(k, v, cfg, seqs)
    for a, b in zip((*whole.k_stats, *whole.v_stats), (*chunked.k_stats, *chunked.v_stats), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(whole.k, chunked.k)
    assert torch.equal(whole.k_scale, chunked.k_scale)
    assert torch.equal(whole.v[..., :300].float(), chunked.v[..., :300].float())
    # the statistics are what the reference computes: per sequence, over its own tokens (for K: smooth
    # K's vector, the trimmed mean; for V: the mean)
    for s, (lo, hi) in enumerate(((0, 70), (70, 300)) if varlen else ((0, 300),)):
        kk = k[0, :, lo:hi].float() if varlen else k[0].float()
        vv = v[0, :, lo:hi].float() if varlen else v[0].float()
        torch.testing.assert_close(chunked.k_stats[0][s], smoothing_vector_k(kk), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked.v_stats[0][s], vv.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked.k_stats[1][s], kk.amax(1))


def dominant_key(seed, nk, outlier=50.0):
    """K with a channel bias and its first key 50x larger: smooth K's trimmed mean leaves that key out."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, nk, 64, generator=g) + 8 * torch.randn(1, 2, 1, 64, generator=g)
    k[:, :, 0] *= outlier
    return k.bfloat16()


@pytest.mark.parametrize("nk", [2, 3, 5, 70])
@pytest.mark.parametrize("keys", ["dominant key", "normal"])
def test_smooth_k_vector_matches_reference(nk, keys):
    """The kernel's K statistic is smooth K's vector, the trimmed token mean, as the reference computes
    it (zero below 3 keys); output and lse (which adds q . vector back) match the reference's, with smooth
    Q too (its correction term is mean(Q block) . (K - vector))."""
    from quantattn.kernels import launch

    k = dominant_key(50 + nk, nk) if keys == "dominant key" else make(50 + nk, 1, 2, nk, 64, outliers=True)
    q, v = make(60, 1, 4, 40, 64), make(61, 1, 2, nk, 64)
    kv = launch.triton_preprocess_kv(k, v, QuantConfig(), launch.sequences(k, None, 0))
    torch.testing.assert_close(kv.k_stats[0][0], smoothing_vector_k(k[0]), rtol=1e-5, atol=1e-4)
    for cfg in (QuantConfig(), QuantConfig(smooth_q=True)):
        (out, lse), (ref, ref_lse) = run_both(q, k, v, cfg, return_lse=True)
        assert_matches(out, ref, attention_fp64(q, k, v))
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5)  # a few ulps of lse up to ~1000


def test_smooth_k_vector_with_non_finite_keys(monkeypatch):
    """Non-finite elements are left out of the trimmed mean (0 to 4 finite values per channel, and more),
    chunked or not; keys holding them get NaN scales, as in the reference."""
    from quantattn.kernels import launch

    g = torch.Generator().manual_seed(62)
    k = torch.randn(1, 2, 200, 64, generator=g) * 3
    bad = torch.zeros(1, 2, 200, 64, dtype=torch.bool)
    for c in range(8):  # channel c of head 0 keeps exactly c finite values; head 1 loses random elements
        bad[0, 0, c:, c] = True
    bad[0, 1] = torch.rand(200, 64, generator=g) < 0.02
    specials = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, bad.shape, generator=g)]
    k = torch.where(bad, specials, k).bfloat16()
    v = make(63, 1, 2, 200, 64)
    for chunks in (16, 2):  # one chunk per head, or the counts of two chunks added up
        monkeypatch.setattr(launch, "MAX_CHUNKS", chunks)
        kv = launch.triton_preprocess_kv(k, v, QuantConfig(), launch.sequences(k, None, 0))
        want = smoothing_vector_k(k[0])
        assert torch.equal(kv.k_stats[0][0, 0, :3], torch.zeros(3))  # channels with 0, 1, 2 finite values
        torch.testing.assert_close(kv.k_stats[0][0], want, rtol=1e-5, atol=1e-5)
        row_bad = bad[0].any(-1)
        assert torch.isnan(kv.k_scale[0][row_bad]).all() and torch.isfinite(kv.k_scale[0][~row_bad]).all()
