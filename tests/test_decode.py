"""The decode kernels (quantattn/kernels/decode.py) through the Triton interpreter, against the reference.

The append kernel and the reference quantize identically: the caches they build hold the same bytes.
The attention kernel differs from the reference only where the reference models the FP8 MMA's FP22
accumulator (the interpreter multiplies exactly) and in float32 summation order, so it must stay within
a small fraction of the reference's own error against FP64 (as tests/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import INTERPRETER, make

import quantattn
from quantattn.config import QuantConfig
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64
from quantattn.reference import decode as R

pytestmark = INTERPRETER

KERNEL_VS_REFERENCE = 0.05


def caches(k, v, **kw):
    kernel = quantattn.QuantizedKVCache.from_kv(k, v, backend="triton", **kw)
    ref = quantattn.QuantizedKVCache.from_kv(k, v, backend="reference", **kw)
    return kernel, ref


def same_bits(a, b):
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def assert_same_bytes(a, b):
    n = len(a)
    assert n == len(b)
    full, tail = n // R.V_BLOCK, n % R.V_BLOCK
    x, y = a.buffers, b.buffers
    assert same_bits(x.k[:, :, :n], y.k[:, :, :n])
    assert same_bits(x.k_scale[:, :, :n], y.k_scale[:, :, :n])
    assert same_bits(x.k_mean, y.k_mean)
    assert same_bits(x.v[..., : full * 64], y.v[..., : full * 64])
    assert same_bits(x.v_scale[:, :, :full], y.v_scale[:, :, :full])
    assert same_bits(x.v_tail[:, :, :tail], y.v_tail[:, :, :tail])


def check_decode(q, cache, truth, **kw):
    out, lse = quantattn.sageattn_decode(q, cache, backend="triton", return_lse=True, **kw)
    ref, ref_lse = quantattn.sageattn_decode(q, cache, backend="reference", return_lse=True, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_l1(out, ref) <= KERNEL_VS_REFERENCE * rel_l1(ref, truth) + 1e-6, (rel_l1(out, ref), rel_l1(ref, truth))
    assert (lse - ref_lse).abs().max() < 1e-4
    return out


@pytest.mark.parametrize(("dtype", "d"), [(torch.bfloat16, 64), (torch.float16, 72)])
def test_append_kernel_builds_the_reference_cache(dtype, d):
    k = make(1, 2, 2, 300, d, dtype=dtype, outliers=True)
    v = make(2, 2, 2, 300, d, dtype=dtype)
    v[1, 0, 7, 3] = float("nan")  # a non-finite V element: NaN in its FP8 block, not in the scales
    kernel, ref = caches(k[:, :, :30], v[:, :, :30], capacity=64)
    pos = 30
    # one token into a partial block, completing it, a block and a half, completing one and leaving a
    # tail (two launches), aligned starts, then growth past the capacity
    for n in (1, 33, 96, 70, 20, 50):
        kernel.append(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        ref.append(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        assert_same_bytes(kernel, ref)
        pos += n
    whole, _ = caches(k[:, :, :pos], v[:, :, :pos], k_mean=ref.k_mean)
    assert_same_bytes(whole, ref)


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "nq", "nk", "d", "causal"),
    [
        (2, 4, 2, 1, 300, 64, False),  # GQA, Nq = 1, a tail of 44 keys
        (1, 2, 2, 4, 256, 64, True),  # no tail, causal with Nq > 1
        (1, 8, 1, 16, 130, 72, True),  # MQA: 128 packed rows in two row tiles, odd head_dim
    ],
)
def test_decode_kernel_matches_reference(b, hq, hkv, nq, nk, d, causal):
    q = make(3, b, hq, nq, d)
    k = make(4, b, hkv, nk, d, outliers=True)
    v = make(5, b, hkv, nk, d)
    cache, _ = caches(k, v)
    check_decode(q, cache, attention_fp64(q, k, v, is_causal=causal), is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_split_k_merge(monkeypatch, causal):
    """Several splits (one block each), their partials merged by the second kernel."""
    monkeypatch.setattr(R, "MIN_SPLIT_BLOCKS", 1)
    q, k, v = make(6, 1, 4, 3, 64), make(7, 1, 2, 330, 64, outliers=True), make(8, 1, 2, 330, 64)
    assert R.cdiv(R.cdiv(330, 64), R.blocks_per_split(330, 2, 6)) > 1
    cache, _ = caches(k, v)
    check_decode(q, cache, attention_fp64(q, k, v, is_causal=causal), is_causal=causal)


@pytest.mark.parametrize("min_split_blocks", [100, 1], ids=["one_split", "merged_splits"])
def test_nan_in_one_query_row_stays_in_that_row(monkeypatch, min_split_blocks):
    """The NaN reaches the output through the softmax's row sum, whether or not the FP8 P·V product
    carries it (the interpreter's FP8 has no NaN; tl.maximum ignores NaN on the GPU and in triton 3.9's
    interpreter)."""
    monkeypatch.setattr(R, "MIN_SPLIT_BLOCKS", min_split_blocks)
    q, k, v = make(12, 1, 4, 2, 64), make(13, 1, 2, 320, 64), make(14, 1, 2, 320, 64)  # no 16-bit tail
    assert (R.cdiv(5, R.blocks_per_split(320, 2, 4)) > 1) == (min_split_blocks == 1)
    q[0, 1, 1, 5] = float("nan")
    cache, _ = caches(k, v)
    out = quantattn.sageattn_decode(q, cache, backend="triton")
    bad = torch.zeros(1, 4, 2, dtype=torch.bool)
    bad[0, 1, 1] = True
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()


def test_sage2pp_ranges_and_nhd(monkeypatch):
    monkeypatch.setattr(R, "MIN_SPLIT_BLOCKS", 2)
    cfg = QuantConfig(pv_accum="fp32+fp16")
    q, k, v = make(9, 1, 4, 2, 64, dtype=torch.float16), make(10, 1, 2, 300, 64, dtype=torch.float16), None
    v = make(11, 1, 2, 300, 64, dtype=torch.float16)
    cache = quantattn.QuantizedKVCache.from_kv(
        k.transpose(1, 2), v.transpose(1, 2), tensor_layout="NHD", config=cfg, backend="triton"
    )
    out = quantattn.sageattn_decode(q.transpose(1, 2), cache, tensor_layout="NHD", backend="triton")
    ref = quantattn.sageattn_decode(q.transpose(1, 2), cache, tensor_layout="NHD", backend="reference")
    truth = attention_fp64(q, k, v)
    assert rel_l1(out.transpose(1, 2), ref.transpose(1, 2)) <= KERNEL_VS_REFERENCE * rel_l1(ref.transpose(1, 2), truth)


def test_decode_after_appends_and_inputs_unmodified():
    q, k, v = make(12, 1, 4, 1, 64), make(13, 1, 2, 200, 64, outliers=True), make(14, 1, 2, 200, 64)
    saved = [t.clone() for t in (q, k, v)]
    cache = quantattn.QuantizedKVCache.from_kv(k[:, :, :120], v[:, :, :120], backend="triton")
    for i in range(120, 200, 16):
        cache.append(k[:, :, i : i + 16], v[:, :, i : i + 16])
        truth = attention_fp64(q, k[:, :, : i + 16], v[:, :, : i + 16])
        check_decode(q, cache, truth)
    for a, b in zip((q, k, v), saved, strict=True):
        assert torch.equal(a, b)
