"""Launchers: buffers, grids and constexpr flags for the Triton kernels. No numerics live here.

The K/V buffers are laid out by quantattn.calls.kv_buffer_layout, which quantattn/memory.py reads too;
memory.py also states the bytes of token_stats and _smooth_q_terms below (a GPU test holds the
allocator's peak to it)."""

from __future__ import annotations

import warnings

import torch
import triton

from quantattn import config as C
from quantattn import settings
from quantattn.calls import (  # noqa: F401  Sequences, sequences, KVBuffers: names tools and tests reach here
    LAG_CHUNKS,
    MAX_CHUNKS,
    PV_TORCH_DTYPE,
    QUANT_BLOCK,
    KVBuffers,
    QuantizedKV,
    Sequences,
    Stats,
    cdiv,
    head_dim_pad,
    kv_buffers,
    next_power_of_2,
    sequences,
)
from quantattn.config import LOG2E, QuantConfig
from quantattn.kernels import attention as A
from quantattn.kernels.attention import sage_attention_kernel
from quantattn.kernels.quant import preprocess_kv_kernel, token_stats_kernel

STATS_BLOCK = 64
PREPROCESS_WARPS = 4
GRAN_CODE = {name: i for i, name in enumerate(C.QK_GRANULARITIES)}
PV_MODE = {
    ("fp8", "fp32+fp32"): A.PV_F8_TWO_LEVEL.value,
    ("fp8", "fp32"): A.PV_F8_ONE_LEVEL.value,
    ("fp8", "fp32+fp16"): A.PV_F8_ACC16.value,
    ("fp16", "fp32"): A.PV_F16_ACC32.value,
    ("fp16", "fp16+fp32"): A.PV_F16_ACC16.value,
    ("bf16", "fp32"): A.PV_F16_ACC32.value,
}


def exact_casts(device: torch.device) -> bool:
    """Round to E4M3 in integer arithmetic before the cast: needed under the interpreter (see common.py)."""
    return device.type == "cpu" or settings.current.exact_casts


MIN_SLAB = 32  # the narrowest channel slab the attention kernel splits off (an INT8 MMA's K is 32)


def head_dim_slabs(d: int) -> tuple[int, int]:
    """(D_PAD, D_TAIL): the attention kernel's channels as one power-of-two slab (D_TAIL = 0), or as the
    largest power of two below d plus a second one, when two slabs hold fewer padded channels than one
    (80 -> 64 + 32 instead of 128, 160 -> 128 + 32 instead of 256). QUANTATTN_SPLIT_HEAD_DIM=0 keeps one slab."""
    padded = head_dim_pad(d)
    main = padded // 2
    if d <= main or not settings.current.split_head_dim:
        return padded, 0
    tail = max(MIN_SLAB, next_power_of_2(d - main))
    return (main, tail) if main + tail < padded else (padded, 0)


def _int_facts(a: int) -> tuple:
    """What Triton specializes an integer argument on: equal to 1, divisible by 16, its integer type."""
    return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31, 0 <= a < 2**64)


