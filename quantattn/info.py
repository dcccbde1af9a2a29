"""`python -m quantattn.info`: the environment report to paste into a bug report.

GPU and compute capability, driver, torch / triton / NVRTC versions, whether each backend can run here
(and the exact reason where not), the Hopper kernel cache (where, and what it holds), and which backend
`backend="auto"` picks for a few typical shapes, and why.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import quantattn

TYPICAL = (  # (label, B, Hq, Hkv, N, d, causal)
    ("LLM prefill 1K, d128, GQA", 1, 32, 8, 1024, 128, True),
    ("LLM prefill 8K, d128, GQA", 1, 32, 8, 8192, 128, True),
    ("image DiT 4K, d128", 1, 24, 24, 4096, 128, False),
    ("image DiT 4K, d64", 2, 24, 24, 4096, 64, False),
    ("head_dim 80", 1, 16, 16, 2048, 80, False),
    ("short, 256 tokens", 1, 16, 16, 256, 128, False),
)


def _versions() -> list[tuple[str, str]]:
    rows = [
        ("quantattn", quantattn.__version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError as exc:
        rows.append(("triton", f"not importable ({exc})"))
    return rows


def _gpu() -> list[tuple[str, str]]:
    if not torch.cuda.is_available():
        return [("GPU", "none (CUDA is not available to torch)")]
    rows = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}"))
    return rows


def _hopper_toolchain() -> list[tuple[str, str]]:
    rows = []
    try:
        from quantattn.hopper import compiler, driver
    except ImportError as exc:
        return [("Hopper backend", f"not importable ({exc})")]
    try:
        v = driver.driver_version()
        rows.append(("CUDA driver", f"{v // 1000}.{v % 1000 // 10} (libcuda.so.1)"))
    except (OSError, driver.DriverError) as exc:
        rows.append(("CUDA driver", f"not loadable ({exc})"))
    state = compiler.nvrtc()
    if state.lib is None:
        rows.append(("NVRTC", state.reason))
        return rows
    rows.append(("NVRTC", f"{state.version[0]}.{state.version[1]} ({state.path})"))
    from quantattn import hopper

    rows.append(("Hopper backend", hopper.unavailable_reason() or "available"))
    folder = compiler.cache_dir()
    cubins = sorted(folder.glob("*.cubin")) if folder.is_dir() else []
    from quantattn.hopper import kernels

    rows.append(("Hopper kernel cache", f"{folder} ({len(cubins)} of {len(kernels.all_specs())} kernels compiled)"))
    unsafe = compiler.private_dir(folder) if folder.is_dir() else None
    if unsafe:
        rows.append(("Hopper kernel cache", f"NOT USED: {unsafe}"))
    return rows


def _backends(device: torch.device) -> list[tuple[str, str]]:
    from quantattn.backends import BACKENDS, AttentionCall

    q = torch.empty(1, 8, 1024, 128, dtype=torch.bfloat16, device=device)
    call = AttentionCall(q, q, q, quantattn.api.default_config(device), False, 0.1, q.clone(), None)
    rows = []
    for name, backend in BACKENDS.items():
        reasons = backend.reasons(call)
        rows.append((f"backend {name}", "available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return rows


def _auto_choices(device: torch.device) -> list[tuple[str, str]]:
    from quantattn.backends import BACKENDS, AttentionCall, select_backend

    rows = []
    cfg = quantattn.api.default_config(device)
    for label, b, hq, hkv, n, d, causal in TYPICAL:
        q = torch.empty(b, hq, n, d, dtype=torch.bfloat16, device=device)
        k = torch.empty(b, hkv, n, d, dtype=torch.bfloat16, device=device)
        call = AttentionCall(q, k, k, cfg, causal, d**-0.5, torch.empty_like(q), None)
        try:
            chosen = select_backend(call, "auto").name
        except RuntimeError as exc:
            chosen = f"none ({exc})"
        why = ""
        if chosen == "sdpa":
            why = "; this GPU's speed table measured torch SDPA faster for the shape class"
        elif chosen != "hopper" and device.type == "cuda":
            hopper = BACKENDS["hopper"]
            skipped = hopper.reasons(call) or (["not preferred for this shape"] if not hopper.prefers(call) else [])
            why = f"; hopper: {'; '.join(skipped)}" if skipped else ""
        rows.append((f"auto: {label}", f"{chosen} [B{b} H{hq}/{hkv} N{n} d{d}{' causal' if causal else ''}]{why}"))
    return rows


def report(device: torch.device | None = None) -> list[tuple[str, str]]:
    """The report as (name, value) rows."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [
        *_versions(),
        *_gpu(),
        *_hopper_toolchain(),
        ("default config", str(quantattn.api.default_config(device))),
        *_backends(device),
        *_auto_choices(device),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantattn.info", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    rows = report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
