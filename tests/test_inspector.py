"""The per-layer inspector on a tiny model (CPU, reference backend): call-site keys, errors measured on
exactly each call's q, k and v, statistics, fallbacks, aggregation over inputs, JSON, cleanup."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import tiny_model as tiny

import quantattn
from quantattn import metrics
from quantattn.accuracy import inspector as I
from quantattn.accuracy.hooks import ROOT
from quantattn.config import VARIANTS
from quantattn.reference import attention_fp64

ORIGINAL = F.scaled_dot_product_attention
CANDIDATES = ("sage2-8b", "sage1", "sage2++")


def inputs(seed, b=2, n=40, dim=64):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.fixture(scope="module")
def report_and_calls():
    """One inspection of a 3-block model (GQA; causal, plain, masked), and the SDPA calls it made."""
    model, x = tiny(), inputs(1)
    calls = []

    def recorder(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q, k, v, attn_mask, is_causal, enable_gqa))
        return ORIGINAL(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)  # fmt: skip

    F.scaled_dot_product_attention = recorder  # the inspector calls whatever SDPA it found
    try:
        with torch.no_grad():
            expected = model(x)
        calls.clear()
        report = quantattn.inspect_attention(model, x, candidates=CANDIDATES)
        with torch.no_grad():
            F.scaled_dot_product_attention = ORIGINAL
            after = model(x)
    finally:
        F.scaled_dot_product_attention = ORIGINAL
    return report, calls, expected, after


def test_every_call_has_a_stable_key(report_and_calls):
    report, calls, _, _ = report_and_calls
    assert list(report.layers) == ["blocks.0.attn#0", "blocks.1.attn#0", "blocks.2.attn#0"]
    assert len(calls) == 3 and all(rec.calls == 1 for rec in report.layers.values())
    s = report.layers["blocks.0.attn#0"].stats
    assert (s.batch, s.heads_q, s.heads_kv, s.seq_q, s.seq_k, s.head_dim) == (2, 4, 2, 40, 40, 16)
    assert s.is_causal and not report.layers["blocks.1.attn#0"].stats.is_causal


def test_errors_are_measured_on_exactly_the_calls_inputs(report_and_calls):
    report, calls, _, _ = report_and_calls
    for (q, k, v, _, causal, _), key in zip(calls[:2], ["blocks.0.attn#0", "blocks.1.attn#0"], strict=True):
        truth = attention_fp64(q, k, v, is_causal=causal)
        for name in CANDIDATES:
            out = quantattn.sageattn(q, k, v, is_causal=causal, config=VARIANTS[name])
            assert report.error(key, name, "rel_l1") == metrics.relative_l1(out, truth)
            assert report.error(key, name, "cosine") == metrics.cosine_similarity(out, truth)
            assert report.error(key, name, "max_abs") == metrics.max_abs_error(out, truth)
        sdpa = ORIGINAL(q, k, v, is_causal=causal, enable_gqa=True)
        assert report.error(key, "sdpa") == metrics.relative_l1(sdpa, truth)


def test_masked_call_is_measured_with_its_mask(report_and_calls):
    report, calls, _, _ = report_and_calls
    key = "blocks.2.attn#0"
    q, k, v, mask, causal, _ = calls[2]
    assert mask is not None and report.layers[key].fallback is None
    truth = attention_fp64(q, k, v, is_causal=causal, attn_mask=mask)
    for name in CANDIDATES:
        out = quantattn.sageattn(q, k, v, is_causal=causal, attn_mask=mask, config=VARIANTS[name])
        assert report.error(key, name, "rel_l1") == metrics.relative_l1(out, truth)
    # the padding keys are really left out: the same layer without its mask is far off the truth
    unmasked = quantattn.sageattn(q, k, v, is_causal=causal, config=VARIANTS["sage2-8b"])
    assert metrics.relative_l1(unmasked, truth) > 10 * report.error(key, "sage2-8b", "rel_l1")


def test_the_model_runs_in_full_precision_and_is_left_as_it_was(report_and_calls):
    _, _, expected, after = report_and_calls
    assert torch.equal(after, expected)
    model = tiny()
    quantattn.inspect_attention(model, inputs(2), candidates=("sage2-8b",))
    assert F.scaled_dot_product_attention is ORIGINAL
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_table_and_json_round_trip(report_and_calls, tmp_path):
    report, _, _, _ = report_and_calls
    table = report.table()
    for key in report.layers:
        assert f"| {key} |" in table
    assert "| sdpa | sage2-8b | sage1 | sage2++ |" in table
    for metric in ("cosine", "max_abs"):
        assert report.table(metric).startswith(metric)
    back = I.InspectionReport.from_json(report.to_json(tmp_path / "r.json"))
    assert back.table() == table and back.candidates == report.candidates


def test_several_inputs_aggregate_to_the_worst_call():
    model = tiny(depth=1, masked=())
    one = [quantattn.inspect_attention(model, inputs(s), candidates=("sage2-8b",)) for s in (3, 4)]
    both = quantattn.inspect_attention(model, [inputs(3), (inputs(4),)], candidates=("sage2-8b",))
    rec = both.layers["blocks.0.attn#0"]
    assert rec.calls == 2
    worst = max(r.error("blocks.0.attn#0", "sage2-8b") for r in one)
    assert rec.errors["sage2-8b"]["rel_l1"] == worst
    assert rec.errors["sage2-8b"]["cosine"] == min(r.error("blocks.0.attn#0", "sage2-8b", "cosine") for r in one)


def test_a_candidate_that_cannot_run_is_marked(monkeypatch):
    real = I.sageattn

    def refuse(q, k, v, *args, config=None, **kw):
        if config == VARIANTS["sage2++"]:
            raise RuntimeError("backend 'triton' cannot run this call: FP8 PV needs compute capability >= 8.9")
        return real(q, k, v, *args, config=config, **kw)

    monkeypatch.setattr(I, "sageattn", refuse)
    report = quantattn.inspect_attention(tiny(depth=1, masked=()), inputs(5), candidates=("sage2-8b", "sage2++"))
    assert "compute capability" in report.layers["blocks.0.attn#0"].errors["sage2++"]["error"]
    assert report.error("blocks.0.attn#0", "sage2++") is None
    assert "| n/a |" in report.table()


def test_trouble_statistics():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 64, 32, generator=g)
    k = torch.randn(1, 2, 64, 32, generator=g) + 8 * torch.randn(1, 2, 1, 32, generator=g)
    v = torch.randn(1, 2, 64, 32, generator=g)
    plain = I.call_stats(q, k - k.mean(-2, keepdim=True), v, False, 0.1)
    biased = I.call_stats(q, k, v, False, 0.1)
    assert plain.k_channel_outlier < 1e-5 < I.K_CHANNEL_OUTLIER < biased.k_channel_outlier
    assert biased.max_abs_q == float(q.abs().max()) and biased.max_abs_v == float(v.abs().max())
    assert not biased.warnings()
    k2 = k.clone()
    k2[:, :, 0] *= 100
    assert any("median" in w for w in I.call_stats(q, k2, v, False, 0.1).warnings())
    assert any("FP16 accumulator" in w for w in I.call_stats(q, k, v * 2000, False, 0.1).warnings())
    assert any("beyond float16" in w for w in I.call_stats(q, k, v * 1e5, False, 0.1).warnings())
    assert any("logits" in w for w in I.call_stats(q * 1e3, k * 1e3, v, False, 0.1).warnings())
    assert any("keys" in w for w in I.call_stats(q, k[:, :, :3], v[:, :, :3], False, 0.1).warnings())


# A model that imported SDPA by name keeps the original function: `targets` reaches it.
sdpa_alias = F.scaled_dot_product_attention


class AliasModel(nn.Module):
    def forward(self, q, k, v):
        return sdpa_alias(q, k, v) + F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_targets_reach_a_function_imported_by_name():
    q, k, v = (inputs(s, b=1, n=32, dim=16)[:, None].expand(1, 2, 32, 16).contiguous() for s in (7, 8, 9))
    model = AliasModel()
    default = quantattn.inspect_attention(model, (q, k, v), candidates=("sage2-8b",))
    assert list(default.layers) == [f"{ROOT}#0"]
    both = quantattn.inspect_attention(model, (q, k, v), candidates=("sage2-8b",),
                                       targets=[(F, "scaled_dot_product_attention"), (sys.modules[__name__], "sdpa_alias")])  # fmt: skip
    assert list(both.layers) == [f"{ROOT}#0", f"{ROOT}#1"]
    assert not both.layers[f"{ROOT}#0"].stats.is_causal and both.layers[f"{ROOT}#1"].stats.is_causal
    assert sdpa_alias is ORIGINAL
