"""Integrations: quantattn where existing code calls attention (torch SDPA first)."""

from quantattn.integrations.torch_sdpa import attach, fallbacks, patch, patched, reset_fallbacks, sdpa, unpatch

__all__ = ["attach", "fallbacks", "patch", "patched", "reset_fallbacks", "sdpa", "unpatch"]
