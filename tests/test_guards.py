"""Guards: the inputs where low-bit attention breaks, each handled or routed.

Every case runs through the public API (the reference backend on CPU tensors; the kernels through the
Triton interpreter where marked) and is compared with FP64 attention. What each case is and what
quantattn does about it: docs/accuracy.md, "Guards".
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import quantattn
from quantattn import calls, guards
from quantattn.calls import AttentionCall
from quantattn.config import SAGE1, SAGE1_FP16ACC, SAGE2_4B, SAGE2PP, VARIANTS, QuantConfig
from quantattn.reference import attention_fp64

DEFAULT = QuantConfig()
AMPERE_DEFAULT = QuantConfig(pv_dtype="fp16", pv_accum="fp32")  # default_config below compute capability 8.9
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the kernels through the Triton interpreter (machines without a GPU)",
)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def rel_l1(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum())


# ----------------------------------------------------------------------------------------------------
# 1. Very short key sequences and smooth K


@pytest.mark.parametrize("nk", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2_4B, SAGE2PP], ids=lambda c: c.name)
def test_short_key_sequences_are_accurate(qa, nk, cfg):
    """Smooth K over 1-16 keys (exact for any centre; with fewer than 3 keys the trimmed mean is zero:
    no smoothing, and the softmax over one key is 1 whatever the quantization); outputs and lse within the
    derived bound, causal rows with no key zero."""
    q, k, v = qa.make_qkv(seed_of(nk, cfg.name), b=2, hq=4, hkv=2, nq=24, nk=nk, d=32, k_bias=6.0, v_bias=2.0)
    for causal in (False, True):
        out, lse = quantattn.sageattn(q, k, v, is_causal=causal, return_lse=True, config=cfg)
        blind = max(0, 24 - nk) if causal else 0
        assert (out[:, :, :blind] == 0).all() and (lse[:, :, :blind] == -math.inf).all()
        qa.assert_accurate(out, q, k, v, cfg, is_causal=causal)
        exact = torch.logsumexp(qa.exact_scores(q, k, causal), -1)
        seen = torch.isfinite(exact)
        assert float((lse.double() - exact)[seen].abs().max()) <= qa.lse_bound(q, k, v, cfg, causal)


def token_outlier_inputs(seed, nk, outlier=50.0, d=64):
    """Keys with a channel bias and one token 50x larger (an attention-sink-like key)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 64, d, generator=g)
    k = torch.randn(1, 4, nk, d, generator=g) + 8 * torch.randn(1, 4, 1, d, generator=g)
    v = torch.randn(1, 4, nk, d, generator=g)
    k[:, :, 0] *= outlier
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def massive_channel_inputs(seed, nk, magnitude=1e4, d=64):
    """One key with two channels at 1e4 (a massive activation) that the queries barely read, so the output
    depends on the ordinary keys: the plain token mean of those channels, 1e4 / Nk, would be every other
    key's largest element after smoothing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 64, d, generator=g)
    k = torch.randn(1, 4, nk, d, generator=g)
    v = torch.randn(1, 4, nk, d, generator=g)
    k[:, :, 0, :2] = magnitude
    q[..., :2] *= 1e-4
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.parametrize(
    "case, nk",
    [("token 50x", n) for n in (2, 3, 4, 5, 8, 128)] + [("two channels 1e4", n) for n in (128, 1024)],
)
def test_smooth_k_does_not_hurt_short_sequences_with_a_token_outlier(qa, case, nk):
    """One key far larger than the rest: smooth K's trimmed mean leaves it out of the centre, so smoothing
    costs nothing against no smoothing (with the plain mean: Nk=3 0.130 vs 0.017, two 1e4 channels at
    Nk=128 0.176 vs 0.057; docs/accuracy.md, Guards), and stays within the derived bound."""
    inputs = token_outlier_inputs if case == "token 50x" else massive_channel_inputs
    q, k, v = inputs(seed_of("outlier", case, nk), nk)
    truth = attention_fp64(q, k, v)
    out = quantattn.sageattn(q, k, v, config=DEFAULT)
    smoothed = rel_l1(out, truth)
    plain = rel_l1(quantattn.sageattn(q, k, v, config=DEFAULT.replace(smooth_k=False)), truth)
    assert smoothed <= 1.1 * plain, (smoothed, plain)
    qa.assert_accurate(out, q, k, v, DEFAULT)


def test_two_keys_are_not_smoothed(qa):
    """Fewer than 3 finite values in a channel: the trimmed mean is zero, K runs unsmoothed (the same
    numbers as smooth_k=False), output and lse within the derived bounds."""
    q, k, v = token_outlier_inputs(seed_of("two keys"), 2)
    out, lse = quantattn.sageattn(q, k, v, config=DEFAULT, return_lse=True)
    plain, plain_lse = quantattn.sageattn(q, k, v, config=DEFAULT.replace(smooth_k=False), return_lse=True)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    qa.assert_accurate(out, q, k, v, DEFAULT)
    exact = torch.logsumexp(qa.exact_scores(q, k), -1)
    assert float((lse.double() - exact).abs().max()) <= qa.lse_bound(q, k, v, DEFAULT)


@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "channel outliers"])
@pytest.mark.parametrize("d", [64, 128])
def test_trimmed_mean_costs_nothing_on_ordinary_keys(monkeypatch, outliers, d):
    """On the accuracy tables' inputs (normal, and channel-biased K) the trimmed mean differs from the mean
    by O(1/N): the error against FP64 stays within 5% of what the plain mean gave (measured within 2%)."""
    import quantattn.reference.attention as ref_attention
    from quantattn import metrics
    from quantattn.reference.quant import finite_mean

    q, k, v = metrics.make_qkv(1, 2, 256, d, outliers=outliers, seed=0)
    truth = attention_fp64(q, k, v)
    trimmed = rel_l1(quantattn.sageattn(q, k, v, config=DEFAULT), truth)
    monkeypatch.setattr(ref_attention, "smoothing_vector_k", lambda k: finite_mean(k, dim=-2))
    mean = rel_l1(quantattn.sageattn(q, k, v, config=DEFAULT), truth)
    assert abs(trimmed / mean - 1) <= 0.05, (trimmed, mean)
    if outliers:  # and smoothing still removes the channel offsets
        assert 1.5 * trimmed < rel_l1(quantattn.sageattn(q, k, v, config=DEFAULT.replace(smooth_k=False)), truth)


# ----------------------------------------------------------------------------------------------------
# 2. head_dim the tensor cores do not take natively (the kernels pad it to a power of two)


@pytest.mark.parametrize("d", [80, 96, 160, 200])
@pytest.mark.parametrize("cfg", [DEFAULT, SAGE1, SAGE2PP], ids=lambda c: c.name)
def test_padded_head_dims(qa, d, cfg):
    q, k, v = qa.make_qkv(seed_of(d, cfg.name), hq=2, nq=40, nk=70, d=d, k_bias=4.0)
    out = quantattn.sageattn(q, k, v, is_causal=True, config=cfg)
    qa.assert_accurate(out, q, k, v, cfg, is_causal=True)


@interpreter
@pytest.mark.parametrize("d", [80, 160])
def test_padded_head_dims_kernel(qa, d):
    q, k, v = qa.make_qkv(seed_of("kernel", d), hq=2, hkv=1, nq=70, nk=90, d=d, k_bias=3.0, dtype=torch.bfloat16)
    for cfg in (DEFAULT, SAGE1):
        out = quantattn.sageattn(q, k, v, is_causal=True, config=cfg, backend="triton")
        ref = quantattn.sageattn(q, k, v, is_causal=True, config=cfg, backend="reference")
        truth = attention_fp64(q, k, v, is_causal=True)
        assert rel_l1(out, ref) <= 0.05 * rel_l1(ref, truth)


# ----------------------------------------------------------------------------------------------------
# 3. FP16 overflow: the output cast, and SageAttention2++'s FP16 partial sums


def p_roundup_inputs(nk=256, d=16, target=275 / 448):
    """Every key but the first has P = target exactly (their scores differ from the first key's by 1 in
    one channel, and sm_scale = -ln(target)); FP8 rounds 448 * P = 275 up to 288 (+4.7%), while the
    softmax denominator sums the unrounded P. With V at float16's largest value the quantized output
    passes 65504 by 4.7%: Inf, unless saturated, while FP64 attention gives exactly V."""
    q = torch.zeros(1, 1, 64, d)
    q[..., 0] = 1
    k = torch.zeros(1, 1, nk, d)
    k[:, :, 0, 0] = 1
    v = torch.full((1, 1, nk, d), 65504.0)
    v[..., 1::2] *= -1
    return q.half(), k.half(), v.half(), -math.log(target)


def saturating_variants():
    return {name: cfg for name, cfg in VARIANTS.items() if cfg.pv_accum != "fp16+fp32"}


@pytest.mark.parametrize("name", list(saturating_variants()))
def test_output_near_float16_max_saturates_instead_of_overflowing(name):
    q, k, v, sm_scale = p_roundup_inputs()
    out = quantattn.sageattn(q, k, v, sm_scale=sm_scale, config=VARIANTS[name])
    truth = attention_fp64(q, k, v, sm_scale=sm_scale)
    assert torch.isfinite(out).all()
    assert torch.equal(out, truth.half())  # the saturated value is V's, which FP64 attention returns


@interpreter
def test_output_saturation_kernel():
    q, k, v, sm_scale = p_roundup_inputs(nk=130)
    for cfg in (DEFAULT, SAGE2PP, SAGE1):
        out = quantattn.sageattn(q, k, v, sm_scale=sm_scale, config=cfg, backend="triton")
        assert torch.equal(out, quantattn.sageattn(q, k, v, sm_scale=sm_scale, config=cfg, backend="reference"))
        assert torch.isfinite(out).all()


def test_saturation_keeps_nan_and_inf_of_v():
    """Saturation clamps finite values only: an Inf in V still reaches the outputs that read it (FP16 PV)."""
    q, k, v, sm_scale = p_roundup_inputs(nk=64)
    v = v.clone()
    v[0, 0, 5, 3] = math.inf
    out = quantattn.sageattn(q, k, v, sm_scale=sm_scale, config=SAGE1)
    assert torch.isinf(out[..., 3]).all() and torch.isfinite(out[..., :3]).all()


@pytest.mark.parametrize("sign", ["same", "alternating"])
def test_sage2pp_fp16_partials_at_the_range_limits_stay_finite(sign):
    """The adversarial case for SageAttention2++'s FP16 accumulator: equal scores (every P is 1, so
    448 * P / 2 = 224 exactly) and every V at its channel's maximum (4.5 after scaling): each 64-key
    partial sums 64 * 224 * 4.5 = 64512 < 65504, the design's bound, and nothing overflows."""
    d, nk = 32, 640
    q = torch.zeros(1, 2, 64, d, dtype=torch.float16)
    k = torch.zeros(1, 2, nk, d, dtype=torch.float16)
    v = torch.full((1, 2, nk, d), 60000.0)
    if sign == "alternating":
        v[:, :, 1::2] *= -1
    v = v.half()
    out = quantattn.sageattn(q, k, v, config=SAGE2PP)
    assert torch.isfinite(out).all()
    assert torch.equal(out, attention_fp64(q, k, v).half())


