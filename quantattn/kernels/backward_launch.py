"""Launcher of the backward kernels (quantattn/kernels/backward.py): buffers, grids, tiles. No numerics here.

Besides the gradients themselves, one call allocates two float32 vectors per query row and head (the
row statistics lse2 and delta: 8 bytes per query and head), and nothing of size Nq x Nk.
"""

from __future__ import annotations

import torch

from quantattn import settings
from quantattn.calls import cdiv, grid_parts, head_dim_pad
from quantattn.config import LOG2E
from quantattn.kernels.backward import attention_bwd_dkdv_kernel, attention_bwd_rows_kernel
from quantattn.kernels.launch import CachedLaunch, exact_casts

launch_rows = CachedLaunch(attention_bwd_rows_kernel)
launch_dkdv = CachedLaunch(attention_bwd_dkdv_kernel)


def backward_tile_config(d_pad: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), shared by the three launches.

    The dK/dV program holds K, V and two FP32 accumulators of BLOCK_N x d_pad in registers, so the tiles
    shrink as head_dim grows. Not tuned on hardware yet; QUANTATTN_BWD_TILE="BM,BN,warps,stages" overrides it
    (BM and BN at least 16, powers of two)."""
    if settings.current.bwd_tile is not None:
        return settings.current.bwd_tile
    if not on_gpu:
        return 32, 32, 4, 1
    if d_pad <= 64:
        return 64, 64, 4, 2
    if d_pad <= 128:
        return 64, 64, 8, 2
    return 32, 32, 8, 1


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with any strides but channels with stride 1."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    is_causal: bool,
    sm_scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    tile: tuple[int, int, int, int] | None = None,
) -> None:
    """Exact attention gradients of HND views ([B, H, N, d], float16 or bfloat16) into dq, dk, dv (HND
    views of q's, k's and v's shapes, written in full). grad_lse ([B, Hq, Nq] float32, optional): the
    gradient of the natural-log lse output, which enters as delta - grad_lse. `tile` overrides
    backward_tile_config (tests)."""
    dev = q.device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # Triton compiles for and launches on the current device
            return attention_backward(q, k, v, grad_out, is_causal, sm_scale, dq, dk, dv, grad_lse, tile)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if nq == 0 or nk == 0 or b == 0 or hq == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return
    runs = grid_parts(b, hq)
    if len(runs) > 1:  # batches are independent: launch them in parts
        for s, e in runs:
            sl = slice(s, e)
            glse = grad_lse[sl] if grad_lse is not None else None
            attention_backward(q[sl], k[sl], v[sl], grad_out[sl], is_causal, sm_scale, dq[sl], dk[sl], dv[sl],
                               glse, tile)  # fmt: skip
        return
    q, k, v, grad_out = (_channels_contiguous(t) for t in (q, k, v, grad_out))
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    d_pad = head_dim_pad(d)
    block_m, block_n, num_warps, num_stages = tile or backward_tile_config(d_pad, q.is_cuda)
    qk_scale = sm_scale * LOG2E
    lse2 = torch.empty(b, hq, nq, dtype=torch.float32, device=dev)
    delta = torch.empty(b, hq, nq, dtype=torch.float32, device=dev)
    exact = exact_casts(dev)
    common = (
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        lse2, delta,
    )  # fmt: skip
    rows_grid = (cdiv(nq, block_m), b * hq)
    shape_args = (nq, nk, hq, hq // hkv, qk_scale, sm_scale)
    constexprs = dict(HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=is_causal)
    # pass 1: the exact row statistics (dq stands in for the unused output pointer)
    launch_rows(
        rows_grid, (*common, dq, 0, 0, 0, *shape_args), dict(constexprs, STATS=True, EXACT_CASTS=exact),
        num_warps, num_stages,
    )  # fmt: skip
    if grad_lse is not None:
        # d lse_i / d s_ij = P_ij: the lse's gradient joins dS = P (dP - delta) as delta - grad_lse
        # (rows that see no key have lse2 = +inf, P = 0 and no gradient, whatever grad_lse holds there)
        delta.sub_(torch.where(lse2 == float("inf"), 0.0, grad_lse.to(torch.float32)))
    launch_dkdv(
        (cdiv(nk, block_n), b * hkv),
        (*common, dk, dk.stride(0), dk.stride(1), dk.stride(2), dv, dv.stride(0), dv.stride(1), dv.stride(2),
         nq, nk, hkv, hq // hkv, qk_scale, sm_scale),
        dict(constexprs, EXACT_CASTS=exact), num_warps, num_stages,
    )  # fmt: skip
    launch_rows(
        rows_grid, (*common, dq, dq.stride(0), dq.stride(1), dq.stride(2), *shape_args),
        dict(constexprs, STATS=False, EXACT_CASTS=exact), num_warps, num_stages,
    )  # fmt: skip
