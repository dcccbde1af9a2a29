"""quantattn in diffusers models: an attention processor, and `apply(pipe)` to install it.

    import quantattn.integrations.diffusers as qa_diffusers
    qa_diffusers.apply(pipe)   # every attention of pipe.transformer (or a model passed directly)
    qa_diffusers.remove(pipe)  # the original processors again

diffusers' own processors (AttnProcessor2_0, JointAttnProcessor2_0 in SD3, FluxAttnProcessor and the
others on the native backend) compute projections, normalizations, rotary embeddings and joint
text-image attention themselves and call `torch.nn.functional.scaled_dot_product_attention` for the
attention. `QuantAttnProcessor` wraps such a processor and runs it with that function swapped for
`quantattn.sdpa` (`quantattn.patched()` for the duration of the call, in its thread), so every model keeps its own
attention logic and only the attention product is quantized; calls quantattn does not take fall back
to torch's SDPA, counted in `quantattn.integrations.fallbacks`. The wrapper shows diffusers the wrapped
processor's call signature, which diffusers reads to decide which keyword arguments to pass on.

diffusers (0.35 and newer) also has an attention-backend registry (`model.set_attention_backend`), but
its backends are members of a fixed enum and its registry is private, so there is no public way to add
one; processors are the public extension point.
"""

from __future__ import annotations

import functools
import inspect

import torch

from quantattn.config import QuantConfig
from quantattn.integrations import torch_sdpa as S

# pipeline components that hold the denoiser's attention (the text encoders and VAE stay as they are)
DENOISERS = ("transformer", "transformer_2", "unet")


class QuantAttnProcessor:
    """A diffusers attention processor that runs `processor` with SDPA calls on quantattn.

    config: the variant (default: the device's default); cpu: "fallback" (CPU tensors use torch's
    SDPA) or "reference" (quantattn's slow reference)."""

    def __new__(cls, processor, config: QuantConfig | None = None, cpu: str = "fallback"):
        if cls is QuantAttnProcessor:  # one subclass per wrapped class, whose __call__ has its signature
            cls = _wrapper_class(type(processor))
        return super().__new__(cls)

    def __init__(self, processor, config: QuantConfig | None = None, cpu: str = "fallback"):
        if isinstance(processor, QuantAttnProcessor):
            raise TypeError("processor is a QuantAttnProcessor already")
        if not callable(processor):
            raise TypeError(f"processor must be a diffusers attention processor, got {type(processor).__name__}")
        self.processor = processor
        self.route = S.Route(config, cpu, setup="apply")
        S.let_dynamo_count_fallbacks()

    def _run(self, attn, *args, **kwargs):
        S.push_route(self.route)
        try:
            return self.processor(attn, *args, **kwargs)
        finally:
            S.pop_route(self.route)

    def __repr__(self) -> str:
        return f"QuantAttnProcessor({self.processor!r}, config={self.route.config}, cpu={self.route.cpu!r})"


@functools.cache
def _wrapper_class(processor_class: type) -> type:
    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    # diffusers drops the keyword arguments that the processor's __call__ does not name
    __call__.__signature__ = inspect.signature(processor_class.__call__)
    name = f"QuantAttn{processor_class.__name__}"
    return type(name, (QuantAttnProcessor,), {"__call__": __call__, "__qualname__": name})


def _models(pipe_or_model) -> list[torch.nn.Module]:
    if isinstance(pipe_or_model, torch.nn.Module):
        return [pipe_or_model]
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers model or pipeline (with components), got {type(pipe_or_model).__name__}")
    models = [components[name] for name in DENOISERS if isinstance(components.get(name), torch.nn.Module)]
    if not models:
        raise ValueError(f"the pipeline has none of the components {', '.join(DENOISERS)}")
    return models


def _attention_modules(model: torch.nn.Module):
    """(name, module) of every diffusers attention module (those with a swappable processor), named like
    the keys of `model.attn_processors` (not every model has that property: DiT has not)."""
    for name, module in model.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            yield f"{name}.processor", module


def apply(pipe_or_model, config: QuantConfig | None = None, cpu: str = "fallback", *, skip=()) -> int:
    """Wrap the processor of every attention module of a diffusers model, or of a pipeline's
    denoiser(s), in a QuantAttnProcessor; applying again replaces the settings. skip: processor names
    or name prefixes (such as "transformer_blocks.0."), named as in `model.attn_processors`, to leave
    in full precision. Returns the number of processors wrapped."""
    S.Route(config, cpu)  # validates before anything changes
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    wrapped = 0
    for model in _models(pipe_or_model):
        for name, module in _attention_modules(model):
            proc = module.processor
            inner = proc.processor if isinstance(proc, QuantAttnProcessor) else proc
            if name.startswith(skip):
                module.set_processor(inner)
            else:
                module.set_processor(QuantAttnProcessor(inner, config, cpu))
                wrapped += 1
    return wrapped


def remove(pipe_or_model) -> int:
    """Put back the processors that apply() wrapped; returns how many."""
    restored = 0
    for model in _models(pipe_or_model):
        for _, module in _attention_modules(model):
            if isinstance(module.processor, QuantAttnProcessor):
                module.set_processor(module.processor.processor)
                restored += 1
    return restored
