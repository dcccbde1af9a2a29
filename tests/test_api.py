"""The public API on CPU tensors (the reference backend): layouts, grouped-query attention, masking,
odd shapes, empty inputs, varlen, lse, configuration, backend choice, and NaN/Inf propagation."""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantattn
from quantattn import api, backends
from quantattn.backends import BACKENDS
from quantattn.config import SAGE1, SAGE1_FP16ACC, SAGE2_4B, SAGE2PP, QuantConfig
from quantattn.reference import smoothing_vector_k

DEFAULT = QuantConfig()  # what sageattn runs on CPU tensors (default_config)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.fixture
def captured(monkeypatch):
    """The AttentionCalls the reference backend receives (it still runs them)."""
    calls = []
    backend = BACKENDS["reference"]
    real = backend.forward

    def forward(call):
        calls.append(call)
        real(call)

    monkeypatch.setattr(backend, "forward", forward)
    return calls


# ----------------------------------------------------------------------------------------------------
# The CPU warning, the default configuration, backends


def test_cpu_warning_is_emitted_once(qa, monkeypatch):
    monkeypatch.setattr(backends, "_warned_cpu", False)
    q, k, v = qa.make_qkv(1, nq=16, d=16)
    with pytest.warns(UserWarning, match="CPU tensors run the pure-PyTorch reference") as record:
        quantattn.sageattn(q, k, v)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        quantattn.sageattn(q, k, v)
    assert not [w for w in again if "quantattn" in str(w.message)]


def test_default_config_on_cpu(qa, captured):
    assert quantattn.default_config(torch.device("cpu")) == DEFAULT
    assert DEFAULT.qk_dtype == "int8" and DEFAULT.pv_dtype == "fp8" and DEFAULT.pv_accum == "fp32+fp32"
    assert DEFAULT.smooth_k and not DEFAULT.smooth_q and not DEFAULT.smooth_v
    q, k, v = qa.make_qkv(2, nq=16, d=16)
    quantattn.sageattn(q, k, v)
    assert len(captured) == 1 and captured[0].cfg == DEFAULT


def test_backend_reference_explicit_equals_auto(qa):
    q, k, v = qa.make_qkv(3, nq=40, d=32)
    assert torch.equal(quantattn.sageattn(q, k, v, backend="reference"), quantattn.sageattn(q, k, v))


