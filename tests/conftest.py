"""Shared test machinery: markers, seeded inputs, accuracy metrics and the derived error bound.

The accuracy bound follows FlashAttention's tests: a result is accurate when its error against FP64
attention is at most twice the error of a plain, untiled PyTorch computation that quantizes the same
operands in the same way (`fake_quant_attention`), plus twice the error of merely rounding the FP64
output to the output dtype. The tolerance then comes from arithmetic, not from a guess.

Test modules reach the helpers through the session fixture `qa` (`qa.make_qkv(...)`,
`qa.assert_accurate(...)`), which works under every pytest import mode. The machine markers as decorators
and the seeded input makers that several test modules share are in helpers.py.
"""

from __future__ import annotations

import os
import warnings

import torch

# Without a GPU the Triton kernels run through the interpreter, which @triton.jit chooses when it
# decorates: set it before any test module imports quantattn.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests check quantattn's numerics: backend="auto" must not hand small GPU calls to torch's SDPA by
# the speed table (tests/test_speed_table.py turns it back on).
os.environ.setdefault("QUANTATTN_AUTO_SDPA", "0")

import contextlib  # noqa: E402
import math
import types
from dataclasses import dataclass

import pytest
import torch

from quantattn import config as C
from quantattn.config import QuantConfig
from quantattn.reference import (
    attention_fp64,
    quantize_int,
    quantize_v_fp8,
    round_to_fp8_e4m3,
    row_group_amax,
    smoothing_vector_k,
)

# The API warns once per process when CPU tensors run the slow reference. A filterwarnings mark has the
# last word over -W / ini filters; ':' separates a filter's fields, so '.' stands for the message's colon.
CPU_WARNING_FILTER = "ignore:quantattn. CPU tensors run the pure-PyTorch reference:UserWarning"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped where torch.cuda is unavailable)")
    config.addinivalue_line(
        "markers",
        "gpu_serial: needs the GPU to itself (memory peaks, 128K+ keys, its own GPU processes, several GPUs): "
        "skipped under pytest-xdist, run by the serial step of `make test-gpu`",
    )
    config.addinivalue_line("markers", "interpreter: runs Triton kernels through TRITON_INTERPRET=1 on the CPU")


def under_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


try:
    import triton
    import triton.language as tl
except ImportError:  # triton exists on Linux only
    triton = None

if triton is not None:

    @triton.jit  # at module level: older interpreters (3.1) look tl up in the kernel's globals
    def _count_to(OUT, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(OUT, total)


def interpreter_loop_problem() -> str | None:
    """Why the Triton interpreter cannot run a loop with a run-time bound here, or None.

    triton 3.6's interpreter turns such a bound into an int with int() on a one-element array, which
    numpy 2.4 refuses; newer interpreters (3.9) squeeze it first. The GPU compiler is not affected.
    Any other failure is left to the tests to show."""
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # numpy 2.0-2.3 only warn that such conversions are deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            _count_to[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the TypeError in its own error
        if "0-dimensional" not in repr(exc):
            return None
        import numpy

        return (
            f"triton {triton.__version__}'s interpreter cannot run on numpy {numpy.__version__} ({exc!r}): "
            "install numpy<2.4 (python3 -m pip install 'numpy<2.4') or a newer triton"
        )
    return None


def pytest_sessionstart(session):
    problem = interpreter_loop_problem()
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    skip_serial = pytest.mark.skip(
        reason="gpu_serial: needs the GPU to itself; run `pytest tests -m gpu_serial` without -n (make test-gpu)"
    )
    has_gpu = torch.cuda.is_available()
    for item in items:
        item.add_marker(pytest.mark.filterwarnings(CPU_WARNING_FILTER))
        if not has_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif under_xdist() and "gpu_serial" in item.keywords:
            item.add_marker(skip_serial)


@pytest.fixture(autouse=True)
def _release_cached_gpu_memory(request):
    """Under pytest-xdist several workers share one GPU, and each one's caching allocator keeps the blocks
    its tests freed: after a large test a worker would hold gigabytes the others need, and they would
    fail with out-of-memory errors that no test of theirs causes. Hand them back after every GPU test."""
    yield
    if under_xdist() and "gpu" in request.keywords and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Inputs


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype=torch.float16, channel_bias: float = 0.0, scale: float = 1.0):
    """scale * N(0, 1) in float32 from `gen`, plus channel_bias * N(0, 1) shared by every token
    (one offset per leading index and channel, as real models' K and V have), cast to dtype."""
    x = scale * torch.randn(*shape, generator=gen)
    if channel_bias:
        x = x + channel_bias * torch.randn(*shape[:-2], 1, shape[-1], generator=gen)
    return x.to(dtype)


