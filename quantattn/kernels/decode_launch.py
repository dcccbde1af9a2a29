"""Launchers of the decode kernels (quantattn/kernels/decode.py): buffers, grids, constexpr flags.

Nothing here reads a device value on the host: lengths and positions are Python ints the cache keeps,
so a decode step (append + attention) never synchronizes and can be captured in a CUDA graph (which
then replays that step's positions).
"""

from __future__ import annotations

import torch

from quantattn.calls import cdiv, head_dim_pad, next_power_of_2
from quantattn.config import LOG2E, QuantConfig
from quantattn.kernels.decode import append_kv_kernel, decode_attention_kernel, decode_merge_kernel
from quantattn.kernels.launch import CachedLaunch, exact_casts
from quantattn.reference.decode import (
    MAX_ROWS_PER_PROGRAM,
    V_BLOCK,
    KVCacheBuffers,
    blocks_per_split,
    packed_rows,
)

SPLIT_BLOCK = 16  # splits the merge kernel reads per step
APPEND_WARPS = 4


class DecodeLaunch(CachedLaunch):
    """CachedLaunch that compiles without FP fusion."""

    def __call__(self, grid, args, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
        # No FMA contraction (a compile option, passed with the constexprs; the interpreter ignores it):
        # ptxas would fuse `x * inv + ROUND_MAGIC` into one fma, rounding x * inv to an integer in one
        # step where the reference rounds the product first, and near-ties (frequent for bf16 Q, K)
        # would round differently. Every float32 operation is then rounded once, as in PyTorch.
        return super().__call__(grid, args, {**constexprs, "enable_fp_fusion": False}, num_warps, num_stages)


launch_decode = DecodeLaunch(decode_attention_kernel)
launch_merge = DecodeLaunch(decode_merge_kernel)
launch_append = DecodeLaunch(append_kv_kernel)


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def append(buf: KVCacheBuffers, k: torch.Tensor, v: torch.Tensor, pos0: int, cfg: QuantConfig) -> None:
    """Quantize HND tokens k, v ([B, Hkv, n, d]) into cache positions pos0 .. pos0 + n.

    An append that completes the partly filled block at pos0 and also leaves a new incomplete block
    runs as two launches: the first reads the old tail, the second overwrites it."""
    n = k.shape[2]
    if n == 0:
        return
    k, v = _unit_channel_stride(k), _unit_channel_stride(v)
    filled = pos0 % V_BLOCK
    if filled and n > V_BLOCK - filled and (pos0 + n) % V_BLOCK:
        head = V_BLOCK - filled
        _append_launch(buf, k[:, :, :head], v[:, :, :head], pos0, cfg)
        _append_launch(buf, k[:, :, head:], v[:, :, head:], pos0 + head, cfg)
    else:
        _append_launch(buf, k, v, pos0, cfg)


def _append_launch(buf: KVCacheBuffers, k, v, pos0: int, cfg: QuantConfig) -> None:
    b, hkv, n, d = k.shape
    blocks = (pos0 + n - 1) // V_BLOCK - pos0 // V_BLOCK + 1
    args = (
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        buf.k_mean,
        buf.k, buf.k.stride(0), buf.k.stride(1), buf.k.stride(2),
        buf.k_scale, buf.k_scale.stride(0), buf.k_scale.stride(1),
        buf.v, buf.v.stride(0), buf.v.stride(1), buf.v.stride(2),
        buf.v_scale, buf.v_scale.stride(0), buf.v_scale.stride(1), buf.v_scale.stride(2),
        buf.v_tail, buf.v_tail.stride(0), buf.v_tail.stride(1), buf.v_tail.stride(2),
        hkv, pos0, n,
    )  # fmt: skip
    constexprs = dict(
        HEAD_DIM=d, D_PAD=head_dim_pad(d), BLOCK_N=V_BLOCK, V_RANGE=cfg.v_range, EXACT_CASTS=exact_casts(k.device)
    )
    launch_append((blocks, b * hkv), args, constexprs, num_warps=APPEND_WARPS, num_stages=1)


# Packed rows per program. Decoding one token with a GQA group of 4 packs 4 rows: a 64-row tile would
# spend 16 times the exp2 and MMA work of the rows it holds, and that work, not the loads, sets the
# speed (H100, B=8, 32/8 heads, d=128: 1.2 TB/s at 64 rows with 1 token or 16). With fewer than 64
# rows Triton 3.6 lowers the FP8 P V product on Hopper to FP8 -> FP16 conversions and mma.sync with a
# true FP32 accumulator instead of wgmma's FP22 one: exact products summed in FP32, more accurate
# than docs/numerics.md §5, and modelled by decode_reference(fp32_pv=True).
MIN_ROWS = 16  # what an MMA needs


def row_block(rows: int, cfg: QuantConfig, on_gpu: bool) -> int:
    """BLOCK_M of the decode kernel: packed rows per program. 2++'s FP16 accumulator keeps 64 rows on
    the GPU (its wgmma accumulation is the modelled one; mma.sync's FP16 one is not)."""
    floor = 64 if on_gpu and cfg.pv_accum == "fp32+fp16" else MIN_ROWS
    return min(MAX_ROWS_PER_PROGRAM, max(floor, next_power_of_2(rows)))


def pv_accumulates_in_fp32(block_m: int, device: torch.device) -> bool:
    """Whether the kernel's FP8 P V product sums in true FP32 (mma.sync after FP16 conversion: Hopper
    with fewer than 64 rows) rather than in the FP8 tensor-core accumulator."""
    return device.type == "cuda" and block_m < 64 and torch.cuda.get_device_capability(device) >= (9, 0)


def reference_rows_in_fp32(q: torch.Tensor, hkv: int, cfg: QuantConfig) -> bool:
    """decode_reference's fp32_pv for a call the kernel would run with q on q's device."""
    return pv_accumulates_in_fp32(row_block(packed_rows(q.shape[1], hkv, q.shape[2]), cfg, q.is_cuda), q.device)


def decode_tile_config(d_pad: int, block_m: int, on_gpu: bool) -> tuple[int, int]:
    """(num_warps, num_stages) of the decode kernel. 64-row tiles take eight warps (two warpgroups
    splitting the tile's columns) because ptxas spills them at four (2020 bytes at d = 128 against 56 at
    eight; sm_90a, triton 3.6); 16-row tiles fit four."""
    if not on_gpu:
        return 4, 1
    warps = 4 if block_m <= 16 else 8
    return (warps, 3) if d_pad <= 128 else (warps, 2)


def decode_attention(
    q: torch.Tensor,
    buf: KVCacheBuffers,
    n_keys: int,
    cfg: QuantConfig,
    is_causal: bool,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None,
) -> None:
    """Write out (HND view of [B, Hq, Nq, d]) and lse ([B, Hq, Nq] float32) for q (HND) against the
    first n_keys tokens of the cache (n_keys >= 1)."""
    q = _unit_channel_stride(q)
    b, hq, nq, d = q.shape
    hkv = buf.k.shape[1]
    rows = packed_rows(hq, hkv, nq)
    block_m = row_block(rows, cfg, q.is_cuda)
    row_tiles = cdiv(rows, block_m)
    bps = blocks_per_split(n_keys, b * hkv, rows)
    n_splits = cdiv(cdiv(n_keys, V_BLOCK), bps)
    d_pad = head_dim_pad(d)
    programs = b * hkv * row_tiles
    single = n_splits == 1
    dev = q.device
    if single:
        part_o = part_ml = buf.k_scale  # unused
    else:
        part_o = torch.empty(programs, block_m, n_splits, d_pad, dtype=torch.float32, device=dev)
        part_ml = torch.empty(programs, block_m, n_splits, 2, dtype=torch.float32, device=dev)
    lse_args = (lse, lse.stride(0), lse.stride(1)) if lse is not None else (buf.k_scale, 0, 0)
    exact = exact_casts(dev)
    num_warps, num_stages = decode_tile_config(d_pad, block_m, q.is_cuda)
    args = (
        q, q.stride(0), q.stride(1), q.stride(2),
        buf.k, buf.k.stride(0), buf.k.stride(1), buf.k.stride(2),
        buf.k_scale, buf.k_scale.stride(0), buf.k_scale.stride(1),
        buf.v, buf.v.stride(0), buf.v.stride(1), buf.v.stride(2),
        buf.v_scale, buf.v_scale.stride(0), buf.v_scale.stride(1), buf.v_scale.stride(2),
        buf.v_tail, buf.v_tail.stride(0), buf.v_tail.stride(1), buf.v_tail.stride(2),
        buf.k_mean,
        out, out.stride(0), out.stride(1), out.stride(2),
        *lse_args,
        part_o, part_ml,
        hkv, nq, n_keys, bps * V_BLOCK, n_splits, row_tiles, hq // hkv,
        sm_scale * LOG2E, sm_scale,
    )  # fmt: skip
    constexprs = dict(
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=V_BLOCK, P_SCALE=cfg.p_scale,
        PV_ACC16=cfg.pv_accum == "fp32+fp16", EXACT_CASTS=exact, IS_CAUSAL=is_causal,
        SINGLE_SPLIT=single, RETURN_LSE=lse is not None,
    )  # fmt: skip
    launch_decode((n_splits, programs), args, constexprs, num_warps=num_warps, num_stages=num_stages)
    if single:
        return
    args = (
        part_o, part_ml,
        q, q.stride(0), q.stride(1), q.stride(2),
        buf.k_mean,
        out, out.stride(0), out.stride(1), out.stride(2),
        *lse_args,
        hkv, nq, n_splits, row_tiles, hq // hkv, sm_scale,
    )  # fmt: skip
    constexprs = dict(
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, SPLIT_BLOCK=SPLIT_BLOCK, EXACT_CASTS=exact,
        RETURN_LSE=lse is not None,
    )  # fmt: skip
    launch_merge((programs * block_m,), args, constexprs, num_warps=4 if d_pad >= 128 else 2, num_stages=1)
