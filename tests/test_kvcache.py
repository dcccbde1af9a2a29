"""The quantized KV cache and sageattn_decode through the PyTorch reference (CPU).

Accuracy: decode against the cache must be as accurate as sageattn's default variant on the same inputs
(the cache quantizes K the same way, V in finer groups, and keeps the last partial block in 16 bits), so
its error against FP64 attention is bounded by 1.5x sageattn's. The cache's bytes must not depend on how
the tokens arrived (docs/numerics.md, "Decoding against a quantized KV cache").
"""

from __future__ import annotations

import math

import pytest
import torch

import quantattn
from quantattn.config import QuantConfig
from quantattn.reference import attention_fp64
from quantattn.reference import decode as R
from quantattn.reference.quant import smoothing_vector_k

DECODE_VS_SAGEATTN = 1.5


def inputs(qa, seed, *, b=2, hq=8, hkv=2, nq=1, nk=700, d=64, dtype=torch.bfloat16, outliers=False):
    bias = dict(q_bias=2.0, k_bias=8.0, v_bias=2.0) if outliers else {}
    q, k, v = qa.make_qkv(seed, b, hq, nq, d, hkv=hkv, nk=nk, dtype=dtype, **bias)
    return q, k, v


def decode(q, k, v, **kw):
    cache = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference")
    return quantattn.sageattn_decode(q, cache, backend="reference", **kw)


def same_contents(a: quantattn.QuantizedKVCache, b: quantattn.QuantizedKVCache) -> bool:
    """The first len tokens of two caches hold the same bytes."""
    n = len(a)
    full, tail = n // R.V_BLOCK, n % R.V_BLOCK
    x, y = a.buffers, b.buffers
    pairs = [
        (x.k[:, :, :n], y.k[:, :, :n]),
        (x.k_scale[:, :, :n], y.k_scale[:, :, :n]),
        (x.k_mean, y.k_mean),
        (x.v[..., : full * R.V_BLOCK].view(torch.uint8), y.v[..., : full * R.V_BLOCK].view(torch.uint8)),
        (x.v_scale[:, :, :full], y.v_scale[:, :, :full]),
        (x.v_tail[:, :, :tail], y.v_tail[:, :, :tail]),
    ]
    return len(a) == len(b) and all(torch.equal(p, r) for p, r in pairs)


@pytest.mark.parametrize("outliers", [False, True], ids=["randn", "outliers"])
@pytest.mark.parametrize(("nq", "causal"), [(1, False), (4, True), (16, False), (16, True)])
@pytest.mark.parametrize("d", [64, 72])
def test_as_accurate_as_sageattn(qa, outliers, nq, causal, d):
    q, k, v = inputs(qa, 1, b=1 if nq == 16 else 2, nq=nq, d=d, outliers=outliers)
    truth = attention_fp64(q, k, v, is_causal=causal)
    out = decode(q, k, v, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    main = quantattn.sageattn(q, k, v, is_causal=causal, config=QuantConfig(), backend="reference")
    err, err_main = qa.rel_l1(out, truth), qa.rel_l1(main, truth)
    assert err <= DECODE_VS_SAGEATTN * err_main, (err, err_main)


@pytest.mark.parametrize("causal", [False, True])
def test_lse_against_fp64(qa, causal):
    q, k, v = inputs(qa, 2, nq=4, outliers=True)
    out, lse = decode(q, k, v, is_causal=causal, return_lse=True)
    truth, truth_lse = attention_fp64(q, k, v, is_causal=causal, return_lse=True)
    assert lse.shape == (2, 8, 4) and lse.dtype == torch.float32
    # the cache quantizes K exactly as the main variant does (whole-K trimmed mean, per-token INT8): same score errors
    bound = qa.lse_bound(q, k, v, QuantConfig(), causal)
    assert (lse.double() - truth_lse).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_appends_hold_the_bytes_of_one_from_kv(qa, dtype):
    """Token-by-token and chunked appends (crossing 64-token blocks, partly filling them, completing
    them) give the bytes of from_kv of all tokens, when both smooth K by the same vector."""
    _, k, v = inputs(qa, 3, nk=400, dtype=dtype, outliers=True)
    whole = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference")
    grown = quantattn.QuantizedKVCache.from_kv(k[:, :, :10], v[:, :, :10], k_mean=whole.k_mean, backend="reference")
    pos = 10
    for n in [1] * 60 + [5, 64, 70, 3, 1, 130]:
        grown.append(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
    grown.append(k[:, :, pos:], v[:, :, pos:])
    assert len(grown) == len(whole) == 400
    assert same_contents(grown, whole)
    q = inputs(qa, 4, nq=2, dtype=dtype)[0]
    a = quantattn.sageattn_decode(q, grown, backend="reference", is_causal=True)
    b = quantattn.sageattn_decode(q, whole, backend="reference", is_causal=True)
    assert torch.equal(a, b)


def test_appends_with_their_own_mean_stay_accurate(qa):
    """With the default vector (smooth K's trimmed mean of the first tokens), an appended-to cache differs from from_kv of all
    tokens only in the smoothing vector: both as accurate as sageattn."""
    q, k, v = inputs(qa, 5, nq=1, nk=500, outliers=True)
    cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :37], v[:, :, :37], backend="reference")
    torch.testing.assert_close(cache.k_mean, smoothing_vector_k(k[:, :, :37]), rtol=0, atol=0)
    for i in range(37, 500, 29):
        cache.append(k[:, :, i : i + 29], v[:, :, i : i + 29])
    out = quantattn.sageattn_decode(q, cache, backend="reference")
    truth = attention_fp64(q, k, v)
    main = quantattn.sageattn(q, k, v, backend="reference")
    assert qa.rel_l1(out, truth) <= DECODE_VS_SAGEATTN * qa.rel_l1(main, truth)


