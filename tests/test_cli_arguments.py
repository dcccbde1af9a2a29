"""The command-line tools refuse bad sizes before they allocate anything: zero, negative or non-numeric
sizes, head dims quantattn cannot take, and runs too large for the device's free memory end with
argparse's exit status 2 and a message that names the argument, never a traceback, a table of NaN or an
attempt to allocate terabytes."""

from __future__ import annotations

import pytest
import torch

from quantattn import __main__ as quick_cli
from quantattn.accuracy import cli as accuracy_cli
from quantattn.bench import cli as bench_cli

GiB = 2**30
TOOLS = {
    "quantattn": (quick_cli.main, []),
    "quantattn.accuracy": (accuracy_cli.main, ["--quiet"]),
    "quantattn.bench": (bench_cli.main, ["--device", "cpu"]),
}


def refused(tool: str, argv: list[str], capsys) -> str:
    main, base = TOOLS[tool]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("quantattn", ["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
        ("quantattn", ["--seq-len", "-4"], "argument --seq-len: must be a positive integer, got -4"),
        ("quantattn", ["--head-dim", "300"], "argument --head-dim: must be between 1 and 256"),
        ("quantattn.accuracy", ["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
        ("quantattn.accuracy", ["--heads", "-2"], "argument --heads: must be a positive integer, got -2"),
        ("quantattn.accuracy", ["--head-dims", "0"], "argument --head-dims: must be a positive integer, got 0"),
        ("quantattn.accuracy", ["--head-dims", "512"], "argument --head-dims: must be between 1 and 256"),
        ("quantattn.accuracy", ["--shape", "1,2,0,64"], "argument --shape: must be a positive integer, got 0"),
        ("quantattn.accuracy", ["--shape", "1,2"], "argument --shape: must be four comma-separated sizes"),
        ("quantattn.bench", ["--warmups", "-1"], "argument --warmups: must be a non-negative integer, got -1"),
        ("quantattn.bench", ["--stop-after", "-5"], "argument --stop-after: must be a non-negative number of seconds"),
        ("quantattn.bench", ["--head-dims", "512"], "argument --head-dims: must be between 1 and 256"),
    ],
)  # fmt: skip
def test_bad_sizes_are_refused_with_the_arguments_name(tool, argv, message, capsys):
    assert message in refused(tool, argv, capsys)


@pytest.mark.parametrize(
    "tool, argv",
    [
        ("quantattn", ["--seq-len", "10000000"]),
        ("quantattn.accuracy", ["--seq-lens", "100000K", "--batch", "64"]),
        ("quantattn.accuracy", ["--shape", "64,64,1000000,128"]),
        ("quantattn.bench", ["--seq-lens", "1000000K"]),
    ],
)
def test_runs_too_large_for_memory_stop_before_allocating(tool, argv, capsys, monkeypatch):
    from quantattn import cli_args

    monkeypatch.setattr(cli_args, "available_bytes", lambda device: 16 * GiB)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("allocated inputs before checking the size"))
    message = refused(tool, argv, capsys)
    assert "GiB, and the host has 16.0 GiB free: choose smaller sizes" in message


def test_the_estimate_grows_with_every_size_and_counts_the_fp64_truth():
    from quantattn import cli_args

    base = cli_args.attention_run_bytes(1, 8, 4096, 4096, 128)
    for bigger in ((2, 8, 4096, 4096, 128), (1, 16, 4096, 4096, 128), (1, 8, 8192, 8192, 128), (1, 8, 4096, 4096, 256)):
        assert cli_args.attention_run_bytes(*bigger) > base
    inputs_only = 2 * 3 * 8 * 4096 * 128
    assert cli_args.attention_run_bytes(1, 8, 4096, 4096, 128, fp64=False) > inputs_only
    assert base > 4 * inputs_only  # q, k, v and the output again in float64
    assert (
        cli_args.check_fits(base, torch.device("cpu"), "x") is None
        or cli_args.available_bytes(torch.device("cpu")) < base
    )
