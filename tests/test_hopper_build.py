"""The native Hopper backend where it cannot run: its CUDA sources compile for sm_90a with NVRTC (where
libnvrtc is installed, e.g. the nvidia-cuda-nvrtc wheel; no GPU needed), the kernel cache trusts only
what the user alone can have written, a machine without a GPU reports the backend unavailable with a
reason, and CPU calls keep running the reference.
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch

import quantattn as qa
from quantattn import settings


def hopper_module(name: str = "quantattn.hopper"):
    """The module, or a skip when it is not there (the backend is optional)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not importable ({exc})")


def needs_nvrtc():
    compiler = hopper_module("quantattn.hopper.compiler")
    if compiler.nvrtc().lib is None:
        pytest.skip(compiler.nvrtc().reason)
    return compiler


def test_every_kernel_compiles_for_sm90a(tmp_path, monkeypatch):
    """Every instantiation the backend launches compiles with NVRTC, into the cache, as a cubin."""
    compiler = needs_nvrtc()
    build = hopper_module("quantattn.hopper.build")
    kernels = hopper_module("quantattn.hopper.kernels")
    monkeypatch.setenv("QUANTATTN_CACHE", str(tmp_path))
    settings.reload()  # quantattn reads the environment once
    built = dict(build.build_all(workers=2))
    assert set(built) == {spec.key for spec in kernels.all_specs()}
    folder = compiler.cache_dir()
    assert folder.is_relative_to(tmp_path)
    for spec in kernels.all_specs():
        data = (folder / f"{spec.key}.cubin").read_bytes()
        assert data[:4] == b"\x7fELF", f"{spec.key}: not a cubin"
        assert data.rpartition(compiler.MARK)[2].startswith(b"_ZN16quantattn_hopper"), spec.key


def test_a_compile_error_carries_the_log():
    compiler = needs_nvrtc()
    with pytest.raises(compiler.CompileError, match="undefined|identifier"):
        compiler.compile_cubin("__global__ void k() { not_declared(); }", "k")


# ---- the kernel cache: trusted only where nobody else can have written it ---------------------------


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """compiler.cached_cubin with a stand-in for NVRTC (no library needed): counts compilations."""
    compiler = hopper_module("quantattn.hopper.compiler")
    monkeypatch.setenv("QUANTATTN_CACHE", str(tmp_path / "cache"))
    settings.reload()  # quantattn reads the environment once
    monkeypatch.setattr(compiler, "nvrtc", lambda: type("S", (), {"version": (13, 0), "lib": object()})())
    calls = []

    def compile_cubin(source, name, filename="x.cu"):
        calls.append(name)
        return b"\x7fELF" + os.urandom(16), "_Z6kernel"

    monkeypatch.setattr(compiler, "compile_cubin", compile_cubin)
    compiler._warned.clear()
    return compiler, calls


def test_the_cache_is_private_and_reused(fake_compiler):
    compiler, calls = fake_compiler
    first = compiler.cached_cubin("k", "attention.cu", "kernel")
    assert compiler.cached_cubin("k", "attention.cu", "kernel") == first and len(calls) == 1
    folder = compiler.cache_dir()
    for path in [
        folder,
        *[p for p in folder.parents if p == compiler.cache_root() or compiler.cache_root() in p.parents],
    ]:
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    assert os.stat(folder / "k.cubin").st_mode & 0o077 == 0
    assert [p.name for p in folder.iterdir()] == ["k.cubin"], "a temporary file was left behind"


def test_a_writable_cache_file_is_compiled_again(fake_compiler, caplog):
    compiler, calls = fake_compiler
    compiler.cached_cubin("k", "attention.cu", "kernel")
    path = compiler.cache_dir() / "k.cubin"
    planted = b"\x7fELFplanted" + compiler.MARK + b"_Z6kernel"
    path.write_bytes(planted)
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, logger="quantattn"):
        cubin, _ = compiler.cached_cubin("k", "attention.cu", "kernel")
    assert cubin != b"\x7fELFplanted" and len(calls) == 2
    assert "writable by group or others" in caplog.text
    assert path.read_bytes() != planted and os.stat(path).st_mode & 0o077 == 0, "the file was not replaced"


