"""backend="auto" and torch's SDPA: speed tables from benchmark results, their lookup, the dispatch (on a
faked GPU), and the SDPA call's result on the CPU.

Marker `gpu`: backend="auto" and the speed table on a real GPU: on a GPU with a table (the shipped H100 one), auto
gives torch's SDPA exactly the shapes the table names, the result is torch SDPA's, forced backends and
backend="quantized" never do; on a GPU without one nothing changes. (The suite's conftest turns the
fallback off; these tests turn it on.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import types

import pytest
import torch
from helpers import GPU, pytest_marks

import quantattn
from quantattn import backends as B
from quantattn.backends import sdpa as S
from quantattn.backends import speed_table as T
from quantattn.bench import cli
from quantattn.bench import speed_table as G
from quantattn.config import VARIANTS, QuantConfig

H100 = "NVIDIA H100 80GB HBM3"
SAGE2 = VARIANTS["sage2-8b"]


@pytest.fixture(autouse=True)
def enabled(request, monkeypatch, tmp_path):
    """The fallback on (the suite's conftest turns it off), an empty user folder, fresh caches. (The GPU
    tests' user folder is named no_user_tables: on the GPU the shipped table is the one found.)"""
    user_dir = "no_user_tables" if request.node.get_closest_marker("gpu") else "user_tables"
    monkeypatch.setenv(T.ENV_OFF, "1")
    monkeypatch.setenv(T.ENV_DIR, str(tmp_path / user_dir))
    T.reload()
    S.reset_fallbacks()
    yield
    T.reload()
    S.reset_fallbacks()


# ---- a synthetic benchmark result ------------------------------------------------------------------


def bench_doc(times: dict, device=H100, sdpa_flash_factor=1.5) -> dict:
    """A format-1 result: times {(impl, head_dim, causal, N): median ms} for quantattn implementations and
    "sdpa-cudnn"; sdpa-flash is slower than cuDNN by sdpa_flash_factor."""
    impls = {
        "sage2-8b": {"kind": "quantattn", "config": SAGE2.name, "available": True, "backend": "triton"},
        "sage2-8b-hopper": {"kind": "quantattn", "config": SAGE2.name, "available": True, "backend": "hopper"},
        "sdpa-cudnn": {"kind": "sdpa", "available": True},
        "sdpa-flash": {"kind": "sdpa", "available": True},
    }
    speed = []
    for (impl, d, causal, n), ms in times.items():
        base = {"head_dim": d, "causal": causal, "seq_len": n, "batch": 4, "heads": 32, "timing": "whole"}
        speed.append({**base, "implementation": impl, "median_ms": ms, "tops": 1.0 / ms})
        if impl == "sdpa-cudnn":
            speed.append({**base, "implementation": "sdpa-flash", "median_ms": ms * sdpa_flash_factor, "tops": 1.0})
        speed.append({**base, "implementation": impl, "timing": "kernel", "median_ms": ms / 100, "tops": 1.0})
    meta = {"device": device, "compute_capability": "9.0", "date": "2026-12-06", "command": "python -m quantattn.bench"}
    return {"format": 1, "metadata": meta, "implementations": impls, "speed": speed, "accuracy": []}


def crossover_doc(ratios: dict[int, float], d=128, causal=False, impl="sage2-8b-hopper") -> dict:
    """cuDNN takes 1 ms everywhere; the implementation takes `ratio` ms at each N."""
    times = {}
    for n, ratio in ratios.items():
        times[("sdpa-cudnn", d, causal, n)] = 1.0
        times[(impl, d, causal, n)] = ratio
    return bench_doc(times)


# ---- the generator ----------------------------------------------------------------------------------


def test_table_from_results_marks_where_the_best_sdpa_was_faster():
    doc = crossover_doc({1024: 2.0, 2048: 1.2, 4096: 0.99, 8192: 0.8})
    table = G.table_from_results([doc], ["run.json"])
    assert table["device"] == H100 and table["kind"] == T.KIND and table["sources"][0]["file"] == "run.json"
    (entry,) = table["entries"]
    assert entry["backend"] == "hopper" and entry["config"] == dataclasses.asdict(SAGE2) and entry["head_dim"] == 128
    assert entry["seq_lens"] == [1024, 2048, 4096, 8192]
    assert entry["ratios"] == [2.0, 1.2, 0.99, 0.8]
    assert entry["sdpa_faster"] == [True, True, False, False]
    assert entry["sdpa_fastest"] == ["CUDNN_ATTENTION"] * 4  # flash was the slower SDPA backend


def test_the_comparison_is_against_the_fastest_sdpa_backend_of_the_same_run():
    times = {("sdpa-cudnn", 64, True, 1024): 1.0, ("sage2-8b", 64, True, 1024): 1.3}
    (entry,) = G.table_from_results([bench_doc(times, sdpa_flash_factor=0.5)])["entries"]
    assert entry["ratios"] == [2.6]  # flash (0.5 ms) was the faster SDPA here
    assert entry["sdpa_fastest"] == ["FLASH_ATTENTION"]
    assert entry["backend"] == "triton"


def test_several_runs_average_their_ratios_and_margin_moves_the_verdict():
    a, b = crossover_doc({4096: 1.10}), crossover_doc({4096: 0.96})
    (entry,) = G.table_from_results([a, b])["entries"]
    assert entry["ratios"] == [1.03] and entry["sdpa_faster"] == [True]
    (entry,) = G.table_from_results([a, b], margin=0.05)["entries"]
    assert entry["sdpa_faster"] == [False]


def test_generator_refuses_mixed_gpus_cpu_runs_and_results_without_pairs():
    with pytest.raises(ValueError, match="one GPU model"):
        G.table_from_results([crossover_doc({1024: 2.0}), bench_doc({}, device="NVIDIA H200")])
    with pytest.raises(ValueError, match="CPU"):
        G.table_from_results([bench_doc({("sdpa-cudnn", 64, False, 64): 1.0}, device="cpu (x86_64), self-test")])
    with pytest.raises(ValueError, match="no quantattn whole call"):
        G.table_from_results([bench_doc({("sdpa-cudnn", 64, False, 1024): 1.0})])


def test_errors_and_skips_are_left_out():
    doc = crossover_doc({1024: 2.0, 2048: 1.5})
    for r in doc["speed"]:
        if r["seq_len"] == 2048 and r["implementation"] == "sage2-8b-hopper":
            del r["median_ms"]
            r["error"] = "boom"
    (entry,) = G.table_from_results([doc])["entries"]
    assert entry["seq_lens"] == [1024]


def test_write_and_load_round_trip(tmp_path):
    table = G.table_from_results([crossover_doc({1024: 2.0, 2048: 0.9})])
    path = G.write_table(table, G.resolve_path(tmp_path, H100))
    assert path == tmp_path / "nvidia-h100-80gb-hbm3.json"
    loaded = T.load(path, H100)
    assert loaded.lookup("hopper", 128, False, SAGE2, 1024) is not None
    with pytest.raises(ValueError, match="written for"):
        T.load(path, "NVIDIA H200")
    assert G.resolve_path(tmp_path / "x.json", H100) == tmp_path / "x.json"
    assert G.resolve_path(None, H100) == T.user_dir() / "nvidia-h100-80gb-hbm3.json"


def test_the_shipped_h100_table_regenerates_from_the_results_it_names():
    """Regenerating it from the committed results gives the committed file (the command in the Makefile)."""
    shipped = json.loads((T.SHIPPED_DIR / "nvidia-h100-80gb-hbm3.json").read_text())
    files = [s["file"] for s in shipped["sources"]]
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not all((root / f).is_file() for f in files):
        pytest.skip("the benchmark results the shipped table names are not in this checkout")
    from quantattn.bench import report

    regenerated = G.table_from_results([report.load(root / f) for f in files], files, shipped["margin"])
    assert regenerated == shipped
    T.SpeedTable(shipped)  # and it loads


# ---- the lookup -------------------------------------------------------------------------------------


def spans(points: dict[int, bool]):
    return [(s.lo, s.hi) for s in T.sdpa_spans(list(points), list(points.values()))]


def test_a_span_runs_the_sdpa_backend_fastest_at_most_of_its_points():
    (span,) = T.sdpa_spans([1, 2, 3], [True] * 3, "x", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "CUDNN_ATTENTION"])
    assert span.sdpa == "CUDNN_ATTENTION" and span.reason == "x, every N (CUDNN_ATTENTION)"
    (span,) = T.sdpa_spans([1, 2], [True] * 2, "x", ["FLASH_ATTENTION", "CUDNN_ATTENTION"])
    assert span.sdpa == "FLASH_ATTENTION"  # a tie: the first


