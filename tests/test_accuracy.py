"""Accuracy at its limits and the accuracy tools.

On the CPU: `python -m quantattn.accuracy` (the reference), at a tiny shape: tables, JSON, chart, options.

Marker `gpu`: the guards on the Triton kernels (128K keys, 64-bit offsets, CUDA's grid limit,
saturation, padded head_dims, huge dynamic range), the inspector and calibration on a larger randomly
initialized model, and the ablation command.
Kernel results are held to the reference variant they implement, as in test_kernels_gpu.py: within a
tenth of the reference's own error against FP64 attention.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import GPU, make, pytest_marks

import quantattn
from quantattn import guards, metrics
from quantattn.accuracy import ablation as A
from quantattn.accuracy import cli
from quantattn.accuracy.models import TinyTransformer
from quantattn.config import SAGE1, SAGE1_FP16ACC, SAGE2PP, VARIANTS, QuantConfig
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

TINY = ["--head-dims", "16", "32", "--seq-lens", "48", "--heads", "1", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    proc = subprocess.run([sys.executable, "-m", "quantattn.accuracy", *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc, out


def test_the_command_writes_table_json_and_chart(run):
    proc, out = run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "accuracy_ablation.json").read_text())
    assert doc["format"] == "quantattn-accuracy-ablation/1" and doc["metadata"]["device"] == "cpu"
    assert (out / "accuracy_ablation.png").stat().st_size > 10_000
    settings = sum(len(s) for s in A.ABLATION_GROUPS.values())
    assert len(doc["rows"]) == settings * 2 * 2  # two head_dims, two input kinds
    assert not [r for r in doc["rows"] if "error" in r]
    for group in A.ABLATION_GROUPS:
        assert f"| {group} |" in proc.stdout
    assert "### head_dim 32, N 48" in proc.stdout and "worst row" in proc.stdout
    # the knobs the issue names, each present
    labels = {(r["group"], r["setting"]) for r in doc["rows"]}
    for knob in ("QK precision", "QK granularity (INT8)", "smooth K", "smooth Q", "PV precision",
                 "PV accumulator (FP8)", "smooth V", "FP16 accumulators"):  # fmt: skip
        assert len({s for g, s in labels if g == knob}) >= 2


def test_rows_are_the_metrics_of_the_variant_on_the_stated_inputs(run):
    _, out = run
    doc = json.loads((out / "accuracy_ablation.json").read_text())
    row = next(
        r for r in doc["rows"] if r["setting"] == "sage2-4b" and r["inputs"] == "outliers" and r["head_dim"] == 32
    )
    q, k, v = metrics.make_qkv(1, 1, 48, 32, outliers=True, seed=0)
    truth = attention_fp64(q, k, v)
    got = quantattn.sageattn(q, k, v, config=quantattn.VARIANTS["sage2-4b"], backend="reference")
    assert row["rel_l1"] == metrics.relative_l1(got, truth)
    assert row["worst_row"] == metrics.worst_row_rel_l1(got, truth) >= row["rel_l1"]
    sdpa = next(r for r in doc["rows"] if r["variant"] == "sdpa" and r["inputs"] == "outliers" and r["head_dim"] == 32)
    assert sdpa["backend"] == "torch" and sdpa["rel_l1"] < row["rel_l1"]


def test_routed_settings_say_so(capsys):
    assert cli.main(["--shape", "1,1,32,16", "--groups", "PV precision", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "FP16 [guard: ran pv_dtype=bf16]" in text  # bf16 inputs: FP16 PV runs BF16 PV
    assert cli.main(["--shape", "1,1,32,16", "--groups", "PV precision", "--dtype", "fp16", "--quiet"]) == 0
    assert "guard" not in capsys.readouterr().out


def test_first_tools_options_still_work(capsys, tmp_path):
    """The options of the first accuracy tool (--shape, --variants, --json) keep their meaning."""
    path = tmp_path / "a.json"
    argv = ["--shape", "1,2,40,16", "--variants", "sage2-8b", "sage2-8b no smooth_k", "--json", str(path), "--quiet"]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["setting"] for r in rows} == {"sage2-8b", "sage2-8b no smooth_k"} and len(rows) == 4
    assert "sage2-8b no smooth_k" in capsys.readouterr().out
    assert cli.main(["--shape", "1,1,16,16", "--variants", "all", "--json", str(path), "--quiet"]) == 0
    assert {r["setting"] for r in json.loads(path.read_text())["rows"]} == set(A.ABLATIONS)
    with pytest.raises(SystemExit):
        cli.main(["--variants", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["--groups", "nope"])


def test_chart_from_the_json_file(run, tmp_path):
    from quantattn.accuracy.chart import plot

    _, out = run
    png = plot(out / "accuracy_ablation.json", tmp_path / "again.png")
    assert png.stat().st_size > 10_000


def test_a_failing_setting_is_reported_not_fatal(monkeypatch, capsys):
    def broken(setting, *args):
        if setting.label == "off":
            raise RuntimeError("boom")
        return A.F.scaled_dot_product_attention(*args[:3])

    monkeypatch.setattr(A, "run_setting", broken)
    assert cli.main(["--shape", "1,1,16,16", "--groups", "smooth K", "--quiet"]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_worst_row_metric():
    ref = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    out = torch.tensor([[1.0, 1.5], [2.0, 2.0], [0.0, 0.0]])
    assert metrics.worst_row_rel_l1(out, ref) == 0.25
    assert metrics.max_abs_error(out, ref) == 0.5


# ==================================================================================================
# On a real GPU (marker: gpu)

DEV = "cuda"
DEFAULT = QuantConfig()
KERNEL_VS_REFERENCE = 0.1


rnd = functools.partial(make, device=DEV)


def check(q, k, v, cfg, layout="HND", **kw):
    """Kernel within a tenth of the reference's error against FP64, both finite where FP64 is."""
    out = quantattn.sageattn(q, k, v, layout, config=cfg, backend="triton", **kw)
    ref = quantattn.sageattn(q, k, v, layout, config=cfg, backend="reference", **kw)
    hnd = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    truth = attention_fp64(hnd(q), hnd(k), hnd(v), kw.get("is_causal", False), kw.get("sm_scale"), chunk=256)
    assert torch.isfinite(out).all(), "NaN/Inf in the kernel's output"
    err_ref = rel_l1(hnd(ref), truth)
    assert rel_l1(out, ref) <= KERNEL_VS_REFERENCE * err_ref + 1e-5, (cfg.name, rel_l1(out, ref), err_ref)
    return out, err_ref