def test_backend_triton_on_cpu_without_interpreter_is_refused(qa, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qa.make_qkv(4, nq=16, d=16)
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run this call: needs CUDA tensors"):
        quantattn.sageattn(q, k, v, backend="triton")


def test_backend_refusal_applies_to_empty_inputs(qa, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qa.make_qkv(4, nq=16, d=16)
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run this call"):
        quantattn.sageattn(q[:, :, :0], k, v, backend="triton")


# ----------------------------------------------------------------------------------------------------
# Configuration: explicit variants and keyword overrides

EXPLICIT = {
    "sageattn_qk_int8_pv_fp16_triton": QuantConfig("int8", "per_block", "fp16", "fp32", True, False, False),
    "sageattn_qk_int8_pv_fp16_cuda": QuantConfig("int8", "per_thread", "fp16", "fp32", True, False, False),
    "sageattn_qk_int8_pv_fp8_cuda": QuantConfig("int8", "per_thread", "fp8", "fp32+fp32", True, False, False),
    "sageattn_qk_int8_pv_fp8_cuda_sm90": QuantConfig("int8", "per_thread", "fp8", "fp32+fp32", True, False, False),
    "sageattn_qk_int8_pv_fp8_triton": QuantConfig("int8", "per_thread", "fp8", "fp32+fp32", True, False, False),
}


@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_variant_selects_its_documented_config(qa, captured, name):
    q, k, v = qa.make_qkv(seed_of(name), nq=70, d=32, nk=90)
    out = getattr(quantattn, name)(q, k, v, is_causal=True)
    assert len(captured) == 1 and captured[0].cfg == EXPLICIT[name]
    assert captured[0].is_causal is True
    assert torch.equal(out, quantattn.sageattn(q, k, v, is_causal=True, config=EXPLICIT[name]))


def test_explicit_variant_takes_keyword_overrides(qa, captured):
    q, k, v = qa.make_qkv(5, nq=16, d=16)
    quantattn.sageattn_qk_int8_pv_fp16_triton(q, k, v, pv_accum_dtype="fp16+fp32")
    quantattn.sageattn_qk_int8_pv_fp16_triton(q, k, v, smooth_k=False, quantization_backend="cuda")
    # the official positional order: tensor_layout, is_causal, qk_quant_gran, sm_scale
    quantattn.sageattn_qk_int8_pv_fp8_cuda(q, k, v, "HND", False, "per_thread", 0.5, pv_accum_dtype="fp32+fp16")
    assert captured[0].cfg == SAGE1_FP16ACC
    assert captured[1].cfg == SAGE1.replace(smooth_k=False)
    assert captured[2].cfg == EXPLICIT["sageattn_qk_int8_pv_fp8_cuda"].replace(pv_accum="fp32+fp16")
    assert captured[2].sm_scale == 0.5


def test_explicit_variants_keep_the_official_positional_order(qa, captured):
    q, k, v = qa.make_qkv(6, nq=16, d=16)
    quantattn.sageattn_qk_int8_pv_fp16_triton(q, k, v, "HND", "cuda", True, 0.25)
    quantattn.sageattn_qk_int8_pv_fp16_cuda(q, k, v, "HND", True, "per_warp", 0.25, "fp16+fp32")
    quantattn.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, "HND", True, "per_warp", 0.25, "fp32")
    for call, (gran, accum) in zip(
        captured, [("per_block", "fp32"), ("per_warp", "fp16+fp32"), ("per_warp", "fp32")], strict=True
    ):
        assert call.is_causal and call.sm_scale == 0.25
        assert (call.cfg.qk_granularity, call.cfg.pv_accum) == (gran, accum)
    with pytest.raises(ValueError, match="quantization_backend"):
        quantattn.sageattn_qk_int8_pv_fp16_triton(q, k, v, quantization_backend="cudnn")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, DEFAULT),
        ({"qk_quant_gran": "per_block"}, DEFAULT.replace(qk_granularity="per_block")),
        ({"qk_quant_gran": "per_warp"}, DEFAULT.replace(qk_granularity="per_warp")),
        ({"qk_quant_dtype": "int4"}, DEFAULT.replace(qk_dtype="int4")),
        ({"pv_accum_dtype": "fp32+fp16"}, DEFAULT.replace(pv_accum="fp32+fp16")),
        ({"pv_accum_dtype": "fp32"}, DEFAULT.replace(pv_accum="fp32")),
        # an accumulator that only FP16 PV has names FP16 PV
        ({"pv_accum_dtype": "fp16+fp32"}, DEFAULT.replace(pv_dtype="fp16", pv_accum="fp16+fp32")),
        # another PV precision without an accumulator gets that precision's first accumulator
        ({"pv_dtype": "fp16"}, DEFAULT.replace(pv_dtype="fp16", pv_accum="fp32")),
        ({"pv_dtype": "bf16"}, DEFAULT.replace(pv_dtype="bf16", pv_accum="fp32")),
        ({"smooth_k": False}, DEFAULT.replace(smooth_k=False)),
        ({"smooth_q": True}, DEFAULT.replace(smooth_q=True)),
        ({"smooth_v": True}, DEFAULT.replace(smooth_v=True)),
        ({"smooth_v": None}, DEFAULT),  # None: not given
        ({"config": SAGE1}, SAGE1),
        ({"config": SAGE1, "smooth_q": True}, SAGE1.replace(smooth_q=True)),
        ({"config": SAGE2_4B, "pv_dtype": "fp16"}, SAGE2_4B.replace(pv_dtype="fp16", pv_accum="fp32")),
        ({"config": SAGE1, "pv_accum_dtype": "fp32+fp16"}, SAGE1.replace(pv_dtype="fp8", pv_accum="fp32+fp16")),
        ({"config": SAGE2PP}, SAGE2PP),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else "",
)
def test_keyword_overrides_reach_the_config(qa, captured, kwargs, expected):
    q, k, v = qa.make_qkv(6, nq=16, d=16)
    quantattn.sageattn(q, k, v, **kwargs)
    assert captured[0].cfg == expected
    options = {key: value for key, value in kwargs.items() if key != "config"}
    assert api.resolve_config(torch.device("cpu"), kwargs.get("config"), options) == expected