def test_spans_extend_past_the_measured_ends_and_need_both_neighbours_inside():
    assert spans({1024: True, 2048: True, 4096: False, 8192: False}) == [(0, 2048)]
    assert spans({1024: False, 2048: True, 4096: True}) == [(2048, math.inf)]
    assert spans({1024: True, 2048: False, 4096: True, 8192: True, 16384: False}) == [(0, 1024), (4096, 8192)]
    assert spans({1024: True, 2048: True}) == [(0, math.inf)]
    assert spans({1024: False, 4096: False}) == []
    assert spans({}) == []


def table_of(points: dict[int, bool], d=128, causal=False, backend="hopper", cfg=SAGE2, device=H100):
    entry = {
        "backend": backend, "config": vars(cfg), "head_dim": d, "causal": causal,
        "seq_lens": list(points), "sdpa_faster": list(points.values()),
        "sdpa_fastest": ["CUDNN_ATTENTION"] * len(points),
    }  # fmt: skip
    return {"format": T.FORMAT, "kind": T.KIND, "device": device, "entries": [entry]}


@pytest.mark.parametrize(
    "n, sdpa",
    [(1, True), (1024, True), (2048, True), (2049, False), (3000, False), (4096, False), (6000, False),
     (8192, False), (12000, False), (16384, True), (1 << 20, True)],
)  # fmt: skip
def test_lookup_boundaries(n, sdpa):
    # SDPA faster at 1K, 2K, 16K, 32K; between 8K and 16K only one neighbour says so: the kernels keep it
    table = T.SpeedTable(table_of({1024: True, 2048: True, 4096: False, 8192: False, 16384: True, 32768: True}))
    assert (table.lookup("hopper", 128, False, SAGE2, n) is not None) is sdpa


