"""Backends declare what they can run; dispatch takes the first one with no reason to refuse a call."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from quantattn.backends import speed_table
from quantattn.backends.sdpa import AUTO_SDPA, AUTO_SDPA_MESSAGE, SDPA_BACKENDS, SdpaBackend, count_fallback
from quantattn.config import QuantConfig
from quantattn.reference.attention import sage_attention_reference


@dataclass
class AttentionCall:
    """One attention call, in HND views ([B, H, N, d]); varlen packs all sequences into B = 1."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cfg: QuantConfig
    is_causal: bool
    sm_scale: float
    out: torch.Tensor  # HND view the backend writes
    lse: torch.Tensor | None  # [B, Hq, Nq] float32 the backend writes, natural log
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # dense calls only: bool (True attends) or additive float mask viewed as [B, Hq, Nq, Nk] (broadcast
    # dims of stride 0), and int32 [B] numbers of valid keys (keys past them are padding)
    attn_mask: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, looked up once per device (it is on every call's path)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if lse is not None:
            out.copy_(res[0])
            lse.copy_(res[1])
        else:
            out.copy_(res)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unsupported(call: AttentionCall) -> list[str]:
    """What the Triton kernels cannot do yet (the reference backend can)."""
    reasons = []
    if call.cfg.smooth_q and (call.is_varlen or call.cfg.qk_granularity == "per_tensor"):
        reasons.append("smooth_q with varlen or per_tensor granularity is reference-only")
    return reasons


class TritonBackend:
    """The Triton kernels: NVIDIA GPUs of compute capability 8.0 and newer (FP8 PV: 8.9 and newer)."""

    name = "triton"
    min_capability = (8, 0)
    fp8_capability = (8, 9)

    def reasons(self, call: AttentionCall) -> list[str]:
        if not _triton_installed():
            return ["triton is not installed"]
        dev = call.q.device
        if dev.type != "cuda":
            if dev.type == "cpu" and interpreter_active():
                return unsupported(call)
            return [f"needs CUDA tensors (got {dev.type}; TRITON_INTERPRET=1 runs it on the CPU)"]
        cap = device_capability(dev)
        if cap < self.min_capability:
            return [f"needs compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"]
        if call.cfg.is_fp8_pv and cap < self.fp8_capability:
            return [
                f"FP8 PV needs compute capability >= 8.9 (Ada, Hopper), this GPU has {cap[0]}.{cap[1]}; "
                "use pv_dtype='fp16'"
            ]
        return unsupported(call)

    def prefers(self, call: AttentionCall) -> bool:
        return True

    def forward(self, call: AttentionCall) -> None:
        from quantattn.kernels.launch import sage_forward

        sage_forward(call)


class HopperBackend:
    """The native CUDA kernel for sm_90 (quantattn/hopper): the default variant, dense calls, head_dim
    64 or 128, no attention mask. Optional: refused wherever it is not built or not on a Hopper GPU."""

    name = "hopper"

    def reasons(self, call: AttentionCall) -> list[str]:
        if call.q.device.type != "cuda":
            return [f"needs CUDA tensors (got {call.q.device.type})"]
        from quantattn import hopper

        reason = hopper.unavailable_reason(call.q.device)
        if reason is not None:
            return [reason]
        from quantattn.hopper.launch import config_reasons, tensor_reasons

        reasons = config_reasons(call.cfg) + tensor_reasons(call.q, call.k, call.v, call.out)
        if call.is_varlen or call.attn_mask is not None or call.key_lengths is not None:
            reasons.append("the Hopper kernel runs dense calls without attention masks or key lengths")
        return reasons

    # backend="auto" takes it where it was measured faster than the Triton kernel as a whole call (H100,
    # bench/results/2026-11-23_075224_H100_session7: head_dim 128 and 64 at every N from 1K, causal or
    # not, by 5-50%; head_dim 64 joined when the kernel went to 4 CTAs per SM). Below 1K queries nothing
    # was measured.
    AUTO_MIN_QUERIES = 1024

    def prefers(self, call: AttentionCall) -> bool:
        return call.q.shape[2] >= self.AUTO_MIN_QUERIES

    def forward(self, call: AttentionCall) -> None:
        from quantattn.hopper.launch import forward

        forward(call)


BACKENDS = {"hopper": HopperBackend(), "triton": TritonBackend(), "reference": ReferenceBackend()}
AUTO_ORDER = ("hopper", "triton")
# "auto": the first quantized backend of AUTO_ORDER that takes the call, or torch's SDPA where this GPU's
# speed table measured SDPA faster for the call's shape class (quantattn.backends.speed_table);
# "quantized": the same choice without torch's SDPA (for measuring quantattn itself).
REQUESTS = ("auto", "quantized", *BACKENDS)


def select_backend(call: AttentionCall, requested: str):
    """The backend that runs `call`: a BACKENDS entry, or (for "auto" only) an SdpaBackend, torch's SDPA."""
    if requested not in REQUESTS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, REQUESTS))}; got {requested!r}")
    if requested in BACKENDS:
        backend = BACKENDS[requested]
        reasons = backend.reasons(call)
        if reasons:
            raise RuntimeError(f"backend {requested!r} cannot run this call: {'; '.join(reasons)}")
        return backend
    if call.q.device.type == "cpu":
        return BACKENDS["reference"]
    refusals = []
    for name in AUTO_ORDER:
        if not BACKENDS[name].prefers(call):
            refusals.append(f"{name}: not preferred for this shape")
            continue
        reasons = BACKENDS[name].reasons(call)
        if not reasons:
            if requested == "auto":
                span = speed_table.sdpa_span(call, name)
                if span is not None:
                    count_fallback(span.reason, AUTO_SDPA_MESSAGE)
                    return SDPA_BACKENDS[span.sdpa]
            return BACKENDS[name]
        refusals.append(f"{name}: {'; '.join(reasons)}")
    raise RuntimeError(
        "no quantattn kernel can run this call on "
        f"{call.q.device} ({' | '.join(refusals)}); backend='reference' runs the slow PyTorch version"
    )


__all__ = [
    "AUTO_SDPA",
    "AttentionCall",
    "BACKENDS",
    "HopperBackend",
    "REQUESTS",
    "SDPA_BACKENDS",
    "ReferenceBackend",
    "SdpaBackend",
    "TritonBackend",
    "device_capability",
    "select_backend",
]
