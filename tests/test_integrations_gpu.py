"""Integrations on a real GPU: torch.compile with inductor (fullgraph), CUDA-graph capture and replay,
views with storage offsets and strides, inputs never written, the per-call memory that
quantattn.memory states, and tiny transformers / diffusers models on the Triton kernels.

Compiled and graph-replayed calls run the same kernels on the same values as eager calls, and the
kernels are deterministic (fixed reduction orders, no atomics in the results), so those comparisons
are bit for bit. Run with `-rP` to see the per-model output differences printed by the model tests.
"""

from __future__ import annotations

import functools

import helpers
import pytest
import torch
import torch.nn.functional as F

import quantattn as qa
from quantattn import memory
from quantattn.config import VARIANTS, QuantConfig
from quantattn.integrations import torch_sdpa as S
from quantattn.metrics import relative_l1 as rel_l1

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("fresh_integrations"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DEV = "cuda"
FP16_PV = QuantConfig(pv_dtype="fp16", pv_accum="fp32")


make = functools.partial(helpers.make, device=DEV)


def qkv(seed, b=2, hq=8, hkv=2, n=1000, d=128, dtype=torch.bfloat16):
    return (
        make(seed, b, hq, n, d, dtype=dtype),
        make(seed + 1, b, hkv, n, d, dtype=dtype),
        make(seed + 2, b, hkv, n, d, dtype=dtype),
    )


# ---- torch.compile ------------------------------------------------------------------------------


class Attention(torch.nn.Module):
    """Every entry point a model may call: sageattn (two variants, lse), sdpa, and patched SDPA."""

    def forward(self, q, k, v):
        a = qa.sageattn(q, k, v, is_causal=True)
        b, lse = qa.sageattn(q, k, v, "HND", False, None, True, config=FP16_PV)
        c = qa.sdpa(q, k, v, enable_gqa=True)
        with qa.patched():
            d = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return a, b, lse, c, d


def test_compile_fullgraph_with_inductor_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v = qkv(1)
    model = Attention()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    want = model(q, k, v)
    for got, expected in zip(compiled(q, k, v), want, strict=True):
        assert torch.equal(got, expected)
    assert counter.frame_count == 1
    calls = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(name.startswith("quantattn.sageattn") for name in calls) == 4
    assert not S.fallbacks
    # new values, same shapes: the compiled graph is reused and still right
    q2, k2, v2 = qkv(4)
    for got, expected in zip(compiled(q2, k2, v2), model(q2, k2, v2), strict=True):
        assert torch.equal(got, expected)
    assert counter.frame_count == 1


def test_compile_varlen_with_inductor_matches_eager():
    lens = [300, 1, 700]
    cu = torch.tensor([0, 300, 301, 1001], dtype=torch.int32, device=DEV)
    q, k, v = make(5, sum(lens), 8, 64), make(6, sum(lens), 4, 64), make(7, sum(lens), 4, 64)

    def f(q, k, v, cu):
        return qa.sageattn_varlen(q, k, v, cu, cu, max(lens), max(lens), is_causal=True, return_lse=True)

    (out, lse), (want, want_lse) = torch.compile(f, fullgraph=True)(q, k, v, cu), f(q, k, v, cu)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_compile_reduce_overhead_runs_in_cuda_graphs():
    """mode="reduce-overhead": inductor records the compiled graph, custom ops included, in CUDA graphs."""
    model = Attention()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for seed in (10, 20, 30, 40):  # warm-up, recording, then replays
        q, k, v = qkv(seed)
        got = [t.clone() for t in compiled(q, k, v)]
        for g, expected in zip(got, model(q, k, v), strict=True):
            assert torch.equal(g, expected), seed


# ---- CUDA graphs --------------------------------------------------------------------------------


def capture(fn, *static):
    """Warm up on a side stream (compiles kernels, fills caches), then capture one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


ENTRY_POINTS = {
    "sageattn": lambda q, k, v: qa.sageattn(q, k, v, is_causal=True),
    "sageattn_fp16_pv_lse": lambda q, k, v: qa.sageattn(q, k, v, config=FP16_PV, return_lse=True),
    "sageattn_smooth_v_per_tensor": lambda q, k, v: qa.sageattn(q, k, v, qk_quant_gran="per_tensor", smooth_v=True),
    "sageattn_sage2_4b_smooth_q": lambda q, k, v: qa.sageattn(q, k, v, config=VARIANTS["sage2-4b"], is_causal=True),
    "sdpa": lambda q, k, v: qa.sdpa(q, k, v, is_causal=True, enable_gqa=True),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_cuda_graph_replay_with_new_inputs_matches_eager(name):
    fn = ENTRY_POINTS[name]
    static = qkv(50)
    graph, out = capture(fn, *static)
    outs = out if isinstance(out, tuple) else (out,)
    previous = [t.clone() for t in outs]
    for seed in (60, 70):
        for buffer, fresh in zip(static, qkv(seed), strict=True):
            buffer.copy_(fresh)  # new values in the captured input buffers
        graph.replay()
        want = fn(*static)  # eager, on the same new values
        want = want if isinstance(want, tuple) else (want,)
        for got, expected, before in zip(outs, want, previous, strict=True):
            assert torch.equal(got, expected), f"{name}: replay differs from eager"
            assert not torch.equal(got, before), f"{name}: replay did not recompute"
        previous = [t.clone() for t in outs]
    assert not S.fallbacks


def test_cuda_graph_replay_varlen():
    cu = torch.tensor([0, 500, 501, 1300], dtype=torch.int32, device=DEV)
    static = (make(80, 1300, 8, 128), make(81, 1300, 2, 128), make(82, 1300, 2, 128))

    def fn(q, k, v):
        return qa.sageattn_varlen(q, k, v, cu, cu, 800, 800, is_causal=True)

    graph, out = capture(fn, *static)
    for buffer, fresh in zip(
        static, (make(83, 1300, 8, 128), make(84, 1300, 2, 128), make(85, 1300, 2, 128)), strict=True
    ):
        buffer.copy_(fresh)
    graph.replay()
    assert torch.equal(out, fn(*static))


# ---- views, storage offsets, no writes to the inputs -------------------------------------------


def strided_inputs(seed):
    """Views as models make them: slices with storage offsets, and a projection's [B, N, 3, H, d]
    output transposed to [B, H, N, d] (heads and tokens strided, channels contiguous)."""
    big = make(seed, 2, 12, 900, 160)
    sliced = (big[:, 0:8, 50:850, 16:144], big[:, 8:10, 0:800, 0:128], big[:, 10:12, 100:900, 32:160])
    proj = make(seed + 1, 2, 700, 3, 8, 64)
    projected = tuple(proj[:, :, i].transpose(1, 2) for i in range(3))
    return big, proj, sliced, projected


def test_views_and_storage_offsets_give_the_contiguous_result():
    _, _, sliced, projected = strided_inputs(90)
    assert sliced[0].storage_offset() > 0 and not sliced[0].is_contiguous() and not projected[0].is_contiguous()
    for q, k, v in (sliced, projected):
        contiguous = [t.contiguous() for t in (q, k, v)]
        gqa = q.shape[1] != k.shape[1]
        assert torch.equal(qa.sageattn(q, k, v, is_causal=True), qa.sageattn(*contiguous, is_causal=True))
        assert torch.equal(qa.sdpa(q, k, v, enable_gqa=gqa), qa.sdpa(*contiguous, enable_gqa=gqa))
        nhd = [t.transpose(1, 2) for t in (q, k, v)]  # the same views read as NHD
        assert torch.equal(qa.sageattn(*nhd, "NHD"), qa.sageattn(*contiguous).transpose(1, 2))
    assert not S.fallbacks


@pytest.mark.parametrize(
    "cfg", [QuantConfig(), FP16_PV, VARIANTS["sage2-4b"], QuantConfig(smooth_v=True, qk_granularity="per_tensor")],
    ids=lambda c: c.name,
)  # fmt: skip
def test_inputs_are_never_written(cfg):
    big, proj, sliced, projected = strided_inputs(100)
    snapshots = [big.clone(), proj.clone()]
    for q, k, v in (sliced, projected):
        qa.sageattn(q, k, v, config=cfg, is_causal=True, return_lse=True)
        with qa.patched(config=cfg):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    packed = proj[0].reshape(700, 3, 8, 64)
    cu = torch.tensor([0, 200, 700], dtype=torch.int32, device=DEV)
    if not cfg.smooth_q:  # varlen smooth Q runs on the reference only
        qa.sageattn_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, 500, 500, is_causal=True)
    torch.cuda.synchronize()
    # every byte of the storages behind the views, not only the viewed elements, is unchanged
    assert torch.equal(big, snapshots[0]) and torch.equal(proj, snapshots[1])


# ---- memory ------------------------------------------------------------------------------------

MiB = 2**20


@pytest.mark.parametrize(
    "cfg", [QuantConfig(), VARIANTS["sage1"], QuantConfig(smooth_v=True, pv_dtype="fp16", pv_accum="fp32"),
            QuantConfig(qk_granularity="per_tensor"), VARIANTS["sage2-4b"]],
    ids=lambda c: c.name,
)  # fmt: skip
@pytest.mark.gpu_serial  # empties the allocator's cache and reads its peak
def test_peak_memory_is_what_quantattn_memory_states(cfg):
    """Sizes are multiples of 2 MiB, so the caching allocator neither splits nor pads them: the
    measured growth is the stated number, up to one large block that the allocator hands out whole
    (at most 1 MiB more than asked)."""
    q, k, v = make(110, 1, 16, 8192, 128), make(111, 1, 8, 8192, 128), make(112, 1, 8, 8192, 128)
    qa.sageattn(q, k, v, config=cfg)  # warm-up: kernels compiled, cuBLAS workspace made
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = qa.sageattn(q, k, v, config=cfg)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before - memory._block(out.untyped_storage().nbytes())
    stated = memory.extra_bytes(q.shape, k.shape, cfg)
    assert stated - 2 * MiB <= measured <= stated + MiB, (cfg.name, measured / MiB, stated / MiB)
    if not cfg.smooth_q:  # besides the quantized K and V, only scales and statistics: no copy of Q, K or V
        sizes = memory.buffers(q.shape, k.shape, cfg)
        assert measured - sizes["k_int8"] - sizes["v_quant"] < 4 * MiB  # K alone is 16 MiB in bf16


# ---- tiny models on the kernels ----------------------------------------------------------------


def test_transformers_llama_on_the_kernels():
    transformers = pytest.importorskip("transformers")
    import quantattn.integrations.transformers as T

    T.register()
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="quantattn")
    model = model.to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 512), device=DEV)
    with torch.no_grad():
        ours = model(ids).logits.float()
        model.set_attn_implementation("sdpa")
        theirs = model(ids).logits.float()
    assert not S.fallbacks
    print(
        f"MAXDIFF LlamaForCausalLM (H100, Triton) {float((ours - theirs).abs().max()):.4g} rel_l1 {rel_l1(ours, theirs):.3g}"
    )
    assert rel_l1(ours, theirs) < 0.05  # one default-variant call alone: 0.038 on random inputs (README)


def test_diffusers_flux_on_the_kernels():
    diffusers = pytest.importorskip("diffusers")
    import quantattn.integrations.diffusers as D

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
                                             pooled_projection_dim=32, axes_dims_rope=(16, 24, 24))  # fmt: skip
    model = model.to(DEV, torch.bfloat16).eval()
    grid = torch.meshgrid(torch.zeros(1), torch.arange(32.0), torch.arange(32.0), indexing="ij")
    inputs = dict(hidden_states=make(120, 1, 1024, 16), encoder_hidden_states=make(121, 1, 77, 64),
                  pooled_projections=make(122, 1, 32), timestep=torch.tensor([0.5], device=DEV, dtype=torch.bfloat16),
                  img_ids=torch.stack(grid, -1).reshape(-1, 3).to(DEV), txt_ids=torch.zeros(77, 3, device=DEV))  # fmt: skip
    with torch.no_grad():
        theirs = model(**inputs).sample.float()
        assert D.apply(model) == 2
        ours = model(**inputs).sample.float()
    assert not S.fallbacks
    print(
        f"MAXDIFF FluxTransformer2DModel (H100, Triton) {float((ours - theirs).abs().max()):.4g} rel_l1 {rel_l1(ours, theirs):.3g}"
    )
    assert rel_l1(ours, theirs) < 0.05