# ----------------------------------------------------------------------------------------------------
# Guards on the kernels


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # holds 128K keys and their FP64 truth
@pytest.mark.parametrize("causal", [False, True])
def test_128k_keys(causal):
    """The last 1024 queries against 131072 keys with channel bias in K and V: statistics over 128K tokens,
    1024 softmax steps, bottom-right causal alignment."""
    q = rnd(1, 1, 4, 1024, 128, bias=1.0)
    k, v = rnd(2, 1, 2, 131072, 128, bias=8.0), rnd(3, 1, 2, 131072, 128, bias=2.0)
    check(q, k, v, DEFAULT, is_causal=causal)


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # the FP64 truth of a 128K x 128K call: gigabytes
def test_128k_by_128k_against_fp64():
    """One head of a full 128K x 128K call (the kernel against FP64 attention directly: the reference's
    tiled loop is too slow at this size): finite, and within twice the default variant's error at 8K."""
    q, k, v = rnd(4, 1, 1, 131072, 128), rnd(5, 1, 1, 131072, 128, bias=4.0), rnd(6, 1, 1, 131072, 128)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    truth = attention_fp64(q, k, v, is_causal=True, chunk=512)
    short = quantattn.sageattn(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True)
    err_8k = rel_l1(short, attention_fp64(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True))
    assert rel_l1(out, truth) <= 2 * err_8k, (rel_l1(out, truth), err_8k)


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # about 30 GiB (K and V of 2**32 elements)
def test_64_bit_key_offsets():
    """FP16 PV reads the caller's V in place: in NHD its row stride is H * d, and 131072 keys of 128 heads
    of 256 channels pass 2**31 elements (32-bit offsets would wrap). Heads 0 and 127 against the
    reference on those heads alone."""
    n, h, d = 131072, 128, 256
    q = rnd(7, 1, 64, h, d, dtype=torch.float16)
    k = rnd(8, 1, n, h, d, dtype=torch.float16)
    v = rnd(9, 1, n, h, d, dtype=torch.float16)
    assert (n - 64) * h * d >= 2**31
    out = quantattn.sageattn(q, k, v, "NHD", config=SAGE1)
    assert torch.isfinite(out).all()
    heads = torch.tensor([0, h - 1], device=DEV)
    sub = [t.index_select(2, heads).transpose(1, 2) for t in (q, k, v)]
    del k, v
    ref = quantattn.sageattn(*sub, config=SAGE1, backend="reference")
    truth = attention_fp64(*sub, chunk=64)
    got = out.index_select(2, heads).transpose(1, 2)
    assert rel_l1(got, ref) <= KERNEL_VS_REFERENCE * rel_l1(ref, truth) + 1e-5