# ----------------------------------------------------------------------------------------------------
# Layouts, heads, masking, strides, dtypes, head dims, sm_scale


@pytest.mark.parametrize("causal", [False, True])
def test_nhd_equals_hnd(qa, causal):
    q, k, v = qa.make_qkv(7, b=2, hq=4, nq=70, d=32, hkv=2, nk=90)
    out, lse = quantattn.sageattn(q, k, v, "HND", causal, return_lse=True)
    out_n, lse_n = quantattn.sageattn(*qa.to_nhd(q, k, v), tensor_layout="NHD", is_causal=causal, return_lse=True)
    assert out_n.shape == (2, 70, 4, 32) and out_n.is_contiguous()
    assert torch.equal(out_n.transpose(1, 2), out) and torch.equal(lse_n, lse)
    qa.assert_accurate(out, q, k, v, DEFAULT, causal)


@pytest.mark.parametrize("hq, hkv", [(4, 1), (4, 2), (6, 3)])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_gqa_equals_repeated_kv(qa, hq, hkv, layout):
    q, k, v = qa.make_qkv(seed_of(hq, hkv, layout), b=2, hq=hq, nq=50, d=32, hkv=hkv, nk=80)
    rep = (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
    if layout == "NHD":
        q, k, v, *rep = qa.to_nhd(q, k, v, *rep)
    out, lse = quantattn.sageattn(q, k, v, layout, True, return_lse=True)
    out_r, lse_r = quantattn.sageattn(q, *rep, layout, True, return_lse=True)
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("nq, nk", [(50, 130), (130, 50), (64, 64), (1, 100), (100, 1)])
def test_causal_is_bottom_right(qa, nq, nk, poison_empty):
    q, k, v = qa.make_qkv(seed_of(nq, nk), hq=2, nq=nq, d=32, nk=nk)
    out, lse = quantattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    blind = max(0, nq - nk)  # query i sees keys j <= i + nk - nq: the first nq - nk rows see none
    assert (out[:, :, :blind] == 0).all() and (lse[:, :, :blind] == -math.inf).all()
    assert torch.isfinite(lse[:, :, blind:]).all()
    qa.assert_accurate(out, q, k, v, DEFAULT, is_causal=True)
    if nq == nk == 64:  # and it is a mask at all: the non-causal result differs
        assert not torch.equal(out, quantattn.sageattn(q, k, v))


def noncontiguous_cases(qa):
    gen = qa.generator(8)
    b, h, n, d = 2, 4, 40, 32
    wide = qa.randn(gen, b, h, 2 * n, 2 * d)
    q_c, k_c, v_c = qa.make_qkv(9, b=b, hq=h, nq=n, d=d)
    one_head = qa.randn(gen, b, 1, n, d)
    return {
        "strided slice": (wide[:, :, ::2, 1::2], k_c, v_c),
        "prefix slice": (q_c, wide[:, :, :n, :d], wide[:, :, n:, d:]),
        "transposed": (qa.randn(gen, b, n, h, d).transpose(1, 2), k_c, qa.randn(gen, b, n, h, d).transpose(1, 2)),
        "expanded heads": (q_c, one_head.expand(b, h, n, d), one_head.expand(b, h, n, d)),
        "expanded batch": (q_c[:1].expand(b, h, n, d), k_c, v_c),
        "channels_last-like": (q_c.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), k_c, v_c),
    }


@pytest.mark.parametrize(
    "case",
    ["strided slice", "prefix slice", "transposed", "expanded heads", "expanded batch", "channels_last-like"],
)
def test_noncontiguous_inputs_equal_contiguous_copies(qa, case):
    q, k, v = noncontiguous_cases(qa)[case]
    assert not all(t.is_contiguous() for t in (q, k, v))
    out = quantattn.sageattn(q, k, v, is_causal=True)
    assert torch.equal(out, quantattn.sageattn(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True))
    assert out.is_contiguous() and out.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2PP], ids=lambda c: c.name)
