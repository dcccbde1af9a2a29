"""The Hopper layout of K/V.

On the CPU: the Hopper kernel's key order, against a model of the registers it moves P through.

On a GPU or through the interpreter: the Triton preprocessing's Hopper layout (V^T keys permuted per 32-key chunk, zero padding, k_scale rows of
a multiple of 4 floats) against the PyTorch definition in quantattn.hopper.layout, through the
interpreter (on a GPU machine the same test runs the compiled kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

from quantattn.config import QuantConfig
from quantattn.hopper.layout import from_wgmma_order, to_wgmma_order, wgmma_key_order


def accumulator_keys(t: int) -> list[int]:
    """Keys of one 32-key chunk that thread t (lane % 4) of a quad holds in the QK accumulator, in the
    order the kernel packs them into the PV A operand: registers a0 (positions 4t..4t+3) then a2
    (positions 16+4t..16+4t+3); accumulator column group c holds keys 8c + 2t + {0, 1}."""
    packed = []
    for cc in range(4):  # a0 takes column groups 0, 1 of the chunk; a2 takes 2, 3
        packed += [8 * cc + 2 * t, 8 * cc + 2 * t + 1]
    return packed


def a_operand_positions(t: int) -> list[int]:
    """Positions (k index of an m64nNk32 8-bit A fragment) thread t holds: 4t..4t+3, then 16+4t..16+4t+3."""
    return [4 * t + j for j in range(4)] + [16 + 4 * t + j for j in range(4)]


def test_key_order_matches_the_register_model():
    order = wgmma_key_order(32)
    for t in range(4):
        for pos, key in zip(a_operand_positions(t), accumulator_keys(t), strict=True):
            assert order[pos].item() == key


def test_key_order_is_a_permutation_within_chunks():
    order = wgmma_key_order(128)
    assert sorted(order.tolist()) == list(range(128))
    assert ((order // 32) == (torch.arange(128) // 32)).all()


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_round_trip_and_zero_padding(n):
    vt = torch.randint(1, 255, (2, 3, 8, n), dtype=torch.uint8)
    hop = to_wgmma_order(vt)
    assert hop.shape[-1] == -(-n // 32) * 32
    assert torch.equal(from_wgmma_order(hop, n), vt)
    assert (hop[..., wgmma_key_order(hop.shape[-1]) >= n] == 0).all()


def test_rejects_partial_chunks():
    with pytest.raises(ValueError):
        wgmma_key_order(40)


gpu_or_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or the Triton interpreter",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@gpu_or_interpreter
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
