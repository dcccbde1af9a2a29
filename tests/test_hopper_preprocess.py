"""The Hopper backend's CUDA K/V preprocessings (quantattn/hopper/preprocess.cu: the resident one up to 2K
keys, the ticketed one beyond, both tested at every shape they take) against the reference, with K
scales per key ("per_token") and per key group ("per_thread").

Given the statistics it computed, its INT8 K, K scales and FP8 V^T are exactly what the reference's
formulas give (quantattn.reference.quant: IEEE divisions, round half to even, E4M3 ties to even), in the
Hopper layout (quantattn.hopper.layout). The statistics themselves match the reference up to the order
of the sums (maxima and minima exactly). Cross-checked against the Triton preprocessing it replaces.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_hopper import SKIP  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)
from test_kernels_gpu import make  # noqa: E402

from quantattn import settings
from quantattn.config import QuantConfig
from quantattn.reference.quant import (
    finite_mean,
    quantize_int,
    quantize_v_fp8,
    row_group_amax,
    smoothing_vector_k,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

DEV = "cuda"
DEFAULT = QuantConfig()
PER_THREAD = QuantConfig(qk_granularity="per_thread")
GRANULARITIES = pytest.mark.parametrize("cfg", [DEFAULT, PER_THREAD], ids=lambda c: c.qk_granularity)
POISON_INT8 = 77  # what unwritten INT8 K would hold: a valid value, so only the exact comparison catches it


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty gives NaN-filled floating tensors (FP8 included) and POISON_INT8-filled int8 ones."""
    real_empty = torch.empty

    def empty(*a, **kw):
        t = real_empty(*a, **kw)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype == torch.int8:
            t.fill_(POISON_INT8)
        return t

    monkeypatch.setattr(torch, "empty", empty)


RESIDENT_MAX_KEYS = 2048  # the resident preprocessing takes heads up to this many keys


@pytest.fixture(params=["resident", "ticket"])
def cuda_path(request, monkeypatch):
    """Runs a test with the resident preprocessing allowed (it takes heads of <= 2K keys) and with it off."""
    monkeypatch.setenv("QUANTATTN_HOPPER_RESIDENT", "1" if request.param == "resident" else "0")
    settings.reload()  # quantattn reads the environment once
    return request.param


def hopper_launch():
    from quantattn.hopper import launch

    return launch


