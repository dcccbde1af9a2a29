"""Calibration on a tiny model (CPU, reference backend): the choice rule, the plan file, applying the plan
at inference, and the README's two-line workflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model as tiny

import quantattn
from quantattn.accuracy import calibration as C
from quantattn.accuracy.inspector import CallStats, InspectionReport, LayerRecord
from quantattn.accuracy.speeds import SPEEDS, speeds_from_bench
from quantattn.config import VARIANTS

ORIGINAL = F.scaled_dot_product_attention
ROOT_DIR = Path(__file__).resolve().parents[1]
# a GPU where the quantized variants are faster than full precision (as on RTX 40-class GPUs)
FAST_QUANT = {"sage2-8b": 5.0, "sage2++": 4.0, "sage1-fp16acc": 3.5, "sage1": 3.0, "sage2-4b": 2.0, "sdpa": 1.0}


def fake_report(errors: dict[str, dict[str, float]], fallback=None) -> InspectionReport:
    """A report with one call site per entry: {key: {candidate: rel_l1}}."""
    stats = CallStats(1, 2, 2, 64, 64, 32, "bfloat16", False)
    layers = {}
    for key, errs in errors.items():
        rec = LayerRecord(key, 1, stats, fallback if key.endswith("masked#0") else None)
        for name, e in errs.items():
            rec.errors[name] = (
                {"error": "cannot run"} if e is None else {"rel_l1": e, "cosine": 1 - e * e, "max_abs": e}
            )
        layers[key] = rec
    return InspectionReport(layers, {n: VARIANTS[n] for n in ("sage2-8b", "sage2++", "sage1")})


def test_choice_is_the_fastest_within_the_tolerance():
    report = fake_report({
        "a#0": {"sdpa": 0.002, "sage2-8b": 0.03, "sage2++": 0.02, "sage1": 0.01},
        "b#0": {"sdpa": 0.002, "sage2-8b": 0.06, "sage2++": 0.05, "sage1": 0.01},
        "c#0": {"sdpa": 0.002, "sage2-8b": 0.06, "sage2++": 0.06, "sage1": 0.06},
        "d#0": {"sdpa": 0.002, "sage2-8b": None, "sage2++": 0.01, "sage1": 0.01},
        "x.masked#0": {},
    }, fallback="attn_mask is given")  # fmt: skip
    plan = C.Plan.from_report(report, tolerance=0.04, speeds=FAST_QUANT)
    assert {k: c.variant for k, c in plan.layers.items()} == {
        "a#0": "sage2-8b", "b#0": "sage1", "c#0": "sdpa", "d#0": "sage2++", "x.masked#0": "sdpa"
    }  # fmt: skip
    assert plan.layers["a#0"].config == VARIANTS["sage2-8b"] and plan.layers["c#0"].config is None
    assert "no faster candidate" in plan.layers["c#0"].why and "attn_mask" in plan.layers["x.masked#0"].why
    # the tolerance is inclusive; a stricter one moves a layer down the ranking
    assert C.Plan.from_report(report, 0.03, speeds=FAST_QUANT).layers["a#0"].variant == "sage2-8b"
    assert C.Plan.from_report(report, 0.025, speeds=FAST_QUANT).layers["a#0"].variant == "sage2++"
    # cosine: 1 - cosine within the tolerance (here 1 - cos = rel_l1**2)
    cos_plan = C.Plan.from_report(report, 0.0025, metric="cosine", speeds=FAST_QUANT)
    assert cos_plan.layers["b#0"].variant == "sage2++"


@pytest.mark.parametrize("metric", ["rel_l1", "cosine", "max_abs"])
def test_non_finite_errors_never_pass(metric):
    """NaN compares False with everything: `nan > tolerance` let a NaN measurement through, and the
    fastest (least accurate) variant won. NaN and infinite errors must count as failures."""
    nan, inf = float("nan"), float("inf")
    report = fake_report({
        "a#0": {"sdpa": 0.002, "sage2-8b": nan, "sage2++": inf, "sage1": 0.01},
        "b#0": {"sdpa": 0.002, "sage2-8b": nan, "sage2++": nan, "sage1": nan},
    })  # fmt: skip
    # fake_report's cosine is 1 - e**2: NaN stays NaN, inf becomes -inf (1 - cosine = inf)
    plan = C.Plan.from_report(report, 0.05, metric=metric, speeds=FAST_QUANT)
    assert plan.layers["a#0"].variant == "sage1"
    assert plan.layers["b#0"].variant == "sdpa" and "no faster candidate" in plan.layers["b#0"].why


def valid_plan_document() -> dict:
    sage1 = C.LayerChoice("sage1", VARIANTS["sage1"], 0.01, "fastest")
    return C.Plan({"a#0": sage1, "<model>#1": C.LayerChoice("sdpa", None, 0.0, "full")}, 0.05).to_dict()


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def with_layer(d: dict, **changes) -> dict:
    return {**d, "layers": {**d["layers"], "a#0": {**d["layers"]["a#0"], **changes}}}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: [d], "not a quantattn plan"),
        (lambda d: without(d, "layers"), r"layers: missing"),
        (lambda d: {**d, "layers": [1, 2]}, r"layers: must be an object"),
        (lambda d: {**d, "default": "sage9"}, r"default: must be 'sdpa' or one of"),
        (lambda d: {**d, "tolerance": "0.05"}, r"tolerance: must be a non-negative number"),
        (lambda d: {**d, "metric": "rmse"}, r"metric: must be one of"),
        (lambda d: with_layer(d, variant="sdpa"), r"layers\['a#0'\]\.config: must be null for variant 'sdpa'"),
        (lambda d: with_layer(d, config=None), r"layers\['a#0'\]\.config: variant 'sage1' needs"),
        (lambda d: with_layer(d, config={"pv_dtype": "fp4"}), r"layers\['a#0'\]\.config: .*pv_dtype"),
        (lambda d: with_layer(d, config={"qk_bits": 8}), r"layers\['a#0'\]\.config: .*qk_bits"),
        (lambda d: with_layer(d, variant=None), r"layers\['a#0'\]\.variant"),
        (lambda d: {**d, "layers": {"blocks.0": d["layers"]["a#0"]}}, r"layers\['blocks.0'\]: a call key"),
        (lambda d: {**d, "layers": {"a#0": "sage1"}}, r"layers\['a#0'\]: must be an object"),
    ],
    ids=["list", "no layers", "layers list", "unknown default", "tolerance string", "metric", "sdpa with config",
         "variant without config", "bad config value", "unknown config field", "no variant", "bad key", "choice string"],
)  # fmt: skip
def test_plan_files_are_checked_whole_at_load(tmp_path, change, match):
    """Plan files fail at load with a message naming the field, not at the first forward (an unknown
    default's KeyError) or never (an 'sdpa' layer with a quantized config ran quantized)."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(valid_plan_document()))
    assert quantattn.load_plan(good).layers["a#0"].config == VARIANTS["sage1"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(change(valid_plan_document())))
    with pytest.raises(ValueError, match=match):
        quantattn.load_plan(path)


def test_plans_made_in_code_are_checked_too():
    with pytest.raises(ValueError, match="default must be"):
        C.Plan({}, 0.05, default="sage9")
    with pytest.raises(ValueError, match=r"layers\['a#0'\]: variant 'sdpa' with config"):
        C.Plan({"a#0": C.LayerChoice("sdpa", VARIANTS["sage1"], None, "")}, 0.05)


def test_full_precision_is_a_candidate_by_its_speed():
    """With the H100's measured speeds, torch's bf16 SDPA (cuDNN) is faster than every quantized variant:
    calibration keeps full precision there, whatever the tolerance."""
    report = fake_report({"a#0": {"sdpa": 0.002, "sage2-8b": 0.01, "sage2++": 0.01, "sage1": 0.01}})
    assert max(SPEEDS, key=SPEEDS.get) == "sdpa"
    assert C.Plan.from_report(report, 0.5).layers["a#0"].variant == "sdpa"
    # unknown speeds rank last, in the report's order
    assert C.Plan.from_report(report, 0.5, speeds={"sage1": 1.0}).layers["a#0"].variant == "sage1"
    with pytest.raises(ValueError, match="metric"):
        C.Plan.from_report(report, 0.1, metric="rmse")


def x_of(seed, b=2, n=48, dim=64):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model, x = tiny(), x_of(1)
    report = quantattn.inspect_attention(model, x, candidates=("sage2-8b", "sage2++", "sage1"))
    errs = [report.error(k, "sage2-8b") for k in ("blocks.0.attn#0", "blocks.1.attn#0")]
    tolerance = sum(errs) / 2  # between the two layers' sage2-8b errors: the plan must tell them apart
    plan = C.Plan.from_report(report, tolerance, speeds=FAST_QUANT)
    path = plan.save(tmp_path_factory.mktemp("plan") / "plan.json")
    return model, x, report, plan, path, errs


def test_plan_tells_layers_apart_and_survives_the_file(calibrated):
    model, x, report, plan, path, errs = calibrated
    low, high = ("blocks.0.attn#0", "blocks.1.attn#0") if errs[0] < errs[1] else ("blocks.1.attn#0", "blocks.0.attn#0")
    assert plan.layers[low].variant == "sage2-8b" and plan.layers[high].variant != "sage2-8b"
    masked = plan.layers["blocks.2.attn#0"]  # its padding mask goes to the kernels: measured like the others
    assert masked.error is not None and report.layers["blocks.2.attn#0"].fallback is None
    loaded = quantattn.load_plan(path)
    assert loaded.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["format"] == "quantattn-plan/1"
    assert f"| blocks.2.attn#0 | {masked.variant} |" in plan.table()


def test_applied_plan_runs_each_layers_variant(calibrated):
    model, x, _, plan, path, _ = calibrated
    loaded = quantattn.load_plan(path)
    with torch.no_grad():
        full = model(x)
        handle = loaded.apply(model)
        out = model(x)
        out_again = model(x)
        handle.remove()
        after = model(x)
    assert F.scaled_dot_product_attention is ORIGINAL
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(after, full) and torch.equal(out, out_again) and not torch.equal(out, full)
    assert dict(handle.counts) == {(k, c.variant): 2 for k, c in plan.layers.items()}
    assert F.scaled_dot_product_attention is ORIGINAL  # patched only while the model runs


def test_applied_plan_equals_the_variant_everywhere_when_all_layers_agree():
    """A plan that picks one variant for every quantizable call computes what quantattn.patched does."""
    model, x = tiny(masked=()), x_of(2)
    plan = quantattn.calibrate(model, x, tolerance=1.0, candidates=("sage2++", "sage1"), speeds=FAST_QUANT)
    assert {c.variant for c in plan.layers.values()} == {"sage2++"}
    with torch.no_grad(), plan.applied(model) as handle:
        out = model(x)
    with torch.no_grad(), quantattn.patched(config=VARIANTS["sage2++"], cpu="reference"):
        expected = model(x)
    assert torch.equal(out, expected) and sum(handle.counts.values()) == 3


def test_calls_the_plan_does_not_know_run_its_default():
    model, x = tiny(depth=2, masked=()), x_of(3)
    plan = C.Plan({"blocks.0.attn#0": C.LayerChoice("sage2-8b", VARIANTS["sage2-8b"], 0.03, "")}, 0.05)
    with torch.no_grad(), plan.applied(model) as handle:
        model(x)
    assert dict(handle.counts) == {("blocks.0.attn#0", "sage2-8b"): 1, ("blocks.1.attn#0", "sdpa"): 1}
    # tracking only the planned modules attributes the unplanned call to the nearest tracked module
    with torch.no_grad(), plan.applied(model, hook="planned") as handle:
        model(x)
    assert dict(handle.counts) == {("blocks.0.attn#0", "sage2-8b"): 1, ("<model>#0", "sdpa"): 1}


def test_planned_modules_only_give_the_same_result(calibrated):
    model, x, _, plan, _, _ = calibrated
    with torch.no_grad():
        with plan.applied(model) as every:
            a = model(x)
        with plan.applied(model, hook="planned") as planned:
            b = model(x)
    assert torch.equal(a, b) and every.counts == planned.counts


def test_speeds_from_a_benchmark_result():
    path = ROOT_DIR / "bench/results/2026-11-23_001817_full-d128.json"
    speeds = speeds_from_bench(path, head_dim=128, seq_len=8192)
    assert set(VARIANTS) <= set(speeds) and speeds["sdpa"] > speeds["sage2-8b"] > 500
    with pytest.raises(ValueError, match="no whole-call speed"):
        speeds_from_bench(path, head_dim=128, seq_len=1000)


def test_readme_workflow(tmp_path, monkeypatch):
    """The README's calibration snippet, run as written on a tiny model."""
    readme = (ROOT_DIR / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "quantattn.calibrate(" in b]
    assert len(blocks) == 1
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith(("#", "import"))]) == 2
    monkeypatch.chdir(tmp_path)
    model, inputs = tiny(masked=()), x_of(4)
    with torch.no_grad():
        full = model(inputs)
        exec(compile(code, "README.md", "exec"), {"model": model, "inputs": inputs})
        assert (tmp_path / "attn_plan.json").exists()
        planned = model(inputs)  # the plan stays applied
    assert planned.shape == full.shape and torch.isfinite(planned).all()
