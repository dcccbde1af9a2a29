"""The benchmark's pure parts: operation counts, case enumeration, options, timing loop, JSON -> table,
the chart, and one end-to-end run of the whole pipeline on the CPU (Triton interpreter, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantattn.bench import cases as C
from quantattn.bench import cli, impls, report, timing
from quantattn.config import VARIANTS

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Operation counts and TOPS


def test_ops_follow_the_protocol():
    case = C.Case(head_dim=128, causal=False, seq_len=4096, batch=4, heads=32)
    assert case.ops == 4 * 4 * 32 * 4096**2 * 128
    assert C.Case(128, True, 4096, 4, 32).ops == case.ops / 2


def test_tops_is_ops_over_median_time():
    case = C.Case(128, False, 32768)
    # an anchor measured on the H100: cuDNN at 606 TOPS runs this shape in 4*4*32*32768^2*128 / 606e12 s = 116.1 ms
    assert case.tops(116.1) == pytest.approx(606, rel=1e-3)
    assert C.Case(128, True, 32768).tops(116.1) == pytest.approx(303, rel=1e-3)
    assert C.Case(64, False, 1024, batch=1, heads=1).tops(1.0) == pytest.approx(4 * 1024**2 * 64 / 1e-3 / 1e12)


def test_tensor_bytes_and_input_set_rotation():
    assert C.Case(128, False, 32768).tensor_bytes == 1 << 30  # 1 GiB per bf16 tensor, as the brief says
    for n in (1024, 2048):
        assert C.MIN_SETS <= C.Case(128, False, n).input_sets <= C.MAX_SETS  # below 4K: rotate
    for n in (4096, 8192, 32768):
        assert C.Case(128, False, n).input_sets == 1
    # a set far smaller than L2 rotates at any length
    assert C.Case(64, False, 8192, batch=1, heads=1).input_sets == C.MAX_SETS


# ----------------------------------------------------------------------------------------------------
# Cases and options


def test_sequence_lengths_parse_and_format():
    assert [C.parse_seq_len(s) for s in ("1K", "4k", "4096", " 32K ")] == [1024, 4096, 4096, 32768]
    assert [C.format_seq_len(n) for n in (1024, 32768, 1000)] == ["1K", "32K", "1000"]
    for bad in ("", "4M", "-1", "0", "1.5K"):
        with pytest.raises(ValueError):
            C.parse_seq_len(bad)


def test_full_protocol_enumeration():
    groups = C.enumerate_cases(C.HEAD_DIMS, C.SEQ_LENS, C.CAUSALS)
    assert [(d, n) for d, n, _ in groups] == [(d, n) for d in (64, 128) for n in C.SEQ_LENS]
    all_cases = [c for _, _, g in groups for c in g]
    assert len(all_cases) == 2 * 6 * 2
    assert len(set(all_cases)) == len(all_cases)
    for d, n, group in groups:
        assert [c.causal for c in group] == [False, True]  # one input draw serves both maskings
        assert all((c.head_dim, c.seq_len, c.batch, c.heads) == (d, n, 4, 32) for c in group)


def parse(*argv):
    return cli.settings_from(cli.parser().parse_args(list(argv)))


def test_default_settings_are_the_protocol():
    s = parse()
    assert (s.head_dims, s.seq_lens, s.causals) == ((64, 128), C.SEQ_LENS, (False, True))
    assert (s.batch, s.heads, s.accuracy, s.accuracy_seq_len) == (4, 32, True, 4096)
    assert s.warmups >= 3 and s.min_repeats >= 30


def test_quick_settings_and_explicit_options_win():
    s = parse("--quick")
    assert (s.head_dims, s.seq_lens, s.causals) == ((128,), (1024, 4096, 16384), (False,))
    assert s.min_repeats >= 30 and s.max_repeats < parse().max_repeats
    s = parse("--quick", "--head-dims", "64", "--causal", "both", "--seq-lens", "2K", "8192", "--no-accuracy")
    assert (s.head_dims, s.seq_lens, s.causals, s.accuracy) == ((64,), (2048, 8192), (False, True), False)


def test_variant_selection():
    args = cli.parser().parse_args(["--variants", "sage2-8b,sdpa-cudnn", "official"])
    assert cli.chosen_names(args) == ["sage2-8b", "sdpa-cudnn", "official"]
    assert cli.chosen_names(cli.parser().parse_args([])) == [
        *VARIANTS, "sage2-8b-hopper", "sdpa-cudnn", "sdpa-flash", "official"
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--variants", "sage3"])
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--seq-lens", "4M"])


def test_implementations_in_canonical_order_with_reasons():
    built = impls.build(["official", "sdpa-flash", "sage2++", "sage1"])
    assert [i.name for i in built] == ["sage1", "sage2++", "sdpa-flash", "official"]
    assert built[0].config == VARIANTS["sage1"] and built[0].prepare_kernel is not None
    assert built[2].prepare_kernel is None  # SDPA: the whole call is the kernel
    official = built[3]
    try:
        import sageattention  # noqa: F401

        assert official.available
    except ImportError:
        assert not official.available and "not installed" in official.unavailable
    with pytest.raises(ValueError, match="unknown implementation"):
        impls.build(["sage3"])


def test_hopper_row_next_to_the_triton_row():
    """sage2-8b is the Triton path explicitly; sage2-8b-hopper, the native kernel, is its own row, listed
    with the reason wherever it cannot run (always with --device cpu; without a GPU on any device)."""
    triton, hopper = impls.build(["sage2-8b-hopper", "sage2-8b"])
    assert (triton.name, hopper.name) == ("sage2-8b", impls.HOPPER)
    assert triton.as_dict()["backend"] == "triton" and hopper.as_dict()["backend"] == "hopper"
    assert hopper.config == VARIANTS["sage2-8b"] and hopper.kind == "quantattn"
    (on_cpu,) = impls.build([impls.HOPPER], device="cpu")
    assert not on_cpu.available and "--device cpu" in on_cpu.unavailable and on_cpu.whole is None
    if not torch.cuda.is_available():
        assert not hopper.available and hopper.unavailable.strip()
        info = hopper.as_dict()
        assert info["available"] is False and info["unavailable"] == hopper.unavailable
    if hopper.available:
        assert hopper.whole is not None and hopper.prepare_kernel is not None and hopper.head_dims


def test_implementations_run_only_their_head_dims():
    """An implementation limited to some head dims (the Hopper kernel: 64 and 128) is left out of the
    others' cases, accuracy and speed, instead of failing there."""
    from quantattn.bench.runner import Runner, Settings

    def whole(q, k, v, causal):
        return v

    every = impls.Implementation("every", "sdpa", "any head dim", whole)
    only64 = impls.Implementation("only64", "sdpa", "head_dim 64 only", whole, head_dims=(64,))
    assert only64.as_dict()["head_dims"] == [64] and "head_dims" not in every.as_dict()
    settings = Settings(
        head_dims=(32, 64), seq_lens=(64,), causals=(False,), batch=1, heads=1, accuracy_seq_len=64,
        warmups=0, min_repeats=1, max_repeats=1, target_s=0.0, device="cpu",
    )  # fmt: skip
    result = report.new_result({}, {i.name: i.as_dict() for i in (every, only64)})
    Runner(settings, [every, only64], result, lambda: None).run()
    for part in ("speed", "accuracy"):
        seen = {(r["implementation"], r["head_dim"]) for r in result[part]}
        assert seen == {("every", 32), ("every", 64), ("only64", 64)}, part
    assert not any("error" in r for r in result["speed"] + result["accuracy"])


