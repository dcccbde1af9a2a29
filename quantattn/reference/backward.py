"""Pure-PyTorch twin of the backward kernels: exact gradients of full-precision attention.

For o = softmax(sm_scale q k^T) v (bottom-right causal, grouped-query heads) and an upstream gradient
dO (and optionally d lse), with P the softmax, dP = dO V^T and delta_i = sum_j P_ij dP_ij:

    dS = P * (dP - delta + d lse)      dQ = sm_scale dS K      dK = sm_scale dS^T Q      dV = P^T dO

delta is computed from P, not as rowsum(dO * O) from a forward output: quantattn's forward output is
quantized, and its error would leak into the gradient. Float32 arithmetic (float64 for float64 inputs),
chunked over queries so that at most about CHUNK_ELEMENTS scores exist at a time. Inputs are HND.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 24


def attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    is_causal: bool = False,
    sm_scale: float | None = None,
    grad_lse: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention at q [B, Hq, Nq, d], k, v [B, Hkv, Nk, d], in float32 (float64 for
    float64 inputs); attention_backward_dtype casts them to the inputs' dtypes.

    grad_out: [B, Hq, Nq, d]; grad_lse: [B, Hq, Nq] (gradient of the natural-log lse), or None.
    Query rows that see no key (causal with Nq > Nk) get zero gradient and contribute none."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, grad_out = (t.detach().to(work) for t in (q, k, v, grad_out))
    # grouped-query heads as [B, Hkv, G, N, d]: K and V broadcast over the group, nothing repeated
    q5 = q.reshape(b, hkv, group, nq, d)
    do5 = grad_out.reshape(b, hkv, group, nq, d)
    k5, v5 = k[:, :, None], v[:, :, None]
    glse5 = grad_lse.detach().to(work).reshape(b, hkv, group, nq) if grad_lse is not None else None
    dq = torch.zeros_like(q5)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * nk))
    keys = torch.arange(nk, device=q.device)
    for start in range(0, nq, chunk):
        rows = slice(start, min(start + chunk, nq))
        qc, doc = q5[..., rows, :], do5[..., rows, :]
        s = (qc @ k5.transpose(-1, -2)) * sm_scale
        if is_causal:
            r = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
            s = s.masked_fill(keys[None, :] > r + (nk - nq), -math.inf)
        lse = torch.logsumexp(s, -1, keepdim=True)
        has_keys = lse > -math.inf
        p = torch.exp(s - torch.where(has_keys, lse, 0.0))
        dp = doc @ v5.transpose(-1, -2)
        delta = (p * dp).sum(-1, keepdim=True)
        if glse5 is not None:
            delta = delta - torch.where(has_keys, glse5[..., rows, None], 0.0)
        ds = p * (dp - delta)
        dq[..., rows, :] = (ds @ k5) * sm_scale
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qc) * sm_scale
        dv += torch.einsum("bhgqk,bhgqd->bhkd", p, doc)
    return dq.reshape(b, hq, nq, d), dk, dv


def attention_backward_dtype(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    is_causal: bool = False,
    sm_scale: float | None = None,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_backward_reference with the gradients cast to the inputs' dtypes (what the kernels return)."""
    grads = attention_backward_reference(q, k, v, grad_out, is_causal, sm_scale, grad_lse)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))
