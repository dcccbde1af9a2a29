"""Exact merge of attentions of one set of queries over disjoint sets of keys, by their logsumexp.

If out_i = softmax(s_i) v_i over key set i and lse_i = logsumexp(s_i) (natural log, of the scores
attention would see in full precision: quantattn's `return_lse`), then attention over the union is
    lse = log(sum_i exp(lse_i)),   out = sum_i exp(lse_i - lse) out_i,
with no approximation. A row with no key in a set has lse_i = -inf and weight 0; a row with no key
anywhere stays out = 0, lse = -inf, as quantattn's own calls give it. NaN rows stay NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_out_layout(lse: torch.Tensor, tensor_layout: str) -> torch.Tensor:
    """[B, H, N] lse viewed to broadcast against an output in `tensor_layout`."""
    return (lse if tensor_layout == "HND" else lse.transpose(1, 2))[..., None]


def merge_into_(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, tensor_layout: str = "HND"
) -> None:
    """Fold one partial (out, lse) into the running (acc_out, acc_lse), in place.

    acc_out: [B, H, N, d] ("HND") or [B, N, H, d] ("NHD") in a float dtype at least as wide as float32;
    acc_lse: [B, H, N] in the same dtype; out, lse: one partial of the same shapes (any float dtype).
    Start from acc_out = 0 and acc_lse = -inf.
    """
    new_lse = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))
    # both -inf (no key yet): the weights would be exp(nan); 0 makes them exp(-inf) = 0
    ref = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_acc = _as_out_layout(torch.exp(acc_lse - ref), tensor_layout)
    w_new = _as_out_layout(torch.exp(lse.to(acc_lse.dtype) - ref), tensor_layout)
    acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new_lse)


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], tensor_layout: str = "HND"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions over disjoint key sets into attention over their union.

    outs: [B, H, N, d] ("HND") or [B, N, H, d] ("NHD"); lses: [B, H, N] natural-log logsumexp.
    Returns (out in outs[0]'s dtype, lse in float32, or float64 when the partials are float64).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"merge_attention needs one lse per output and at least one of each, got {len(outs)} and {len(lses)}"
        )
    if tensor_layout not in ("HND", "NHD"):
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    acc_dtype = torch.promote_types(outs[0].dtype, torch.float32)
    acc_out = torch.zeros(outs[0].shape, dtype=acc_dtype, device=outs[0].device)
    acc_lse = torch.full(lses[0].shape, float("-inf"), dtype=acc_dtype, device=lses[0].device)
    for out, lse in zip(outs, lses, strict=True):
        if out.shape != acc_out.shape or lse.shape != acc_lse.shape:
            raise ValueError(
                f"partials must share one shape: out {tuple(acc_out.shape)} and lse {tuple(acc_lse.shape)}, "
                f"got {tuple(out.shape)} and {tuple(lse.shape)}"
            )
        merge_into_(acc_out, acc_lse, out, lse, tensor_layout)
    return acc_out.to(outs[0].dtype), acc_lse
