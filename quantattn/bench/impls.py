"""The implementations one run compares, each with a whole-call function and, where it has one, a
kernel-only function on pre-quantized inputs.

quantattn's variants (quantattn.config.VARIANTS) run the Triton kernels (backend="triton", so that the
rows stay the Triton path when backend="auto" would pick another one) and time the whole `sageattn` call
and the attention kernel alone; "sage2-8b-hopper" is the default variant on the native sm_90 kernel
(quantattn.hopper), whole call and kernel alone, reported unavailable where that backend cannot run;
torch SDPA (cuDNN and flash backends, bf16) has no quantization, so its whole call is its kernel; the
official `sageattention` package is timed as a whole call when it is importable (its kernel-only entry
points are internal and change between its versions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantattn.config import VARIANTS, QuantConfig

SDPA_NAMES = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION"}
HOPPER = "sage2-8b-hopper"
HOPPER_VARIANT = "sage2-8b"  # the one variant the native Hopper kernel computes
OFFICIAL = "official"
ALL_NAMES = (*VARIANTS, HOPPER, *SDPA_NAMES, OFFICIAL)

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
    head_dims: tuple[int, ...] | None = None  # the head dims it runs (None: any); others are left out
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def runs(self, head_dim: int) -> bool:
        return self.head_dims is None or head_dim in self.head_dims

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "description": self.description,
            "config": self.config.name if self.config is not None else None,
            "available": self.available,
            "unavailable": self.unavailable,
            "kernel_only": self.prepare_kernel is not None,
            **({"head_dims": list(self.head_dims)} if self.head_dims is not None else {}),
            **self.extra,
        }


def quantattn_impl(name: str, cfg: QuantConfig) -> Implementation:
    import quantattn

    def whole(q, k, v, causal):
        # CPU tensors (--device cpu) keep backend="auto", the reference
        backend = "triton" if q.is_cuda else "auto"
        return quantattn.sageattn(q, k, v, tensor_layout="HND", is_causal=causal, config=cfg, backend=backend)

    def prepare_kernel(q, k, v, causal):
        from quantattn.kernels import launch

        kv = launch.triton_preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
        out = torch.empty_like(q)
        sm_scale = 1.0 / math.sqrt(q.shape[-1])

        def kernel(q, kv, out, k):
            launch.triton_attention(q, kv, causal, sm_scale, out, None, launch.sequences(q, None, 0), k=k)
            return out

        return kernel, (q, kv, out, k)

    return Implementation(
        name, "quantattn", f"quantattn {name} ({cfg.name}), Triton", whole, prepare_kernel, config=cfg,
        extra={"backend": "triton"},
    )  # fmt: skip


def hopper_unavailable(device: str = "cuda") -> str | None:
    """Why the native Hopper backend cannot run in this benchmark (None when it can)."""
    if device != "cuda":
        return "runs on CUDA tensors only (this run is --device cpu)"
    try:
        from quantattn import hopper

        return hopper.unavailable_reason()
    except Exception as exc:  # noqa: BLE001  an optional backend: a failure to import or load means not here
        return f"quantattn.hopper cannot be loaded ({type(exc).__name__}: {exc})"


def hopper_impl(device: str = "cuda") -> Implementation:
    """The default variant on the native sm_90 kernel: the whole call with backend="hopper", and the kernel
    alone on K/V quantized by quantattn.hopper.launch.hopper_preprocess (in the layout the kernel reads)."""
    import quantattn

    cfg = VARIANTS[HOPPER_VARIANT]
    description = f"quantattn {HOPPER_VARIANT} ({cfg.name}), native CUDA kernel for sm_90 (quantattn.hopper)"
    extra = {"backend": "hopper"}
    reason = hopper_unavailable(device)
    if reason is not None:
        return Implementation(HOPPER, "quantattn", description, config=cfg, unavailable=reason, extra=extra)
    from quantattn.hopper import launch

    head_dims = launch.HEAD_DIMS
    description += f", head_dim {' and '.join(map(str, head_dims))}"

    def whole(q, k, v, causal):
        return quantattn.sageattn(q, k, v, tensor_layout="HND", is_causal=causal, config=cfg, backend="hopper")

    def prepare_kernel(q, k, v, causal):
        kv = launch.hopper_preprocess(k, v, cfg)
        out = torch.empty_like(q)
        sm_scale = 1.0 / math.sqrt(q.shape[-1])

        def kernel(q, kv, out):
            launch.hopper_attention(q, kv, causal, sm_scale, out)
            return out

        return kernel, (q, kv, out)

    return Implementation(
        HOPPER, "quantattn", description, whole, prepare_kernel, config=cfg, head_dims=head_dims, extra=extra
    )


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


def build(names, device: str = "cuda") -> list[Implementation]:
    """Implementations in the canonical order (quantattn variants, the Hopper kernel, SDPA, official),
    unavailable ones too; device is the one the run's tensors are on."""
    unknown = sorted(set(names) - set(ALL_NAMES))
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(ALL_NAMES)}")
    impls = []
    for name in ALL_NAMES:
        if name not in names:
            continue
        if name in VARIANTS:
            impls.append(quantattn_impl(name, VARIANTS[name]))
        elif name == HOPPER:
            impls.append(hopper_impl(device))
        elif name in SDPA_NAMES:
            impls.append(sdpa_impl(name))
        else:
            impls.append(official_impl())
    return impls
