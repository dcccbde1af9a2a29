"""The preprocessing's Hopper layout (V^T keys permuted per 32-key chunk, zero padding, k_scale rows of
a multiple of 4 floats) against the PyTorch definition in quantattn.hopper.layout, through the
interpreter (on a GPU machine the same test runs the compiled kernel)."""

from __future__ import annotations

import os

import pytest
import torch

from quantattn.config import QuantConfig
from quantattn.hopper.layout import from_wgmma_order, to_wgmma_order, wgmma_key_order

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or the Triton interpreter",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,d", [(1, 64), (45, 64), (64, 128), (100, 128), (130, 64), (256, 128), (1000, 128)])
def test_preprocess_wgmma_order_is_the_permuted_natural_layout(n, d):
    from quantattn.kernels import launch as L

    g = torch.Generator(device=DEV).manual_seed(n * 1000 + d)
    k = torch.randn(2, 2, n, d, generator=g, device=DEV).bfloat16()
    v = (torch.randn(2, 2, n, d, generator=g, device=DEV) + 3).bfloat16()  # pad zeros must not come from V
    cfg = QuantConfig()
    seqs = L.sequences(k, None, 0)
    natural = L.triton_preprocess_kv(k, v, cfg, seqs)
    # poison: the Hopper buffers' padding must be written, not inherited from the allocator
    torch.empty(2 * 2 * d * 512, dtype=torch.uint8, device=DEV).fill_(0x7F)
    hop = L.triton_preprocess_kv(k, v, cfg, seqs, wgmma_order=True)
    assert torch.equal(hop.k, natural.k)
    assert torch.equal(hop.k_scale, natural.k_scale)
    assert hop.k_scale.stride(1) % 4 == 0 and hop.k_scale.stride(2) == 1
    n32 = -(-n // 32) * 32
    assert hop.v.shape == (2, 2, d, n32)
    expected = to_wgmma_order(natural.v[..., :n].view(torch.uint8))
    assert torch.equal(hop.v.view(torch.uint8), expected)
    assert torch.equal(from_wgmma_order(hop.v.view(torch.uint8), n), natural.v[..., :n].view(torch.uint8))
    pad_positions = wgmma_key_order(n32) >= n
    assert (hop.v.view(torch.uint8)[..., pad_positions] == 0).all()