def test_empty_cache_and_first_append(qa):
    q, k, v = inputs(qa, 6, nq=3, nk=100)
    cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :0], v[:, :, :0], backend="reference")
    assert len(cache) == 0 and cache.seq_len == 0
    out, lse = quantattn.sageattn_decode(q, cache, backend="reference", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == -math.inf).all()
    cache.append(k, v)
    torch.testing.assert_close(cache.k_mean, smoothing_vector_k(k), rtol=0, atol=0)  # the first append's
    assert same_contents(cache, quantattn.QuantizedKVCache.from_kv(k, v, backend="reference"))


def test_fewer_than_three_tokens_are_not_smoothed(qa):
    """The trimmed mean of 1 or 2 tokens is zero (nothing left after dropping max and min): such a
    cache subtracts nothing, which is exact, and keeps that zero vector for every later append."""
    q, k, v = inputs(qa, 6, nq=1, nk=100, outliers=True)
    for n in (1, 2):
        cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :n], v[:, :, :n], backend="reference")
        assert torch.equal(cache.k_mean, torch.zeros_like(cache.k_mean))
        cache.append(k[:, :, n:], v[:, :, n:])
        assert torch.equal(cache.k_mean, torch.zeros_like(cache.k_mean))
        out = quantattn.sageattn_decode(q, cache, backend="reference")
        assert qa.rel_l1(out, attention_fp64(q, k, v)) < 0.05
    assert not torch.equal(smoothing_vector_k(k[:, :, :3]), torch.zeros_like(cache.k_mean))


def test_capacity_and_growth(qa):
    _, k, v = inputs(qa, 7, nk=300, d=72)
    cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :100], v[:, :, :100], capacity=130, backend="reference")
    assert cache.capacity == 192  # rounded up to 64-token blocks
    before = cache.nbytes
    cache.append(k[:, :, 100:190], v[:, :, 100:190])
    assert cache.capacity == 192 and cache.nbytes == before
    assert cache.append(k[:, :, 190:200], v[:, :, 190:200]) is cache
    assert cache.capacity == 384 and len(cache) == 200  # doubled
    cache.append(k[:, :, 200:], v[:, :, 200:])
    ref = quantattn.QuantizedKVCache.from_kv(k, v, k_mean=cache.k_mean, backend="reference")
    assert same_contents(cache, ref)
    big = quantattn.QuantizedKVCache.from_kv(k[:, :, :1], v[:, :, :1], backend="reference")
    big.append(k[:, :, 1:], v[:, :, 1:])  # one append far past the capacity
    assert big.capacity >= 300 and len(big) == 300


