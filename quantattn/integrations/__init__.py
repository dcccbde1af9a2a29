"""Integrations: quantattn where existing code calls attention.

torch SDPA (`quantattn.sdpa`, patch/unpatch/patched/attach) is here; transformers
(`quantattn.integrations.transformers.register`) and diffusers (`quantattn.integrations.diffusers.apply`)
are submodules, imported on demand because those packages are optional (the `integrations` extra).
"""

from quantattn.integrations.torch_sdpa import attach, fallbacks, patch, patched, reset_fallbacks, sdpa, unpatch

__all__ = ["attach", "fallbacks", "patch", "patched", "reset_fallbacks", "sdpa", "unpatch"]