def test_dtypes(qa, dtype, cfg):
    q, k, v = qa.make_qkv(seed_of(str(dtype), cfg.name), b=2, hq=2, nq=100, d=64, nk=120, dtype=dtype)
    out = quantattn.sageattn(q, k, v, config=cfg)
    assert out.dtype == dtype
    qa.assert_accurate(out, q, k, v, cfg)


@pytest.mark.parametrize("d", [1, 3, 59, 64, 96, 128, 200, 256])
def test_head_dims(qa, d):
    q, k, v = qa.make_qkv(seed_of(d), hq=2, nq=33, d=d, nk=47)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    qa.assert_accurate(out, q, k, v, DEFAULT, is_causal=True)


@pytest.mark.parametrize("sm_scale", [0.02, 0.3, 1.0, -0.2])
def test_custom_sm_scale(qa, captured, sm_scale):
    q, k, v = qa.make_qkv(seed_of(sm_scale), hq=2, nq=60, d=64, nk=90)
    out, lse = quantattn.sageattn(q, k, v, sm_scale=sm_scale, return_lse=True)
    assert captured[0].sm_scale == sm_scale
    qa.assert_accurate(out, q, k, v, DEFAULT, sm_scale=sm_scale)
    exact = torch.logsumexp(qa.exact_scores(q, k, sm_scale=sm_scale), -1)
    assert float((lse.double() - exact).abs().max()) <= qa.lse_bound(q, k, v, DEFAULT, sm_scale=sm_scale)
    # the default is 1/sqrt(d), and a custom one changes the result
    assert not torch.equal(out, quantattn.sageattn(q, k, v))
    assert torch.equal(quantattn.sageattn(q, k, v), quantattn.sageattn(q, k, v, sm_scale=1 / 8))


# ----------------------------------------------------------------------------------------------------
# Empty and tiny inputs, output properties, inputs untouched


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("b, nq, nk", [(0, 16, 16), (2, 0, 16), (2, 16, 0), (2, 0, 0), (1, 1, 1), (2, 1, 5), (2, 5, 1)])
def test_empty_and_tiny(qa, b, nq, nk, layout, poison_empty):
    q, k, v = qa.make_qkv(seed_of(b, nq, nk), b=b, hq=2, nq=nq, d=16, nk=nk)
    if layout == "NHD":
        q, k, v = qa.to_nhd(q, k, v)
    for causal in (False, True):
        out, lse = quantattn.sageattn(q, k, v, layout, causal, return_lse=True)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, 2, nq)
        assert lse.dtype == torch.float32
        out_h = out if layout == "HND" else out.transpose(1, 2)
        if nk == 0:
            assert (out == 0).all() and (lse == -math.inf).all()
        elif out.numel():
            hnd = (q, k, v) if layout == "HND" else qa.to_nhd(q, k, v)
            qa.assert_accurate(out_h, *hnd, DEFAULT, is_causal=causal)
            assert not torch.isnan(lse).any()


def test_single_key_returns_its_value(qa):
    """softmax over one key is 1: the output is V's row up to its FP8 rounding (which is exact for the
    one token that sets the per-channel scale)."""
    q, k, v = qa.make_qkv(10, b=2, hq=2, nq=7, d=16, nk=1)
    out = quantattn.sageattn(q, k, v)
    assert torch.equal(out, v.expand_as(out))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_matches_q(qa, layout, dtype):
    q, k, v = qa.make_qkv(11, b=2, hq=4, nq=20, d=24, hkv=2, nk=30, dtype=dtype)
    if layout == "NHD":
        q, k, v = qa.to_nhd(q, k, v)
    out = quantattn.sageattn(q, k, v, layout)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device and out.is_contiguous()
    assert out.stride() == q.contiguous().stride()


