"""backend="auto" and the speed table on a real GPU: on a GPU with a table (the shipped H100 one), auto
gives torch's SDPA exactly the shapes the table names, the result is torch SDPA's, forced backends and
backend="quantized" never do; on a GPU without one nothing changes. (The suite's conftest turns the
fallback off; these tests turn it on.)"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

import quantattn as qa
from quantattn import backends as B
from quantattn.backends import sdpa as S
from quantattn.backends import speed_table as T
from quantattn.config import QuantConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
DEV = "cuda"


@pytest.fixture(autouse=True)
def enabled(monkeypatch, tmp_path):
    monkeypatch.setenv(T.ENV_OFF, "1")
    monkeypatch.setenv(T.ENV_DIR, str(tmp_path / "no_user_tables"))
    T.reload()
    S.reset_fallbacks()
    yield
    T.reload()
    S.reset_fallbacks()


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


def test_this_gpu_has_the_table_it_should():
    name = torch.cuda.get_device_name()
    shipped = (T.SHIPPED_DIR / f"{T.normalized_name(name)}.json").is_file()
    assert (table() is not None) is shipped, name


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
        out = qa.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale)
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
        quantized = qa.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale, backend="quantized")
        torch.testing.assert_close(out, quantized)  # the kernel's result (bitwise where the kernel is deterministic)


def _call(q, k, v, layout, causal):
    to_hnd = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    qh = to_hnd(q)
    return B.AttentionCall(qh, to_hnd(k), to_hnd(v), QuantConfig(), causal, 1.0, torch.empty_like(qh), None)


@pytest.mark.parametrize("backend", ["hopper", "triton", "quantized"])
def test_forced_backends_never_take_sdpa(backend):
    if backend == "hopper" and B.BACKENDS["hopper"].reasons(_call(*qkv(1, 8, 8, 1024, 128), "HND", False)):
        pytest.skip("the Hopper backend does not run here")
    q, k, v = qkv(1, 8, 8, 1024, 128)
    qa.sageattn(q, k, v, backend=backend)
    assert not S.fallbacks


def test_masks_lse_and_unequal_lengths_keep_the_kernels():
    q, k, v = qkv(1, 8, 8, 1024, 128)
    qa.sageattn(q, k, v, return_lse=True)
    qa.sageattn(q, k, v, attn_mask=torch.ones(1024, 1024, dtype=torch.bool, device=DEV))
    qa.sageattn(q, k[:, :, :512], v[:, :, :512])
    assert not S.fallbacks


def test_switched_off(monkeypatch):
    monkeypatch.setenv(T.ENV_OFF, "0")
    T.reload()
    q, k, v = qkv(1, 8, 8, 1024, 128)
    qa.sageattn(q, k, v)
    assert not S.fallbacks


def test_the_fallback_runs_the_sdpa_backend_the_table_measured():
    """torch's own priority puts FlashAttention-2 first; the H100 table measured cuDNN fastest."""
    t = table()
    if t is None:
        pytest.skip("no speed table for this GPU")
    q, k, v = qkv(4, 32, 32, 1024, 128)
    span = t.lookup("hopper", 128, False, QuantConfig(), 1024) or t.lookup("triton", 128, False, QuantConfig(), 1024)
    if span is None or span.sdpa != "CUDNN_ATTENTION":
        pytest.skip("the table does not give this shape to cuDNN")
    qa.sageattn(q, k, v)  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        qa.sageattn(q, k, v)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # cuDNN's own kernels carry "flash" in their names too (cudnn_..._sdpa_sm90_flash_fprop_...): the
    # attention kernel must be cuDNN's, and none FlashAttention-2's (pytorch_flash::flash_fwd_kernel)
    attention = [n for n in names if "sdpa" in n.lower() or "flash" in n.lower() or "attention" in n.lower()]
    assert attention and all("cudnn" in n.lower() for n in attention), names
    switches = [enabled() for enabled, _ in S._SWITCHES.values()]
    assert switches == [True, True, True, True]  # restored (torch's defaults)


def test_under_patched_sdpa_the_fallback_is_torch_sdpa():
    if table() is None:
        pytest.skip("no speed table for this GPU")
    q, k, v = qkv(1, 8, 8, 1024, 128)
    with qa.patched():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if S.fallbacks:  # the table names 1K causal on this GPU
        torch.testing.assert_close(out, S.ORIGINAL_SDPA(q, k, v, is_causal=True))  # exact attention, another kernel