def test_nbytes_per_token(qa):
    """int8 K + its float32 scale + FP8 V + a float32 scale per channel per 64 tokens, plus the 16-bit
    tail block and the mean: (2d + 4 + 4d/64) bytes per token and kv head, about half of bf16 K/V."""
    b, hkv, d, cap = 2, 3, 128, 4096
    _, k, v = inputs(qa, 8, hkv=hkv, hq=hkv, nk=64, d=d)
    cache = quantattn.QuantizedKVCache.from_kv(k, v, capacity=cap, backend="reference")
    per_head = cap * (2 * d + 4) + cap // 64 * d * 4 + 64 * d * 2 + d * 4
    assert cache.nbytes == b * hkv * per_head
    assert cache.nbytes < 0.55 * b * hkv * cap * d * 2 * 2


def test_gqa_and_mqa_match_repeated_heads(qa):
    """Query head h reads kv head h // (Hq/Hkv): the same as giving each query head its own copy."""
    q, k, v = inputs(qa, 9, b=1, hq=4, hkv=1, nq=2, nk=200)
    out = decode(q, k, v, is_causal=True)
    per_head = [decode(q[:, h : h + 1], k, v, is_causal=True) for h in range(4)]
    truth = attention_fp64(q, k, v, is_causal=True)
    assert qa.rel_l1(out, truth) < 0.05
    # the packing changes only the split choice, not the groups: each head's output is close to its own call
    for h in range(4):
        assert qa.rel_l1(out[:, h : h + 1], per_head[h]) < 0.01


def test_causal_rows_do_not_see_later_keys(qa):
    q, k, v = inputs(qa, 10, nq=5, nk=130)
    cache = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference")
    out = quantattn.sageattn_decode(q, cache, is_causal=True, backend="reference")
    v2 = v.clone()
    v2[:, :, -1] += 100  # the last key (in the 16-bit tail): only the last query row sees it
    cache2 = quantattn.QuantizedKVCache.from_kv(k, v2, backend="reference")
    out2 = quantattn.sageattn_decode(q, cache2, is_causal=True, backend="reference")
    assert torch.equal(out[:, :, :4], out2[:, :, :4])
    assert not torch.equal(out[:, :, 4], out2[:, :, 4])
    # Nq > Nk: the first rows see no key and give zeros, as sageattn's
    short = quantattn.QuantizedKVCache.from_kv(k[:, :, :3], v[:, :, :3], backend="reference")
    out, lse = quantattn.sageattn_decode(q, short, is_causal=True, return_lse=True, backend="reference")
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2])) and (lse[:, :, :2] == -math.inf).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 2:]).all()


def test_nhd_layout_and_sm_scale(qa):
    q, k, v = inputs(qa, 11, nq=3, nk=150)
    hnd = decode(q, k, v, sm_scale=0.3, is_causal=True)
    cache = quantattn.QuantizedKVCache.from_kv(*qa.to_nhd(k, v), tensor_layout="NHD", backend="reference")
    cache.append(*qa.to_nhd(k[:, :, :5], v[:, :, :5]))  # appends take the cache's layout
    ref = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference").append(k[:, :, :5], v[:, :, :5])
    assert same_contents(cache, ref)
    nhd = quantattn.sageattn_decode(qa.to_nhd(q), cache, tensor_layout="NHD", sm_scale=0.3, backend="reference")
    assert nhd.shape == qa.to_nhd(q).shape and nhd.is_contiguous()
    hnd = quantattn.sageattn_decode(q, ref, sm_scale=0.3, backend="reference")
    assert torch.equal(nhd.transpose(1, 2), hnd)


