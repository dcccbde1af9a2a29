"""The backward pass, on three machines.

On the CPU (reference backend): the gradient of full-precision attention at the
inputs, whatever the forward's quantization.

Tolerance, FlashAttention's convention: a gradient is accurate when its max |error| against FP64
autograd is at most twice that of the same gradient computed by plain PyTorch autograd in the input
dtype (`dtype_grads`), plus twice the error of merely rounding the FP64 gradient to the dtype.
`test_bound_catches_wrong_gradients` shows the bound is tight enough to reject a wrong backward.

Marker `interpreter`: the backward kernels through the Triton interpreter, against the float32
reference backward.

The kernels multiply 16-bit operands (P and dS rounded to the input dtype, as FlashAttention does) with
FP32 accumulation; the reference keeps P and dS in float32. Both must meet the CPU tests'
bound against FP64 autograd (twice plain PyTorch autograd's error in the input dtype, plus rounding),
and the kernel must be at least as close to the reference (relative L1) as that plain run is: the
final rounding to the dtype dominates both, so a tighter fraction would test the seed. Small tiles
(16 and 32 rows) so that several blocks, the causal diagonal and the partial last blocks all run.

Marker `gpu`: the backward kernels on a real GPU, at real sizes, against FP64 autograd.
Bound as on the CPU: max |error| of each gradient at most twice that of
plain PyTorch autograd in the input dtype, plus twice the rounding of the FP64 gradient to the dtype.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import GPU, INTERPRETER, make_grad_inputs, max_err, pytest_marks

import quantattn
from quantattn import autograd as QA
from quantattn import calls
from quantattn.config import VARIANTS
from quantattn.integrations import torch_sdpa as S
from quantattn.kernels import backward_launch as BL
from quantattn.kernels.backward_launch import attention_backward
from quantattn.metrics import relative_l1 as rel_l1
from quantattn.reference.backward import attention_backward_dtype, attention_backward_reference


def make(seed, b=1, hq=4, hkv=2, nq=97, nk=97, d=59, dtype=torch.bfloat16):
    return make_grad_inputs(seed, hq, hkv, nq, nk, d, dtype, b)


def plain_attention(q, k, v, is_causal, sm_scale=None, return_lse=False):
    """softmax(sm_scale q k^T) v by autograd-able torch ops in the inputs' dtype (HND, GQA expanded)."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if is_causal:
        nq, nk = q.shape[-2], k.shape[-2]
        s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + (nk - nq), -math.inf)
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # softmax in float32 (float64 stays)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)  # rows with no key: 0, as quantattn
    out = p @ v
    return (out, lse) if return_lse else out


def autograd_grads(q, k, v, do, is_causal, sm_scale=None, dtype=None, grad_lse=None):
    """Gradients of plain_attention by torch autograd, computed in `dtype` (float64: the truth)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = plain_attention(*leaves, is_causal, sm_scale, return_lse=True)
    loss = (out * do.to(out.dtype)).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


def max_err_or_zero(a, b):
    return max_err(a, b) if a.numel() else 0.0


def bounds(q, k, v, do, is_causal, sm_scale=None, grad_lse=None):
    """(FP64 gradients, per-gradient bound) by the module docstring's rule."""
    truth = autograd_grads(q, k, v, do, is_causal, sm_scale, torch.float64, grad_lse)
    base = autograd_grads(q, k, v, do, is_causal, sm_scale, None, grad_lse)
    limits = [
        2 * max_err_or_zero(b, t) + 2 * max_err_or_zero(t.to(q.dtype), t) + 1e-6
        for b, t in zip(base, truth, strict=True)
    ]
    return truth, limits


