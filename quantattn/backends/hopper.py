"""The Hopper backend: the native CUDA kernel for sm_90 (quantattn/hopper). Forward calls only: the default
variant, dense, head_dim 64 or 128, no attention mask. Optional: refused wherever it is not built or not
on a Hopper GPU."""

from __future__ import annotations

from quantattn.calls import AttentionCall


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
