"""Helpers shared by the test modules: the machine markers as decorators and the seeded input makers.

Test modules import them with `from helpers import ...` (tests/ is on sys.path under pytest's default
import mode, as for every module here). The accuracy machinery (FP64 truth, the fake-quantized baseline
and the derived bound) lives in conftest.py and reaches tests through the `qa` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

# ----------------------------------------------------------------------------------------------------
# Machines, as markers: a module's tests run where its marks allow (`pytestmark = GPU`), or, in a module
# that holds tests of several machines, each test carries its machine (`@pytest_marks(GPU)`).

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# The Triton kernels through TRITON_INTERPRET=1 (tests/conftest.py sets it before any test module imports
# triton, on machines without a GPU); on a GPU machine the `gpu` tests cover the kernels instead.
INTERPRETER = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on machines without a GPU (the gpu tests cover the GPU)",
    ),
]


def pytest_marks(marks):
    """A decorator applying each mark of `marks` (a mark or a list, as a module's `pytestmark`) to a test."""
    marks = marks if isinstance(marks, list | tuple) else [marks]

    def apply(test):
        for mark in marks:
            test = mark(test)
        return test

    return apply


# ----------------------------------------------------------------------------------------------------
# Seeded inputs


def make(seed, *shape, dtype=torch.bfloat16, outliers=False, bias=0.0, scale=1.0, device=None):
    """scale * N(0, 1) of `shape` in float32 from a generator seeded with `seed` (on `device`, default the
    CPU), plus bias * N(0, 1) shared by every token (one offset per leading index and channel, as real
    models' K and V have; outliers=True is bias 4), cast to dtype."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=device)
    if scale != 1.0:
        x = scale * x
    bias = 4 if outliers else bias
    if bias:
        x = x + bias * torch.randn(*shape[:-2], 1, shape[-1], generator=g, device=device)
    return x.to(dtype)


def make_grad_inputs(seed, hq, hkv, nq, nk, d, dtype, b=1, device=None):
    """q [b, hq, nq, d], k and v [b, hkv, nk, d] and the output gradient [b, hq, nq, d], in that order
    from one generator seeded with `seed` (on `device`, default the CPU)."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(seed)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d), (b, hq, nq, d))
    return tuple(torch.randn(*s, generator=g, device=device).to(dtype) for s in shapes)


def tiny_model(seed=0, **kw):
    """quantattn.accuracy.models.TinyTransformer in bfloat16, eval mode, weights from torch.manual_seed(seed):
    3 blocks of 4 query and 2 kv heads (causal, plain, masked) unless `kw` says otherwise."""
    from quantattn.accuracy.models import TinyTransformer

    torch.manual_seed(seed)
    opts = {"dim": 64, "heads": 4, "kv_heads": 2, "depth": 3, "masked": (2,), "key_bias": 2.0, **kw}
    return TinyTransformer(**opts).bfloat16().eval()


def max_err(a, b):
    """max |a - b| in float64."""
    return float((a.double() - b.double()).abs().max())