@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2_4B.replace(smooth_v=True)], ids=lambda c: c.name)
def test_inputs_are_not_modified(qa, cfg):
    q, k, v = qa.make_qkv(12, b=2, hq=4, nq=70, d=32, hkv=2, nk=90, k_bias=4.0, q_bias=2.0, v_bias=2.0)
    clones = [t.clone() for t in (q, k, v)]
    quantattn.sageattn(q, k, v, is_causal=True, return_lse=True, config=cfg)
    for before, after in zip(clones, (q, k, v), strict=True):
        assert torch.equal(before, after)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]
    clones = [t.clone() for t in packed]
    cu_q, cu_k = torch.tensor([0, 30, 70], dtype=torch.int32), torch.tensor([0, 50, 90], dtype=torch.int32)
    quantattn.sageattn_varlen(*packed, cu_q, cu_k, 40, 50, config=cfg)
    for before, after in zip(clones, packed, strict=True):
        assert torch.equal(before, after)
    assert cu_q.tolist() == [0, 30, 70] and cu_k.tolist() == [0, 50, 90]


# ----------------------------------------------------------------------------------------------------
# varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen_equals_per_sequence_calls(qa, causal, index_dtype, poison_empty):
    lens_q, lens_k = [5, 0, 40, 70, 1, 3], [7, 13, 0, 90, 1, 3]
    hq, hkv, d = 4, 2, 32
    gen = qa.generator(seed_of(causal, str(index_dtype)))
    q = qa.randn(gen, sum(lens_q), hq, d)
    k = qa.randn(gen, sum(lens_k), hkv, d, channel_bias=3.0)
    v = qa.randn(gen, sum(lens_k), hkv, d)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=index_dtype)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=index_dtype)
    out, lse = quantattn.sageattn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (hq, sum(lens_q))
    for i in range(len(lens_q)):
        rows, keys = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        o_i, lse_i = quantattn.sageattn(q[rows][None], k[keys][None], v[keys][None], "NHD", causal, return_lse=True)
        assert torch.equal(out[rows], o_i[0]), i
        assert torch.equal(lse[:, rows], lse_i[0]), i
    # the zero-key sequence (i = 2) gives zeros and -inf; everything else was written and is finite
    assert (out[5:45] == 0).all() and (lse[:, 5:45] == -math.inf).all()
    assert torch.isfinite(out).all()
    # a sequence is smoothed and quantized on its own: packing with a neighbour changes nothing, but
    # attending across the boundary would
    joint = quantattn.sageattn(q[None, 45:116], k[None, 20:111], v[None, 20:111], "NHD", causal)[0]
    assert not torch.equal(joint[:70], out[45:115])


def test_varlen_without_lse_and_defaults(qa):
    gen = qa.generator(13)
    q, k, v = qa.randn(gen, 30, 2, 16), qa.randn(gen, 30, 2, 16), qa.randn(gen, 30, 2, 16)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    out = quantattn.sageattn_varlen(q, k, v, cu, cu, 20, 20)
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert torch.equal(out[10:], quantattn.sageattn(q[None, 10:], k[None, 10:], v[None, 10:], "NHD")[0])


# ----------------------------------------------------------------------------------------------------
# lse


@pytest.mark.parametrize(
    "cfg, causal, layout",
    [(DEFAULT, False, "HND"), (DEFAULT, True, "NHD"), (SAGE1, True, "HND"), (SAGE2_4B, False, "HND")],
    ids=["default", "default-causal-nhd", "sage1-causal", "sage2-4b"],
)
def test_lse_matches_float64_logsumexp(qa, cfg, causal, layout):
    q, k, v = qa.make_qkv(seed_of(cfg.name, causal), b=2, hq=4, nq=90, d=64, hkv=2, nk=150, k_bias=5.0)
    args = (q, k, v) if layout == "HND" else qa.to_nhd(q, k, v)
    out, lse = quantattn.sageattn(*args, layout, causal, return_lse=True, config=cfg)
    assert lse.shape == (2, 4, 90) and lse.dtype == torch.float32 and torch.isfinite(lse).all()
    exact = torch.logsumexp(qa.exact_scores(q, k, causal), -1)
    err = float((lse.double() - exact).abs().max())
    bound = qa.lse_bound(q, k, v, cfg, causal)
    assert err <= bound, (err, bound)
    # the bound is not vacuous: an lse that forgot smooth K's per-row shift q.kbar * sm_scale fails it
    k_mean = smoothing_vector_k(k.double()).repeat_interleave(2, 1)[..., None, :]
    shift = (q.double() * k_mean).sum(-1) / math.sqrt(64)
    assert float((lse.double() - shift - exact).abs().max()) > 2 * bound


