"""Input checks, done once at the API boundary, with messages that name the argument."""

from __future__ import annotations

import math
import numbers

import torch

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("HND", "NHD")
MAX_HEAD_DIM = 256


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16 (quantattn does not take {t.dtype}); cast it first")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_sm_scale(sm_scale) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a float or None, got {sm_scale!r}")
    if not math.isfinite(float(sm_scale)) or float(sm_scale) == 0.0:
        raise ValueError(f"sm_scale must be finite and non-zero, got {sm_scale!r}")


def check_qkv(q, k, v, expected_ndim: int, layout_desc: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != expected_ndim:
            raise ValueError(f"{name} must be {expected_ndim}-D ({layout_desc}), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_layout(tensor_layout) -> None:
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' ([B, H, N, d]) or 'NHD' ([B, N, H, d]), got {tensor_layout!r}")


def check_heads_and_dims(q_shape, k_shape, v_shape) -> None:
    """Shapes as (B, H, N, d), for dense inputs, or (H, N, d) for varlen ones."""
    *qb, hq, _, d = q_shape
    *kb, hk, nk, dk = k_shape
    *vb, hv, nv, dv = v_shape
    if qb != kb or qb != vb:
        raise ValueError(f"q, k and v must have one batch size, got {qb[0]}, {kb[0]}, {vb[0]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if dk != d or dv != d:
        raise ValueError(f"q, k and v must have one head_dim, got {d}, {dk}, {dv}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if nk != nv:
        raise ValueError(f"k and v must have the same sequence length, got {nk} and {nv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the key/value heads ({hk})")


def check_cu_seqlens(name: str, cu, total: int, batch: int | None, max_seqlen, max_name: str) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0)")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {batch + 1} and {cu.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading the offsets would synchronize; a captured graph trusts its caller
    host = cu.cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {int(host[-1])}")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence ({int(lengths.max())})")


MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)


def check_attn_mask(mask, q: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The mask as a [B, Hq, Nq, Nk] view (broadcast dims of stride 0): SDPA's forms, bool (True
    attends) or float (added to the scores), broadcastable to `shape`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"attn_mask must be bool (True attends) or float16/bfloat16/float32 (added), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device ({q.device}), got {mask.device}")
    if not broadcasts_to(mask.shape, shape):
        raise ValueError(f"attn_mask must broadcast to [B, Hq, Nq, Nk] = {list(shape)}, got shape {tuple(mask.shape)}")
    return mask.expand(shape)


def broadcasts_to(shape, target) -> bool:
    """Whether a tensor of `shape` broadcasts to `target` (trailing dims equal or 1, no extra dims)."""
    return len(shape) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(tuple(shape)), reversed(tuple(target)), strict=False)
    )


def check_key_lengths(lengths, q: torch.Tensor, batch: int, nk: int) -> torch.Tensor:
    """Per-batch numbers of valid keys as int32 [B], clamped to [0, Nk] on the device (reading them here
    would synchronize with the GPU), before the cast: an int64 length beyond int32 must not wrap."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"key_lengths must be a torch.Tensor or None, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.shape != (batch,):
        raise ValueError(
            f"key_lengths must be an int32 or int64 tensor of shape [B] = [{batch}], got {lengths.dtype} of shape "
            f"{tuple(lengths.shape)}"
        )
    if lengths.device != q.device:
        raise ValueError(f"key_lengths must be on q's device ({q.device}), got {lengths.device}")
    return lengths.clamp(0, nk).to(torch.int32).contiguous()