def test_fp16_accumulator_range_is_the_variants_own():
    """sage1-fp16acc (SageAttn-vB) sums 64 products of P <= 1 and the unscaled V in FP16: beyond
    |V| ~ 65504 / 64 with flat attention it overflows, as the official kernel does. No guard can see V's
    values without a GPU sync, so this stays an explicit choice; the inspector flags such layers."""
    q = torch.zeros(1, 1, 16, 16, dtype=torch.float16)
    k = torch.zeros(1, 1, 128, 16, dtype=torch.float16)
    v = torch.full((1, 1, 128, 16), 2000.0, dtype=torch.float16)
    assert torch.isinf(quantattn.sageattn(q, k, v, config=SAGE1_FP16ACC)).all()
    assert torch.equal(quantattn.sageattn(q, k, v, config=SAGE1), v[:, :, :16])


# ----------------------------------------------------------------------------------------------------
# 4. Extremely long contexts: 128K keys


def test_128k_keys(qa):
    """Statistics (token means and ranges) over 131072 keys in float32, FP8 V scales over all of them,
    and an online softmax over 1024 steps, for the last 16 queries of a causal call (a decode-like call:
    bottom-right alignment makes them see every key but the last few). The kernels' 64-bit offsets at
    this length are checked on the GPU (tests/test_accuracy.py)."""
    q, k, v = qa.make_qkv(seed_of("128k"), hq=2, hkv=1, nq=16, nk=131072, d=16, k_bias=8.0, v_bias=2.0,
                          dtype=torch.bfloat16)  # fmt: skip
    out, lse = quantattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    qa.assert_accurate(out, q, k, v, DEFAULT, is_causal=True)
    exact = torch.logsumexp(qa.exact_scores(q, k, True), -1)
    assert float((lse.double() - exact).abs().max()) <= qa.lse_bound(q, k, v, DEFAULT, True)


