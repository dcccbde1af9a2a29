"""The SDPA patch under threads: attach(), patched() and applied plans route the calls of the thread that
runs the model, never another thread's, and F.scaled_dot_product_attention is exactly torch's again once
every route has closed, in whatever order the forwards end. Forwards are made to overlap with events:
each model makes one SDPA call, says so, waits until told to go on, and makes a second one."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import quantattn
from quantattn.accuracy.calibration import LayerChoice, Plan
from quantattn.integrations import torch_sdpa as S

pytestmark = pytest.mark.usefixtures("fresh_integrations")

ORIGINAL = S.ORIGINAL_SDPA
SAGE1, SAGE2 = quantattn.VARIANTS["sage1"], quantattn.VARIANTS["sage2-8b"]
TIMEOUT = 60


def qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 24, 16, generator=g).bfloat16() for _ in range(3))


class Paused(torch.nn.Module):
    """Two SDPA calls with a pause between them: `inside` is set after the first, `go` ends the pause."""

    def __init__(self):
        super().__init__()
        self.inside, self.go = threading.Event(), threading.Event()

    def forward(self, q, k, v):
        first = F.scaled_dot_product_attention(q, k, v)
        self.inside.set()
        assert self.go.wait(TIMEOUT), "never told to go on"
        return first, F.scaled_dot_product_attention(q, k, v)


def start(model, q, k, v):
    """Run model(q, k, v) in a thread until its pause; returns (thread, result list)."""
    result = []

    def run():
        with torch.no_grad():
            result.append(model(q, k, v))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert model.inside.wait(TIMEOUT), "the forward never reached its pause"
    return thread, result


def finish(model, thread, result):
    model.go.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive() and len(result) == 1, "the forward failed (see the thread's traceback)"
    return result[0]


def expected(q, k, v, cfg):
    return quantattn.sageattn(q, k, v, config=cfg, backend="reference")


def overlap(model_a, model_b, qkv_a, qkv_b):
    """A enters, B enters, a third, unattached thread calls SDPA, then A ends before B (out of order)."""
    a = start(model_a, *qkv_a)
    b = start(model_b, *qkv_b)
    q, k, v = qkv(3)
    third = []
    t = threading.Thread(target=lambda: third.append(F.scaled_dot_product_attention(q, k, v)))
    t.start()
    t.join(TIMEOUT)
    assert torch.equal(third[0], ORIGINAL(q, k, v)), "a thread outside both models got quantattn"
    return finish(model_a, *a), finish(model_b, *b)


def test_two_attached_models_in_two_threads_run_their_own_variant():
    model_a, model_b = Paused(), Paused()
    handles = [quantattn.attach(model_a, SAGE1, cpu="reference"), quantattn.attach(model_b, SAGE2, cpu="reference")]
    qkv_a, qkv_b = qkv(1), qkv(2)
    out_a, out_b = overlap(model_a, model_b, qkv_a, qkv_b)
    want_a, want_b = expected(*qkv_a, SAGE1), expected(*qkv_b, SAGE2)
    assert not torch.equal(want_a, expected(*qkv_a, SAGE2))  # the variants differ on these inputs
    assert torch.equal(out_a[0], want_a) and torch.equal(out_a[1], want_a)
    assert torch.equal(out_b[0], want_b) and torch.equal(out_b[1], want_b)
    assert F.scaled_dot_product_attention is ORIGINAL
    for h in handles:
        h.remove()
    assert F.scaled_dot_product_attention is ORIGINAL


def plan_of(cfg, name):
    choice = LayerChoice(name, cfg, None, "test")
    return Plan({"<model>#0": choice, "<model>#1": choice}, tolerance=1.0)


def test_two_applied_plans_ending_out_of_order_restore_sdpa_exactly():
    model_a, model_b = Paused(), Paused()
    handle_a = plan_of(SAGE1, "sage1").apply(model_a)
    handle_b = plan_of(SAGE2, "sage2-8b").apply(model_b)
    qkv_a, qkv_b = qkv(4), qkv(5)
    out_a, out_b = overlap(model_a, model_b, qkv_a, qkv_b)
    assert torch.equal(out_a[1], expected(*qkv_a, SAGE1)) and torch.equal(out_b[1], expected(*qkv_b, SAGE2))
    assert dict(handle_a.counts) == {("<model>#0", "sage1"): 1, ("<model>#1", "sage1"): 1}
    assert dict(handle_b.counts) == {("<model>#0", "sage2-8b"): 1, ("<model>#1", "sage2-8b"): 1}
    handle_a.remove()
    handle_b.remove()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_patched_in_one_thread_leaves_the_others_alone():
    model = Paused()  # unattached: its SDPA calls are torch's unless its own thread patches
    q, k, v = qkv(6)
    thread, result = start(model, q, k, v)
    with quantattn.patched(SAGE1, cpu="reference"):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), expected(q, k, v, SAGE1))
        first, second = finish(model, thread, result)
    assert torch.equal(first, ORIGINAL(q, k, v)) and torch.equal(second, ORIGINAL(q, k, v))
    assert F.scaled_dot_product_attention is ORIGINAL


def test_removing_a_handle_during_a_forward_still_restores_sdpa():
    model = Paused()
    handle = quantattn.attach(model, SAGE1, cpu="reference")
    q, k, v = qkv(7)
    thread, result = start(model, q, k, v)
    handle.remove()  # the running forward finishes on its route, and closes it
    first, second = finish(model, thread, result)
    assert torch.equal(second, expected(q, k, v, SAGE1))
    assert F.scaled_dot_product_attention is ORIGINAL
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(q, k, v)[0], ORIGINAL(q, k, v))  # model.go is still set: no pause


def test_process_wide_patch_reaches_every_thread():
    q, k, v = qkv(8)
    quantattn.patch(SAGE1, cpu="reference")
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(F.scaled_dot_product_attention(q, k, v)))
        t.start()
        t.join(TIMEOUT)
        assert torch.equal(out[0], expected(q, k, v, SAGE1))
    finally:
        quantattn.unpatch()
    assert F.scaled_dot_product_attention is ORIGINAL
