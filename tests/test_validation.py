"""Every bad input gets a clear error that names the argument at fault."""

from __future__ import annotations

import math

import pytest
import torch

import quantattn
from quantattn.config import QuantConfig


def qkv(b=1, hq=2, nq=16, d=16, *, hkv=None, nk=None, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hkv = hq if hkv is None else hkv
    nk = nq if nk is None else nk
    return (
        torch.randn(b, hq, nq, d, generator=gen).to(dtype),
        torch.randn(b, hkv, nk, d, generator=gen).to(dtype),
        torch.randn(b, hkv, nk, d, generator=gen).to(dtype),
    )


def good():
    return qkv()


def replace(i, make):
    """The standard good inputs with input i (0: q, 1: k, 2: v) replaced by make(that input)."""

    def build():
        ts = list(good())
        ts[i] = make(ts[i])
        return ts

    return build


DENSE_CASES = {
    # argument types and dtypes
    "q not a tensor": (replace(0, lambda t: t.tolist()), {}, TypeError, r"^q must be a torch\.Tensor, got list"),
    "k None": (replace(1, lambda t: None), {}, TypeError, r"^k must be a torch\.Tensor, got NoneType"),
    "q float32": (replace(0, lambda t: t.float()), {}, TypeError, r"^q must be float16 or bfloat16.*torch\.float32"),
    "v float64": (replace(2, lambda t: t.double()), {}, TypeError, r"^v must be float16 or bfloat16.*torch\.float64"),
    "k int8": (replace(1, lambda t: t.to(torch.int8)), {}, TypeError, r"^k must be float16 or bfloat16.*torch\.int8"),
    "q fp8": (replace(0, lambda t: t.to(torch.float8_e4m3fn)), {}, TypeError, r"^q must be float16 or bfloat16"),
    "mixed dtypes": (replace(1, lambda t: t.bfloat16()), {}, TypeError, r"q, k and v must share one dtype"),
    "k on another device": (
        replace(1, lambda t: t.to("meta")),
        {},
        ValueError,
        r"q, k and v must be on one device.*meta",
    ),
    "v on another device": (
        replace(2, lambda t: t.to("meta")),
        {},
        ValueError,
        r"q, k and v must be on one device.*meta",
    ),
    # shapes
    "q 3-D": (replace(0, lambda t: t[0]), {}, ValueError, r"^q must be 4-D"),
    "v 5-D": (replace(2, lambda t: t[None]), {}, ValueError, r"^v must be 4-D"),
    "batch mismatch": (replace(1, lambda t: t.expand(2, -1, -1, -1)), {}, ValueError, r"one batch size, got 1, 2, 1"),
    "head_dim mismatch": (replace(1, lambda t: t[..., :8]), {}, ValueError, r"one head_dim, got 16, 8, 16"),
    "Hkv differs between k and v": (
        lambda: qkv(hq=2, hkv=2)[:2] + (qkv(hq=1)[2],),
        {},
        ValueError,
        r"k and v must have the same number of heads",
    ),
    "Nk differs from Nv": (
        replace(2, lambda t: t[:, :, :10]),
        {},
        ValueError,
        r"k and v must have the same sequence length, got 16 and 10",
    ),
    "Hq not a multiple of Hkv": (
        lambda: qkv(hq=3, hkv=2),
        {},
        ValueError,
        r"query heads \(3\) must be a multiple of the key/value heads \(2\)",
    ),
    "Hkv zero": (lambda: qkv(hq=2, hkv=0), {}, ValueError, r"key/value heads \(0\)"),
    "head_dim 0": (lambda: qkv(d=0), {}, ValueError, r"head_dim must be between 1 and 256, got 0"),
    "head_dim 257": (lambda: qkv(d=257, nq=2), {}, ValueError, r"head_dim must be between 1 and 256, got 257"),
    # layout and flags
    "layout unknown": (
        good,
        {"tensor_layout": "BHND"},
        ValueError,
        r"tensor_layout must be 'HND'.* or 'NHD'.*got 'BHND'",
    ),
    "layout lower case": (good, {"tensor_layout": "hnd"}, ValueError, r"tensor_layout must be"),
    "layout None": (good, {"tensor_layout": None}, ValueError, r"tensor_layout must be"),
    "is_causal int": (good, {"is_causal": 1}, TypeError, r"is_causal must be a bool, got 1"),
    "is_causal str": (good, {"is_causal": "True"}, TypeError, r"is_causal must be a bool"),
    "return_lse None": (good, {"return_lse": None}, TypeError, r"return_lse must be a bool"),
    # sm_scale
    "sm_scale nan": (good, {"sm_scale": math.nan}, ValueError, r"sm_scale must be finite and non-zero, got nan"),
    "sm_scale inf": (good, {"sm_scale": math.inf}, ValueError, r"sm_scale must be finite"),
    "sm_scale 0": (good, {"sm_scale": 0.0}, ValueError, r"sm_scale must be finite and non-zero, got 0"),
    "sm_scale str": (good, {"sm_scale": "0.1"}, TypeError, r"sm_scale must be a float or None, got '0.1'"),
    "sm_scale bool": (good, {"sm_scale": True}, TypeError, r"sm_scale must be a float or None"),
    "sm_scale tensor": (good, {"sm_scale": torch.tensor(0.1)}, TypeError, r"sm_scale must be a float or None"),
    # options
    "qk_quant_gran unknown": (
        good,
        {"qk_quant_gran": "per_foo"},
        ValueError,
        r"qk_quant_gran must be one of .*'per_token'.*got 'per_foo'",
    ),
    "qk_quant_dtype unknown": (
        good,
        {"qk_quant_dtype": "int2"},
        ValueError,
        r"qk_quant_dtype must be one of 'int8', 'int4'; got 'int2'",
    ),
    "pv_dtype unknown": (
        good,
        {"pv_dtype": "fp4"},
        ValueError,
        r"pv_dtype must be one of 'fp8', 'fp16', 'bf16'; got 'fp4'",
    ),
    "pv_accum_dtype unknown": (
        good,
        {"pv_accum_dtype": "fp64"},
        ValueError,
        r"pv_accum_dtype \(with pv_dtype='fp8'\) must be one of .*got 'fp64'",
    ),
    "pv_accum_dtype of another pv_dtype": (
        good,
        {"pv_dtype": "bf16", "pv_accum_dtype": "fp32+fp32"},
        ValueError,
        r"pv_accum_dtype \(with pv_dtype='bf16'\) must be one of 'fp32'; got 'fp32\+fp32'",
    ),
    "pv fp16 with the 2++ accumulator": (
        good,
        {"pv_dtype": "fp16", "pv_accum_dtype": "fp32+fp16"},
        ValueError,
        r"pv_accum_dtype \(with pv_dtype='fp16'\)",
    ),
    "smooth_k not a bool": (good, {"smooth_k": "yes"}, TypeError, r"smooth_k must be a bool, got 'yes'"),
    "smooth_v int": (good, {"smooth_v": 1}, TypeError, r"smooth_v must be a bool"),
    "unknown keyword": (
        good,
        {"qk_quant_granularity": "per_block"},
        TypeError,
        r"unknown keyword argument\(s\) qk_quant_granularity; accepted: config, backend",
    ),
    "config not a QuantConfig": (
        good,
        {"config": "sage1"},
        TypeError,
        r"config must be a quantattn\.QuantConfig, got str",
    ),
    "backend unknown": (
        good,
        {"backend": "cuda"},
        ValueError,
        r"backend must be one of 'auto', 'quantized', 'hopper', 'triton', 'reference'; got 'cuda'",
    ),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_sageattn_rejects(case):
    make, kwargs, error, match = DENSE_CASES[case]
    q, k, v = make()
    with pytest.raises(error, match=match):
        quantattn.sageattn(q, k, v, **kwargs)


def test_good_inputs_are_accepted():
    """The cases above start from these: they must fail for the reason named, not for another."""
    q, k, v = good()
    out = quantattn.sageattn(q, k, v, tensor_layout="HND", is_causal=True, sm_scale=0.1, return_lse=False)
    assert torch.isfinite(out).all()
    quantattn.sageattn(q, k, v, qk_quant_gran="per_block", pv_dtype="bf16", pv_accum_dtype="fp32", smooth_v=True)
    quantattn.sageattn(*qkv(hq=4, hkv=2, d=256, nq=3), sm_scale=-0.5)


def test_nhd_shapes_are_checked_in_nhd_order():
    q, k, v = (t.transpose(1, 2) for t in qkv(hq=3, hkv=3, nq=16, nk=16))  # [B, N, H, d]
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of the key/value heads \(2\)"):
        quantattn.sageattn(q, k[:, :, :2], v[:, :, :2], tensor_layout="NHD")
    with pytest.raises(ValueError, match=r"k and v must have the same sequence length"):
        quantattn.sageattn(q, k, v[:, :8], tensor_layout="NHD")


def test_explicit_variants_validate_too():
    q, k, v = good()
    with pytest.raises(TypeError, match=r"^q must be float16 or bfloat16"):
        quantattn.sageattn_qk_int8_pv_fp16_triton(q.float(), k, v)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) smooth"):
        quantattn.sageattn_qk_int8_pv_fp8_cuda(q, k, v, smooth=True)
    with pytest.raises(ValueError, match=r"pv_accum_dtype \(with pv_dtype='fp16'\)"):
        quantattn.sageattn_qk_int8_pv_fp16_cuda(q, k, v, pv_accum_dtype="fp32+fp32", pv_dtype="fp16")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"qk_dtype": "int3"}, r"qk_quant_dtype must be one of"),
        ({"qk_granularity": "per_row"}, r"qk_quant_gran must be one of"),
        ({"pv_dtype": "fp8", "pv_accum": "fp16+fp32"}, r"pv_accum_dtype \(with pv_dtype='fp8'\)"),
        ({"smooth_q": None}, r"smooth_q must be a bool"),
    ],
)
def test_quant_config_rejects(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------
# varlen


def packed(total_q=30, total_k=30, hq=2, hkv=2, d=16, dtype=torch.float16):
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(total_q, hq, d, generator=gen).to(dtype),
        torch.randn(total_k, hkv, d, generator=gen).to(dtype),
        torch.randn(total_k, hkv, d, generator=gen).to(dtype),
    )