def make_qkv(
    seed: int,
    b: int = 1,
    hq: int = 2,
    nq: int = 128,
    d: int = 64,
    *,
    hkv: int | None = None,
    nk: int | None = None,
    dtype=torch.float16,
    q_bias: float = 0.0,
    k_bias: float = 0.0,
    v_bias: float = 0.0,
    q_scale: float = 1.0,
):
    """Fresh HND inputs q [b, hq, nq, d], k and v [b, hkv, nk, d] from a generator seeded with `seed`."""
    gen = generator(seed)
    hkv = hq if hkv is None else hkv
    nk = nq if nk is None else nk
    q = randn(gen, b, hq, nq, d, dtype=dtype, channel_bias=q_bias, scale=q_scale)
    k = randn(gen, b, hkv, nk, d, dtype=dtype, channel_bias=k_bias)
    v = randn(gen, b, hkv, nk, d, dtype=dtype, channel_bias=v_bias)
    return q, k, v


def to_nhd(*ts):
    """HND [B, H, N, d] -> NHD [B, N, H, d] (a transposed view)."""
    out = tuple(t.transpose(1, 2) for t in ts)
    return out if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------------------------------
# Metrics, all in float64 over the flattened tensors


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum|out - ref| / sum|ref| (0 when both are all zeros)."""
    a, b = out.double(), ref.double()
    num, den = float((a - b).abs().sum()), float(b.abs().sum())
    return num / den if den else (0.0 if num == 0 else math.inf)


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.double().flatten(), ref.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def angle(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(1 - cosine similarity): grows linearly with the error, as rel_l1 does, so the bound's
    "2 x baseline + 2 x rounding" applies to it as written (1 - cos itself grows quadratically)."""
    return math.sqrt(max(0.0, 1.0 - cosine(out, ref)))


# ----------------------------------------------------------------------------------------------------
# The fake-quantized baseline


def q_block_means(q64: torch.Tensor) -> torch.Tensor:
    """Each row's Q-block mean ([..., N, d]): blocks of C.Q_BLOCK_ROWS rows, the last one over its own rows."""
    n, rows = q64.shape[-2], C.Q_BLOCK_ROWS
    out = torch.empty_like(q64)
    for start in range(0, n, rows):
        out[..., start : start + rows, :] = q64[..., start : start + rows, :].mean(-2, keepdim=True)
    return out


def causal_mask(nq: int, nk: int) -> torch.Tensor:
    """True where query i may not see key j (bottom-right aligned)."""
    return torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + (nk - nq)