def test_no_gpu_exits_nonzero_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--quick"]) == cli.EXIT_NO_GPU != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Timing loop (wall clock on the CPU; the same loop runs with CUDA events on a GPU)


def test_repeat_count():
    assert timing.repeat_count(100.0, 30, 200, 0.3) == 30  # long calls: the minimum
    assert timing.repeat_count(0.01, 30, 200, 0.3) == 200  # short calls: up to the maximum
    assert timing.repeat_count(5.0, 30, 200, 0.3) == 60


def test_summary_statistics():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], warmups=3)
    assert (t.median_ms, t.min_ms, t.p25_ms, t.p75_ms, t.repeats, t.warmups) == (3.0, 1.0, 2.0, 4.0, 5, 3)


def test_measure_compiles_warms_up_and_rotates():
    seen = []
    t = timing.measure(
        lambda x: seen.append(x), [("a",), ("b",), ("c",)], warmups=3, min_repeats=30, max_repeats=30, device="cpu"
    )
    assert len(seen) == 1 + 3 + 30 and t.repeats == 30 and t.warmups == 3
    assert seen[:5] == ["a", "b", "c", "a", "b"]
    assert {"a", "b", "c"} == set(seen[4:])


# ----------------------------------------------------------------------------------------------------
# JSON -> table, merging, chart


