"""Gradients for quantattn: a quantized forward, the exact gradient of full-precision attention.

`sageattn` goes through `SageAttentionFunction` when autograd is recording and q, k or v requires grad.
Its forward is the quantized attention `sageattn` computes anyway (same kernels, same variant, same
result bit for bit); its backward returns the gradient of full-precision attention
softmax(sm_scale q k^T) v at the same q, k, v, computed without quantization:

    dS = P * (dO V^T - delta)     dQ = sm_scale dS K     dK = sm_scale dS^T Q     dV = P^T dO

with P the exact softmax and delta_i = sum_j P_ij (dO_i . v_j), recomputed from q, k and v (not taken
from the quantized output, whose error would otherwise enter the gradient). This is the
straight-through convention of quantization-aware training: the gradient does not see the rounding of
the forward, so it is what full-precision attention would give at the inputs, while the loss is the
quantized model's. The log-sum-exp, when returned, is differentiable the same way (d lse_i / d s_ij =
P_ij): partial attentions merged by their lse (ring attention) keep their gradients.

CUDA tensors (and CPU tensors with backend="triton" under TRITON_INTERPRET=1) run the Triton kernels
of quantattn/kernels/backward.py; CPU tensors otherwise run the float32 PyTorch twin
(quantattn/reference/backward.py). Both need O(N) memory besides the gradients, no Nq x Nk matrix.
Dense calls only: sageattn_varlen, masks and key lengths have no backward yet.
"""

from __future__ import annotations

import torch

from quantattn import backends, prepare
from quantattn.backends import backward_backend  # noqa: F401  (which backward runs: the registry decides)
from quantattn.config import QuantConfig


def attention_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    grad_lse: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the gradient of full-precision attention at q, k, v for the upstream gradient
    grad_out (q's layout and shape) and, optionally, grad_lse ([B, Hq, Nq]). Gradients come back in
    the inputs' layouts and dtypes, contiguous."""
    to_hnd = prepare.dense_to_hnd(tensor_layout)
    qh, kh, vh, doh = to_hnd(q), to_hnd(k), to_hnd(v), to_hnd(grad_out)
    scale = prepare.default_scale(sm_scale, q.shape[-1])
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq, dk, dv = (to_hnd(g) for g in grads)
    backends.backward(qh, kh, vh, doh, is_causal, scale, dq, dk, dv, grad_lse, backend)
    return grads


class SageAttentionFunction(torch.autograd.Function):
    """Quantized attention forward, exact full-precision attention gradient backward.

    apply(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend): the arguments of
    `sageattn` (config a resolved QuantConfig). The forward is `sageattn`'s own quantized computation;
    the backward is the gradient of full-precision softmax(sm_scale q k^T) v at the forward's inputs,
    not the gradient of the quantized function (see the module docstring). With return_lse the lse is
    differentiable too."""

    @staticmethod
    def forward(ctx, q, k, v, tensor_layout: str, is_causal: bool, sm_scale, return_lse: bool,
                config: QuantConfig, backend: str):  # fmt: skip
        # autograd records nothing inside forward: this is the plain quantized call (api.sageattn validated it)
        res = prepare.run_dense(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend)
        ctx.save_for_backward(q, k, v)
        ctx.args = (tensor_layout, is_causal, sm_scale, backend)
        return res

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so rather than give a wrong one
    def backward(ctx, grad_out, grad_lse=None):
        q, k, v = ctx.saved_tensors
        tensor_layout, is_causal, sm_scale, backend = ctx.args
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk, dv = attention_grads(q, k, v, grad_out, tensor_layout, is_causal, sm_scale, grad_lse, backend)
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, *([None] * 6)


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> bool:
    """Whether autograd would record a call on these tensors (a float mask that requires grad counts)."""
    return torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (isinstance(mask, torch.Tensor) and mask.requires_grad)
    )


def sageattn_with_grad(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend, attn_mask=None,
                       key_lengths=None):  # fmt: skip
    """sageattn for inputs that require grad (api.sageattn calls this after prepare.check_dense)."""
    if attn_mask is not None or key_lengths is not None:
        raise NotImplementedError(_MASK_ERROR)
    return SageAttentionFunction.apply(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, config, backend)


# ---- torch.compile: the custom operator quantattn::sageattn gets the same backward ----------------
# Dynamo traces sageattn as the opaque operator of quantattn/ops.py (imported there, after the operator is
# defined); AOTAutograd traces this formula, whose work is one more opaque operator.

_MASK_ERROR = (
    "quantattn's backward pass does not support attn_mask or key_lengths yet: call sageattn under "
    "torch.no_grad(), or use torch's scaled_dot_product_attention where gradients are needed"
)


@torch.library.custom_op(
    "quantattn::sageattn_backward",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor grad_out, Tensor? grad_lse, str tensor_layout, bool is_causal, "
    "float? sm_scale, str backend) -> (Tensor, Tensor, Tensor)",
)
def _sageattn_backward_op(q, k, v, grad_out, grad_lse, tensor_layout, is_causal, sm_scale, backend):
    return attention_grads(q, k, v, grad_out, tensor_layout, is_causal, sm_scale, grad_lse, backend)


@_sageattn_backward_op.register_fake
def _sageattn_backward_fake(q, k, v, grad_out, grad_lse, tensor_layout, is_causal, sm_scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    # by the operator's argument names, so that arguments added to its schema change nothing here
    names = [a.name for a in torch.ops.quantattn.sageattn.default._schema.arguments]
    args = dict(zip(names, inputs, strict=True))
    ctx.save_for_backward(args["q"], args["k"], args["v"])
    ctx.masked = args.get("attn_mask") is not None or args.get("key_lengths") is not None
    ctx.args = tuple(args[n] for n in ("tensor_layout", "is_causal", "sm_scale", "return_lse", "backend"))
    ctx.n_inputs = len(inputs)


def _compiled_backward(ctx, grad_out, grad_lse):
    if ctx.masked:
        raise NotImplementedError(_MASK_ERROR)
    q, k, v = ctx.saved_tensors
    tensor_layout, is_causal, sm_scale, return_lse, backend = ctx.args
    grads = torch.ops.quantattn.sageattn_backward(
        q, k, v, grad_out, grad_lse if return_lse else None, tensor_layout, is_causal, sm_scale, backend
    )
    return (*grads, *([None] * (ctx.n_inputs - 3)))


def register_operator_autograd() -> None:
    """Give quantattn::sageattn (quantattn/ops.py) this module's backward; ops.py calls it once."""
    torch.library.register_autograd("quantattn::sageattn", _compiled_backward, setup_context=_setup_context)


VARLEN_ERROR = (
    "quantattn's backward pass supports dense calls (sageattn) only, not sageattn_varlen: call it under "
    "torch.no_grad() or with inputs that do not require grad"
)
