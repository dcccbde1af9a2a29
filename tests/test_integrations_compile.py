"""torch.compile on CPU: the custom ops, and fullgraph compilation of code that calls sageattn,
sageattn_varlen and quantattn.sdpa (directly, patched, attached). CPU tensors run the reference, so a
compiled call must equal the eager one bit for bit. The GPU test compiles with inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import quantattn
from quantattn import ops
from quantattn.config import QuantConfig
from quantattn.integrations import torch_sdpa as S

pytestmark = pytest.mark.usefixtures("fresh_integrations")


def qkv(seed, b=1, hq=4, hkv=2, n=48, d=32, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def compiled(fn):
    """fn compiled whole (a graph break raises), through AOTAutograd so the fake implementations run."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def ops_in(counter):
    """The operators Dynamo's graphs call, overloads named by their packet ("quantattn.sageattn")."""
    names = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    return [name.removesuffix(".default") for name in names]


def test_sageattn_compiles_to_one_custom_op_and_matches_eager():
    q, k, v = qkv(0)
    cfg = quantattn.VARIANTS["sage1"]

    def f(q, k, v):
        a = quantattn.sageattn(q, k, v, is_causal=True)
        b, lse = quantattn.sageattn(q, k, v, "HND", False, 0.3, True, config=cfg, pv_accum_dtype="fp16+fp32")
        c = quantattn.sageattn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "NHD", qk_quant_gran="per_warp")
        return a * 2, b, lse, c

    fn, counter = compiled(f)
    for got, want in zip(fn(q, k, v), f(q, k, v), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)
    assert counter.frame_count == 1
    assert ops_in(counter).count("quantattn.sageattn") == 3


def test_config_and_options_cross_the_op_boundary_unchanged():
    cfg = QuantConfig(qk_dtype="int4", qk_granularity="per_block", pv_dtype="fp16", pv_accum="fp32", smooth_q=True)
    options = {"pv_accum_dtype": "fp16+fp32", "smooth_v": True}
    assert ops.unflatten_choices(ops.flatten_choices(cfg, options)) == (cfg, options)
    assert ops.unflatten_choices(ops.flatten_choices(None, {})) == (None, {})
    with pytest.raises(TypeError, match="unknown keyword argument"):
        ops.flatten_choices(None, {"pv_precision": "fp8"})
    with pytest.raises(TypeError, match="config must be a quantattn.QuantConfig"):
        ops.flatten_choices("sage1", {})


def test_varlen_compiles_and_matches_eager():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(70, h, 32, generator=g).bfloat16() for h in (4, 2, 2))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)

    def f(q, k, v, cu):
        return quantattn.sageattn_varlen(q, k, v, cu, cu, 40, 40, is_causal=True, return_lse=True)

    fn, counter = compiled(f)
    (out, lse), (want, want_lse) = fn(q, k, v, cu), f(q, k, v, cu)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert "quantattn.sageattn_varlen" in ops_in(counter)


def test_bad_calls_fail_at_compile_time_with_the_eager_message():
    q, k, v = qkv(2)
    with pytest.raises(Exception, match="head_dim"):
        compiled(lambda q, k, v: quantattn.sageattn(q, k, v[..., :16]))[0](q, k, v)
    with pytest.raises(Exception, match="pv_accum_dtype"):
        compiled(lambda q, k, v: quantattn.sageattn(q, k, v, pv_dtype="fp16", pv_accum_dtype="fp32+fp32"))[0](q, k, v)


def test_ops_pass_torch_library_opcheck():
    q, k, v = qkv(3, n=16)
    choices = ops.flatten_choices(None, {})
    torch.library.opcheck(
        torch.ops.quantattn.sageattn.default, (q, k, v, "HND", None, None, True, None, True, "auto", *choices)
    )
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(3)) > 0.5
    lengths = torch.tensor([16, 9][: q.shape[0]], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.quantattn.sageattn.default, (q, k, v, "HND", mask, lengths, False, None, True, "auto", *choices)
    )
    cu = torch.tensor([0, 16], dtype=torch.int32)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.quantattn.sageattn_varlen.default,
        (qp, kp, vp, cu, cu, 16, 16, False, None, False, "auto", *choices),
    )


class Block(torch.nn.Module):
    """A model whose attention is torch's SDPA, as most models' is."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d, dtype=torch.bfloat16)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("how", ["patched", "attach", "sdpa"])
def test_sdpa_compiles_without_graph_breaks(how):
    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(2, 32, 64).bfloat16()
    if how == "attach":
        quantattn.attach(block, cpu="reference")
        fn = block
    elif how == "patched":

        def fn(x):
            with quantattn.patched(cpu="reference"):
                return block(x)
    else:
        quantattn.patch(cpu="reference")
        fn = block
    with torch.no_grad():
        want = fn(x)
        got, counter = compiled(fn)
        got = got(x)
    assert torch.equal(got, want)
    assert "quantattn.sageattn" in ops_in(counter)
    assert counter.frame_count == 1
    assert not S.fallbacks
    assert F.scaled_dot_product_attention is (quantattn.sdpa if how == "sdpa" else S.ORIGINAL_SDPA)


def test_compiled_fallback_is_torch_sdpa_and_is_said_when_traced():
    q, k, v = (t.float() for t in qkv(4, hkv=4))
    fn, counter = compiled(lambda q, k, v: quantattn.sdpa(q, k, v, is_causal=True))
    S.let_dynamo_count_fallbacks()
    for _ in range(3):
        assert torch.equal(fn(q, k, v), S.ORIGINAL_SDPA(q, k, v, is_causal=True))
    assert counter.frame_count == 1 and "quantattn.sageattn" not in ops_in(counter)
    assert dict(S.fallbacks) == {"dtype torch.float32 (quantattn takes float16 and bfloat16)": 1}  # once per graph


def test_patched_compiles_in_a_process_that_never_patched_eagerly(monkeypatch):
    """The GPU suite's reduce-overhead test compiles `qa.patched()` before any eager patch; under xdist a
    worker could reach it first, and marking the fallback counter for Dynamo while Dynamo traced raised
    Unsupported. Here the mark is unset as in such a worker."""
    monkeypatch.setattr(S, "_dynamo_knows_fall_back", False)
    block, x = Block().eval(), torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(5)).bfloat16()

    def fn(x):
        with quantattn.patched(cpu="reference"):
            return block(x)

    with torch.no_grad():
        got, counter = compiled(fn)
        got = got(x)
        assert torch.equal(got, fn(x))
    assert "quantattn.sageattn" in ops_in(counter) and counter.frame_count == 1
    assert S._dynamo_knows_fall_back  # the eager call marked it