def synthetic_result(head_dims=(64, 128), causals=(False, True), seq_lens=(1024, 4096, 16384)) -> dict:
    names = ["sage2-8b", "sage1", "sdpa-cudnn", "sdpa-flash", "official"]
    infos = {
        "sage2-8b": {"kind": "quantattn", "available": True, "kernel_only": True},
        "sage1": {"kind": "quantattn", "available": True, "kernel_only": True},
        "sdpa-cudnn": {"kind": "sdpa", "available": True, "kernel_only": False},
        "sdpa-flash": {"kind": "sdpa", "available": True, "kernel_only": False},
        "official": {"kind": "official", "available": False, "unavailable": "not installed (test)"},
    }
    base = {"sage2-8b": 500.0, "sage1": 350.0, "sdpa-cudnn": 600.0, "sdpa-flash": 320.0}
    result = report.new_result(
        {"date": "2026-01-02T03:04:05+00:00", "device": "Test GPU", "torch": "2.11", "triton": "3.6"}, infos
    )
    for d in head_dims:
        for causal in causals:
            for n in seq_lens:
                case = C.Case(d, causal, n)
                for name in names[:4]:
                    timings = ("whole", "kernel") if infos[name]["kernel_only"] else ("whole",)
                    for t in timings:
                        tops = base[name] * (1.3 if t == "kernel" else 1.0) * (1 - 1024 / (2 * n))
                        rec = {
                            "head_dim": d, "causal": causal, "seq_len": n, "batch": 4, "heads": 32,
                            "implementation": name, "timing": t, "input_sets": case.input_sets, "ops": case.ops,
                        }  # fmt: skip
                        if name == "sage1" and n == 16384 and t == "whole":
                            rec["error"] = "OutOfMemoryError: CUDA out of memory\nmore"
                        else:
                            rec.update(median_ms=case.ops / (tops * 1e12) * 1e3, tops=tops)
                        result["speed"].append(rec)
                for name in names[:4]:
                    for kind in C.INPUT_KINDS:
                        result["accuracy"].append(
                            {
                                "head_dim": d,
                                "causal": causal,
                                "implementation": name,
                                "inputs": kind,
                                "shape": [1, 8, 4096, d],
                                "cosine": 0.999123,
                                "rel_l1": 0.0345,
                                "rmse": 1e-3,
                            }  # fmt: skip
                        )
    return result