@pytest_marks(GPU)
def test_past_the_grid_limit():
    """2049 sequences x 32 heads = 65568 (sequence, head) pairs, past CUDA's 65535: split by sequences."""
    q, k, v = (rnd(s, 2049, 32, 16, 64) for s in (10, 11, 12))
    assert len(guards.split(guards.route(_call(q, k, v)))) == 2
    check(q, k, v, DEFAULT, is_causal=True)
    check(q, k, v, SAGE1)


def _call(q, k, v):
    from quantattn.backends import AttentionCall

    return AttentionCall(q, k, v, DEFAULT, False, 0.125, torch.empty_like(q), None)


@pytest_marks(GPU)
@pytest.mark.parametrize("name", [n for n, c in VARIANTS.items() if c.pv_accum != "fp16+fp32"])
def test_output_saturates_at_float16_max(name):
    """P rounded up by FP8 (275 -> 288) with V at 65504: FP64 gives 65504, the output must not be Inf."""
    d, nk, target = 16, 256, 275 / 448
    q = torch.zeros(1, 1, 64, d, device=DEV)
    q[..., 0] = 1
    k = torch.zeros(1, 1, nk, d, device=DEV)
    k[:, :, 0, 0] = 1
    v = torch.full((1, 1, nk, d), 65504.0, device=DEV)
    v[..., 1::2] *= -1
    q, k, v = q.half(), k.half(), v.half()
    out = quantattn.sageattn(q, k, v, sm_scale=-math.log(target), config=VARIANTS[name])
    assert torch.isfinite(out).all()
    assert torch.equal(out, attention_fp64(q, k, v, sm_scale=-math.log(target)).half())


@pytest_marks(GPU)
def test_sage2pp_partials_at_the_range_limits():
    q, k = torch.zeros(1, 2, 64, 32, device=DEV).half(), torch.zeros(1, 2, 640, 32, device=DEV).half()
    v = torch.full((1, 2, 640, 32), 60000.0, device=DEV).half()
    out = quantattn.sageattn(q, k, v, config=SAGE2PP)
    # every partial is 64 * 224 * 4.5 = 64512: finite; the MMA's own rounding of it may move the output
    # by an ulp or two of float16 (the reference, summing 32 products exactly, gives 60000 exactly)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), v[:, :, :64].float(), rtol=2e-3, atol=0)


