"""Attention masks, on three machines.

On the CPU: attention masks (bool and additive, SDPA's forms) and key padding given as per-batch lengths, on the
reference backend: what they mean (against FP64 attention under the same mask), how they combine with
causal masking, GQA and layouts, and what happens at the edges (rows that see no key, garbage padding).

Marker `interpreter`: the attention kernel's masks (bool, additive, broadcast) and key lengths, through
the interpreter,
against the reference that implements them (tests/test_kernels.py explains the bound).

Marker `gpu`: attention masks and key lengths in the kernels (FP8 and FP16 PV), and long
contexts (256K keys, memory that grows linearly).
Kernel results are held to the reference variant they implement, as in test_kernels_gpu.py: within a
tenth of the reference's own error against FP64 attention under the same mask.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import GPU, INTERPRETER, make, pytest_marks

import quantattn
from quantattn.config import SAGE1, QuantConfig
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference import attention_fp64

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 96, 160, 64


def inputs(qa, seed, **kw):
    opts = dict(b=B, hq=HQ, nq=NQ, d=D, hkv=HKV, nk=NK, dtype=torch.bfloat16, k_bias=2.0)
    return qa.make_qkv(seed, **{**opts, **kw})


def bool_mask(seed, *shape, keep=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < keep


def run(q, k, v, **kw):
    return quantattn.sageattn(q, k, v, backend="reference", **kw)


MASKS = {
    "bool [B, Hq, Nq, Nk]": lambda: bool_mask(1, B, HQ, NQ, NK),
    "bool [Nq, Nk]": lambda: bool_mask(2, NQ, NK),
    "bool [B, 1, 1, Nk] (key padding)": lambda: torch.arange(NK)[None, None, None, :] < torch.tensor([NK, 50])[:, None, None, None],
    "additive float32 [B, 1, Nq, Nk]": lambda: 2 * torch.randn(B, 1, NQ, NK, generator=torch.Generator().manual_seed(3)),
    "additive bf16 [1, Hq, Nq, Nk] with -inf": lambda: torch.randn(1, HQ, NQ, NK).masked_fill(bool_mask(4, 1, HQ, NQ, NK, keep=0.2), -math.inf).bfloat16(),
}  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", list(MASKS))
def test_masked_attention_is_as_accurate_as_unmasked(qa, form, causal):
    q, k, v = inputs(qa, 10)
    mask = MASKS[form]()
    out = run(q, k, v, attn_mask=mask, is_causal=causal)
    truth = attention_fp64(q, k, v, is_causal=causal, attn_mask=mask)
    err, err_unmasked = (
        qa.rel_l1(out, truth),
        qa.rel_l1(run(q, k, v, is_causal=causal), attention_fp64(q, k, v, is_causal=causal)),
    )
    assert torch.isfinite(out).all()
    assert err < 1.5 * err_unmasked + 1e-3, (err, err_unmasked)
    # the mask changed the result: ignoring it would be far off
    assert qa.rel_l1(run(q, k, v, is_causal=causal), truth) > 3 * err


def test_lse_under_an_additive_mask_is_that_of_the_masked_scores(qa):
    q, k, v = inputs(qa, 11)
    mask = MASKS["additive float32 [B, 1, Nq, Nk]"]()
    _, lse = run(q, k, v, attn_mask=mask, return_lse=True)
    _, truth = attention_fp64(q, k, v, attn_mask=mask, return_lse=True)
    assert (lse.double() - truth).abs().max() < 0.05


def test_rows_that_see_no_key_give_zeros_and_leave_other_rows_alone(qa, poison_empty):
    q, k, v = inputs(qa, 12)
    mask = bool_mask(5, B, HQ, NQ, NK)
    mask[0, 1, 7] = False  # one row sees nothing
    mask[1, :, :3] = False  # three rows of every head of batch 1
    add = torch.zeros(B, HQ, NQ, NK).masked_fill(~mask, -math.inf)
    for m in (mask, add):
        out, lse = run(q, k, v, attn_mask=m, return_lse=True)
        assert torch.isfinite(out).all()
        assert (out[0, 1, 7] == 0).all() and (out[1, :, :3] == 0).all()
        assert lse[0, 1, 7] == -math.inf and (lse[1, :, :3] == -math.inf).all()
        others = torch.ones(B, HQ, NQ, dtype=torch.bool)
        others[0, 1, 7] = False
        others[1, :, :3] = False
        truth = attention_fp64(q, k, v, attn_mask=mask)
        assert qa.rel_l1(out[others], truth[others]) < 0.05


def test_gqa_mask_indexes_query_heads_and_nhd_layout_agrees(qa):
    q, k, v = inputs(qa, 13)
    mask = bool_mask(6, B, HQ, NQ, NK)
    mask[:, 1] = True  # head 1 (kv head 0) unmasked: a mask indexed by kv head would differ
    hnd = run(q, k, v, attn_mask=mask)
    nhd = run(*qa.to_nhd(q, k, v), tensor_layout="NHD", attn_mask=mask)
    assert torch.equal(nhd.transpose(1, 2), hnd)
    assert torch.equal(hnd[:, 1], run(q, k, v)[:, 1])


def test_key_lengths_attend_as_if_the_padding_were_absent(qa):
    q, k, v = inputs(qa, 14)
    lengths = torch.tensor([NK - 37, 64])
    out = run(q, k, v, key_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = run(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        assert torch.equal(out[b : b + 1], alone)


def test_key_lengths_ignore_whatever_the_padding_holds(qa):
    q, k, v = inputs(qa, 15)
    lengths = torch.tensor([100, 3])
    out = run(q, k, v, key_lengths=lengths, is_causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 100:], v2[0, :, 100:] = math.nan, math.inf
    k2[1, :, 3:], v2[1, :, 3:] = 1e4, -math.inf
    assert torch.equal(run(q, k2, v2, key_lengths=lengths, is_causal=True), out)


def test_key_lengths_with_causal_keep_the_tensors_alignment(qa):
    """Causal masking stays aligned to the tensors' Nk (query i sees keys j <= i + Nk - Nq) while
    key_lengths hides the padding: the same as a bool key-padding mask, to within the quantization
    (the mask's keys still count in the smoothing and the scales, the lengths' do not)."""
    q, k, v = inputs(qa, 16, nq=NK)
    lengths = torch.tensor([NK, 77])
    pad = (torch.arange(NK)[None, :] < lengths[:, None])[:, None, None, :]
    out = run(q, k, v, key_lengths=lengths, is_causal=True)
    truth = attention_fp64(q, k, v, is_causal=True, attn_mask=pad)
    assert qa.rel_l1(out, truth) < 1.5 * qa.rel_l1(
        run(q, k, v, is_causal=True), attention_fp64(q, k, v, is_causal=True)
    )
    assert torch.equal(out[0], run(q[:1], k[:1], v[:1], is_causal=True)[0])


def test_key_lengths_are_clamped_to_the_keys(qa):
    q, k, v = inputs(qa, 17)
    out = run(q, k, v, key_lengths=torch.tensor([NK + 100, -5]))
    assert torch.equal(out[0], run(q[:1], k[:1], v[:1])[0])
    assert (out[1] == 0).all()


def test_int64_key_lengths_beyond_int32_clamp_instead_of_wrapping(qa):
    """2**32 is past every sequence: all keys (not 0, its low 32 bits); -2**32 + 5 is none (not 5)."""
    q, k, v = inputs(qa, 19)
    out = run(q, k, v, key_lengths=torch.tensor([2**32, -(2**32) + 5], dtype=torch.int64))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], run(q[:1], k[:1], v[:1])[0])
    assert (out[1] == 0).all()
    assert torch.equal(run(q, k, v, key_lengths=torch.tensor([2**31, 2**40 + 3])), run(q, k, v))


def test_mask_and_inputs_are_not_modified(qa):
    q, k, v = inputs(qa, 18)
    mask = MASKS["additive bf16 [1, Hq, Nq, Nk] with -inf"]()
    lengths = torch.tensor([NK, 10])
    before = [t.clone() for t in (q, k, v, mask, lengths)]
    run(q, k, v, attn_mask=mask, key_lengths=lengths, is_causal=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask, lengths), strict=True))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attn_mask": torch.ones(NQ, NK, dtype=torch.int32)}, TypeError, "attn_mask must be bool"),
        ({"attn_mask": torch.ones(NQ, NK + 1, dtype=torch.bool)}, ValueError, "broadcast to"),
        ({"attn_mask": torch.ones(1, 1, 1, NQ, NK, dtype=torch.bool)}, ValueError, "broadcast to"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask must be a torch.Tensor"),
        ({"attn_mask": torch.ones(NQ, NK, dtype=torch.bool, device="meta")}, ValueError, "q's device"),
        ({"key_lengths": torch.tensor([1.0, 2.0])}, ValueError, "int32 or int64"),
        ({"key_lengths": torch.tensor([1, 2, 3])}, ValueError, r"shape \[B\] = \[2\]"),
        ({"key_lengths": 5}, TypeError, "key_lengths must be a torch.Tensor"),
    ],
)
def test_bad_masks_are_refused_with_a_message_naming_them(qa, kwargs, error, match):
    q, k, v = inputs(qa, 19)
    with pytest.raises(error, match=match):
        run(q, k, v, **kwargs)


# ==================================================================================================
# The mask kernels through the Triton interpreter (marker: interpreter)

KERNEL_VS_REFERENCE = 0.05
B, HQ, HKV, NQ, NK, D = 2, 2, 1, 80, 150, 32


def qkv(seed):
    return make(seed, B, HQ, NQ, D), make(seed + 1, B, HKV, NK, D, outliers=True), make(seed + 2, B, HKV, NK, D)


def both(q, k, v, **kw):
    return (quantattn.sageattn(q, k, v, backend=b, **kw) for b in ("triton", "reference"))


def assert_matches(out, ref, truth):
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf"
    assert rel_l1(out, ref) <= KERNEL_VS_REFERENCE * rel_l1(ref, truth) + 1e-6, (rel_l1(out, ref), rel_l1(ref, truth))


def keep(seed, *shape, p=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest_marks(INTERPRETER)
@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(),
        QuantConfig(qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32"),
        QuantConfig(smooth_q=True, qk_granularity="per_warp"),
    ],  # fmt: skip
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("causal", [False, True])
def test_bool_and_additive_masks_match_the_reference(cfg, causal):
    q, k, v = qkv(1)
    masks = {
        "bool": keep(2, B, HQ, NQ, NK),
        "additive": (2 * torch.randn(B, 1, NQ, NK, generator=torch.Generator().manual_seed(3))).bfloat16(),
    }
    masks["bool"][0, 1, 9] = False  # a row that sees no key
    for mask in masks.values():
        out, ref = both(q, k, v, attn_mask=mask, is_causal=causal, config=cfg)
        assert_matches(out, ref, attention_fp64(q, k, v, is_causal=causal, attn_mask=mask))
    assert (out[0, 1, 9] == 0).all() or not masks["bool"][0, 1, 9].any()


@pytest_marks(INTERPRETER)
def test_broadcast_key_padding_mask_and_lse():
    q, k, v = qkv(4)
    mask = (torch.arange(NK) < torch.tensor([NK, 70])[:, None])[:, None, None, :]  # [B, 1, 1, Nk]: stride-0 dims
    (out, lse), (ref, ref_lse) = both(q, k, v, attn_mask=mask, return_lse=True)
    truth, truth_lse = attention_fp64(q, k, v, attn_mask=mask, return_lse=True)
    assert_matches(out, ref, truth)
    assert (lse - ref_lse).abs().max() < 1e-4 and (ref_lse.double() - truth_lse).abs().max() < 0.1


@pytest_marks(INTERPRETER)
@pytest.mark.parametrize("causal", [False, True])
def test_key_lengths_match_the_reference_and_skip_the_padding(causal):
    q, k, v = qkv(5)
    lengths = torch.tensor([NK - 21, 64], dtype=torch.int32)
    k[0, :, NK - 21 :], v[1, :, 64:] = math.nan, math.inf  # garbage in the padding is never read
    out, ref = both(q, k, v, key_lengths=lengths, is_causal=causal)
    pad = (torch.arange(NK) < lengths[:, None])[:, None, None, :]
    assert_matches(out, ref, attention_fp64(q, k.nan_to_num(0), v.nan_to_num(0, 0, 0), is_causal=causal, attn_mask=pad))


@pytest_marks(INTERPRETER)
def test_key_lengths_zero_and_past_the_end():
    q, k, v = qkv(6)
    (out, lse), _ = both(q, k, v, key_lengths=torch.tensor([0, NK + 5]), return_lse=True)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert torch.equal(out[1], quantattn.sageattn(q[1:], k[1:], v[1:], backend="triton")[0])


# ==================================================================================================
# On a real GPU (marker: gpu)

DEV = "cuda"
GPU_KERNEL_VS_REFERENCE = 0.1
GPU_CONFIGS = [QuantConfig(), QuantConfig(pv_dtype="fp16", pv_accum="fp32"), SAGE1, QuantConfig(pv_accum="fp32+fp16")]


rnd = functools.partial(make, device=DEV)


def gpu_qkv(seed, b=2, hq=8, hkv=2, nq=1024, nk=1536, d=128, dtype=torch.bfloat16):
    return (
        rnd(seed, b, hq, nq, d, dtype=dtype),
        rnd(seed + 1, b, hkv, nk, d, bias=4.0, dtype=dtype),
        rnd(seed + 2, b, hkv, nk, d, bias=1.0, dtype=dtype),
    )


def check(q, k, v, cfg, mask_for_truth=None, **kw):
    out = quantattn.sageattn(q, k, v, config=cfg, backend="triton", **kw)
    ref = quantattn.sageattn(q, k, v, config=cfg, backend="reference", **kw)
    truth_mask = kw.get("attn_mask") if mask_for_truth is None else mask_for_truth
    truth = attention_fp64(q, k, v, kw.get("is_causal", False), attn_mask=truth_mask, chunk=256)
    assert torch.isfinite(out).all(), "NaN/Inf in the kernel's output"
    err_ref = rel_l1(ref, truth)
    assert rel_l1(out, ref) <= GPU_KERNEL_VS_REFERENCE * err_ref + 1e-5, (cfg.name, rel_l1(out, ref), err_ref)
    return out, err_ref


@pytest_marks(GPU)
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask(cfg, causal):
    dtype = torch.float16 if cfg.pv_accum == "fp32+fp16" else torch.bfloat16
    q, k, v = gpu_qkv(1, dtype=dtype)
    g = torch.Generator(device=DEV).manual_seed(2)
    mask = torch.rand(2, 8, 1024, 1536, generator=g, device=DEV) < 0.5
    mask[0, 3, 100] = False  # a row that sees nothing: zeros
    out, _ = check(q, k, v, cfg, attn_mask=mask, is_causal=causal)
    assert (out[0, 3, 100] == 0).all()


@pytest_marks(GPU)
@pytest.mark.parametrize("cfg", GPU_CONFIGS[:2], ids=lambda c: c.name)
def test_additive_mask_broadcast_over_heads(cfg):
    q, k, v = gpu_qkv(3)
    g = torch.Generator(device=DEV).manual_seed(4)
    bias = (3 * torch.randn(2, 1, 1024, 1536, generator=g, device=DEV)).bfloat16()
    bias[..., 1000:] = -math.inf
    check(q, k, v, cfg, attn_mask=bias)


@pytest_marks(GPU)
def test_transformers_padding_mask_matches_key_lengths():
    """transformers' left-padding-free right padding as a bool [B, 1, N, N] mask, and the same padding
    as key_lengths (the fast path): both close to FP64 under the mask."""
    n = 2048
    q, k, v = gpu_qkv(5, nq=n, nk=n)
    lengths = torch.tensor([n, 1300], device=DEV, dtype=torch.int32)
    pad = torch.arange(n, device=DEV)[None, :] < lengths[:, None]
    causal = torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
    mask = causal[None, None] & pad[:, None, None, :]
    out_mask, _ = check(q, k, v, QuantConfig(), attn_mask=mask)
    out_len, _ = check(q, k, v, QuantConfig(), mask_for_truth=mask, key_lengths=lengths, is_causal=True)
    truth = attention_fp64(q, k, v, attn_mask=mask, chunk=256)
    rows = torch.arange(n, device=DEV) < 1300  # rows past the padding of batch 1 see only real keys too
    for out in (out_mask, out_len):
        assert rel_l1(out[1][:, rows], truth[1][:, rows]) < 0.05


@pytest_marks(GPU)
@pytest.mark.parametrize("cfg", GPU_CONFIGS[:2], ids=lambda c: c.name)
def test_key_lengths_skip_garbage_padding(cfg):
    q, k, v = gpu_qkv(6, nq=512, nk=4096)
    lengths = torch.tensor([4096 - 1000, 77], device=DEV)
    k[0, :, 3096:], v[1, :, 77:] = math.nan, math.inf
    pad = (torch.arange(4096, device=DEV)[None, :] < lengths[:, None])[:, None, None, :]
    check(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0, 0.0), cfg, mask_for_truth=pad, key_lengths=lengths)
    out = quantattn.sageattn(q, k, v, config=cfg, key_lengths=lengths)
    assert torch.equal(out, quantattn.sageattn(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0, 0.0), config=cfg,
                                               key_lengths=lengths))  # fmt: skip


@pytest_marks(GPU)
def test_masked_call_captures_in_a_cuda_graph():
    q, k, v = gpu_qkv(7, nq=256, nk=512)
    mask = torch.rand(2, 1, 256, 512, device=DEV) < 0.7
    lengths = torch.tensor([512, 300], device=DEV, dtype=torch.int32)
    eager = quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    lengths.fill_(100)  # new lengths, same graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, quantattn.sageattn(q, k, v, attn_mask=mask, key_lengths=lengths))


# ----------------------------------------------------------------------------------------------------
# Long contexts


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # 256K keys
@pytest.mark.parametrize("causal", [False, True])
def test_256k_keys(causal):
    """The last 512 queries against 262144 keys with channel bias in K and V, against the reference."""
    q = rnd(10, 1, 4, 512, 128, bias=1.0)
    k, v = rnd(11, 1, 2, 262144, 128, bias=8.0), rnd(12, 1, 2, 262144, 128, bias=2.0)
    check(q, k, v, QuantConfig(), is_causal=causal)


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # 256K x 256K and its FP64 truth
def test_256k_by_256k_one_head_is_finite_and_accurate():
    """A full 256K x 256K causal call of one head against FP64 attention on its last 2048 queries
    (FP64 on all of them would take minutes), within twice the error at 8K."""
    n = 262144
    q, k, v = rnd(13, 1, 1, n, 128), rnd(14, 1, 1, n, 128, bias=4.0), rnd(15, 1, 1, n, 128)
    out = quantattn.sageattn(q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    tail = slice(n - 2048, n)
    truth = attention_fp64(q[:, :, tail], k, v, is_causal=True, chunk=256)
    short = quantattn.sageattn(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True)
    err_8k = rel_l1(short, attention_fp64(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192], is_causal=True))
    assert rel_l1(out[:, :, tail], truth) <= 2 * err_8k, (rel_l1(out[:, :, tail], truth), err_8k)


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # reads the allocator's peak up to 256K keys
def test_memory_grows_linearly_with_length():
    """Peak extra memory of a call (beyond its inputs and output) at 32K, 64K, 128K and 256K tokens: the
    ratio between consecutive lengths stays at 2 (no N^2 buffer anywhere)."""
    peaks = []
    for n in (32768, 65536, 131072, 262144):
        q, k, v = (rnd(16 + i, 1, 4, n, 128) for i in range(3))
        out = torch.empty_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = quantattn.sageattn(q, k, v)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v, out
    ratios = [b / a for a, b in zip(peaks, peaks[1:], strict=False)]
    assert all(1.7 < r < 2.3 for r in ratios), (peaks, ratios)