# ----------------------------------------------------------------------------------------------------
# 5. Huge dynamic range


def dynamic_range_cases():
    """name -> (q, k, v) in bfloat16, [1, 2, 96, 32]."""

    def rn(name, *scale_by_tensor):
        g = torch.Generator().manual_seed(seed_of(name))
        return [torch.randn(1, 2, 96, 32, generator=g) * s for s in scale_by_tensor]

    cases = {
        "qk 100 (logits ~4e4, peaked softmax)": rn("a", 100.0, 100.0, 1.0),
        "all 1e-30": rn("b", 1e-30, 1e-30, 1e-30),
        "v 1e-8": rn("c", 1.0, 1.0, 1e-8),
        "v 1e5 (beyond float16)": rn("d", 1.0, 1.0, 1e5),
        "q 1e-20, k 1e20": rn("e", 1e-20, 1e20, 1.0),
    }
    q, k, v = rn("f", 1.0, 1.0, 1.0)
    v[..., 3] *= 1e6
    v[..., 4] *= 1e-6
    cases["v channels 1e6 and 1e-6"] = (q, k, v)
    q, k, v = rn("g", 1.0, 1.0, 1.0)
    q[..., 0] = 1e4 * (1 + 0.01 * q[..., 0])
    cases["q channel 1e4"] = (q, k, v)
    return {name: tuple(t.bfloat16() for t in qkv) for name, qkv in cases.items()}