def test_a_cache_file_of_another_user_is_compiled_again(fake_compiler, monkeypatch, caplog):
    compiler, calls = fake_compiler
    compiler.cached_cubin("k", "attention.cu", "kernel")
    real_getuid = os.getuid
    path = compiler.cache_dir() / "k.cubin"
    real_fstat = os.fstat

    def fstat(fd):  # the file looks owned by someone else
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, real_getuid() + 1, *st[5:]))

    monkeypatch.setattr(os, "fstat", fstat)
    with caplog.at_level(logging.WARNING, logger="quantattn"):
        compiler.cached_cubin("k", "attention.cu", "kernel")
    assert len(calls) == 2 and "owned by uid" in caplog.text
    assert path.exists()


def test_a_shared_cache_folder_is_not_used(fake_compiler, caplog):
    compiler, calls = fake_compiler
    compiler.cached_cubin("k", "attention.cu", "kernel")
    folder = compiler.cache_dir()
    os.chmod(folder, 0o777)
    try:
        with caplog.at_level(logging.WARNING, logger="quantattn"):
            compiler.cached_cubin("k", "attention.cu", "kernel")
            compiler.cached_cubin("k", "attention.cu", "kernel")
    finally:
        os.chmod(folder, 0o700)
    assert len(calls) == 3, "a cubin was read from a folder others can write"
    assert "cache is not used" in caplog.text


def test_a_symlinked_cache_file_is_not_followed(fake_compiler, tmp_path):
    compiler, calls = fake_compiler
    compiler.cached_cubin("k", "attention.cu", "kernel")
    path = compiler.cache_dir() / "k.cubin"
    elsewhere = tmp_path / "elsewhere.cubin"
    elsewhere.write_bytes(b"\x7fELFelsewhere" + compiler.MARK + b"_Z6kernel")
    os.chmod(elsewhere, 0o600)
    path.unlink()
    path.symlink_to(elsewhere)
    cubin, _ = compiler.cached_cubin("k", "attention.cu", "kernel")
    assert cubin != b"\x7fELFelsewhere" and len(calls) == 2


def test_the_cache_key_changes_with_the_sources(fake_compiler, monkeypatch):
    compiler, _ = fake_compiler
    before = compiler.cache_dir()
    real = compiler.sources()
    monkeypatch.setattr(compiler, "sources", lambda: real[:-1])
    assert compiler.cache_dir() != before


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


def test_a_folder_made_by_another_thread_meanwhile_is_fine(fake_compiler, monkeypatch):
    """Threads compiling in parallel (python -m quantattn.hopper.build) race to create the cache folders:
    a folder that appears between the look and the mkdir is checked like any other, not refused."""
    compiler, calls = fake_compiler
    compiler.cached_cubin("k0", "attention.cu", "kernel")  # the folders exist now
    monkeypatch.setattr(type(compiler.cache_dir()), "exists", lambda self: False)  # as if made meanwhile
    compiler.cached_cubin("k1", "attention.cu", "kernel")
    assert not compiler._warned, compiler._warned
    assert sorted(p.name for p in compiler.cache_dir().iterdir()) == ["k0.cubin", "k1.cubin"]


def test_the_cuda_preprocessing_takes_both_granularities_of_the_attention_kernel():
    """per_token and per_thread K scales come from the CUDA preprocessings (resident up to 2K keys, ticketed
    beyond), each its own instantiation; granularities the Hopper kernel does not read go to Triton's, with
    the reason. Path choice and kernel names only: no GPU needed."""
    launch = hopper_module("quantattn.hopper.launch")
    kernels = hopper_module("quantattn.hopper.kernels")
    from quantattn.calls import sequences
    from quantattn.config import QuantConfig

    for n, path in ((100, "resident"), (3000, "ticket")):
        k = torch.zeros(1, 2, n, 128, dtype=torch.bfloat16)
        for gran in ("per_token", "per_thread"):
            assert launch.preprocess_path(k, k, sequences(k, None, 0), QuantConfig(qk_granularity=gran)) == path
        per_block = QuantConfig(qk_granularity="per_block")
        assert launch.preprocess_path(k, k, sequences(k, None, 0), per_block) == "triton"
        assert "per_block" in launch.native_preprocess_reason(k, k, sequences(k, None, 0), per_block)
    for resident in (False, True):
        token = kernels.preprocess_spec(128, "bf16", True, resident)
        thread = kernels.preprocess_spec(128, "bf16", True, resident, per_thread=True)
        assert token.name.endswith("true, false>") and thread.name.endswith("true, true>") and token.key != thread.key
        assert {token, thread} <= set(kernels.all_specs())
