"""The Triton backend: quantattn's Triton kernels (quantattn/kernels) on NVIDIA GPUs of compute capability
8.0 and newer, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1). It serves forward,
backward and decode calls; its launchers are imported on first use (they import Triton)."""

from __future__ import annotations

import torch

from quantattn.backends.capability import device_capability, fp8_reason, interpreter_active, triton_installed
from quantattn.calls import AttentionCall


def unsupported(call: AttentionCall) -> list[str]:
    """What the Triton kernels cannot do yet (the reference backend can)."""
    reasons = []
    if call.cfg.smooth_q and (call.is_varlen or call.cfg.qk_granularity == "per_tensor"):
        reasons.append("smooth_q with varlen or per_tensor granularity is reference-only")
    return reasons


def on_current_device(device: torch.device):
    """A context for launching on `device` where it is not the current CUDA device (Triton compiles for and
    launches on the current device), else None."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return None


class TritonBackend:
    """The Triton kernels: NVIDIA GPUs of compute capability 8.0 and newer (FP8 PV: 8.9 and newer)."""

    name = "triton"
    min_capability = (8, 0)
    fp8_capability = (8, 9)

    def reasons(self, call: AttentionCall) -> list[str]:
        if not triton_installed():
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

    # ---- backward: the exact gradient (quantattn/kernels/backward.py) ----

    def backward(self, q, k, v, grad_out, is_causal, sm_scale, dq, dk, dv, grad_lse) -> None:
        from quantattn.kernels.backward_launch import attention_backward

        attention_backward(q, k, v, grad_out, is_causal, sm_scale, dq, dk, dv, grad_lse)

    # ---- decode: the quantized KV cache (quantattn/kernels/decode.py; FP8 V) ----

    def decode_reasons(self, device: torch.device) -> list[str]:
        if not triton_installed():
            return ["triton is not installed"]
        if device.type == "cpu":
            return [] if interpreter_active() else ["needs CUDA tensors (TRITON_INTERPRET=1 runs it on the CPU)"]
        if device.type != "cuda":
            return [f"needs CUDA tensors (got {device.type})"]
        reason = fp8_reason(device, "FP8")
        return [reason] if reason else []

    def decode_append(self, buf, k, v, pos0: int, cfg) -> None:
        from quantattn.kernels.decode_launch import append

        ctx = on_current_device(k.device)
        if ctx is None:
            append(buf, k, v, pos0, cfg)
            return
        with ctx:
            append(buf, k, v, pos0, cfg)

    def decode(self, q, buf, n_keys: int, cfg, is_causal: bool, sm_scale: float, out, lse) -> None:
        from quantattn.kernels.decode_launch import decode_attention

        ctx = on_current_device(q.device)
        if ctx is None:
            decode_attention(q, buf, n_keys, cfg, is_causal, sm_scale, out, lse)
            return
        with ctx:
            decode_attention(q, buf, n_keys, cfg, is_causal, sm_scale, out, lse)
