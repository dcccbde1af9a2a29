"""`python -m quantattn.bench --workloads`: argument parsing and validation, back-to-back timing (wall
clock), records, ratios and the markdown table with fake timings (CPU; the GPU run is in the report)."""

from __future__ import annotations

import json

import pytest

from quantattn.bench import cli
from quantattn.bench import workloads as W


def test_builtin_list_is_the_real_models_shapes():
    shapes = {w.name: (w.batch, w.heads_q, w.heads_kv, w.seq_len, w.head_dim, w.causal) for w in W.BUILTIN}
    assert shapes == {
        "Flux 1024 px": (1, 24, 24, 4608, 128, False),
        "SD3.5": (2, 24, 24, 4250, 64, False),
        "Wan2.1-14B 480p": (1, 40, 40, 32760, 128, False),
        "HunyuanVideo 720p": (1, 24, 24, 119056, 128, False),
        "Llama-3-8B prefill 8K": (1, 32, 8, 8192, 128, True),
        "Llama-3-8B prefill 32K": (1, 32, 8, 32768, 128, True),
        "Qwen2.5-7B 4x2K": (4, 28, 4, 2048, 128, True),
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,32,8,16K,128,1", (1, 32, 8, 16384, 128, True)),
        (" 2, 24 ,24,4250,64,off ", (2, 24, 24, 4250, 64, False)),
        ("4,28,4,2048,128,true", (4, 28, 4, 2048, 128, True)),
        ("1,1,1,1,1,0", (1, 1, 1, 1, 1, False)),
    ],
)
def test_parse_workload(text, expected):
    w = W.parse_workload(text)
    assert (w.batch, w.heads_q, w.heads_kv, w.seq_len, w.head_dim, w.causal) == expected
    assert w.name == f"custom {text.strip()}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,32,8,16K,128", "6 comma-separated fields"),
        ("1,32,8,16K,128,1,2", "6 comma-separated fields"),
        ("0,32,8,1K,128,1", "B must be a positive integer"),
        ("1,x,8,1K,128,1", "Hq must be a positive integer"),
        ("1,32,-8,1K,128,1", "Hkv must be a positive integer"),
        ("1,32,8,1.5K,128,1", "N must be a positive integer"),
        ("1,32,8,1K,0,1", "d must be a positive integer"),
        ("1,32,8,1K,512,1", "d must be at most 256"),
        ("1,32,6,1K,128,1", "Hq \\(32\\) must be a multiple of Hkv \\(6\\)"),
        ("1,32,8,1K,128,maybe", "causal must be 1/0"),
    ],
)
def test_parse_workload_says_which_field_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        W.parse_workload(text)


def test_cli_rejects_bad_workloads_and_grid_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--workload", "1,32,6,1K,128,1"])
    assert "must be a multiple of Hkv" in capsys.readouterr().err
    for extra in (["--head-dims", "64"], ["--seq-lens", "4K"], ["--quick"], ["--batch", "2"], ["--causal", "on"]):
        with pytest.raises(SystemExit):
            cli.main(["--workloads", *extra])
        assert "cannot be combined with --workloads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--workloads", "--device", "cpu"])
    assert "CUDA only" in capsys.readouterr().err


def test_which_workloads_run():
    custom = [W.parse_workload("1,2,2,64,32,0")]
    assert W.chosen(True, None) == list(W.BUILTIN)
    assert W.chosen(True, custom) == [*W.BUILTIN, *custom]
    assert W.chosen(False, custom) == custom
    args = cli.parser().parse_args(["--workloads", "--workload", "1,2,2,64,32,0", "--workload", "2,4,1,1K,64,1"])
    assert args.workloads and [w.heads_kv for w in args.workload] == [2, 1]


def test_input_rotation_follows_the_protocol():
    by_name = {w.name: w for w in W.BUILTIN}
    assert by_name["HunyuanVideo 720p"].input_sets == 1 and by_name["Wan2.1-14B 480p"].input_sets == 1
    assert by_name["Qwen2.5-7B 4x2K"].input_sets > 1  # 2K tokens: rotate
    assert by_name["SD3.5"].input_sets > 1  # a set of 78 MB would sit in L2 across calls otherwise


def test_back_to_back_groups_on_the_wall_clock():
    calls = []
    res = W.time_back_to_back(lambda x: calls.append(x), [(0,), (1,)], warmups=2, device="cpu")
    assert len(calls) == 1 + 2 + res["groups"] * res["calls_per_group"]
    assert res["calls_per_group"] == W.CALLS_PER_GROUP and W.MIN_GROUPS <= res["groups"] <= W.MAX_GROUPS
    assert calls[:4] == [0, 1, 0, 1]  # inputs rotate
    assert 0 <= res["min_us"] <= res["us"] <= res["max_us"]