class CachedLaunch:
    """`kernel[grid](*args, **constexprs)`, with Triton's per-call argument binding skipped for
    argument signatures it has already compiled.

    Triton binds and specializes every argument on each launch, which costs tens of microseconds for
    the attention kernel's ~50 arguments: more than the kernel itself on short sequences. The facts
    Triton specializes on are the integers' properties (equal to 1, divisible by 16, 32 or 64 bits:
    `_int_facts`, not their values), the tensors' dtypes and 16-byte alignment, and the constexprs; a
    signature made of exactly those finds the compiled kernel of an earlier call, which is launched
    directly on the current stream. Keying on the properties rather than the values keeps a call with a
    new sequence length (every decode step, every new prompt length) on the direct path, and the table
    as small as the set of compiled kernels.
    QUANTATTN_DIRECT_LAUNCH=0 turns this off (every launch goes through Triton's front door).
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict = {}
        if hasattr(fn, "constexprs"):  # a JITFunction (the interpreter's stand-in has none: never direct)
            n_params = len(fn.arg_names)
            # constexprs passed by keyword must follow every runtime argument, in signature order
            self.constexpr_names = [fn.arg_names[i] for i in sorted(fn.constexprs)]
            assert sorted(fn.constexprs) == list(range(n_params - len(fn.constexprs), n_params)), fn.arg_names

    @staticmethod
    def signature(args, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
        # what Triton specializes integers on, dtype and alignment of tensors; floats are never specialized
        spec = tuple(
            _int_facts(a) if type(a) is int else (a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else None
            for a in args
        )
        return args[0].device.index, spec, tuple(constexprs.values()), num_warps, num_stages

    def __call__(self, grid, args, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
        direct = settings.current.direct_launch and args[0].is_cuda
        if direct:
            key = self.signature(args, constexprs, num_warps, num_stages)
            hit = self.compiled.get(key)
            if hit is not None and _no_launch_hooks():
                kernel, tail = hit
                stream = torch._C._cuda_getCurrentRawStream(args[0].device.index)
                kernel.run(
                    grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                    kernel.function, kernel.packed_metadata, None, None, None, *args, *tail,
                )  # fmt: skip
                return kernel
        kernel = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if direct and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            self.compiled[key] = (kernel, tuple(constexprs[name] for name in self.constexpr_names))
        return kernel


def _no_launch_hooks() -> bool:
    """Whether a profiler (e.g. proton) hooks launches: then they keep going through Triton."""
    hook = triton.knobs.runtime.launch_enter_hook  # an empty HookChain in triton 3.6, None in others
    return hook is None or getattr(hook, "calls", None) == []


launch_token_stats = CachedLaunch(token_stats_kernel)
launch_preprocess_kv = CachedLaunch(preprocess_kv_kernel)
launch_attention = CachedLaunch(sage_attention_kernel)


def token_stats(seqs: Sequences, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Stats]:
    """Mean, max and min over tokens of the finite elements, per (sequence, head, channel), of x
    (and of y, same shape, in the same launch)."""
    tensors = [x] if y is None else [x, y]
    _, h, _, d = x.shape
    stats = torch.empty(len(tensors), 3, seqs.count, h, d, dtype=torch.float32, device=x.device)
    n_programs = seqs.count * h
    if n_programs:
        second = tensors[-1]
        args = (
            x, x.stride(0), x.stride(1), x.stride(2),
            second, second.stride(0), second.stride(1), second.stride(2),
            _cu(seqs, x), seqs.n_dense, h, n_programs, stats,
        )  # fmt: skip
        constexprs = dict(HEAD_DIM=d, D_PAD=head_dim_pad(d), BLOCK_N=STATS_BLOCK, IS_VARLEN=seqs.is_varlen)
        launch_token_stats((len(tensors) * n_programs,), args, constexprs)
    return [tuple(t.unbind(0)) for t in stats.unbind(0)]


def _cu(seqs: Sequences, like: torch.Tensor) -> torch.Tensor:
    """The kernels' cu_seqlens argument: varlen offsets, or per-batch lengths, or a dummy."""
    if seqs.cu_seqlens is not None:
        return seqs.cu_seqlens
    return seqs.lengths if seqs.lengths is not None else like


def _check_strides(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with arbitrary strides but want the channel stride 1."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def triton_preprocess_kv(
    k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, seqs: Sequences, wgmma_order: bool = False
) -> QuantizedKV:
    """Smooth and quantize K (and V, for FP8 PV or smooth V) in one launch.

    wgmma_order (dense FP8 PV only): the layout the Hopper backend reads through TMA: V^T's keys
    permuted inside each 32-key chunk (zeros up to a multiple of 32) and k_scale rows of a multiple of 4
    floats (TMA wants 16-byte row strides)."""
    k, v = _check_strides(k), _check_strides(v)
    _, h, _, d = k.shape
    heads = seqs.count * h
    assert not wgmma_order or (cfg.is_fp8_pv and not seqs.is_varlen)
    buf = kv_buffers(k, v, cfg, seqs, wgmma_order)
    if buf.sync is not None:
        args = (
            k, k.stride(0), k.stride(1), k.stride(2),
            v, v.stride(0), v.stride(1), v.stride(2),
            _cu(seqs, k), seqs.n_dense, h, heads, buf.n_chunks, buf.lag,
            buf.partials, buf.stats, buf.sync,
            buf.kq, buf.kq.stride(0), buf.kq.stride(1), buf.kq.stride(2),
            buf.k_scale, buf.k_scale.stride(0), buf.k_scale.stride(1),
            buf.vq, *buf.vq_strides,
        )  # fmt: skip
        constexprs = dict(
            BLOCKS_PER_CHUNK=buf.per_chunk,
            GRAN=GRAN_CODE[cfg.qk_granularity], QMAX=cfg.qmax, SMOOTH_K=cfg.smooth_k,
            V_STATS=cfg.is_fp8_pv or cfg.smooth_v, V_MODE=buf.v_mode, SMOOTH_V=cfg.smooth_v,
            V_RANGE=cfg.v_range if cfg.is_fp8_pv else 1.0, EXACT_CASTS=exact_casts(k.device),
            HEAD_DIM=d, D_PAD=head_dim_pad(d), BLOCK_N=QUANT_BLOCK, IS_VARLEN=seqs.is_varlen,
            LENGTHS=seqs.has_lengths, V_WGMMA_ORDER=wgmma_order,
        )  # fmt: skip
        grid = ((heads + buf.lag) * buf.n_chunks,)
        launch_preprocess_kv(grid, args, constexprs, num_warps=PREPROCESS_WARPS, num_stages=1)
    return buf.result(cfg, seqs)