def assert_accurate(grads, truth, limits):
    for name, g, t, lim in zip("qkv", grads, truth, limits, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        assert max_err_or_zero(g, t) <= lim, f"d{name}: max error {max_err_or_zero(g, t):.3e} > bound {lim:.3e}"


def sage_grads(q, k, v, do, layout="HND", **kw):
    """q, k, v gradients through quantattn.sageattn (reference backend on CPU tensors)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*leaves, layout, **kw)
    assert out.grad_fn is not None
    out.backward(do)
    return out, [t.grad for t in leaves]


# ----------------------------------------------------------------------------------------------------
# The reference backward is the derivative of attention


class _ExactAttention(torch.autograd.Function):
    """FP64 attention forward (out, lse) whose backward is attention_backward_reference: gradcheck
    compares that backward with finite differences of the forward."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, sm_scale):
        out, lse = plain_attention(q, k, v, is_causal, sm_scale, return_lse=True)
        ctx.save_for_backward(q, k, v)
        ctx.args = (is_causal, sm_scale)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v = ctx.saved_tensors
        return *attention_backward_reference(q, k, v, grad_out, *ctx.args, grad_lse=grad_lse), None, None


@pytest.mark.parametrize(
    "hq, hkv, nq, nk, causal",
    [(2, 2, 5, 5, False), (4, 2, 3, 6, True), (2, 1, 6, 3, True), (3, 1, 4, 7, False)],
)
def test_reference_backward_passes_gradcheck(hq, hkv, nq, nk, causal):
    g = torch.Generator().manual_seed(hq * 100 + nq * 10 + nk)
    q, k, v = (torch.randn(1, h, n, 3, generator=g, dtype=torch.float64) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: _ExactAttention.apply(q, k, v, causal, 0.7), inputs)


def test_reference_chunks_change_nothing():
    q, k, v, do = make(1, nq=50, nk=70, d=16)
    whole = attention_backward_reference(q, k, v, do, True)
    parts = attention_backward_reference(q, k, v, do, True, chunk=7)
    for a, b in zip(whole, parts, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# sageattn's gradients against FP64 autograd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "hq, hkv, nq, nk, d",
    [(4, 2, 97, 97, 59), (2, 2, 33, 97, 64), (4, 1, 97, 40, 16), (2, 2, 17, 23, 1), (2, 1, 9, 12, 256)],
    ids=["gqa-97-d59", "short-q", "mqa-long-q", "d1", "d256"],
)
def test_gradients_match_fp64_autograd(dtype, causal, hq, hkv, nq, nk, d):
    q, k, v, do = make(hq + nq + nk + d, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, dtype=dtype)
    out, grads = sage_grads(q, k, v, do, is_causal=causal)
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype
    assert_accurate(grads, *bounds(q, k, v, do, causal))


def test_nhd_layout_and_custom_scale():
    q, k, v, do = make(3, hq=4, hkv=2, nq=40, nk=56, d=24)
    nhd = [t.transpose(1, 2).contiguous() for t in (q, k, v, do)]
    out, grads = sage_grads(*nhd, layout="NHD", is_causal=True, sm_scale=0.31)
    assert out.shape == nhd[0].shape
    assert_accurate([g.transpose(1, 2) for g in grads], *bounds(q, k, v, do, True, 0.31))
    _, hnd_grads = sage_grads(q, k, v, do, is_causal=True, sm_scale=0.31)
    for a, b in zip(grads, hnd_grads, strict=True):
        assert torch.equal(a.transpose(1, 2), b)


def test_rows_that_see_no_key_get_zero_gradient():
    q, k, v, do = make(4, hq=2, hkv=2, nq=30, nk=10, d=16)  # causal: queries 0..19 see no key
    out, (dq, dk, dv) = sage_grads(q, k, v, do, is_causal=True)
    assert torch.all(out[:, :, :20] == 0) and torch.all(dq[:, :, :20] == 0)
    assert dq[:, :, 20:].abs().amax() > 0 and dk.abs().amax() > 0 and dv.abs().amax() > 0
    assert_accurate((dq, dk, dv), *bounds(q, k, v, do, True))


def test_inputs_are_not_modified_and_only_requested_gradients_are_made():
    q, k, v, do = make(5, nq=20, nk=20, d=8)
    copies = [t.clone() for t in (q, k, v, do)]
    qg = q.clone().requires_grad_()
    out = quantattn.sageattn(qg, k, v, is_causal=True)
    out.backward(do)
    assert qg.grad is not None and k.grad is None and v.grad is None
    for before, after in zip(copies, (qg.detach(), k, v, do), strict=True):
        assert torch.equal(before, after)
    with torch.no_grad():
        assert quantattn.sageattn(qg, k, v).grad_fn is None
    assert quantattn.sageattn(q, k, v).grad_fn is None  # nothing requires grad: the plain call


def test_lse_is_differentiable():
    q, k, v, do = make(6, hq=4, hkv=2, nq=30, nk=45, d=16)
    g_lse = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(60))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = quantattn.sageattn(*leaves, is_causal=True, return_lse=True)
    ((out.float() * do.float()).sum() + (lse * g_lse).sum()).backward()
    assert_accurate([t.grad for t in leaves], *bounds(q, k, v, do, True, grad_lse=g_lse))