@pytest_marks(GPU)
def test_fp16_accumulator_range_is_the_variants_own():
    """As on the CPU: sage1-fp16acc overflows beyond |V| ~ 65504/64 with flat attention (documented)."""
    q, k = torch.zeros(1, 1, 64, 64, device=DEV).half(), torch.zeros(1, 1, 256, 64, device=DEV).half()
    v = torch.full((1, 1, 256, 64), 2000.0, device=DEV).half()
    assert torch.isinf(quantattn.sageattn(q, k, v, config=SAGE1_FP16ACC)).all()


@pytest_marks(GPU)
@pytest.mark.parametrize("d", [80, 96, 160, 200])
def test_padded_head_dims(d):
    q, k, v = rnd(13, 1, 4, 777, d), rnd(14, 1, 2, 901, d, bias=4.0), rnd(15, 1, 2, 901, d)
    for cfg in (DEFAULT, SAGE1, SAGE2PP):
        check(q, k, v, cfg, is_causal=True)


@pytest_marks(GPU)
@pytest.mark.parametrize("nk", [1, 2, 3, 5, 16])
def test_short_key_sequences(nk):
    q, k, v = rnd(16, 2, 4, 100, 128), rnd(17, 2, 2, nk, 128, bias=6.0), rnd(18, 2, 2, nk, 128)
    for cfg in (DEFAULT, SAGE1, SAGE2PP):
        out = quantattn.sageattn(q, k, v, config=cfg, backend="triton")
        ref = quantattn.sageattn(q, k, v, config=cfg, backend="reference")
        truth = attention_fp64(q, k, v)
        assert torch.isfinite(out).all()
        assert rel_l1(out, truth) <= 2 * rel_l1(ref, truth) + 2**-8


DYNAMIC = {
    "qk 30 (logits ~4e3)": (30.0, 30.0, 1.0),
    "qk 100 (logits ~4e4)": (100.0, 100.0, 1.0),
    "all 1e-30": (1e-30, 1e-30, 1e-30),
    "v 1e-8": (1.0, 1.0, 1e-8),
    "v 1e5": (1.0, 1.0, 1e5),
    "q 1e-20, k 1e20": (1e-20, 1e20, 1.0),
}


@pytest_marks(GPU)
@pytest.mark.parametrize("case", list(DYNAMIC))
def test_huge_dynamic_range(case):
    sq, sk, sv = DYNAMIC[case]
    q, k, v = rnd(19, 1, 4, 700, 64, scale=sq), rnd(20, 1, 4, 700, 64, scale=sk), rnd(21, 1, 4, 700, 64, scale=sv)
    for cfg in (DEFAULT, SAGE1, SAGE2PP, QuantConfig(pv_dtype="fp16", pv_accum="fp32")):
        check(q, k, v, cfg)


# ----------------------------------------------------------------------------------------------------
# Inspector and calibration on a larger model

FAST_QUANT = {"sage2-8b": 5.0, "sage2++": 4.0, "sage1-fp16acc": 3.5, "sage1": 3.0, "sage2-4b": 2.0, "sdpa": 1.0}


@pytest.fixture(scope="module")
def big_model():
    """Hidden 1024, 16 query heads over 4 kv heads (head_dim 64), 4 blocks (causal, plain, causal, masked),
    channel bias in K; inputs of 2 x 2048 and 1 x 4096 tokens."""
    torch.manual_seed(0)
    model = TinyTransformer(dim=1024, heads=16, kv_heads=4, depth=4, causal=(True, False), masked=(3,), key_bias=3.0)
    model = model.to(DEV, torch.bfloat16).eval()
    xs = [rnd(30, 2, 2048, 1024), rnd(31, 1, 4096, 1024)]
    return model, xs


@pytest_marks(GPU)
def test_inspector_on_a_larger_model(big_model):
    model, xs = big_model
    report = quantattn.inspect_attention(model, xs)
    assert list(report.layers) == [f"blocks.{i}.attn#0" for i in range(4)]
    # the masked block's padding mask goes to the kernels: measured like the others
    assert all(rec.fallback is None for rec in report.layers.values())
    for key in report.layers:
        rec = report.layers[key]
        assert rec.calls == 2 and rec.stats.seq_k == 4096 and rec.stats.heads_kv == 4
        assert rec.stats.k_channel_outlier > 1
        assert report.error(key, "sdpa") < 0.01
        for name in VARIANTS:
            err = report.error(key, name)
            assert err is not None and 0 < err < (0.3 if name == "sage2-4b" else 0.08), (key, name, err)
    print(report.table())


