"""quantattn.settings: every QUANTATTN_* variable read once, in one place, with its documented meaning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantattn import settings
from quantattn.settings import Settings

PACKAGE = Path(__file__).resolve().parents[1] / "quantattn"


def test_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings().experiment_kv_block is None  # the numerics are the variant's unless an experiment says so


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"QUANTATTN_HOPPER": "0"}, "hopper", False),
        ({"QUANTATTN_HOPPER": "1"}, "hopper", True),
        ({"QUANTATTN_AUTO_SDPA": "0"}, "auto_sdpa", False),
        ({"QUANTATTN_HOPPER_PREPROCESS": "0"}, "hopper_preprocess", False),
        ({"QUANTATTN_HOPPER_RESIDENT": "0"}, "hopper_resident", False),
        ({"QUANTATTN_HOPPER_OVERLAP": "0"}, "hopper_overlap", False),
        ({"QUANTATTN_DIRECT_LAUNCH": "0"}, "direct_launch", False),
        ({"QUANTATTN_EXACT_CASTS": "1"}, "exact_casts", True),
        ({"QUANTATTN_EXACT_CASTS": "yes"}, "exact_casts", False),  # on by "1" only, as before
        ({"QUANTATTN_SPLIT_HEAD_DIM": "0"}, "split_head_dim", False),
        ({"QUANTATTN_TILE": "128,4,1"}, "tile", (128, 4, 1)),
        ({"QUANTATTN_BWD_TILE": "32,32,4,1"}, "bwd_tile", (32, 32, 4, 1)),
        ({"QUANTATTN_EXPERIMENT_KV_BLOCK": "64"}, "experiment_kv_block", 64),
        ({"QUANTATTN_CACHE": "/tmp/c"}, "cache_dir", "/tmp/c"),
        ({"QUANTATTN_NVRTC": "/x/libnvrtc.so"}, "nvrtc", "/x/libnvrtc.so"),
        ({"QUANTATTN_SPEED_TABLE_DIR": "/t"}, "speed_table_dir", "/t"),
        ({"QUANTATTN_TILE": ""}, "tile", None),
    ],
)
def test_each_variable(env, field, value):
    assert getattr(Settings.from_env(env), field) == value


def test_a_malformed_tile_says_which_variable():
    with pytest.raises(ValueError, match="QUANTATTN_TILE"):
        Settings.from_env({"QUANTATTN_TILE": "128,4"})


def test_reload_reads_the_environment_again(monkeypatch):
    monkeypatch.setenv("QUANTATTN_SPLIT_HEAD_DIM", "0")
    assert settings.reload().split_head_dim is False and settings.current.split_head_dim is False


def test_every_variable_is_read_here_and_documented():
    """No module reads a QUANTATTN_* variable itself, and the settings docstring names each one it reads."""
    readers = [
        p.relative_to(PACKAGE.parent)
        for p in PACKAGE.rglob("*.py")
        if p.name != "settings.py" and re.search(r"environ(\.get)?\(?\[?[\"']QUANTATTN_", p.read_text())
    ]
    assert readers == []
    source = (PACKAGE / "settings.py").read_text()
    read = set(re.findall(r"\"(QUANTATTN_[A-Z_]+)\"", source))
    documented = set(re.findall(r"^\s+(QUANTATTN_[A-Z_]+)", settings.__doc__, re.M))
    assert read and read == documented