CASES = dynamic_range_cases()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["sage2-8b", "sage1", "sage2++", "ampere-default"])
def test_huge_dynamic_range(qa, case, name):
    """Finite where FP64 attention is, and within the derived bound (as accurate as the variant's
    quantization of these values allows: with logits ~4e4 the softmax is an argmax, and a score error
    picks a neighbour, in the untiled model of the quantization as much as here)."""
    cfg = AMPERE_DEFAULT if name == "ampere-default" else VARIANTS[name]
    q, k, v = CASES[case]
    out = quantattn.sageattn(q, k, v, config=cfg)
    assert torch.isfinite(out).all()
    ran = guards.route(call_of(q, k, v, cfg)).cfg  # bf16 inputs with FP16 PV run BF16 PV
    qa.assert_accurate(out, q, k, v, ran)


def test_scores_beyond_float32_fail_in_full_precision_too():
    """|q| |k| d sm_scale above ~3e38 cannot be held by float32 scores: torch SDPA (float32 included)
    returns NaN, and so does quantattn. The one input range where FP64 is finite and quantattn is not,
    shared by every float32 attention; documented in docs/accuracy.md."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 32, 32, generator=g) * s for s in (1e30, 1e30, 1.0))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert torch.isfinite(attention_fp64(q, k, v)).all()
    assert not torch.isfinite(F.scaled_dot_product_attention(q.float(), k.float(), v.float())).all()
    assert not torch.isfinite(quantattn.sageattn(q, k, v)).all()


# ----------------------------------------------------------------------------------------------------
# Routing: decided from dtypes, shapes and flags alone


def call_of(q, k, v, cfg, **kw):
    out = torch.empty_like(q)
    return AttentionCall(q, k, v, cfg, False, 1.0 / math.sqrt(q.shape[-1]), out, None, **kw)


def test_fp16_pv_on_bf16_inputs_routes_to_bf16_pv():
    meta = [torch.empty(2, 4, 8, 16, device="meta", dtype=dt) for dt in (torch.bfloat16, torch.float16)]
    bf, fp = ([t, t, t] for t in meta)
    assert guards.route(call_of(*bf, SAGE1)).cfg == SAGE1.replace(pv_dtype="bf16")
    assert guards.route(call_of(*bf, AMPERE_DEFAULT)).cfg == AMPERE_DEFAULT.replace(pv_dtype="bf16")
    for cfg in (SAGE1, AMPERE_DEFAULT):
        assert guards.route(call_of(*fp, cfg)).cfg == cfg  # float16 inputs fit FP16 PV
    for cfg in (DEFAULT, SAGE2PP, SAGE1_FP16ACC):
        same = call_of(*bf, cfg)
        assert guards.route(same) is same
    assert guards.explain(torch.bfloat16, SAGE1) and not guards.explain(torch.bfloat16, DEFAULT)


def test_routes_and_splits_read_no_tensor_values():
    """Meta tensors have no values: if routing read one (a GPU sync on CUDA tensors), this would raise."""
    q = torch.empty(70000, 1, 8, 16, device="meta", dtype=torch.bfloat16)
    parts = guards.split(guards.route(call_of(q, q, q, SAGE1)))
    assert [p.q.shape[0] for p in parts] == [65535, 4465]
    assert all(p.cfg.pv_dtype == "bf16" for p in parts)


def test_split_keeps_the_result(qa, monkeypatch):
    """Past CUDA's grid limit of 65535 (sequence, head) pairs a call is cut by sequences: the same
    numbers, for dense and varlen calls (shown with the limit lowered to 8)."""
    q, k, v = qa.make_qkv(seed_of("split"), b=5, hq=4, hkv=2, nq=30, nk=30, d=16, k_bias=3.0)
    whole = quantattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    lens_q, lens_k = [3, 7, 0, 5, 9, 2], [4, 7, 2, 0, 11, 5]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    qp, kp, vp = q[0, :, :26].transpose(0, 1), k[0, :, :29].transpose(0, 1), v[0, :, :29].transpose(0, 1)
    packed = quantattn.sageattn_varlen(qp, kp, vp, cu_q, cu_k, 9, 11, True, None, True)
    monkeypatch.setattr(calls, "MAX_GRID_Y", 8)
    assert len(guards.split(call_of(q, k, v, DEFAULT))) == 3
    for a, b in zip(whole, quantattn.sageattn(q, k, v, is_causal=True, return_lse=True), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(packed, quantattn.sageattn_varlen(qp, kp, vp, cu_q, cu_k, 9, 11, True, None, True), strict=True):
        assert torch.equal(a, b)


@interpreter
def test_split_keeps_the_result_kernel(qa, monkeypatch):
    q, k, v = qa.make_qkv(seed_of("split-kernel"), b=3, hq=2, nq=40, nk=50, d=32, dtype=torch.bfloat16)
    whole = quantattn.sageattn(q, k, v, backend="triton")
    monkeypatch.setattr(calls, "MAX_GRID_Y", 2)
    assert torch.equal(whole, quantattn.sageattn(q, k, v, backend="triton"))
