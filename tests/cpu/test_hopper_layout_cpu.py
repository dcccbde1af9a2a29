"""The Hopper kernel's key order, against a model of the registers it moves P through."""

from __future__ import annotations

import pytest
import torch

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