def test_multiple_splits_stay_accurate(qa, monkeypatch):
    """Short inputs take several splits when each may be one block; the merged result is as accurate."""
    q, k, v = inputs(qa, 12, nq=2, nk=600, outliers=True)
    one = decode(q, k, v, return_lse=True)
    monkeypatch.setattr(R, "MIN_SPLIT_BLOCKS", 1)
    assert R.cdiv(R.cdiv(600, 64), R.blocks_per_split(600, 4, 8)) > 1
    many = decode(q, k, v, return_lse=True)
    truth = attention_fp64(q, k, v)
    main = quantattn.sageattn(q, k, v, backend="reference")
    assert qa.rel_l1(many[0], truth) <= DECODE_VS_SAGEATTN * qa.rel_l1(main, truth)
    assert qa.rel_l1(many[0], one[0]) < 0.02
    assert (many[1] - one[1]).abs().max() < 1e-4


def test_split_choice():
    for n_keys in (1, 63, 64, 65, 4096, 128 * 1024):
        for heads, rows in ((64, 4), (8, 4), (1, 1), (64, 64), (8, 512)):
            bps = R.blocks_per_split(n_keys, heads, rows)
            n_blocks = R.cdiv(n_keys, 64)
            splits = R.cdiv(n_blocks, bps)
            assert bps >= 1 and splits >= 1
            assert splits == 1 or bps >= R.MIN_SPLIT_BLOCKS
            assert splits * bps >= n_blocks > (splits - 1) * bps
    # decode shapes of the benchmark: B * Hkv = 64 kv heads, 4 rows each (GQA 32/8, Nq = 1)
    assert R.cdiv(64, R.blocks_per_split(4096, 64, 4)) >= 8


def test_no_nan_on_extreme_values(qa):
    q, k, v = inputs(qa, 13, nq=2, nk=200, dtype=torch.float16)
    v = (v.float() * 6e4 / v.float().abs().max()).half()  # near float16's largest value
    k = (k.float() * 100).half()
    out, lse = decode(q * 10, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_inputs_are_not_modified(qa):
    q, k, v = inputs(qa, 14, nq=4, nk=200)
    q_nhd = qa.to_nhd(q)
    saved = [t.clone() for t in (q, k, v)]
    cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :100], v[:, :, :100], backend="reference")
    cache.append(k[:, :, 100:], v[:, :, 100:])
    quantattn.sageattn_decode(q, cache, is_causal=True, return_lse=True, backend="reference")
    quantattn.sageattn_decode(q_nhd, cache, tensor_layout="NHD", backend="reference")
    for a, b in zip((q, k, v), saved, strict=True):
        assert torch.equal(a, b)


def test_auto_backend_on_cpu_is_the_reference(qa):
    q, k, v = inputs(qa, 15, nq=1, nk=70)
    cache = quantattn.QuantizedKVCache.from_kv(k, v)
    assert cache.backend == "reference"
    assert torch.equal(quantattn.sageattn_decode(q, cache), quantattn.sageattn_decode(q, cache, backend="reference"))
    assert "len=70" in repr(cache)


