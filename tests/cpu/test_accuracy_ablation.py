"""`python -m quantattn.accuracy` on CPU (the reference), at a tiny shape: tables, JSON, chart, options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import quantattn
from quantattn import metrics
from quantattn.accuracy import ablation as A
from quantattn.accuracy import cli
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