def test_lookup_misses_keep_the_kernels():
    table = T.SpeedTable(table_of({1024: True, 2048: True}))
    assert table.lookup("hopper", 128, False, SAGE2, 1024)
    assert table.lookup("hopper", 64, False, SAGE2, 1024) is None  # unmeasured head_dim
    assert table.lookup("hopper", 128, True, SAGE2, 1024) is None  # unmeasured causal
    assert table.lookup("triton", 128, False, SAGE2, 1024) is None  # another backend
    assert table.lookup("hopper", 128, False, VARIANTS["sage1"], 1024) is None  # another configuration


def test_broken_documents_say_what_is_wrong():
    with pytest.raises(ValueError, match="not a quantattn speed table"):
        T.SpeedTable({"format": 1})
    bad = table_of({1024: True})
    del bad["entries"][0]["seq_lens"]
    with pytest.raises(ValueError, match="lacks seq_lens"):
        T.SpeedTable(bad)
    bad = table_of({1024: True})
    bad["entries"][0]["sdpa_fastest"] = ["XLA"]
    with pytest.raises(ValueError, match="unknown SDPA backends"):
        T.SpeedTable(bad)


def fake_gpu(monkeypatch, name=H100):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    T.reload()


def test_table_for_device_finds_the_shipped_h100_table_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: calls.append(index) or H100)
    T.reload()
    table = T.table_for_device(0)
    assert table is not None and table.device == H100 and table.source.endswith("nvidia-h100-80gb-hbm3.json")
    assert T.table_for_device(0) is table and calls == [0]  # cached per device index