def test_errors_name_the_argument(qa):
    q, k, v = inputs(qa, 16, nq=2, nk=100)
    cache = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference")
    decode_errors = [
        (dict(q=q.float()), TypeError, "q must be float16 or bfloat16"),
        (dict(q=q.half()), TypeError, "cache's dtype"),
        (dict(q=torch.zeros(2, 8, 17, 64, dtype=torch.bfloat16)), ValueError, "quantattn.sageattn"),
        (dict(q=q[:1]), ValueError, "batch size"),
        (dict(q=q[..., :32]), ValueError, "head_dim"),
        (dict(q=q[:, :3]), ValueError, "multiple of the cache's kv heads"),
        (dict(q=q[0]), ValueError, "4-D"),
        (dict(q=q, cache=(k, v)), TypeError, "QuantizedKVCache"),
        (dict(q=q, tensor_layout="BHND"), ValueError, "tensor_layout"),
        (dict(q=q, is_causal=1), TypeError, "is_causal"),
        (dict(q=q, sm_scale=0.0), ValueError, "sm_scale"),
        (dict(q=q, backend="cuda"), ValueError, "backend"),
        (dict(q=q, backend="triton"), RuntimeError, "triton"),
    ]
    for kw, exc, text in decode_errors:
        kw = {"cache": cache, **kw}
        if kw.get("backend") == "triton" and __import__("os").environ.get("TRITON_INTERPRET") == "1":
            continue  # the interpreter runs the kernels on CPU tensors
        with pytest.raises(exc, match=text):
            quantattn.sageattn_decode(kw.pop("q"), kw.pop("cache"), **kw)
    from_kv_errors = [
        ((k, v[:, :, :50]), {}, ValueError, "same shape"),
        ((k.float(), v), {}, TypeError, "k must be float16"),
        ((k, v.half()), {}, ValueError, "dtype"),
        ((k[0], v[0]), {}, ValueError, "k must be 4-D"),
        ((k, v), dict(capacity=10), ValueError, "capacity"),
        ((k, v), dict(capacity=-1), TypeError, "capacity"),
        ((k, v), dict(config=QuantConfig(pv_dtype="fp16", pv_accum="fp32")), ValueError, "FP8 V"),
        ((k, v), dict(config=QuantConfig(pv_accum="fp32")), ValueError, "fresh accumulator"),
        ((k, v), dict(config=QuantConfig(qk_granularity="per_block")), ValueError, "per-token"),
        ((k, v), dict(config=QuantConfig(smooth_v=True)), ValueError, "smooth_v"),
        ((k, v), dict(config="sage2"), TypeError, "QuantConfig"),
        ((k, v), dict(k_mean=torch.zeros(2, 2, 32)), ValueError, "k_mean"),
        ((k, v), dict(tensor_layout="nhd"), ValueError, "tensor_layout"),
        ((k, v), dict(backend="fast"), ValueError, "backend"),
    ]
    for args, kw, exc, text in from_kv_errors:
        with pytest.raises(exc, match=text):
            quantattn.QuantizedKVCache.from_kv(*args, backend=kw.pop("backend", "reference"), **kw)
    for args, exc, text in [
        ((k[:, :1, :3], v[:, :1, :3]), ValueError, "Hkv=2"),
        ((k[:, :, :3].half(), v[:, :, :3].half()), TypeError, "k_new must have the cache's dtype"),
        ((k[:, :, :3], v[:, :, :2]), ValueError, "k_new and v_new"),
        ((k[:, :, 0], v[:, :, 0]), ValueError, "k_new must be 4-D"),
        ((None, v), TypeError, "k_new must be a torch.Tensor"),
    ]:
        with pytest.raises(exc, match=text):
            cache.append(*args)
    assert len(cache) == 100  # failed appends change nothing


def test_supported_configs(qa):
    """smooth_k=False stores a zero mean; SageAttention2++'s ranges (P 224, V 4.5) and FP16 partials."""
    q, k, v = inputs(qa, 17, nq=2, nk=300, outliers=True)
    truth = attention_fp64(q, k, v)
    for cfg in (QuantConfig(smooth_k=False), QuantConfig(pv_accum="fp32+fp16")):
        cache = quantattn.QuantizedKVCache.from_kv(k, v, config=cfg, backend="reference")
        out = quantattn.sageattn_decode(q, cache, backend="reference")
        main = quantattn.sageattn(q, k, v, config=cfg, backend="reference")
        assert qa.rel_l1(out, truth) <= DECODE_VS_SAGEATTN * qa.rel_l1(main, truth), cfg.name
        if not cfg.smooth_k:
            assert torch.equal(cache.k_mean, torch.zeros_like(cache.k_mean))
        else:
            assert cache.buffers.v_scale[:, :, :4].max() * 4.5 <= v.float().abs().max() * 1.0001


def test_readme_decode_snippet_runs(qa):
    """The README's decoding example, run as written on CPU tensors."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("Decoding: quantize the prompt's K/V once", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0].replace('device="cuda"', 'device="cpu"')
    _, k, v = qa.make_qkv(18, 2, 8, 1, 128, hkv=8, nk=100, dtype=torch.bfloat16)
    namespace = {"torch": torch, "quantattn": quantattn, "k": k, "v": v}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["cache"]) == 116 and namespace["out"].shape == (2, 32, 1, 128)
