"""The implementations one run compares, each with a whole-call function and, where it has one, a
kernel-only function on pre-quantized inputs.

quantattn's variants (quantattn.config.VARIANTS) time the whole `sageattn` call and the attention kernel
alone; torch SDPA (cuDNN and flash backends, bf16) has no quantization, so its whole call is its kernel;
the official `sageattention` package is timed as a whole call when it is importable (its kernel-only
entry points are internal and change between its versions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantattn.config import VARIANTS, QuantConfig

SDPA_NAMES = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION"}
OFFICIAL = "official"
ALL_NAMES = (*VARIANTS, *SDPA_NAMES, OFFICIAL)

Whole = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
# prepare(q, k, v, causal) -> (fn, args): fn(*args) runs the kernel alone; prepare runs outside the timing.
PrepareKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[Callable, tuple]]


@dataclass
class Implementation:
    name: str
    kind: str  # "quantattn", "sdpa" or "official"
    description: str
    whole: Whole | None = None
    prepare_kernel: PrepareKernel | None = None
    config: QuantConfig | None = None
    unavailable: str | None = None  # why it cannot run here (then whole is None)
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "description": self.description,
            "config": self.config.name if self.config is not None else None,
            "available": self.available,
            "unavailable": self.unavailable,
            "kernel_only": self.prepare_kernel is not None,
            **self.extra,
        }


def quantattn_impl(name: str, cfg: QuantConfig) -> Implementation:
    import quantattn

    def whole(q, k, v, causal):
        return quantattn.sageattn(q, k, v, tensor_layout="HND", is_causal=causal, config=cfg)

    def prepare_kernel(q, k, v, causal):
        from quantattn.kernels import launch

        kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
        out = torch.empty_like(q)
        sm_scale = 1.0 / math.sqrt(q.shape[-1])

        def kernel(q, kv, out, k):
            launch.attention(q, kv, causal, sm_scale, out, None, launch.sequences(q, None, 0), k=k)
            return out

        return kernel, (q, kv, out, k)

    return Implementation(name, "quantattn", f"quantattn {name} ({cfg.name})", whole, prepare_kernel, config=cfg)


def sdpa_impl(name: str) -> Implementation:
    backend_name = SDPA_NAMES[name]
    description = f"torch SDPA, {backend_name.split('_')[0].lower()} backend (bf16)"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:  # torch < 2.3
        return Implementation(name, "sdpa", description, unavailable=f"torch.nn.attention is missing ({exc})")
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return Implementation(name, "sdpa", description, unavailable=f"this torch has no SDPBackend.{backend_name}")

    def whole(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return Implementation(name, "sdpa", description, whole)


def official_impl() -> Implementation:
    description = "official SageAttention package, sageattention.sageattn (whole call)"
    try:
        import sageattention
    except Exception as exc:  # noqa: BLE001  a broken CUDA extension raises OSError or RuntimeError too
        reason = (
            "not installed (the 'sageattention' package is not importable)"
            if isinstance(exc, ModuleNotFoundError) and exc.name == "sageattention"
            else f"installed but not importable ({type(exc).__name__}: {exc})"
        )
        return Implementation(OFFICIAL, "official", description, unavailable=reason)

    def whole(q, k, v, causal):
        return sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=causal)

    version = getattr(sageattention, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("sageattention")
        except Exception:  # noqa: BLE001  metadata is optional
            version = None
    return Implementation(OFFICIAL, "official", description, whole, extra={"version": version})


def build(names) -> list[Implementation]:
    """Implementations in the canonical order (quantattn variants, SDPA, official), unavailable ones too."""
    unknown = sorted(set(names) - set(ALL_NAMES))
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(ALL_NAMES)}")
    impls = []
    for name in ALL_NAMES:
        if name not in names:
            continue
        if name in VARIANTS:
            impls.append(quantattn_impl(name, VARIANTS[name]))
        elif name in SDPA_NAMES:
            impls.append(sdpa_impl(name))
        else:
            impls.append(official_impl())
    return impls