def exact_scores(q, k, is_causal=False, sm_scale=None):
    """sm_scale q k^T in float64, -inf where masked; HND, GQA heads expanded."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k64 = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.double() @ k64.transpose(-1, -2)) * sm_scale
    if is_causal:
        s = s.masked_fill(causal_mask(q.shape[-2], k.shape[-2]), -math.inf)
    return s


def fake_quant_attention(q, k, v, cfg: QuantConfig, is_causal=False, sm_scale=None):
    """Untiled float64 attention with the config's quantization and nothing else.

    Q and K are smoothed and quantized in the config's groups (the reference's own primitives; smooth K
    subtracts the kernels' vector, the trimmed token mean, here in float64), the smooth-Q correction is
    added exactly, the softmax is one float64 pass over the full row, P is rounded to the PV precision
    after dividing by the row's global maximum (FP8: times the static scale), V is rounded per channel,
    and the product is float64. No tiling, no accumulator rounding.
    Returns (output float64 [B, Hq, Nq, d], the dequantized scores in full-precision units [B, Hq, Nq, Nk]).
    """
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    no_mean = k64.new_zeros(*k64.shape[:-2], 1, d)
    k_mean = smoothing_vector_k(k64)[..., None, :] if cfg.smooth_k else no_mean
    k_s = k64 - k_mean
    kq, kscale = quantize_int(k_s, row_group_amax(k_s, cfg.qk_granularity, "k"), cfg.qmax)
    k_hat = (kq.double() * kscale.double()[..., None]).repeat_interleave(group, 1)
    k_s, k_mean = k_s.repeat_interleave(group, 1), k_mean.repeat_interleave(group, 1)
    q_mean = q_block_means(q64) if cfg.smooth_q else torch.zeros_like(q64)
    q_s = q64 - q_mean
    qq, qscale = quantize_int(q_s, row_group_amax(q_s, cfg.qk_granularity, "q"), cfg.qmax)
    q_hat = qq.double() * qscale.double()[..., None]
    s = (q_hat @ k_hat.transpose(-1, -2) + q_mean @ k_s.transpose(-1, -2)) * sm_scale
    if is_causal:
        s = s.masked_fill(causal_mask(q.shape[-2], k.shape[-2]), -math.inf)
    m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), -math.inf)
    p = torch.exp(s - torch.where(m == -math.inf, 0.0, m))
    l_sum = p.sum(-1, keepdim=True)
    v_mean = v64.mean(-2, keepdim=True) if cfg.smooth_v and v.shape[-2] else no_mean
    v_s = v64 - v_mean
    if cfg.is_fp8_pv:
        p_hat = round_to_fp8_e4m3(p * cfg.p_scale).double() / cfg.p_scale
        vq, vscale = quantize_v_fp8(v_s, cfg.v_range)
        v_hat = vq.double() * vscale.double()[..., None, :]
    else:
        low = torch.float16 if cfg.pv_dtype == "fp16" else torch.bfloat16
        p_hat, v_hat = p.to(low).double(), v_s.to(low).double()
    v_hat, v_mean = v_hat.repeat_interleave(group, 1), v_mean.repeat_interleave(group, 1)
    has_keys = l_sum > 0
    out = p_hat @ v_hat / torch.where(has_keys, l_sum, 1.0) + v_mean
    out = torch.where(has_keys, out, 0.0)
    scores = s + (q64 @ k_mean.transpose(-1, -2)) * sm_scale
    return out, scores


# ----------------------------------------------------------------------------------------------------
# The bound


@dataclass
class AccuracyCheck:
    rel_l1: float
    rel_l1_bound: float
    angle: float
    angle_bound: float
    base_rel_l1: float  # the fake-quantized baseline's own error
    detail: str

    @property
    def ok(self) -> bool:
        return self.rel_l1 <= self.rel_l1_bound and self.angle <= self.angle_bound

    def __str__(self) -> str:
        return (
            f"rel_l1 {self.rel_l1:.3e} (bound {self.rel_l1_bound:.3e}), "
            f"angle {self.angle:.3e} (bound {self.angle_bound:.3e}); {self.detail}"
        )


def check_accuracy(out, q, k, v, cfg, is_causal=False, sm_scale=None) -> AccuracyCheck:
    """Compare `out` (HND) with FP64 attention under the derived bound (see the module docstring)."""
    ref = attention_fp64(q, k, v, is_causal=is_causal, sm_scale=sm_scale)
    base, _ = fake_quant_attention(q, k, v, cfg, is_causal, sm_scale)
    rounded = ref.to(q.dtype)
    b_rel, r_rel = rel_l1(base, ref), rel_l1(rounded, ref)
    b_ang, r_ang = angle(base, ref), angle(rounded, ref)
    return AccuracyCheck(
        rel_l1(out, ref),
        2 * b_rel + 2 * r_rel,
        angle(out, ref),
        2 * b_ang + 2 * r_ang,
        b_rel,
        f"baseline rel_l1 {b_rel:.3e} angle {b_ang:.3e}; rounding rel_l1 {r_rel:.3e} angle {r_ang:.3e}; {cfg.name}",
    )


def assert_accurate(out, q, k, v, cfg, is_causal=False, sm_scale=None) -> AccuracyCheck:
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite values in the output"
    check = check_accuracy(out, q, k, v, cfg, is_causal, sm_scale)
    assert check.ok, str(check)
    return check


def lse_bound(q, k, v, cfg, is_causal=False, sm_scale=None) -> float:
    """Bound on max |lse - exact lse| (natural log).

    logsumexp is 1-Lipschitz in the max norm of its arguments, so its error is at most the largest
    score error: take twice the baseline's largest score error. Where quantization happens to be
    lossless (one key with smooth K, head_dim 1 per token) that is 0, so add the float32 forward error
    of the reference's own arithmetic: a few roundings at the scale of the scores and the lse, a sum of
    at most Nk terms in [0, 1] (relative error <= Nk eps), and smooth K's shift sm_scale * q.kbar
    summed over d channels (error <= d eps sum|q_c kbar_c|, kbar smooth K's vector)."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    _, scores = fake_quant_attention(q, k, v, cfg, is_causal, sm_scale)
    exact = exact_scores(q, k, is_causal, sm_scale)
    visible = torch.isfinite(exact)
    if not visible.any():
        return 0.0
    score_err = float((scores - exact)[visible].abs().max())
    big = float(exact[visible].abs().max() + torch.logsumexp(exact, -1)[visible.any(-1)].abs().max())
    k_mean = smoothing_vector_k(k.double())[..., None, :].repeat_interleave(q.shape[1] // k.shape[1], 1)
    shift = float((q.double().abs() @ k_mean.abs().transpose(-1, -2)).max()) * abs(sm_scale)
    eps = torch.finfo(torch.float32).eps
    return 2 * score_err + eps * (4 * big + k.shape[-2] + q.shape[-1] * shift)


# ----------------------------------------------------------------------------------------------------
# Fixtures and poisoning


@pytest.fixture(scope="session")
def qa():
    """This module's helpers, for tests (`qa.make_qkv`, `qa.assert_accurate`, ...)."""
    return types.SimpleNamespace(**{name: obj for name, obj in globals().items() if not name.startswith("_")})


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / torch.empty_like return NaN-filled floating tensors while active, so output elements
    that a code path forgets to write show up as NaN instead of whatever the allocator happened to hold."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
        yield


@pytest.fixture
def poison_empty():
    with poisoned_allocations():
        yield


@pytest.fixture
def fresh_integrations():
    """Dynamo's caches, quantattn.sdpa's fallback counts and any patch left by a failed test cleared
    before and after a test, so that compiled graphs and patches do not leak between tests."""
    from quantattn.integrations import torch_sdpa

    torch._dynamo.reset()
    torch_sdpa.reset_fallbacks()
    yield
    while torch_sdpa._routes:
        torch_sdpa.unpatch()
    for key, stack in list(torch_sdpa._local.stacks.items()):  # routes this thread left open
        target = tuple(torch_sdpa._switches[key][:2])
        for handler in reversed(stack):
            torch_sdpa.close_route(handler, (target,))
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _settings_follow_the_environment():
    """quantattn.settings reads the environment once: after a test that changed it (monkeypatch has undone
    its changes by the time this runs), the next test sees the environment's settings again."""
    yield
    from quantattn import settings

    if settings.current != settings.Settings.from_env():
        settings.reload()
