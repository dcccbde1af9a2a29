"""python -m quantattn.bench.decode: arguments, the no-GPU exit, and a CPU self-test of the whole run."""

from __future__ import annotations

import json

import pytest
import torch

from quantattn.bench import decode as bench


def test_defaults_are_the_decode_protocol():
    settings = bench.settings_from(bench.parser().parse_args([]))
    assert (settings["batch"], settings["heads"], settings["kv_heads"], settings["head_dim"]) == (8, 32, 8, 128)
    assert settings["nqs"] == [1, 16]
    assert settings["seq_lens"] == [4096, 8192, 16384, 32768, 65536, 131072]
    quick = bench.settings_from(bench.parser().parse_args(["--quick", "--nq", "4"]))
    assert quick["seq_lens"] == [4096, 32768] and quick["nqs"] == [4] and quick["min_repeats"] < 30
    explicit = bench.settings_from(bench.parser().parse_args(["--seq-lens", "8K", "100", "--batch", "2"]))
    assert explicit["seq_lens"] == [8192, 100] and explicit["batch"] == 2


@pytest.mark.parametrize(
    ("argv", "text"),
    [(["--nq", "17"], "1 to 16"), (["--heads", "12", "--kv-heads", "8"], "multiple"), (["--batch", "0"], "positive")],
)
def test_bad_settings_exit_with_a_message(argv, text):
    with pytest.raises(SystemExit, match=text):
        bench.settings_from(bench.parser().parse_args(argv))


def test_no_gpu_exits_nonzero_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == bench.EXIT_NO_GPU != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bytes_per_call():
    # d = 128: 264 bytes per token and kv head for full blocks, against 512 for bf16 K and V
    assert bench.cache_bytes_read(1, 1, 64, 128) == 64 * 132 + 64 * 128 + 128 * 4 + 128 * 4
    assert bench.cache_bytes_read(1, 1, 1, 128) == 132 + 256 + 512
    assert bench.bf16_kv_bytes(2, 8, 4096, 128) == 2 * 8 * 4096 * 512


def test_cpu_self_test_writes_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["--device", "cpu", "--batch", "1", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
            "--nq", "2", "--seq-lens", "100", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["format"] == bench.FORMAT
    assert result["metadata"]["command"].startswith("python -m quantattn.bench.decode --device cpu")
    ours = next(r for r in result["speed"] if r["impl"] == "quantattn")
    assert ours["eager"]["median_us"] > 0 and ours["cache_nbytes"] > 0
    sdpa = [r for r in result["speed"] if r["impl"].startswith("sdpa-") and "eager" in r]
    assert sdpa and all(r["rel_l1_quantattn_vs_this"] < 0.1 for r in sdpa)
    assert result["append"][0]["eager"]["median_us"] > 0
    assert "quantattn" in capsys.readouterr().out