def expected(k: torch.Tensor, v: torch.Tensor, kv, cfg: QuantConfig):
    """INT8 K, K scales and Hopper-layout FP8 V^T (as float32) by the reference's quantization, K smoothed
    with the vector the kernel computed."""
    from quantattn.hopper.layout import to_wgmma_order

    x = k.float() - (kv.k_stats[0][:, :, None, :] if cfg.smooth_k else 0.0)
    kq, k_scale = quantize_int(x, row_group_amax(x, cfg.qk_granularity, "k"), cfg.qmax)
    vq, _ = quantize_v_fp8(v, cfg.v_range)
    return kq, k_scale, to_wgmma_order(vq.transpose(-1, -2).to(torch.float8_e4m3fn)).float()


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig = DEFAULT):
    """The CUDA preprocessing of (k, v) against the reference's formulas and the Triton preprocessing."""
    from quantattn.kernels import launch as L

    launch = hopper_launch()
    seqs = L.sequences(k, None, 0)
    resident_allowed = os.environ.get("QUANTATTN_HOPPER_RESIDENT", "1") != "0"
    want = "resident" if resident_allowed and k.shape[2] <= RESIDENT_MAX_KEYS else "ticket"
    assert launch.preprocess_path(k, v, seqs, cfg) == want
    copies = (k.clone(), v.clone())
    kv = launch.hopper_preprocess(k, v, cfg)
    b, h, n, d = k.shape
    # statistics: maxima and minima exact, the means up to the order of the sums
    finite = torch.isfinite(k.float())
    torch.testing.assert_close(kv.k_stats[1], torch.where(finite, k.float(), -math.inf).amax(2))
    torch.testing.assert_close(kv.k_stats[2], torch.where(finite, k.float(), math.inf).amin(2))
    vf = torch.isfinite(v.float())
    torch.testing.assert_close(kv.v_stats[1], torch.where(vf, v.float(), -math.inf).amax(2))
    torch.testing.assert_close(kv.v_stats[2], torch.where(vf, v.float(), math.inf).amin(2))
    torch.testing.assert_close(kv.k_stats[0], smoothing_vector_k(k.float()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.v_stats[0], finite_mean(v.float(), 2), rtol=1e-5, atol=1e-5)
    # quantized values: exactly the reference's, given those statistics
    kq, k_scale, vq = expected(k, v, kv, cfg)
    assert kv.k.dtype == torch.int8 and kv.k.shape == (b, h, n, d)
    assert torch.equal(kv.k.float(), kq), (kv.k.float() - kq).abs().max()
    torch.testing.assert_close(kv.k_scale, k_scale, rtol=2.5e-7, atol=0, equal_nan=True)  # amax / 127: <= 1 ulp
    n_pad = -(-n // 32) * 32
    assert kv.v.shape == (b, h, d, n_pad) and kv.v.dtype == torch.float8_e4m3fn
    assert same_values(kv.v.float(), vq), "FP8 V^T differs from the reference"
    # the Triton preprocessing computes the same up to rounding: its 127 / amax is not an IEEE division and
    # its means may differ in the last bit, so that about 0.1% of INT8 K differs by one (H100, per token:
    # 0.11-0.13%); its scales group the same keys (the NaN scales included)
    tri = L.triton_preprocess_kv(k, v, cfg, seqs, wgmma_order=True)
    flips = (tri.k.float() - kv.k.float()).abs()
    assert flips.max() <= 1 and flips.gt(0).float().mean() < 1e-2
    torch.testing.assert_close(tri.k_scale, kv.k_scale, rtol=1e-5, atol=0, equal_nan=True)
    torch.cuda.synchronize()
    bits = [t.view(torch.int16) for t in (*copies, k, v)]  # NaN-proof comparison
    assert torch.equal(bits[0], bits[2]) and torch.equal(bits[1], bits[3]), "the inputs were modified"
    return kv


@pytest.mark.parametrize(
    "b,h,n",
    [(2, 3, 1), (2, 3, 63), (1, 2, 300), (2, 4, 1000), (1, 3, 2048), (1, 2, 2049), (1, 2, 20000), (4, 150, 64)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("d", [64, 128])
@GRANULARITIES
def test_matches_reference(poisoned, cuda_path, b, h, n, d, cfg):
    """One key, part of a block, several blocks, the resident preprocessing's clusters of 1, 3, 8 and
    16 CTAs (up to 2048 keys) and the first length past them, one chunk of 32 blocks per program (20000
    keys), and more heads than the ticket kernel's lag between statistics and quantization (600 heads,
    one chunk each)."""
    check(make(n + d, b, h, n, d, outliers=True), make(n + d + 1, b, h, n, d), cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smooth_k", [True, False])
@pytest.mark.parametrize("gran", ["per_token", "per_thread"])
@pytest.mark.parametrize("d", [64, 128])
def test_dtypes_and_smooth_k(poisoned, cuda_path, dtype, smooth_k, gran, d):
    k, v = make(5, 2, 4, 777, d, dtype=dtype, outliers=True), make(6, 2, 4, 777, d, dtype=dtype)
    check(k, v, QuantConfig(smooth_k=smooth_k, qk_granularity=gran))


@GRANULARITIES
def test_non_finite_elements(poisoned, cuda_path, cfg):
    """NaN and +-Inf in K and V: left out of the statistics; K rows holding one get a NaN scale (their
    finite elements are still quantized, and count in their group's scale), V's non-finite elements
    become NaN in FP8."""
    g = torch.Generator(device=DEV).manual_seed(7)
    k, v = make(8, 2, 3, 500, 128, outliers=True), make(9, 2, 3, 500, 128)
    specials = torch.tensor([math.nan, math.inf, -math.inf], device=DEV)
    for t in (k, v):
        bad = torch.rand(t.shape, generator=g, device=DEV) < 0.003
        pick = specials[torch.randint(0, 3, t.shape, generator=g, device=DEV)]
        t.copy_(torch.where(bad, pick.to(t.dtype), t))
    k[0, 0, :, 5] = math.nan  # a channel with no finite value: centre 0, max -inf, min inf
    kv = check(k, v, cfg)
    assert kv.k_stats[0][0, 0, 5] == 0 and torch.isnan(kv.k_scale[0, 0]).all()


@pytest.mark.parametrize("n", [100, 1000, 2049, 5000])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_per_thread_groups(poisoned, cuda_path, n, d, dtype):
    """per_thread's groups (16 keys 8j + 2c + e of a 64-key block) where it is easy to get them wrong: large
    channel offsets, so that the zeros past n in a partial last block, smoothed, would dominate its
    groups' scales if they counted; one key with a NaN and a large finite element, whose group takes that
    element's size while the key alone gets a NaN scale; a large element in the next group down, which
    must stay there."""
    k, v = make(20 + n, 2, 2, n, d, dtype=dtype, bias=60.0), make(21 + n, 2, 2, n, d, dtype=dtype)
    key = 64 + 6  # group 3 of the second block
    k[0, 1, key, 3], k[0, 1, key, 4] = math.nan, 900.0
    k[0, 1, key - 2, 0] = -700.0  # group 2
    kv = check(k, v, PER_THREAD)
    scales = kv.k_scale[0, 1]
    assert torch.isnan(scales[key]) and torch.isfinite(scales[:key]).all() and torch.isfinite(scales[key + 1 :]).all()
    peers = [q for p in range(key, min(n, 128), 8) for q in (p, p + 1) if q != key and q < n]  # group 3's
    assert (scales[peers] == scales[peers[0]]).all() and scales[peers[0]] > 500 / 127
    assert scales[key - 2] != scales[peers[0]] and scales[key - 2] > 400 / 127


def test_strided_views_use_it_and_misaligned_ones_fall_back(cuda_path):
    launch = hopper_launch()
    from quantattn.kernels import launch as L

    big = make(10, 3, 6, 1100, 160)
    k, v = big[1:, 1:5, 3:903, 16:144], big[:2, :4, 100:1000, 32:160]
    check(k, v)
    odd = big[:2, :4, 100:1000, 1:129]  # rows start 2 bytes past a 16-byte boundary
    assert launch.native_preprocess_reason(odd, v, L.sequences(odd, None, 0), DEFAULT) is not None
    kv = launch.hopper_preprocess(odd, v, QuantConfig())
    want = launch.hopper_preprocess(odd.contiguous(), v, QuantConfig())
    flips = (kv.k.float() - want.k.float()).abs()  # Triton's preprocessing against the CUDA one
    assert flips.max() <= 1 and flips.gt(0).float().mean() < 1e-2


def test_captures_in_a_cuda_graph(cuda_path):
    """The whole Hopper call (memset of the counters, preprocessing, attention) replays from a CUDA graph."""
    import quantattn as qa

    q, k, v = make(11, 2, 8, 1000, 128), make(12, 2, 8, 1000, 128, outliers=True), make(13, 2, 8, 1000, 128)
    eager = qa.sageattn(q, k, v, backend="hopper")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        qa.sageattn(q, k, v, backend="hopper")  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qa.sageattn(q, k, v, backend="hopper")
    for _ in range(2):
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_resident_limit_is_the_documented_one():
    from quantattn.hopper import kernels

    assert kernels.RESIDENT_MAX_KEYS == RESIDENT_MAX_KEYS


def test_a_refused_cluster_falls_back_to_the_ticketed_kernel(monkeypatch):
    """A GPU that cannot run the resident kernel's cluster (the occupancy query says 0 clusters; nothing
    is launched) gets the ticketed kernel's values, not an error."""
    from quantattn.hopper import kernels

    launch = hopper_launch()
    k, v = make(14, 2, 4, 1500, 128, outliers=True), make(15, 2, 4, 1500, 128)
    monkeypatch.setenv("QUANTATTN_HOPPER_RESIDENT", "0")
    settings.reload()  # quantattn reads the environment once
    want = launch.hopper_preprocess(k, v, DEFAULT)
    monkeypatch.setenv("QUANTATTN_HOPPER_RESIDENT", "1")
    settings.reload()  # quantattn reads the environment once
    calls = []

    def refuse(*args):
        calls.append(args)
        return False

    monkeypatch.setattr(kernels, "cluster_fits", refuse)
    got = launch.hopper_preprocess(k, v, DEFAULT)
    assert calls, "the resident kernel was not asked"
    assert torch.equal(got.k, want.k) and torch.equal(got.v.view(torch.uint8), want.v.view(torch.uint8))
    assert same_values(got.k_scale, want.k_scale)
