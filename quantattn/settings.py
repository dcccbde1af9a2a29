"""Every QUANTATTN_* environment variable, read once (at import) into one object, `settings.current`.

The hot paths read `current`'s fields (an attribute lookup), never os.environ. A process that changes
the environment after importing quantattn calls `reload()`; a test can also swap `current` for
`current.replace(...)`.

Dispatch (what runs; README "Backends"):
  QUANTATTN_HOPPER=0             the Hopper backend refuses every call (auto runs the Triton kernels)
  QUANTATTN_AUTO_SDPA=0          backend="auto" never hands a call to torch's SDPA by the speed table
  QUANTATTN_SPEED_TABLE_DIR      where auto looks first for this GPU's speed table (before the shipped ones)
Files:
  QUANTATTN_CACHE                where the compiled Hopper kernels are cached (default ~/.cache/quantattn)
  QUANTATTN_NVRTC                path of libnvrtc.so, where it is not found next to torch or in CUDA_HOME
Implementation paths (same numerics specification; debugging and A/B runs):
  QUANTATTN_HOPPER_PREPROCESS=0  the Hopper backend preprocesses K/V with Triton's kernel (differs from the
                                 CUDA one by rounding only: tests/test_hopper_preprocess.py)
  QUANTATTN_HOPPER_RESIDENT=0    no resident (cluster) CUDA preprocessing: the ticketed one for every length
  QUANTATTN_HOPPER_OVERLAP=0     the Hopper attention kernel starts after the CUDA preprocessing has ended,
                                 not while it ends (programmatic dependent launch)
  QUANTATTN_DIRECT_LAUNCH=0      every Triton launch goes through Triton's own front door (slower host path)
  QUANTATTN_EXACT_CASTS=1        FP8/BF16 rounding in integer arithmetic on the GPU too (same values, slower)
  QUANTATTN_SPLIT_HEAD_DIM=0     one padded channel slab instead of two for head dims like 80 or 160 (bit
                                 for bit the same: tests/test_kernels_head_dims.py)
Tuning (tile shapes; the numerics do not depend on them):
  QUANTATTN_TILE="BM,warps,stages"          the forward attention kernel's tile
  QUANTATTN_BWD_TILE="BM,BN,warps,stages"   the backward kernels' tile
Experiments (these change what is computed: never for results anyone relies on):
  QUANTATTN_EXPERIMENT_KV_BLOCK=N  keys per online-softmax step of the Triton forward kernel instead of the
                                   variant's QuantConfig.kv_block (P's quantization and the second-level
                                   accumulator span one step, so the results change)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Set off by "0", on by "1"; the default when unset (other values count as the default's opposite,
    as the readers before this object did: `!= "0"` for default-on, `== "1"` for default-off)."""
    value = env.get(name)
    if value is None:
        return default
    return value != "0" if default else value == "1"


def _ints(env: Mapping[str, str], name: str, count: int) -> tuple[int, ...] | None:
    value = env.get(name)
    if not value:
        return None
    parts = tuple(int(x) for x in value.split(","))
    if len(parts) != count:
        raise ValueError(f"{name} must be {count} comma-separated integers, got {value!r}")
    return parts


@dataclass(frozen=True)
class Settings:
    hopper: bool = True
    auto_sdpa: bool = True
    speed_table_dir: str | None = None
    cache_dir: str | None = None
    nvrtc: str | None = None
    hopper_preprocess: bool = True
    hopper_resident: bool = True
    hopper_overlap: bool = True
    direct_launch: bool = True
    exact_casts: bool = False
    split_head_dim: bool = True
    tile: tuple[int, int, int] | None = None
    bwd_tile: tuple[int, int, int, int] | None = None
    experiment_kv_block: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        kv_block = env.get("QUANTATTN_EXPERIMENT_KV_BLOCK")
        return cls(
            hopper=_flag(env, "QUANTATTN_HOPPER", True),
            auto_sdpa=_flag(env, "QUANTATTN_AUTO_SDPA", True),
            speed_table_dir=env.get("QUANTATTN_SPEED_TABLE_DIR") or None,
            cache_dir=env.get("QUANTATTN_CACHE") or None,
            nvrtc=env.get("QUANTATTN_NVRTC") or None,
            hopper_preprocess=_flag(env, "QUANTATTN_HOPPER_PREPROCESS", True),
            hopper_resident=_flag(env, "QUANTATTN_HOPPER_RESIDENT", True),
            hopper_overlap=_flag(env, "QUANTATTN_HOPPER_OVERLAP", True),
            direct_launch=_flag(env, "QUANTATTN_DIRECT_LAUNCH", True),
            exact_casts=_flag(env, "QUANTATTN_EXACT_CASTS", False),
            split_head_dim=_flag(env, "QUANTATTN_SPLIT_HEAD_DIM", True),
            tile=_ints(env, "QUANTATTN_TILE", 3),
            bwd_tile=_ints(env, "QUANTATTN_BWD_TILE", 4),
            experiment_kv_block=int(kv_block) if kv_block else None,
        )

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


current = Settings.from_env()


def reload() -> Settings:
    """Read the environment again (after os.environ changed in this process); returns the new settings."""
    global current
    current = Settings.from_env()
    return current
