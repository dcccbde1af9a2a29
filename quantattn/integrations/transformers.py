"""quantattn as a Hugging Face transformers attention implementation: `attn_implementation="quantattn"`.

    import quantattn.integrations.transformers as qa_transformers
    qa_transformers.register()  # once; then any model that supports SDPA takes it
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="quantattn")
    model.set_attn_implementation("sdpa")  # and back, per model, without restarting

The attention function receives transformers' [B, H, N, d] query/key/value and returns [B, N, H, d],
as transformers' SDPA function does. The mask function registered with it is transformers' own SDPA
mask builder: a pure causal mask comes back as None (and becomes `is_causal`, no mask materialized),
while padding, sliding-window or packed-sequence masks come back as bool tensors, which the kernels
read block by block (fully masked rows, e.g. left padding, give zeros). Calls `quantattn.sdpa` would
not quantize (float32, dropout, CPU tensors unless cpu="reference", ...), and position biases,
softcapping and paged caches, run transformers' own SDPA attention, counted and said once in
`quantattn.integrations.fallbacks` like every fallback. Grouped-query attention passes K and V with
their own head count: the kernels read kv head h // (Hq / Hkv) themselves, nothing is repeated.
"""

from __future__ import annotations

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from quantattn.config import QuantConfig
from quantattn.integrations import torch_sdpa as S

NAME = "quantattn"


def register(name: str = NAME, config: QuantConfig | None = None, cpu: str = "fallback") -> str:
    """Register quantattn with transformers as attention implementation `name` (idempotent; a second
    call with the same name replaces its settings). config: the variant (default: the device's
    default); cpu: "fallback" (CPU tensors use torch's SDPA) or "reference" (quantattn's slow
    reference). Returns `name`, for `attn_implementation=`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in ("sdpa", "eager") or "flash" in name or "flex" in name or "paged" in name:
        raise ValueError(f"name {name!r} is one of transformers' own implementations (or looks like one)")
    route = S.Route(config, cpu, setup="register")
    S.let_dynamo_count_fallbacks()
    transformers.AttentionInterface.register(name, _attention_function(name, route))
    # without a mask function of its own, transformers would hand this implementation no mask at all
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _attention_function(name: str, route: S.Route):
    def quantattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):  # fmt: skip
        return attention_forward(route, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                 **kwargs)  # fmt: skip

    quantattn_attention.__name__ = f"{name}_attention_forward"
    return quantattn_attention


def _why_transformers_sdpa(kwargs) -> str | None:
    """Reasons that only transformers' SDPA function handles (biases, paged caches, softcapping)."""
    if kwargs.get("position_bias") is not None:
        return "position bias"
    if kwargs.get("softcap") is not None:
        return "logit softcapping"
    if kwargs.get("cache") is not None:
        return "paged cache"
    return None


def attention_forward(route: S.Route, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **kwargs):  # fmt: skip
    """transformers' attention-function contract: [B, H, N, d] in, ([B, N, H, d], None) out."""
    reason = _why_transformers_sdpa(kwargs)
    if reason is not None:
        if S._dynamo_knows_fall_back or not torch.compiler.is_compiling():
            S._fall_back(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:  # a padding, sliding-window or packing mask: it holds the causal part too
        mask = attention_mask[:, :, :, :kv_len]
        out = S.routed_sdpa(route, query, key, value, mask, dropout, False, scaling, query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # one query attends to every cached key (what SDPA's top-left causal mask gives it, too)
    is_causal = bool(is_causal) and q_len > 1
    if is_causal and kv_len > q_len:
        # a prefill into a larger static cache: SDPA's top-left causal mask shows query i keys 0..i only
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = S.routed_sdpa(route, query, key, value, None, dropout, is_causal, scaling, query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None
