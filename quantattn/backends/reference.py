"""The reference backend: the pure-PyTorch specification of every kernel (quantattn/reference), on any
device, slow. It serves forward, backward and decode calls."""

from __future__ import annotations

import torch

from quantattn.calls import AttentionCall
from quantattn.reference.attention import sage_attention_reference
from quantattn.reference.backward import attention_backward_reference
from quantattn.reference.decode import append_reference, decode_reference


class ReferenceBackend:
    """The pure-PyTorch specification: any device, slow."""

    name = "reference"

    def reasons(self, call: AttentionCall) -> list[str]:
        return []

    def forward(self, call: AttentionCall) -> None:
        if call.key_lengths is not None:
            self._padded_keys(call)
            return
        if not call.is_varlen:
            self._dense(call, call.q, call.k, call.v, call.out, call.lse, call.attn_mask)
            return
        cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            lse = call.lse[:, :, rows] if call.lse is not None else None
            self._dense(call, call.q[:, :, rows], call.k[:, :, keys], call.v[:, :, keys], call.out[:, :, rows], lse)

    def _padded_keys(self, call: AttentionCall) -> None:
        """Each batch entry on its first key_lengths[b] keys (clamped to [0, Nk], as the kernels do),
        quantized as if the padding were absent; the causal mask stays aligned to the tensors' Nk."""
        nq, nk = call.q.shape[2], call.k.shape[2]
        for b, n in enumerate(call.key_lengths.clamp(0, nk).tolist()):
            rows, keys = slice(b, b + 1), slice(0, n)
            mask = call.attn_mask[rows, ..., keys] if call.attn_mask is not None else None
            lse = call.lse[rows] if call.lse is not None else None
            self._dense(call, call.q[rows], call.k[rows, :, keys], call.v[rows, :, keys], call.out[rows], lse, mask,
                        causal_shift=nk - nq)  # fmt: skip

    @staticmethod
    def _dense(call, q, k, v, out, lse, attn_mask=None, causal_shift=None):
        if q.shape[2] == 0:
            return
        if k.shape[2] == 0:
            out.zero_()
            if lse is not None:
                lse.fill_(float("-inf"))
            return
        res = sage_attention_reference(
            q, k, v, call.cfg, call.is_causal, call.sm_scale, lse is not None, attn_mask=attn_mask,
            causal_shift=causal_shift,
        )  # fmt: skip
        _write(res, out, lse)

    # ---- backward: the exact gradient, float32 ----

    def backward_reasons(self, device: torch.device) -> list[str]:
        return []

    def backward(self, q, k, v, grad_out, is_causal, sm_scale, dq, dk, dv, grad_lse) -> None:
        for dst, src in zip((dq, dk, dv), attention_backward_reference(q, k, v, grad_out, is_causal, sm_scale, grad_lse),
                            strict=True):  # fmt: skip
            dst.copy_(src)

    # ---- decode: the quantized KV cache ----

    def decode_reasons(self, device: torch.device) -> list[str]:
        return []

    def decode_append(self, buf, k, v, pos0: int, cfg) -> None:
        append_reference(buf, k, v, pos0, cfg.v_range)

    def decode(self, q, buf, n_keys: int, cfg, is_causal: bool, sm_scale: float, out, lse) -> None:
        fp32_pv = False
        if q.is_cuda:  # mirror the kernel this GPU would run (its P V accumulator depends on the tile)
            from quantattn.kernels.decode_launch import reference_rows_in_fp32

            fp32_pv = reference_rows_in_fp32(q, buf.k.shape[1], cfg)
        res = decode_reference(q, buf, n_keys, cfg, is_causal, sm_scale, lse is not None, fp32_pv=fp32_pv)
        _write(res, out, lse)


def _write(res, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """A reference's result (output, or output and lse) into the call's buffers."""
    if lse is not None:
        out.copy_(res[0])
        lse.copy_(res[1])
    else:
        out.copy_(res)
