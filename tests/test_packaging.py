"""What pip installs: the sdist and the wheel built from it hold every file the package reads (the Hopper
backend's CUDA sources included), the installed wheel imports and finds them, and the declared
dependencies carry their platform markers.

The package is built from a copy of the source tree with setuptools' own build hooks, no isolation and
no network (seconds). Where setuptools cannot build wheels the tests skip, except under CI, where they
fail: CI must build the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantattn"
# what pyproject.toml reads besides the package (the readme is the long description)
PROJECT_FILES = ("pyproject.toml", "README.md")


def package_files() -> set[str]:
    """Every file of the source package a wheel must hold, as paths relative to ROOT (build outputs and
    caches left out)."""
    files = set()
    for path in PACKAGE.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
            files.add(path.relative_to(ROOT).as_posix())
    return files


def kernel_sources() -> list[str]:
    """The native backend's CUDA sources in the source tree (what it compiles at run time)."""
    return sorted(p.name for p in (PACKAGE / "hopper").iterdir() if p.suffix in (".cu", ".cuh"))


def build_backend_missing() -> str | None:
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed (pip install -e '.[test]' installs it)"
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            import wheel  # noqa: F401  # setuptools before 70.1 builds wheels with the wheel package
        except ImportError:
            return f"setuptools {setuptools.__version__} needs the wheel package to build wheels (70.1+ does not)"
    return None


def run_hook(source: Path, hook: str, out: Path) -> Path:
    """One PEP 517 hook of setuptools.build_meta run in `source`, in a subprocess (no network)."""
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=source, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"{hook} failed:\n{res.stdout}\n{res.stderr}"
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel): the sdist built from a copy of the source tree, the wheel built from the unpacked
    sdist, as pip does when it installs from an sdist."""
    reason = build_backend_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the wheel: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    shutil.copytree(PACKAGE, tree / "quantattn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, tree / name)
    dist = tmp / "dist"
    dist.mkdir()
    sdist = run_hook(tree, "build_sdist", dist)
    with tarfile.open(sdist) as tar:
        # the "data" filter where this Python has it (3.10.12+, 3.11.4+)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "unpacked", **kw)
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = run_hook(unpacked, "build_wheel", dist)
    return sdist, wheel


def test_sdist_holds_every_package_file(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(package_files() - names)
    assert not missing, f"the sdist lacks {missing}"


def test_wheel_holds_every_package_file(built):
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"quantattn/hopper/{name}" for name in kernel_sources()} <= names
    missing = sorted(package_files() - names)
    assert not missing, f"the wheel lacks {missing}"


def test_installed_wheel_imports_and_finds_its_kernel_sources(built, tmp_path):
    """The wheel unpacked as pip installs it (its files under site-packages), imported in a fresh
    interpreter that sees neither the source tree nor an editable install of it."""
    _, wheel = built
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    code = """
import sys
from pathlib import Path
import quantattn, quantattn.hopper
site, names = Path(sys.argv[1]).resolve(), sys.argv[2:]
here = Path(quantattn.hopper.__file__).resolve().parent
assert here.is_relative_to(site), f"imported {here}, not the installed wheel under {site}"
for name in names:
    assert (here / name).is_file() and (here / name).stat().st_size > 0, f"{name} is not installed"
try:  # the file list the backend reads (build.SOURCES today), where it has one
    from quantattn.hopper import build
    for name in getattr(build, "SOURCES", ()):
        assert (build.HERE / name).is_file(), f"{name}, which quantattn.hopper.build reads, is missing"
except ImportError:
    pass
print("ok", quantattn.__version__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run(
        [sys.executable, "-c", code, str(site), *kernel_sources()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.startswith("ok"), f"{res.stdout}\n{res.stderr}"


def test_wheel_declares_its_dependencies_with_markers(built):
    """triton only where it exists (Linux), numpy always (torch warns at import without it)."""
    _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower(): r for r in requires if "extra ==" not in r}
    assert {"torch", "triton", "numpy"} <= names.keys(), requires
    assert "platform_system" in names["triton"] and "Linux" in names["triton"], names["triton"]
    assert ";" not in names["torch"] and ";" not in names["numpy"]