def _smooth_q_terms(q: torch.Tensor, kv: QuantizedKV, k: torch.Tensor, qk_scale: float):
    """Block means of Q and the score correction mean(Q_block) . (K - k̄), in float32 (dense only); k̄ is
    smooth K's vector (the trimmed token mean, kv.k_stats[0]), the one the kernel subtracted."""
    b, hq, nq, d = q.shape
    rows = C.Q_BLOCK_ROWS
    nb = cdiv(nq, rows)
    q32 = q.float()
    q32 = torch.where(torch.isfinite(q32), q32, 0.0)
    q32 = torch.nn.functional.pad(q32, (0, 0, 0, nb * rows - nq))
    counts = (nq - torch.arange(nb, device=q.device) * rows).clamp(max=rows).float()
    means = (q32.view(b, hq, nb, rows, d).sum(-2) / counts[:, None]).contiguous()
    hkv = k.shape[1]
    k_s = k.float() - (kv.k_stats[0][:, :, None, :] if kv.cfg.smooth_k else 0.0)
    delta = means.view(b, hkv, (hq // hkv) * nb, d) @ k_s.transpose(-1, -2)
    return means, (delta * qk_scale).view(b, hq, nb, -1).contiguous()


def triton_attention(
    q: torch.Tensor,
    kv: QuantizedKV,
    is_causal: bool,
    sm_scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    seqs_q: Sequences,
    k: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
):
    """The attention kernel on pre-quantized K/V; writes `out` (HND view) and `lse` ([B, Hq, Nq]).

    `k` (the unquantized K) is needed only for smooth Q's correction term. `attn_mask`: bool (True
    attends) or float (added to the scores), a view of shape [B, Hq, Nq, Nk] (broadcast dims may have
    stride 0). Returns Triton's compiled kernel handle (its .asm and register counts are what tools
    inspect)."""
    cfg = kv.cfg
    q = _check_strides(q)
    b, hq, nq, d = q.shape
    hkv = kv.k.shape[1]
    qk_scale = sm_scale * LOG2E
    dummy = kv.k_scale
    q_stats = token_stats(seqs_q, q)[0] if cfg.qk_granularity == "per_tensor" else (dummy, dummy, dummy)
    if cfg.smooth_q:
        means, delta = _smooth_q_terms(q, kv, k, qk_scale)
        means_args = (means, means.stride(0), means.stride(1))
        delta_args = (delta, delta.stride(0), delta.stride(1), delta.stride(2))
    else:
        means_args, delta_args = (dummy, 0, 0), (dummy, 0, 0, 0)
    v = kv.v
    v_strides = (v.stride(0), v.stride(1), 1, v.stride(2)) if kv.v_transposed else (*v.stride()[:3], 1)
    lse_args = (lse, lse.stride(0), lse.stride(1)) if lse is not None else (dummy, 0, 0)
    mask_mode, mask_args = _mask_args(attn_mask, dummy)
    d_pad, d_tail = head_dim_slabs(d)
    if not kv.v_transposed and v.dtype != PV_TORCH_DTYPE.get(cfg.pv_dtype, v.dtype):
        # V converted in the kernel (bf16 V, FP16 PV) with two slabs: Triton 3.6 miscompiles it on sm_90
        # (compute-sanitizer: out-of-range shared memory access in the PV product), so one padded slab
        d_pad, d_tail = head_dim_pad(d), 0
    block_m, num_warps, num_stages = forward_tile_config(d_pad + d_tail, cfg, q.is_cuda)
    block_n = settings.current.experiment_kv_block or cfg.kv_block  # the experiment changes the numerics
    grid = (cdiv(seqs_q.max_len, block_m), seqs_q.count * hq)
    args = (
        q, q.stride(0), q.stride(1), q.stride(2),
        kv.k, kv.k.stride(0), kv.k.stride(1), kv.k.stride(2),
        kv.k_scale, kv.k_scale.stride(0), kv.k_scale.stride(1),
        v, *v_strides,
        q_stats[1], q_stats[2], *means_args,
        *delta_args,
        kv.k_stats[0], kv.v_stats[0], kv.v_stats[1], kv.v_stats[2],
        out, out.stride(0), out.stride(1), out.stride(2),
        *lse_args,
        *mask_args,
        _cu(seqs_q, q), _cu(kv.seqs, q), seqs_q.n_dense, kv.seqs.n_dense, hq, hq // hkv,
        qk_scale, sm_scale,
    )  # fmt: skip
    constexprs = dict(
        HEAD_DIM=d, D_PAD=d_pad, D_TAIL=d_tail, BLOCK_M=block_m, BLOCK_N=block_n,
        GRAN=GRAN_CODE[cfg.qk_granularity], QMAX=cfg.qmax, SMOOTH_K=cfg.smooth_k, SMOOTH_Q=cfg.smooth_q,
        SMOOTH_V=cfg.smooth_v, PV_MODE=PV_MODE[(cfg.pv_dtype, cfg.pv_accum)], P_SCALE=cfg.p_scale,
        V_RANGE=cfg.v_range if cfg.is_fp8_pv else 1.0,
        PV_DTYPE=_triton_dtype(cfg), EXACT_CASTS=exact_casts(q.device),
        IS_CAUSAL=is_causal, IS_VARLEN=seqs_q.is_varlen, RETURN_LSE=lse is not None,
        MASK_MODE=mask_mode, KEY_LENGTHS=kv.seqs.has_lengths,
    )  # fmt: skip
    return launch_attention(grid, args, constexprs, num_warps, num_stages)


def _mask_args(attn_mask: torch.Tensor | None, dummy: torch.Tensor) -> tuple[int, tuple]:
    """(MASK_MODE, the mask's pointer and strides); a bool mask is read as its bytes."""
    if attn_mask is None:
        return A.MASK_NONE.value, (dummy, 0, 0, 0, 0)
    if attn_mask.dtype == torch.bool:
        mode, attn_mask = A.MASK_BOOL.value, attn_mask.view(torch.uint8)
    else:
        mode = A.MASK_ADD.value
    return mode, (attn_mask, *attn_mask.stride())


def forward_tile_config(d_pad: int, cfg: QuantConfig, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages); QUANTATTN_TILE="BM,warps,stages" overrides it for tuning runs."""
    if settings.current.tile is not None:
        return settings.current.tile
    if not on_gpu:
        return 64, 4, 1
    if d_pad > 128:
        return 64, 4, 2
    # measured on the H100 (docs/perf-notes.md): FP8 PV runs best with one warpgroup per 64 query rows,
    # FP16/BF16 PV (64-key steps) with two warpgroups per 128 rows
    return (64, 4, 3) if cfg.is_fp8_pv else (128, 8, 3)


def _triton_dtype(cfg: QuantConfig):
    import triton.language as tl

    return {"fp16": tl.float16, "bf16": tl.bfloat16}.get(cfg.pv_dtype, tl.float16)


INTERPRETER_FP8_PV_NOTE = (
    "quantattn: under the Triton interpreter, FP8 P.V products lose NaN and Inf (triton 3.6's interpreter "
    "decodes the E4M3 NaN as 480 inside tl.dot), so a NaN or Inf in V can come out finite here; the numbers "
    "are otherwise the kernel's. NaN propagation is checked on the GPU (tests/test_kernels_gpu.py)."
)
_said_interpreter_fp8_pv = False


def say_what_the_interpreter_cannot_check(cfg: QuantConfig, device: torch.device) -> None:
    """Warn once per process when an FP8-PV call runs through the interpreter (CPU tensors)."""
    global _said_interpreter_fp8_pv
    if cfg.is_fp8_pv and device.type == "cpu" and not _said_interpreter_fp8_pv:
        _said_interpreter_fp8_pv = True
        warnings.warn(INTERPRETER_FP8_PV_NOTE, stacklevel=4)


def sage_forward(call) -> None:
    """Whole call: preprocess K/V, then the attention kernel (Q is quantized inside it)."""
    dev = call.q.device
    say_what_the_interpreter_cannot_check(call.cfg, dev)
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # Triton compiles for and launches on the current device
            return sage_forward(call)
    seqs_k = sequences(call.k, call.cu_seqlens_k, call.max_seqlen_k, call.key_lengths)
    seqs_q = sequences(call.q, call.cu_seqlens_q, call.max_seqlen_q)
    kv = triton_preprocess_kv(call.k, call.v, call.cfg, seqs_k)
    triton_attention(
        call.q, kv, call.is_causal, call.sm_scale, call.out, call.lse, seqs_q, k=call.k, attn_mask=call.attn_mask
    )