CU = torch.tensor([0, 10, 30], dtype=torch.int32)


def varlen_args(**changes):
    q, k, v = packed()
    args = {"q": q, "k": k, "v": v, "cu_seqlens_q": CU, "cu_seqlens_k": CU, "max_seqlen_q": 20, "max_seqlen_k": 20}
    args.update(changes)
    return args


VARLEN_CASES = {
    "q 4-D": ({"q": packed()[0][None]}, ValueError, r"^q must be 3-D"),
    "k float32": ({"k": packed()[1].float()}, TypeError, r"^k must be float16 or bfloat16"),
    "v on another device": ({"v": packed()[2].to("meta")}, ValueError, r"q, k and v must be on one device"),
    "Hq not a multiple of Hkv": ({"q": packed(hq=3)[0]}, ValueError, r"query heads \(3\) must be a multiple"),
    "head_dim mismatch": ({"k": packed(d=8)[1]}, ValueError, r"one head_dim"),
    "cu_seqlens_q a list": (
        {"cu_seqlens_q": [0, 10, 30]},
        TypeError,
        r"^cu_seqlens_q must be a torch\.Tensor, got list",
    ),
    "cu_seqlens_k float": (
        {"cu_seqlens_k": CU.float()},
        TypeError,
        r"^cu_seqlens_k must be a 1-D int32 or int64 tensor, got torch\.float32",
    ),
    "cu_seqlens_q 2-D": ({"cu_seqlens_q": CU[None]}, TypeError, r"^cu_seqlens_q must be a 1-D int32 or int64 tensor"),
    "cu_seqlens_q empty": (
        {"cu_seqlens_q": CU[:0], "cu_seqlens_k": CU[:0]},
        ValueError,
        r"^cu_seqlens_q must hold at least one offset",
    ),
    "cu_seqlens_q not from 0": (
        {"cu_seqlens_q": torch.tensor([2, 10, 30])},
        ValueError,
        r"^cu_seqlens_q must start at 0, got 2",
    ),
    "cu_seqlens_k decreasing": (
        {"cu_seqlens_k": torch.tensor([0, 20, 10, 30]), "cu_seqlens_q": torch.tensor([0, 5, 10, 30])},
        ValueError,
        r"^cu_seqlens_k must be non-decreasing, got \[0, 20, 10, 30\]",
    ),
    "cu_seqlens_q last != total": (
        {"cu_seqlens_q": torch.tensor([0, 10, 25])},
        ValueError,
        r"^cu_seqlens_q\[-1\] must equal the number of packed tokens \(30\), got 25",
    ),
    "cu_seqlens_k last != total": (
        {"cu_seqlens_k": torch.tensor([0, 10, 31])},
        ValueError,
        r"^cu_seqlens_k\[-1\] must equal",
    ),
    "cu_seqlens lengths differ": (
        {"cu_seqlens_k": torch.tensor([0, 10, 20, 30])},
        ValueError,
        r"cu_seqlens_q and cu_seqlens_k must have the same length, got 3 and 4",
    ),
    "max_seqlen_q too small": (
        {"max_seqlen_q": 19},
        ValueError,
        r"^max_seqlen_q \(19\) is smaller than the longest sequence \(20\)",
    ),
    "max_seqlen_k too small": ({"max_seqlen_k": 5}, ValueError, r"^max_seqlen_k \(5\) is smaller"),
    "max_seqlen_k negative": ({"max_seqlen_k": -1}, TypeError, r"^max_seqlen_k must be a non-negative int, got -1"),
    "max_seqlen_q float": ({"max_seqlen_q": 20.0}, TypeError, r"^max_seqlen_q must be a non-negative int, got 20\.0"),
    "max_seqlen_q bool": ({"max_seqlen_q": True}, TypeError, r"^max_seqlen_q must be a non-negative int"),
    "cu_seqlens_q on another device": (
        {"cu_seqlens_q": CU.to("meta")},
        ValueError,
        r"^cu_seqlens_q must be on q's device \(cpu\), got meta",
    ),
    "cu_seqlens_k on another device": (
        {"cu_seqlens_k": CU.to("meta")},
        ValueError,
        r"^cu_seqlens_k must be on q's device",
    ),
    "is_causal None": ({"is_causal": None}, TypeError, r"is_causal must be a bool"),
    "sm_scale nan": ({"sm_scale": math.nan}, ValueError, r"sm_scale must be finite"),
    "unknown keyword": ({"tensor_layout": "NHD"}, TypeError, r"unknown keyword argument\(s\) tensor_layout"),
    "pv_accum_dtype unknown": ({"pv_accum_dtype": "fp8"}, ValueError, r"pv_accum_dtype"),
}


@pytest.mark.parametrize("case", VARLEN_CASES)
def test_sageattn_varlen_rejects(case):
    changes, error, match = VARLEN_CASES[case]
    with pytest.raises(error, match=match):
        quantattn.sageattn_varlen(**varlen_args(**changes))


def test_good_varlen_inputs_are_accepted():
    out, lse = quantattn.sageattn_varlen(**varlen_args(), is_causal=True, return_lse=True)
    assert torch.isfinite(out).all() and lse.shape == (2, 30)
    # int64 offsets, and a max_seqlen larger than needed, are fine
    quantattn.sageattn_varlen(**varlen_args(cu_seqlens_q=CU.long(), max_seqlen_q=1000))
