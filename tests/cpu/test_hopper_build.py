"""The native Hopper backend where it cannot run: its CUDA source compiles (where nvcc is installed), a
machine without a GPU reports it unavailable with a reason, and CPU calls keep running the reference.

No GPU is needed: compiling for sm_90a only needs the CUDA toolkit.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch

import quantattn as qa


def hopper_module(name: str = "quantattn.hopper"):
    """The module, or a skip when it is not there (the backend is optional)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not importable ({exc})")


def test_cuda_source_compiles_for_sm90a(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    build = hopper_module("quantattn.hopper.build")
    path = Path(build.compile_library(str(tmp_path)))
    assert path.is_file(), path
    assert path.resolve().is_relative_to(tmp_path.resolve()), f"{path} was written outside the output folder"
    assert path.read_bytes()[:4] == b"\x7fELF", "not a shared library"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the path of a machine without a GPU")
def test_unavailable_without_a_gpu_says_why():
    hopper = hopper_module()
    assert hopper.available() is False
    reason = hopper.unavailable_reason()
    assert isinstance(reason, str) and reason.strip()


def test_cpu_tensors_still_run_the_reference():
    """backend="auto" on CPU tensors is the reference, whatever the Hopper backend's state."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 100, 64, generator=g).bfloat16() for _ in range(3))
    for causal in (False, True):
        out, lse = qa.sageattn(q, k, v, is_causal=causal, return_lse=True)
        ref, ref_lse = qa.sageattn(q, k, v, is_causal=causal, return_lse=True, backend="reference")
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_hopper_backend_refuses_cpu_tensors():
    hopper_module()
    from quantattn.backends import BACKENDS

    if "hopper" not in BACKENDS:
        pytest.skip("quantattn.backends has no 'hopper' backend yet")
    q, k, v = (torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(RuntimeError, match="hopper"):
        qa.sageattn(q, k, v, backend="hopper")