@pytest_marks(GPU)
def test_inspector_errors_match_the_reference(big_model):
    """The inspector's number for a call is the kernel's error on that call: close to the reference's."""
    model, xs = big_model
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q, k, v, is_causal))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)  # fmt: skip

    torch.nn.functional.scaled_dot_product_attention = record
    try:
        report = quantattn.inspect_attention(model, xs[0], candidates=("sage2-8b",))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    q, k, v, causal = calls[0]
    ref = quantattn.sageattn(q, k, v, is_causal=causal, backend="reference")
    err_ref = rel_l1(ref, attention_fp64(q, k, v, is_causal=causal))
    assert abs(report.error("blocks.0.attn#0", "sage2-8b") - err_ref) <= 0.1 * err_ref


@pytest_marks(GPU)
def test_calibration_on_a_larger_model(big_model, tmp_path):
    model, xs = big_model
    report = quantattn.inspect_attention(model, xs, candidates=("sage2-8b", "sage2++", "sage1"))
    errs = sorted(report.error(f"blocks.{i}.attn#0", "sage2-8b") for i in range(3))
    plan = quantattn.accuracy.Plan.from_report(report, tolerance=errs[1], speeds=FAST_QUANT)
    chosen = {k: c.variant for k, c in plan.layers.items()}
    assert [chosen[f"blocks.{i}.attn#0"] for i in range(3)].count("sage2-8b") == 2
    assert plan.layers["blocks.3.attn#0"].error is not None  # the masked block is measured, not a fallback
    path = plan.save(tmp_path / "plan.json")
    with torch.no_grad():
        full = model(xs[0])
        with quantattn.load_plan(path).applied(model) as handle:
            out = model(xs[0])
    assert torch.isfinite(out).all() and 0 < rel_l1(out, full) < 0.05
    assert dict(handle.counts) == {(k, v): 1 for k, v in chosen.items()}
    # the H100's measured speeds keep full precision everywhere (cuDNN's bf16 attention is the fastest)
    assert {c.variant for c in quantattn.accuracy.Plan.from_report(report, 1.0).layers.values()} == {"sdpa"}


# ----------------------------------------------------------------------------------------------------
# The ablation command


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # a second GPU process; compares its numbers with this one's
def test_ablation_command(tmp_path):
    cmd = [sys.executable, "-m", "quantattn.accuracy", "--head-dims", "64", "128", "--seq-lens", "1024",
           "--groups", "smooth K", "PV accumulator (FP8)", "variants", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "accuracy_ablation.json").read_text())
    assert doc["metadata"]["backends"] == ["triton"] and not [r for r in doc["rows"] if "error" in r]
    assert (tmp_path / "accuracy_ablation.png").exists()
    by = {(r["setting"], r["inputs"], r["head_dim"]): r["rel_l1"] for r in doc["rows"]}
    for d in (64, 128):
        assert by[("sage2-8b", "outliers", d)] < 0.02 < by[("sage2-4b", "normal", d)]
        assert by[("off", "outliers", d)] > by[("on (default)", "outliers", d)]  # smooth K helps on outliers
    # the same numbers as the metrics on the same inputs, with the backend the ablation ran (auto would take
    # the Hopper kernel here, whose rounding differs in the fourth digit)
    q, k, v = metrics.make_qkv(1, 8, 1024, 128, device=DEV, outliers=True, seed=0)
    out = quantattn.sageattn(q, k, v, config=VARIANTS["sage2-8b"], backend="triton")
    assert by[("sage2-8b", "outliers", 128)] == pytest.approx(
        metrics.relative_l1(out, attention_fp64(q, k, v)), rel=1e-6
    )