# ----------------------------------------------------------------------------------------------------
# What the gradient is, and that the test can tell a wrong one


def test_gradient_is_exact_attentions_not_the_quantized_forwards():
    q, k, v, do = make(7, nq=64, nk=80, d=32)
    want = attention_backward_dtype(q, k, v, do, True)
    outs = []
    for variant in ("sage1", "sage2-8b", "sage2-4b"):
        out, grads = sage_grads(q, k, v, do, is_causal=True, config=VARIANTS[variant])
        outs.append(out)
        for g, w in zip(grads, want, strict=True):
            assert torch.equal(g, w), variant  # the same gradient whatever the quantization
    assert not torch.equal(outs[0], outs[2])  # while the forwards differ


def test_delta_from_the_quantized_output_would_fail():
    """FlashAttention-2 takes delta = rowsum(dO * O); with O the quantized output (here the 4-bit QK
    variant) that gradient misses the bound which the exact delta meets."""
    q, k, v, do = make(8, hq=2, hkv=2, nq=64, nk=64, d=32)
    truth, limits = bounds(q, k, v, do, False)
    out = quantattn.sageattn(q, k, v, config=VARIANTS["sage2-4b"]).double()
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    p = torch.softmax((q64 @ k64.transpose(-1, -2)) / math.sqrt(32), -1)
    ds = p * (do64 @ v64.transpose(-1, -2) - (do64 * out).sum(-1, keepdim=True))
    dq_fa2 = ds @ k64 / math.sqrt(32)
    assert max_err_or_zero(dq_fa2, truth[0]) > limits[0]
    _, grads = sage_grads(q, k, v, do, config=VARIANTS["sage2-4b"])
    assert_accurate(grads, truth, limits)


def test_bound_catches_wrong_gradients():
    q, k, v, do = make(9, hq=2, hkv=2, nq=48, nk=48, d=32)
    truth, limits = bounds(q, k, v, do, True)
    dq, dk, dv = attention_backward_dtype(q, k, v, do, True)
    assert_accurate((dq, dk, dv), truth, limits)
    wrong = {
        "dk and dv swapped": (dq, dv, dk),
        "sm_scale missing from dq": ((dq.float() * math.sqrt(32)).to(dq.dtype), dk, dv),
        "causal mask ignored": attention_backward_dtype(q, k, v, do, False),
        "gqa heads not summed": (dq, dk / 2, dv),
        # d lse = delta cancels delta: dS = P dP
        "delta left out": attention_backward_dtype(
            q, k, v, do, True, grad_lse=(plain_attention(q.float(), k.float(), v.float(), True) * do.float()).sum(-1)
        ),  # fmt: skip
    }
    for name, grads in wrong.items():
        with pytest.raises(AssertionError):
            assert_accurate(grads, truth, limits)
            pytest.fail(name)


# ----------------------------------------------------------------------------------------------------
# Wiring: what has no backward says so; SDPA no longer falls back for training


def test_varlen_and_masks_with_grad_raise_clearly():
    q, k, v, _ = make(10, hq=2, hkv=2, nq=16, nk=16, d=8)
    packed = [t[0].transpose(0, 1).clone().requires_grad_() for t in (q, k, v)]
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="dense calls"):
        quantattn.sageattn_varlen(*packed, cu, cu, 10, 10)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        quantattn.sageattn(q.requires_grad_(), k, v, key_lengths=torch.tensor([8]))
    with torch.no_grad():
        quantattn.sageattn_varlen(*packed, cu, cu, 10, 10)  # no gradient needed: fine


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_mask_that_requires_grad_raises_like_inputs_that_do(backend):
    """A float mask whose gradient is wanted, with q, k and v that need none: no silently missing or wrong
    mask gradient, the error that a mask with q.requires_grad gives (on every backend: it is raised
    before one is chosen)."""
    q, k, v, _ = make(11, hq=2, hkv=2, nq=16, nk=16, d=8)
    mask = torch.randn(16, 16, generator=torch.Generator().manual_seed(11)).requires_grad_()
    with pytest.raises(NotImplementedError, match="attn_mask"):
        quantattn.sageattn(q, k, v, attn_mask=mask, backend=backend)
    with torch.no_grad():  # no gradient recorded: the mask is an ordinary input
        out = quantattn.sageattn(q, k, v, attn_mask=mask, backend="reference")
    assert torch.equal(out, quantattn.sageattn(q, k, v, attn_mask=mask.detach(), backend="reference"))