# ----------------------------------------------------------------------------------------------------
# NaN and Inf


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "cfg", [DEFAULT, SAGE1, SAGE2_4B, QuantConfig(qk_granularity="per_tensor", smooth_v=True)], ids=lambda c: c.name
)
def test_non_finite_q_row_poisons_only_that_row(qa, value, cfg):
    q, k, v = qa.make_qkv(seed_of(value, cfg.name), b=2, hq=4, nq=80, d=32, hkv=2, nk=70)
    q[1, 3, 17, 5] = value
    out, lse = quantattn.sageattn(q, k, v, return_lse=True, config=cfg)
    bad = torch.zeros_like(lse, dtype=torch.bool)
    bad[1, 3, 17] = True
    assert out[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse[~bad]).all()


@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2_4B], ids=lambda c: c.name)
def test_nan_in_k_poisons_only_the_query_heads_reading_it(qa, cfg):
    q, k, v = qa.make_qkv(seed_of("k", cfg.name), b=2, hq=4, nq=40, d=32, hkv=2, nk=70)
    k[0, 1, 33, 7] = math.nan  # kv head 1 of batch 0 is read by query heads 2 and 3
    out, lse = quantattn.sageattn(q, k, v, return_lse=True, config=cfg)
    assert out[0, 2:].isnan().all() and lse[0, 2:].isnan().all()
    assert torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(lse[0, :2]).all() and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("nq, nk, j", [(100, 100, 40), (60, 100, 70), (100, 60, 10)])
@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2_4B], ids=lambda c: c.name)
def test_causal_nan_key_spares_rows_that_cannot_see_it(qa, cfg, nq, nk, j):
    q, k, v = qa.make_qkv(seed_of(nq, nk, j, cfg.name), hq=2, nq=nq, d=32, nk=nk)
    k[0, 0, j, 3] = math.nan
    out, lse = quantattn.sageattn(q, k, v, is_causal=True, return_lse=True, config=cfg)
    first = j - (nk - nq)  # query i sees key j when j <= i + nk - nq
    assert out[0, 0, first:].isnan().all() and lse[0, 0, first:].isnan().all()
    assert torch.isfinite(out[0, 0, :first]).all() and not torch.isnan(lse[0, 0, :first]).any()
    assert torch.isfinite(out[0, 1]).all()


# ----------------------------------------------------------------------------------------------------
# Random shapes


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    nq=st.integers(1, 140),
    nk=st.integers(1, 140),
    d=st.sampled_from([1, 8, 24, 59, 64, 128]),
    layout=st.sampled_from(["HND", "NHD"]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    cfg=st.sampled_from([DEFAULT, SAGE1, SAGE1_FP16ACC, SAGE2_4B, SAGE2PP]),
)
def test_random_shapes(qa, b, hkv, group, nq, nk, d, layout, causal, dtype, cfg):
    hq = hkv * group
    q, k, v = qa.make_qkv(seed_of(b, hkv, group, nq, nk, d), b=b, hq=hq, nq=nq, d=d, hkv=hkv, nk=nk, dtype=dtype)
    args = (q, k, v) if layout == "HND" else qa.to_nhd(q, k, v)
    with qa.poisoned_allocations():
        out, lse = quantattn.sageattn(*args, layout, causal, return_lse=True, config=cfg)
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, hq, nq) and lse.dtype == torch.float32
    out_h = out if layout == "HND" else out.transpose(1, 2)
    blind = max(0, nq - nk) if causal else 0
    assert (out_h[:, :, :blind] == 0).all() and (lse[:, :, :blind] == -math.inf).all()
    assert torch.isfinite(lse[:, :, blind:]).all()
    if out.numel():
        qa.assert_accurate(out_h, q, k, v, cfg, is_causal=causal)
        exact = torch.logsumexp(qa.exact_scores(q, k, causal), -1)
        seen = torch.isfinite(exact)
        err = float((lse.double() - exact)[seen].abs().max()) if seen.any() else 0.0
        assert err <= qa.lse_bound(q, k, v, cfg, causal)
