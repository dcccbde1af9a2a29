"""quantattn.sdpa as a drop-in for torch SDPA: signature, fallbacks, patching (CPU; the GPU path is
the same `sageattn` call the kernel tests cover)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

import quantattn
from quantattn.integrations import torch_sdpa as S
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

ORIGINAL = S.ORIGINAL_SDPA


@pytest.fixture(autouse=True)
def clean_state():
    S.reset_fallbacks()
    yield
    while S._routes:
        S.unpatch()
    assert F.scaled_dot_product_attention is ORIGINAL


def qkv(seed, b=2, hq=4, hkv=4, nq=64, nk=64, d=32, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def test_signature_is_sdpas():
    ours = inspect.signature(quantattn.sdpa).parameters
    theirs = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    assert set(ours) == theirs
    assert [p.default for p in ours.values()][3:] == [None, 0.0, False, None, False]
    ORIGINAL(*qkv(0), enable_gqa=False)  # this torch's SDPA takes every one of them by name


def test_cpu_calls_fall_back_by_default_and_say_why_once(caplog):
    q, k, v = qkv(1)
    with caplog.at_level(logging.WARNING, logger="quantattn"):
        out = quantattn.sdpa(q, k, v)
        quantattn.sdpa(q, k, v)
    assert torch.equal(out, ORIGINAL(q, k, v))
    reason = next(iter(S.fallbacks))
    assert reason.startswith("CPU tensors") and S.fallbacks[reason] == 2
    assert sum("falling back" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"attn_mask": torch.zeros(64, 64, dtype=torch.bfloat16).requires_grad_()}, "attn_mask requires grad"),
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"dtype": torch.float32}, "dtype torch.float32"),
        ({"nq": 32, "is_causal": True}, "is_causal with Nq != Nk"),
        ({"d": 320}, "head_dim 320"),
    ],
)
def test_calls_kernels_cannot_take_fall_back(kwargs, reason):
    kwargs = dict(kwargs)
    mask, dropout, causal = kwargs.pop("attn_mask", None), kwargs.pop("dropout_p", 0.0), kwargs.pop("is_causal", False)
    q, k, v = qkv(2, **kwargs)
    with quantattn.patched(cpu="reference"):
        torch.manual_seed(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    torch.manual_seed(0)
    assert torch.equal(out, ORIGINAL(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal))
    assert any(r.startswith(reason) for r in S.fallbacks), dict(S.fallbacks)


@pytest.mark.parametrize("scale", [0.0, -0.0, float("nan"), float("inf")])
def test_scales_sageattn_refuses_fall_back_to_torch(scale):
    """SDPA computes with any float scale (0: uniform weights, NaN: NaN); sageattn refuses those, so the
    drop-in hands them to torch instead of raising."""
    q, k, v = qkv(9)
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    want = ORIGINAL(q, k, v, scale=scale)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert any(r.startswith("scale is zero") for r in S.fallbacks), dict(S.fallbacks)
    with pytest.raises(ValueError, match="sm_scale must be finite and non-zero"):
        quantattn.sageattn(q, k, v, sm_scale=scale, backend="reference")  # the kernels' API still says why


@pytest.mark.parametrize("form", ["bool", "additive", "key padding [B, 1, 1, Nk]"])
def test_masks_go_to_the_kernels_with_sdpas_meaning(form):
    q, k, v = qkv(3)
    g = torch.Generator().manual_seed(3)
    if form == "bool":
        mask = torch.rand(64, 64, generator=g) > 0.3
    elif form == "additive":
        mask = torch.randn(q.shape[0], q.shape[1], 64, 64, generator=g).to(q.dtype)
    else:
        mask = torch.ones(q.shape[0], 1, 1, 64, dtype=torch.bool)
        mask[0, ..., 40:] = False
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not S.fallbacks
    assert torch.equal(out, quantattn.sageattn(q, k, v, attn_mask=mask, backend="reference"))
    truth = attention_fp64(q, k, v, attn_mask=mask)
    assert rel_l1(out, truth) < 0.05
    assert rel_l1(ORIGINAL(q, k, v), truth) > 2 * rel_l1(out, truth)  # the mask matters on these inputs


def test_inputs_that_require_grad_are_quantized_and_keep_their_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(7))
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().sum().backward()
    assert q.grad is not None and k.grad is not None
    assert not S.fallbacks  # quantattn's backward (tests/test_backward.py checks its values)
    with quantattn.patched(cpu="reference"), torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)  # no autograd: quantized
    assert not S.fallbacks


def test_no_keys_falls_back():
    q, k, v = qkv(8, nk=0)
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ORIGINAL(q, k, v), equal_nan=True)  # torch's answer, whatever it is
    assert any(r.startswith("no keys") for r in S.fallbacks)


def test_route_validates_its_settings():
    with pytest.raises(ValueError, match="cpu must be"):
        S.Route(cpu="cuda")
    with pytest.raises(TypeError, match="QuantConfig"):
        S.Route(config={"pv_dtype": "fp8"})


def test_gqa_without_enable_gqa_behaves_as_torch():
    q, k, v = qkv(3, hq=4, hkv=2)
    with quantattn.patched(cpu="reference"), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        ORIGINAL(q, k, v)


@pytest.mark.parametrize("causal, gqa", [(False, False), (True, False), (True, True)])
def test_patched_sdpa_runs_quantattn_and_is_accurate(causal, gqa):
    q, k, v = qkv(4, hq=4, hkv=2 if gqa else 4)
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, scale=0.2)
    assert not S.fallbacks
    assert torch.equal(out, quantattn.sageattn(q, k, v, is_causal=causal, sm_scale=0.2, backend="reference"))
    exact = ORIGINAL(q.double(), k.double(), v.double(), is_causal=causal, scale=0.2, enable_gqa=gqa)
    assert ((out.double() - exact).abs().sum() / exact.abs().sum()) < 0.05  # INT8/FP8 quantization error


def test_patched_config_is_used():
    q, k, v = qkv(5)
    cfg = quantattn.VARIANTS["sage1"]
    with quantattn.patched(config=cfg, cpu="reference"):
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, quantattn.sageattn(q, k, v, config=cfg, backend="reference"))


def test_patch_nests_and_restores_exactly():
    quantattn.patch(cpu="reference")
    with quantattn.patched():
        assert F.scaled_dot_product_attention is quantattn.sdpa
        assert S._active().cpu == "fallback"
    assert S._active().cpu == "reference"
    quantattn.unpatch()
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(RuntimeError, match="without a matching patch"):
        quantattn.unpatch()


def test_patched_restores_after_an_exception():
    with pytest.raises(ZeroDivisionError), quantattn.patched():
        1 / 0  # noqa: B018
    assert F.scaled_dot_product_attention is ORIGINAL


class Attention(torch.nn.Module):
    def forward(self, q, k, v, fail=False):
        if fail:
            raise ValueError("boom")
        return F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention is quantattn.sdpa


def test_attach_patches_only_inside_the_module():
    model, other = Attention(), Attention()
    handle = quantattn.attach(model, cpu="reference")
    q, k, v = qkv(6)
    out, inside = model(q, k, v)
    _, inside_other = other(q, k, v)
    assert inside and not inside_other
    assert F.scaled_dot_product_attention is ORIGINAL
    assert torch.equal(out, quantattn.sageattn(q, k, v, backend="reference"))
    with pytest.raises(ValueError, match="boom"):
        model(q, k, v, fail=True)
    assert F.scaled_dot_product_attention is ORIGINAL
    handle.remove()
    assert not model(q, k, v)[1]


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: quantattn.patch(cpu="gpu"), ValueError),
        (lambda: quantattn.patch(config="sage1"), TypeError),
        (lambda: quantattn.attach(torch.nn.Identity(), cpu="maybe"), ValueError),
    ],
)
def test_bad_arguments(call, error):
    with pytest.raises(error):
        call()