def fake_record(name, quant_us, cudnn_us, auto_us, path="torch SDPA", w=None, **results):
    w = w or W.parse_workload("1,24,24,4608,128,0")
    rec = {"name": name, "shape": w.shape, "results": {
        "quantattn": {"us": quant_us, "backend": "hopper"},
        "sdpa-cudnn": {"us": cudnn_us},
        "auto": {"us": auto_us, "path": path},
        **results,
    }}  # fmt: skip
    return W.add_ratios(rec)


def test_ratios():
    rec = fake_record("Flux", 1220.0, 1000.0, 1005.0)
    assert rec["speedup_vs_cudnn"] == pytest.approx(1000 / 1220)
    assert rec["auto_vs_best"] == pytest.approx(1.005)
    rec = fake_record("broken", 1000.0, None, 900.0)
    assert rec["speedup_vs_cudnn"] is None and rec["auto_vs_best"] is None


def test_markdown_table_with_fake_timings():
    doc = W.new_document({"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0"})
    gqa = W.parse_workload("1,32,8,8K,128,1")
    doc["workloads"] = [
        fake_record("Flux 1024 px", 1220.4, 1000.2, 1001.0),
        fake_record("Llama-3-8B prefill 8K", 2000.0, 1920.0, 2001.0, "quantattn kernel", w=gqa),
    ]
    doc["workloads"][1]["results"]["sdpa-cudnn"]["note"] = "enable_gqa=True"
    doc["workloads"].append(
        W.add_ratios({"name": "Wan", "shape": "B1 H40 N32760 d128", "results": {
            "quantattn": {"error": "RuntimeError: out of memory\nmore"}, "sdpa-cudnn": {"us": 5.0}, "auto": {}}})
    )  # fmt: skip
    text = W.format_markdown(doc)
    lines = text.splitlines()
    assert "NVIDIA H100 80GB HBM3 (torch 2.11.0, cuda 13.0)" in lines[0]
    assert lines[2] == (
        "| workload | shape | quantattn µs | cuDNN µs | quantattn speed over cuDNN | auto µs (path) | auto / faster |"
    )
    assert "| Flux 1024 px | B1 H24 N4608 d128 | 1220 (hopper) | 1000 | 0.82× | 1001 (torch SDPA) | 1.00 |" in lines
    assert (
        "| Llama-3-8B prefill 8K | B1 H32/8 N8192 d128 causal | 2000 (hopper) | 1920 (enable_gqa=True) | 0.96× | "
        "2001 (quantattn kernel) | 1.04 |" in lines
    )
    assert "| Wan | B1 H40 N32760 d128 | error | 5 | - | - | - |" in lines
    assert lines[-1] == "! Wan, quantattn: RuntimeError: out of memory"


def test_cli_runs_custom_workloads_on_the_cpu_and_prints_the_table_last(tmp_path, capsys, monkeypatch):
    """The whole mode end to end with the timing faked (the CPU reference is far too slow to time)."""
    timed = []

    def fake_timing(fn, arg_sets, **kw):
        fn(*arg_sets[0])  # the real call, once: the implementations run
        timed.append(kw["device"])
        return {"us": 100.0 + len(timed), "min_us": 1.0, "max_us": 200.0, "groups": 10, "calls_per_group": 20}

    monkeypatch.setattr(W, "time_back_to_back", fake_timing)
    argv = ["--workload", "1,4,2,64,32,1", "--device", "cpu", "--out", str(tmp_path), "--warmups", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("| custom 1,4,2,64,32,1 | B1 H4/2 N64 d32 causal | 101 (quantized)")
    (path,) = tmp_path.glob("*_workloads.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == W.KIND and doc["metadata"]["command"].endswith(" ".join(argv))
    (rec,) = doc["workloads"]
    assert rec["heads_kv"] == 2 and rec["results"]["auto"]["path"] == "quantattn kernel" and timed == ["cpu"] * 3
    assert cli.main(["--from-json", str(path)]) == 0
    assert "| custom 1,4,2,64,32,1 |" in capsys.readouterr().out


def test_a_shape_the_hopper_backend_refuses_runs_the_quantized_choice(monkeypatch):
    monkeypatch.setattr(W, "quantattn_backend", lambda w, device: "hopper")  # on the CPU, hopper refuses
    monkeypatch.setattr(W, "time_back_to_back", lambda fn, sets, **kw: fn(*sets[0]) is None or {"us": 1.0, "groups": 1})
    rec = W.measure(W.parse_workload("1,2,2,32,16,0"), device="cpu", warmups=0, log=lambda text: None)
    quant = rec["results"]["quantattn"]
    assert quant["backend"] == "quantized" and "cannot run this call" in quant["hopper_refused"]
