"""The masked-attention benchmark's pure parts on CPU: arguments, the masks it builds, no-GPU exit."""

from __future__ import annotations

import pytest
import torch

from quantattn.bench import masks as M


def test_parser_defaults_and_lengths():
    args = M.parser().parse_args(["--seq-lens", "1K", "2048", "--quick"])
    assert args.seq_lens == [1024, 2048] and args.quick and args.head_dim == 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_it_says_so(capsys):
    assert M.main(["--quick"]) == M.EXIT_NO_GPU
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("case", M.CASES)
def test_each_case_gives_quantattn_and_sdpa_the_same_masking(case):
    b, n = 2, 32
    kw = M.masks_for(case, b, n, "cpu")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, 2, n, 16, generator=g).bfloat16() for _ in range(3))
    from quantattn.metrics import relative_l1
    from quantattn.reference import attention_fp64

    ours = attention_fp64(q, k, v, attn_mask=_as_mask(kw["ours"], n))
    sdpa = attention_fp64(q, k, v, attn_mask=kw["sdpa"].get("attn_mask"))
    assert relative_l1(ours, sdpa) < 1e-12


def _as_mask(kw, n):
    if "key_lengths" in kw:
        return (torch.arange(n)[None, :] < kw["key_lengths"][:, None])[:, None, None, :]
    return kw.get("attn_mask")