def test_sdpa_trains_on_quantattn_and_falls_back_where_it_cannot():
    q, k, v, do = make(11, hq=2, hkv=2, nq=32, nk=32, d=16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    S.reset_fallbacks()
    with quantattn.patched(cpu="reference"):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    assert not S.fallbacks and out.grad_fn is not None
    out.backward(do)
    assert_accurate([t.grad for t in leaves], *bounds(q, k, v, do, True))
    with quantattn.patched(cpu="reference"):
        F.scaled_dot_product_attention(*leaves, dropout_p=0.5)
    assert "dropout_p > 0" in S.fallbacks
    S.reset_fallbacks()


def test_backward_backend_choice():
    assert QA.backward_backend(torch.device("cpu"), "auto") == "reference"
    assert QA.backward_backend(torch.device("cpu"), "triton") == "triton"
    assert QA.backward_backend(torch.device("cuda", 0), "auto") == "triton"
    assert QA.backward_backend(torch.device("cuda", 0), "reference") == "reference"


def test_compiled_training_runs_the_same_backward():
    q, k, v, do = make(12, hq=2, hkv=1, nq=24, nk=24, d=16)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: quantattn.sageattn(q, k, v, is_causal=True), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    eager_out, eager = sage_grads(q, k, v, do, is_causal=True)
    assert torch.equal(out, eager_out)
    for a, b in zip((t.grad for t in leaves), eager, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# The forward + backward benchmark's CPU-side parts


def test_bench_options_and_flops():
    from quantattn.bench import backward as B

    s = B.settings(B.parser().parse_args(["--quick", "--causal", "on", "--impls", "quantattn", "sdpa-flash"]))
    assert s["head_dims"] == [128] and s["seq_lens"] == [1024, 4096, 16384] and s["causals"] == [True]
    assert s["implementations"] == ["quantattn", "sdpa-flash"] and s["batch"] == 4 and s["heads"] == 32
    s = B.settings(B.parser().parse_args(["--seq-lens", "2K", "3000", "--head-dims", "64", "--batch", "2"]))
    assert s["seq_lens"] == [2048, 3000] and s["head_dims"] == [64] and s["causals"] == [False, True]
    for bad in (["--seq-lens", "0"], ["--impls", "flash3"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            B.parser().parse_args(bad)
    assert B.flops(4, 32, 1024, 128, False) == 4 * 4 * 32 * 1024**2 * 128 * 3.5
    assert B.flops(4, 32, 1024, 128, True) == B.flops(4, 32, 1024, 128, False) / 2


def test_bench_without_a_gpu_says_so(capsys, tmp_path):
    from quantattn.bench import backward as B

    assert B.main(["--quick", "--out", str(tmp_path / "x.json")]) == B.EXIT_NO_GPU
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_pipeline_on_cpu():
    """The timing loop, records and table with wall-clock timing on tiny CPU shapes (numbers mean nothing)."""
    from quantattn.bench import backward as B

    s = B.settings(B.parser().parse_args(["--seq-lens", "64", "--head-dims", "16", "--causal", "on", "--batch", "1",
                                          "--heads", "2", "--impls", "quantattn", "sdpa-cudnn"]))  # fmt: skip
    s.update(device="cpu", timing={"min_repeats": 2, "max_repeats": 2, "target_s": 0.0, "warmups": 1})
    result = {"format": B.FORMAT, "metadata": {"settings": s}, "speed": [], "check": []}
    saves = []
    B.run(result, lambda: saves.append(len(result["speed"])))
    ours, cudnn = result["speed"]
    assert ours["implementation"] == "quantattn" and ours["tops"] > 0 and ours["repeats"] == 2
    assert "error" in cudnn  # no cuDNN on the CPU: recorded, the run goes on
    assert saves == [1, 2]
    table = B.format_table(result)
    assert "head_dim 16, causal on" in table and "error" in table


# ==================================================================================================
# The backward kernels through the Triton interpreter (marker: interpreter)

TILE = (32, 16, 4, 1)  # BLOCK_M, BLOCK_N, warps, stages


def kernel_grads(q, k, v, do, causal, sm_scale, grad_lse=None, tile=TILE):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BL.attention_backward(q, k, v, do, causal, sm_scale, dq, dk, dv, grad_lse, tile)
    return dq, dk, dv


def plain_grads(q, k, v, do, causal, sm_scale, dtype, grad_lse=None):
    """torch autograd of attention computed in `dtype` (softmax in float32 at least)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    group = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    s = (qq @ kk.transpose(-1, -2)) * sm_scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        keys, rows = torch.arange(nk, device=q.device), torch.arange(nq, device=q.device)
        s = s.masked_fill(keys[None, :] > rows[:, None] + (nk - nq), -math.inf)
    s = s.to(torch.promote_types(dtype, torch.float32))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    loss = ((p.to(dtype) @ vv) * do.to(dtype)).sum()
    if grad_lse is not None:
        lse = torch.logsumexp(s, -1)
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


def check(q, k, v, do, causal, sm_scale, grads, grad_lse=None):
    truth = plain_grads(q, k, v, do, causal, sm_scale, torch.float64, grad_lse)
    plain = plain_grads(q, k, v, do, causal, sm_scale, q.dtype, grad_lse)
    ref = attention_backward_reference(q, k, v, do, causal, sm_scale, grad_lse)
    for name, g, t, p, r in zip("qkv", grads, truth, plain, ref, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        bound = 2 * max_err(p, t) + 2 * max_err(t.to(q.dtype), t) + 1e-6
        assert max_err(g, t) <= bound, f"d{name}: {max_err(g, t):.3e} > {bound:.3e}"
        assert rel_l1(g, r) <= rel_l1(p, r), f"d{name}: rel L1 to the reference {rel_l1(g, r):.3e} > {rel_l1(p, r):.3e}"


@pytest_marks(INTERPRETER)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "hq, hkv, nq, nk, d, dtype",
    [
        (2, 2, 80, 80, 16, torch.bfloat16),
        (2, 1, 48, 80, 40, torch.float16),  # GQA, Nq < Nk, head_dim padded to 64
        (4, 2, 72, 33, 16, torch.bfloat16),  # GQA, Nq > Nk: causal rows that see no key
    ],
    ids=["mha-80-bf16", "gqa-48x80-d40-fp16", "gqa-72x33-bf16"],
)
def test_kernels_match_reference(causal, hq, hkv, nq, nk, d, dtype):
    q, k, v, do = make_grad_inputs(nq + nk + d, hq, hkv, nq, nk, d, dtype)
    sm_scale = 1.0 / math.sqrt(d)
    grads = kernel_grads(q, k, v, do, causal, sm_scale)
    check(q, k, v, do, causal, sm_scale, grads)
    if causal and nq > nk:
        assert torch.all(grads[0][:, :, : nq - nk] == 0)


@pytest_marks(INTERPRETER)
@pytest.mark.parametrize("tile", [(16, 32, 4, 1), (64, 64, 4, 1)], ids=["bm16-bn32", "bm64-bn64"])
@pytest.mark.parametrize(
    "hq, hkv, nq, nk, d, dtype",
    [(2, 2, 50, 70, 1, torch.float16), (1, 1, 20, 36, 256, torch.bfloat16)],
    ids=["d1-fp16", "d256-bf16"],
)
def test_other_tiles_and_head_dims(tile, hq, hkv, nq, nk, d, dtype):
    q, k, v, do = make_grad_inputs(nq * d, hq, hkv, nq, nk, d, dtype)
    grads = kernel_grads(q, k, v, do, True, 1.0 / math.sqrt(d), tile=tile)
    check(q, k, v, do, True, 1.0 / math.sqrt(d), grads)


@pytest_marks(INTERPRETER)
def test_lse_gradient_custom_scale_and_batches_in_parts(monkeypatch):
    q, k, v, do = make_grad_inputs(5, 2, 1, 40, 24, 16, torch.bfloat16, b=2)
    g_lse = torch.randn(2, 2, 40, generator=torch.Generator().manual_seed(50))
    monkeypatch.setattr(calls, "MAX_GRID_Y", 2)  # one launch per batch entry: the split path
    grads = kernel_grads(q, k, v, do, True, 0.4, g_lse)
    check(q, k, v, do, True, 0.4, grads, g_lse)


@pytest_marks(INTERPRETER)
def test_sageattn_backward_runs_the_kernels_in_nhd():
    q, k, v, do = make_grad_inputs(6, 2, 1, 24, 40, 32, torch.bfloat16)
    nhd = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*nhd, "NHD", is_causal=True, backend="triton")
    out.backward(do.transpose(1, 2))
    grads = [t.grad.transpose(1, 2) for t in nhd]
    want = kernel_grads(q, k, v, do, True, 1.0 / math.sqrt(32), tile=None)
    for a, b in zip(grads, want, strict=True):
        assert torch.equal(a, b)
    check(q, k, v, do, True, 1.0 / math.sqrt(32), grads)


# ==================================================================================================
# On a real GPU (marker: gpu)

DEV = "cuda"
make_on_gpu = functools.partial(make_grad_inputs, device=DEV)


def assert_accurate_on_gpu(q, k, v, do, causal, sm_scale, grads):
    truth = plain_grads(q, k, v, do, causal, sm_scale, torch.float64)
    plain = plain_grads(q, k, v, do, causal, sm_scale, q.dtype)
    for name, g, t, p in zip("qkv", grads, truth, plain, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        bound = 2 * max_err(p, t) + 2 * max_err(t.to(q.dtype), t) + 1e-6
        assert max_err(g, t) <= bound, f"d{name}: {max_err(g, t):.3e} > {bound:.3e}"


@pytest_marks(GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [1024, 4096])
def test_sageattn_gradients_match_fp64(dtype, causal, d, n):
    q, k, v, do = make_on_gpu(d + n, 4, 2, n, n, d, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*leaves, is_causal=causal)
    out.backward(do)
    assert_accurate_on_gpu(q, k, v, do, causal, 1.0 / math.sqrt(d), [t.grad for t in leaves])


@pytest_marks(GPU)
@pytest.mark.parametrize("nq, nk", [(1000, 3000), (3000, 1000), (1, 777), (65, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_unequal_lengths_odd_dims_and_nhd(nq, nk, causal):
    q, k, v, do = make_on_gpu(nq + nk, 8, 1, nq, nk, 96, torch.bfloat16)
    nhd = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*nhd, "NHD", is_causal=causal, sm_scale=0.2)
    out.backward(do.transpose(1, 2))
    assert_accurate_on_gpu(q, k, v, do, causal, 0.2, [t.grad.transpose(1, 2) for t in nhd])


@pytest_marks(GPU)
def test_kernels_match_the_reference_backward():
    q, k, v, do = make_on_gpu(1, 4, 2, 2048, 1500, 128, torch.bfloat16)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_backward(q, k, v, do, True, 0.1, dq, dk, dv)
    ref = attention_backward_reference(q, k, v, do, True, 0.1)
    plain = plain_grads(q, k, v, do, True, 0.1, torch.bfloat16)
    for g, r, p in zip((dq, dk, dv), ref, plain, strict=True):
        rel = float((g.double() - r.double()).abs().sum() / r.double().abs().sum())
        rel_plain = float((p.double() - r.double()).abs().sum() / r.double().abs().sum())
        assert rel <= rel_plain, (rel, rel_plain)


@pytest_marks(GPU)
@pytest.mark.gpu_serial  # reads the allocator's peak
def test_backward_memory_is_linear_in_n():
    """32K tokens: an Nq x Nk float32 matrix per head would be 4 GiB; the backward may allocate only the
    gradients and 8 bytes of row statistics per query and head (plus allocator rounding)."""
    b, h, n, d = 1, 2, 32768, 128
    q, k, v, do = make_on_gpu(2, h, h, n, n, d, torch.bfloat16, b)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = quantattn.sageattn(*leaves, is_causal=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(do)
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
    allowed = grads + 8 * b * h * n + (4 << 20)
    assert torch.cuda.max_memory_allocated() - before <= allowed
    assert all(torch.isfinite(t.grad).all() for t in leaves)