def test_table_from_json(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(synthetic_result(), path)
    table = report.format_table(report.load(path))
    lines = table.splitlines()
    assert "official: not installed (test)" in table
    blocks = [line for line in lines if line.startswith("head_dim ")]
    assert [b.split(" (")[0] for b in blocks] == [
        "head_dim 64, causal off", "head_dim 64, causal on", "head_dim 128, causal off", "head_dim 128, causal on"
    ]  # fmt: skip
    assert "[1, 8, 4096, 128]" in blocks[-1] and "/ 2 /" in blocks[-1]
    row = next(line for line in lines if line.startswith("sage2-8b"))
    cells = row.split()
    # whole call per N, kernel only per N, then cosine / rel L1 for normal and outlier inputs
    assert cells[1:4] == ["250", "438", "484"]
    assert cells[4:7] == ["325", "569", "630"]
    assert cells[7:] == ["0.999123", "0.0345", "0.999123", "0.0345"]
    cudnn = next(line for line in lines if line.startswith("sdpa-cudnn")).split()
    assert cudnn[4:7] == ["-", "-", "-"]  # no kernel-only time for SDPA
    sage1 = next(line for line in lines if line.startswith("sage1")).split()
    assert sage1[3] == "err"
    assert sum("! sage1 whole N=16K: OutOfMemoryError: CUDA out of memory" in line for line in lines) == 4
    assert not any(line.startswith("official ") for line in lines)
    header = next(line for line in lines if line.startswith("implementation"))
    assert header.split()[1:4] == ["1K", "4K", "16K"]


def test_merge_keeps_both_runs_and_later_wins(tmp_path):
    a, b = synthetic_result(head_dims=(64,)), synthetic_result(head_dims=(128,))
    b["speed"][0]["tops"] = 1.5
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json(a, pa)
    report.write_json(b, pb)
    merged = report.load([pa, pb])
    assert report.panels(merged) == [(64, False), (64, True), (128, False), (128, True)]
    assert len(merged["speed"]) == len(a["speed"]) + len(b["speed"])
    assert [m["source"] for m in merged["metadata"]["merged_from"]] == [str(pa), str(pb)]
    again = report.load([pb, pb])
    assert len(again["speed"]) == len(b["speed"])
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
        report.load(tmp_path / "bad.json")


def test_output_names_carry_date_and_tag():
    import datetime as dt

    stem = report.output_stem(dt.datetime(2026, 5, 1, 12, 30, 5), "H100 80GB/quick")
    assert stem == "2026-05-01_123005_H100-80GB-quick"


def test_plot_from_synthetic_json(tmp_path):
    pytest.importorskip("matplotlib")
    from quantattn.bench import plot

    path = tmp_path / "r.json"
    report.write_json(synthetic_result(), path)
    png = plot(path, tmp_path / "sub" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_from_json_redraws_without_gpu(tmp_path, capsys):
    path = tmp_path / "r.json"
    report.write_json(synthetic_result(head_dims=(128,), causals=(False,)), path)
    assert cli.main(["--from-json", str(path), "--out", str(tmp_path / "charts")]) == 0
    out = capsys.readouterr().out
    assert "head_dim 128, causal off" in out
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "charts" / "r.png").exists()
    except ImportError:
        assert "chart skipped" in out


def test_stop_after_skips_the_rest_and_still_reports(tmp_path, capsys):
    argv = ["--device", "cpu", "--no-accuracy", "--stop-after", "0", "--variants", "sage2-8b", "sdpa-flash",
            "--head-dims", "32", "--seq-lens", "64", "128", "--batch", "1", "--heads", "1",
            "--out", str(tmp_path), "--tag", "stopped"]  # fmt: skip
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("*_stopped.json")
    speed = json.loads(path.read_text())["speed"]
    assert len(speed) == 2 * 2 * (2 + 1) and all(r["skipped"] == "time limit" for r in speed)
    assert "12 measurement(s) skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# The whole pipeline on the CPU: quantattn's whole call (the reference backend), its kernel alone
# (Triton interpreter), SDPA's missing cuDNN backend reported, results written as JSON.


@pytest.mark.interpreter
def test_cpu_selftest_end_to_end(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable, "-m", "quantattn.bench", "--device", "cpu", "--batch", "1", "--heads", "1",
        "--head-dims", "32", "--seq-lens", "64", "--causal", "both", "--accuracy-seq-len", "64",
        "--variants", "sage2-8b", "sage2-8b-hopper", "sdpa-cudnn", "official", "--warmups", "1", "--repeats", "2",
        "--out", str(tmp_path), "--tag", "selftest",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*_selftest.json")
    result = json.loads(path.read_text())
    meta = result["metadata"]
    assert meta["command"].startswith("python -m quantattn.bench --device cpu")
    assert len(meta["source_sha256"]) == 16 and meta["torch"] == torch.__version__
    assert "not installed" in proc.stdout or result["implementations"]["official"]["available"]
    hopper = result["implementations"]["sage2-8b-hopper"]
    assert not hopper["available"] and "--device cpu" in hopper["unavailable"]
    assert f"sage2-8b-hopper: {hopper['unavailable']}" in proc.stdout  # the table lists why it did not run
    assert not any(r["implementation"] == "sage2-8b-hopper" for r in result["speed"] + result["accuracy"])
    speed = {(r["implementation"], r["timing"], r["causal"]): r for r in result["speed"]}
    for causal in (False, True):
        assert speed[("sage2-8b", "whole", causal)]["tops"] > 0
        assert speed[("sage2-8b", "kernel", causal)]["tops"] > 0
        assert "error" in speed[("sdpa-cudnn", "whole", causal)]
    acc = [r for r in result["accuracy"] if r["implementation"] == "sage2-8b"]
    assert len(acc) == 4 and all(r["cosine"] > 0.99 for r in acc)
