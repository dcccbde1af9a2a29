"""`python -m quantattn.info`, the environment report: it runs on any machine and names every backend."""

from __future__ import annotations

import subprocess
import sys

from quantattn import info


def test_report_names_every_backend_and_the_auto_choices():
    rows = dict(info.report())
    for name in ("quantattn", "torch", "triton", "GPU", "backend hopper", "backend triton", "backend reference"):
        assert any(key.startswith(name) for key in rows), f"no {name!r} row"
    autos = [key for key in rows if key.startswith("auto: ")]
    assert len(autos) == len(info.TYPICAL)
    assert all(value.strip() for value in rows.values())


def test_command_runs():
    res = subprocess.run([sys.executable, "-m", "quantattn.info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "backend reference" in res.stdout and "auto: " in res.stdout
