"""quantattn.memory: the stated per-call memory against the buffers the launcher really allocates (K/V
preprocessing through the Triton interpreter on CPU). The whole-call peak is measured on the GPU
(tests/test_integrations_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from quantattn import memory
from quantattn.config import VARIANTS, QuantConfig

CONFIGS = [QuantConfig(), VARIANTS["sage1"], QuantConfig(pv_dtype="fp16", pv_accum="fp32", smooth_v=True)]


def storage_bytes(*tensors) -> int:
    """Allocator-rounded bytes of the distinct storages behind the tensors."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = memory._block(storage.nbytes())
    return sum(seen.values())


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_buffers_match_what_preprocess_kv_allocates(cfg):
    from quantattn.kernels import launch

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 70, 24, generator=g).bfloat16() for _ in range(2))
    kv = launch.triton_preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
    sizes = memory.buffers((2, 4, 50, 24), k.shape, cfg)
    assert storage_bytes(*kv.k_stats, *kv.v_stats) == sizes["stats"]
    assert storage_bytes(kv.k) == sizes["k_int8"] and storage_bytes(kv.k_scale) == sizes["k_scale"]
    assert (storage_bytes(kv.v) if kv.v is not v else 0) == sizes["v_quant"]


def test_default_variant_numbers():
    """The README's example: B=1, 8 kv heads, 4096 keys, head_dim 128, FP8 PV."""
    sizes = memory.buffers((1, 32, 4096, 128), (1, 8, 4096, 128), QuantConfig())
    assert sizes["k_int8"] == sizes["v_quant"] == 4 * 2**20  # one byte per element
    assert sizes["k_scale"] == 128 * 2**10 and sizes["stats"] == 24 * 2**10
    total = memory.extra_bytes((1, 32, 4096, 128), (1, 8, 4096, 128), QuantConfig())
    assert total == sum(sizes.values())  # the partial sums are alive with everything else, at the peak
    assert total < 16 * 2**20 * 0.65  # under two thirds of K and V in bf16


def test_layouts_varlen_and_empty_calls():
    cfg = QuantConfig()
    hnd = memory.extra_bytes((2, 8, 100, 64), (2, 4, 300, 64), cfg)
    assert memory.extra_bytes((2, 100, 8, 64), (2, 300, 4, 64), cfg, tensor_layout="NHD") == hnd
    one = memory.extra_bytes((1, 8, 300, 64), (1, 4, 300, 64), cfg)
    packed = memory.extra_bytes((300, 8, 64), (300, 4, 64), cfg, num_sequences=1, max_seqlen_k=300)
    assert packed == one + 2 * 512  # plus the int32 offsets
    assert memory.extra_bytes((2, 8, 0, 64), (2, 4, 300, 64), cfg) == 0
    # smooth Q's float32 temporaries dominate: the 4-bit variant needs more than its K/V buffers
    assert memory.extra_bytes((1, 8, 256, 64), (1, 8, 256, 64), VARIANTS["sage2-4b"]) > 4 * one


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"config": "sage1"}, TypeError),
        ({"num_sequences": 2}, ValueError),
        ({"tensor_layout": "BHSD"}, ValueError),
        ({"q_shape": (8, 100, 64)}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    args = {"q_shape": (2, 8, 100, 64), "k_shape": (2, 4, 300, 64), "config": QuantConfig(), **kwargs}
    with pytest.raises(error):
        memory.extra_bytes(args.pop("q_shape"), args.pop("k_shape"), args.pop("config"), **args)