def test_unknown_gpu_has_no_table(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")
    assert T.table_for_device(0) is None


def test_env_turns_the_fallback_off(monkeypatch):
    fake_gpu(monkeypatch)
    monkeypatch.setenv(T.ENV_OFF, "0")
    T.reload()
    assert T.table_for_device(0) is None


def test_user_table_wins_and_a_broken_one_is_skipped_with_a_warning(monkeypatch, caplog):
    fake_gpu(monkeypatch)
    user = T.user_dir() / "nvidia-h100-80gb-hbm3.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps(table_of({1024: False})))
    assert T.table_for_device(0).source == str(user)
    user.write_text("{not json")
    T.reload()
    with caplog.at_level(logging.WARNING, logger="quantattn"):
        assert T.table_for_device(0).source.startswith(str(T.SHIPPED_DIR))
    assert "ignoring speed table" in caplog.text


def test_normalized_names():
    assert T.normalized_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert T.normalized_name("NVIDIA H100 PCIe") == "nvidia-h100-pcie"
    assert T.normalized_name("  ") == "unknown-gpu"


# ---- the dispatch, on a faked GPU ---------------------------------------------------------------------


def fake_tensor(b, h, n, d, requires_grad=False):
    return types.SimpleNamespace(
        device=torch.device("cuda", 0), shape=(b, h, n, d), requires_grad=requires_grad, dtype=torch.bfloat16
    )


def fake_call(n=1024, nk=None, d=128, causal=False, hq=4, hkv=4, cfg=SAGE2, **kw):
    q = fake_tensor(2, hq, n, d, kw.pop("q_grad", False))
    k, v = fake_tensor(2, hkv, n if nk is None else nk, d), fake_tensor(2, hkv, n if nk is None else nk, d)
    return B.AttentionCall(q, k, v, cfg, causal, d**-0.5, out=None, lse=kw.pop("lse", None), **kw)


@pytest.fixture
def gpu(monkeypatch):
    """A faked H100: the shipped table is read for device 0, and both quantized backends take any call."""
    fake_gpu(monkeypatch)
    for name in ("hopper", "triton"):
        monkeypatch.setattr(B.BACKENDS[name], "reasons", lambda call: [])
    return B.BACKENDS


SHIPPED = T.load(T.SHIPPED_DIR / "nvidia-h100-80gb-hbm3.json")


@pytest.mark.parametrize("n", [128, 1024, 1500, 2048, 4096, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_auto_takes_sdpa_exactly_where_the_table_says(gpu, n, d, causal):
    call = fake_call(n, d=d, causal=causal)
    chosen = B.select_backend(call, "auto")
    kernel = "hopper" if n >= B.HopperBackend.AUTO_MIN_QUERIES else "triton"
    expected = SHIPPED.lookup(kernel, d, causal, SAGE2, n)
    assert isinstance(chosen, B.SdpaBackend) is (expected is not None)
    if expected is not None:
        assert S.fallbacks == {expected.reason: 1}
        assert chosen.only == expected.sdpa == "CUDNN_ATTENTION"  # the measured fastest, not torch's first choice
    else:
        assert chosen is gpu[kernel] and not S.fallbacks
    if d == 80:
        assert expected is None  # the table measured head_dim 64 and 128 only


def test_shipped_h100_table_at_the_readme_crossovers(gpu):
    def takes(n, d=128, causal=False):
        return isinstance(B.select_backend(fake_call(n, d=d, causal=causal), "auto"), B.SdpaBackend)

    assert takes(1024) and takes(2048) and not takes(4096) and not takes(16384)
    assert takes(4096, causal=True) and not takes(16384, causal=True)


@pytest.mark.parametrize("backend", ["hopper", "triton", "quantized"])
def test_forced_backends_and_quantized_never_take_sdpa(gpu, backend):
    chosen = B.select_backend(fake_call(1024), backend)
    assert chosen is gpu["hopper" if backend == "quantized" else backend] and not S.fallbacks


@pytest.mark.parametrize(
    "kw",
    [
        {"lse": object()},
        {"attn_mask": object()},
        {"key_lengths": object()},
        {"cu_seqlens_q": object(), "cu_seqlens_k": object()},
        {"nk": 2048},  # Nq != Nk: not what the table measured (and SDPA's causal alignment differs)
        {"q_grad": True},  # training keeps quantattn's forward and backward
    ],
)
def test_calls_sdpa_would_not_compute_alike_keep_the_kernels(gpu, kw):
    assert B.select_backend(fake_call(1024, **kw), "auto") is gpu["hopper"] and not S.fallbacks


def test_no_table_or_switched_off_keeps_todays_choice(gpu, monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H200")
    assert B.select_backend(fake_call(1024), "auto") is gpu["hopper"]
    fake_gpu(monkeypatch)
    monkeypatch.setenv(T.ENV_OFF, "0")
    T.reload()
    assert B.select_backend(fake_call(1024), "auto") is gpu["hopper"] and not S.fallbacks


def test_fallback_is_said_once_per_reason_and_counted_in_the_integrations_counter(gpu, caplog):
    from quantattn.integrations import fallbacks

    with caplog.at_level(logging.WARNING, logger="quantattn"):
        for n in (1024, 1024, 2048):
            B.select_backend(fake_call(n), "auto")
        B.select_backend(fake_call(1024, causal=True), "auto")
    assert sum(fallbacks.values()) == 4 and len(fallbacks) == 2  # 1K and 2K share their span's reason
    said = [r.message for r in caplog.records if "backend='auto' runs torch SDPA" in r.message]
    assert len(said) == 2 and "head_dim 128, causal off, N <= 2K" in said[0]


def test_unknown_backend_names_list_the_choices():
    with pytest.raises(ValueError, match="'auto', 'quantized', 'hopper'"):
        B.select_backend(fake_call(), "sdpa")


# ---- the SDPA call itself: result equal to torch SDPA's -----------------------------------------------


@pytest.fixture
def auto_is_sdpa(monkeypatch):
    """The dispatch answers AUTO_SDPA for backend="auto" (as on an H100 at a short length)."""
    real = B.select_backend
    monkeypatch.setattr(
        B, "select_backend", lambda call, requested: B.AUTO_SDPA if requested == "auto" else real(call, requested)
    )


def reference_sdpa(q, k, v, causal, scale, layout):
    to_hnd = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    qh, kh, vh = to_hnd(q), to_hnd(k), to_hnd(v)
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    return to_hnd(out)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_auto_sdpa_result_equals_torch_sdpa(auto_is_sdpa, qa, layout, hq, hkv, causal, scale):
    q, k, v = qa.make_qkv(3, b=2, hq=hq, hkv=hkv, nq=96, d=64, dtype=torch.bfloat16)
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = quantattn.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale)
    want = reference_sdpa(q, k, v, causal, scale, layout)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_auto_sdpa_without_enable_gqa_repeats_the_heads(auto_is_sdpa, qa, monkeypatch):
    monkeypatch.setattr(S, "SDPA_HAS_GQA", False)
    q, k, v = qa.make_qkv(4, b=1, hq=6, hkv=2, nq=64, d=32, dtype=torch.bfloat16)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    torch.testing.assert_close(out, reference_sdpa(q, k, v, True, None, "HND"), atol=0, rtol=0)


@pytest.mark.parametrize("only", ["CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH"])
def test_the_measured_sdpa_backend_runs_alone_and_the_switches_come_back(qa, monkeypatch, only):
    """Whatever the switches allow on the CPU (where cuDNN does not run, torch's own choice takes the call),
    the result is torch SDPA's and the switches are as they were."""
    monkeypatch.setattr(B, "select_backend", lambda call, requested: B.SDPA_BACKENDS[only])
    switches = [enabled() for enabled, _ in S._SWITCHES.values()]
    q, k, v = qa.make_qkv(7, b=1, hq=4, hkv=2, nq=80, d=32, dtype=torch.bfloat16)
    out = quantattn.sageattn(q, k, v, is_causal=True, sm_scale=0.2)
    assert [enabled() for enabled, _ in S._SWITCHES.values()] == switches
    want = reference_sdpa(q, k, v, True, 0.2, "HND")
    exact = only != "MATH"  # the math kernel rounds differently in bf16
    torch.testing.assert_close(out, want, atol=0 if exact else 1e-2, rtol=0 if exact else 1e-2)


def test_a_refusal_of_the_measured_backend_restores_the_switches_first(monkeypatch):
    seen = []

    def sdpa(call):
        seen.append([enabled() for enabled, _ in S._SWITCHES.values()])
        if len(seen) == 1:
            raise RuntimeError("No available kernel. Aborting execution.")
        return "torch's choice"

    backend = S.SdpaBackend("CUDNN_ATTENTION")
    monkeypatch.setattr(backend, "_sdpa", sdpa)
    before = [enabled() for enabled, _ in S._SWITCHES.values()]
    assert backend.run(None) == "torch's choice"
    assert seen == [[False, False, False, True], before]


def test_auto_sdpa_with_empty_inputs(auto_is_sdpa, qa):
    q, k, v = qa.make_qkv(5, b=0, hq=2, nq=16, d=32, dtype=torch.bfloat16)
    assert quantattn.sageattn(q, k, v).shape == q.shape


def test_auto_sdpa_calls_the_original_sdpa_not_a_patched_one(auto_is_sdpa, qa, monkeypatch):
    """Under quantattn.patch() F.scaled_dot_product_attention is quantattn's: auto must not call back into it."""

    def patched(*args, **kwargs):
        raise AssertionError("auto's SDPA path called the patched function")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", patched)
    q, k, v = qa.make_qkv(6, b=1, hq=2, nq=64, d=32, dtype=torch.bfloat16)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    torch.testing.assert_close(out, S.ORIGINAL_SDPA(q, k, v, is_causal=True), atol=0, rtol=0)


# ---- the bench option ------------------------------------------------------------------------------


def test_bench_from_json_writes_the_speed_table(tmp_path, capsys):
    results = tmp_path / "run.json"
    results.write_text(json.dumps(crossover_doc({1024: 2.0, 2048: 0.9})))
    out = tmp_path / "tables"
    code = cli.main(["--from-json", str(results), "--write-speed-table", str(out), "--out", str(tmp_path / "charts")])
    assert code == 0
    table = json.loads((out / "nvidia-h100-80gb-hbm3.json").read_text())
    assert table["entries"][0]["sdpa_faster"] == [True, False]
    assert "SDPA at N <= 1K" in capsys.readouterr().out


def test_bench_write_speed_table_defaults_to_autos_location(tmp_path):
    results = tmp_path / "run.json"
    results.write_text(json.dumps(crossover_doc({1024: 2.0})))
    assert cli.main(["--from-json", str(results), "--write-speed-table", "--out", str(tmp_path)]) == 0
    assert (T.user_dir() / "nvidia-h100-80gb-hbm3.json").is_file()


def test_speed_table_command(tmp_path, capsys):
    results = tmp_path / "run.json"
    results.write_text(json.dumps(crossover_doc({1024: 1.04}, d=64, causal=True, impl="sage2-8b")))
    assert G.main([str(results), "--out", str(tmp_path / "t.json"), "--margin", "0.05"]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["margin"] == 0.05 and table["entries"][0]["sdpa_faster"] == [False]
    assert G.main([str(tmp_path / "missing.json")]) == 1
    assert isinstance(QuantConfig(**table["entries"][0]["config"]), QuantConfig)


def test_concurrent_fallbacks_leave_the_switches_as_they_were(monkeypatch):
    import threading
    import time

    backend = S.SdpaBackend("CUDNN_ATTENTION")

    def sdpa(call):
        time.sleep(0.001)  # another thread would save the switches while this one holds them changed
        return [enabled() for enabled, _ in S._SWITCHES.values()]

    monkeypatch.setattr(backend, "_sdpa", sdpa)
    before = [enabled() for enabled, _ in S._SWITCHES.values()]
    seen = []
    threads = [threading.Thread(target=lambda: seen.extend(backend.run(None) for _ in range(20))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == [False, False, False, True] for s in seen) and len(seen) == 80
    assert [enabled() for enabled, _ in S._SWITCHES.values()] == before


# ==================================================================================================
# On a real GPU (marker: gpu) (the autouse fixture `enabled` above applies)

DEV = "cuda"


def table():
    return T.table_for_device(torch.cuda.current_device())


def qkv(b, hq, hkv, n, d, layout="HND", seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = [(b, hq, n, d), (b, hkv, n, d), (b, hkv, n, d)]
    ts = [torch.randn(s, generator=g, device=DEV, dtype=torch.bfloat16) for s in shapes]
    return ts if layout == "HND" else [t.transpose(1, 2).contiguous() for t in ts]


def sdpa_expected(q, k, v, causal, scale, layout, only=None, repeat=False):
    """torch SDPA as a user calls it (enable_gqa for grouped heads; `only`: that SDPA backend alone, by
    torch's sdpa_kernel), or with K/V heads repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    to_hnd = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    qh, kh, vh = to_hnd(q), to_hnd(k), to_hnd(v)
    group = qh.shape[1] // kh.shape[1]
    if repeat:
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    gqa = {"enable_gqa": True} if kh.shape[1] != qh.shape[1] else {}
    with sdpa_kernel(getattr(SDPBackend, only)) if only else contextlib.nullcontext():
        return to_hnd(S.ORIGINAL_SDPA(qh, kh, vh, is_causal=causal, scale=scale, **gqa))


@pytest_marks(GPU)
def test_this_gpu_has_the_table_it_should():
    name = torch.cuda.get_device_name()
    shipped = (T.SHIPPED_DIR / f"{T.normalized_name(name)}.json").is_file()
    assert (table() is not None) is shipped, name


@pytest_marks(GPU)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("hq, hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, d", [(1024, 128), (2048, 64), (4096, 128), (16384, 64)])
def test_auto_takes_sdpa_exactly_where_the_table_says_and_equals_it(layout, hq, hkv, causal, n, d, caplog):
    t = table()
    if t is None:
        pytest.skip(f"no speed table for {torch.cuda.get_device_name()}")
    q, k, v = qkv(1, hq, hkv, n, d, layout)
    scale = 0.1
    with caplog.at_level(logging.WARNING, logger="quantattn"):
        out = quantattn.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale)
    call = _call(q, k, v, layout, causal)
    hopper = B.BACKENDS["hopper"]
    kernel = "hopper" if hopper.prefers(call) and not hopper.reasons(call) else "triton"
    span = t.lookup(kernel, d, causal, QuantConfig(), n)
    assert (sum(S.fallbacks.values()) == 1) is (span is not None)
    if span is not None:
        assert S.fallbacks[span.reason] == 1 and "backend='auto' runs torch SDPA" in caplog.text
        # the very same computation as the user's own SDPA call, and close to SDPA on repeated heads
        want = sdpa_expected(q, k, v, causal, scale, layout, span.sdpa)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        torch.testing.assert_close(out, sdpa_expected(q, k, v, causal, scale, layout, repeat=True))
        assert out.is_contiguous() and out.shape == q.shape
    else:
        quantized = quantattn.sageattn(
            q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale, backend="quantized"
        )
        torch.testing.assert_close(out, quantized)  # the kernel's result (bitwise where the kernel is deterministic)


def _call(q, k, v, layout, causal):
    to_hnd = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    qh = to_hnd(q)
    return B.AttentionCall(qh, to_hnd(k), to_hnd(v), QuantConfig(), causal, 1.0, torch.empty_like(qh), None)


@pytest_marks(GPU)
@pytest.mark.parametrize("backend", ["hopper", "triton", "quantized"])
def test_forced_backends_never_take_sdpa(backend):
    if backend == "hopper" and B.BACKENDS["hopper"].reasons(_call(*qkv(1, 8, 8, 1024, 128), "HND", False)):
        pytest.skip("the Hopper backend does not run here")
    q, k, v = qkv(1, 8, 8, 1024, 128)
    quantattn.sageattn(q, k, v, backend=backend)
    assert not S.fallbacks


@pytest_marks(GPU)
def test_masks_lse_and_unequal_lengths_keep_the_kernels():
    q, k, v = qkv(1, 8, 8, 1024, 128)
    quantattn.sageattn(q, k, v, return_lse=True)
    quantattn.sageattn(q, k, v, attn_mask=torch.ones(1024, 1024, dtype=torch.bool, device=DEV))
    quantattn.sageattn(q, k[:, :, :512], v[:, :, :512])
    assert not S.fallbacks


@pytest_marks(GPU)
def test_switched_off(monkeypatch):
    monkeypatch.setenv(T.ENV_OFF, "0")
    T.reload()
    q, k, v = qkv(1, 8, 8, 1024, 128)
    quantattn.sageattn(q, k, v)
    assert not S.fallbacks


@pytest_marks(GPU)
def test_the_fallback_runs_the_sdpa_backend_the_table_measured():
    """torch's own priority puts FlashAttention-2 first; the H100 table measured cuDNN fastest."""
    t = table()
    if t is None:
        pytest.skip("no speed table for this GPU")
    q, k, v = qkv(4, 32, 32, 1024, 128)
    span = t.lookup("hopper", 128, False, QuantConfig(), 1024) or t.lookup("triton", 128, False, QuantConfig(), 1024)
    if span is None or span.sdpa != "CUDNN_ATTENTION":
        pytest.skip("the table does not give this shape to cuDNN")
    quantattn.sageattn(q, k, v)  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        quantattn.sageattn(q, k, v)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # cuDNN's own kernels carry "flash" in their names too (cudnn_..._sdpa_sm90_flash_fprop_...): the
    # attention kernel must be cuDNN's, and none FlashAttention-2's (pytorch_flash::flash_fwd_kernel)
    attention = [n for n in names if "sdpa" in n.lower() or "flash" in n.lower() or "attention" in n.lower()]
    assert attention and all("cudnn" in n.lower() for n in attention), names
    switches = [enabled() for enabled, _ in S._SWITCHES.values()]
    assert switches == [True, True, True, True]  # restored (torch's defaults)


@pytest_marks(GPU)
def test_under_patched_sdpa_the_fallback_is_torch_sdpa():
    if table() is None:
        pytest.skip("no speed table for this GPU")
    q, k, v = qkv(1, 8, 8, 1024, 128)
    with quantattn.patched():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if S.fallbacks:  # the table names 1K causal on this GPU
        torch.testing.assert_close(out, S.ORIGINAL_SDPA(q, k, v, is_causal=True))  # exact attention, another kernel
