"""Attention masks (bool and additive, SDPA's forms) and key padding given as per-batch lengths, on the
reference backend: what they mean (against FP64 attention under the same mask), how they combine with
causal masking, GQA and layouts, and what happens at the edges (rows that see no key, garbage padding)."""

from __future__ import annotations

import math

import pytest
import torch

import quantattn
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
