"""Where torch's SDPA was measured faster than quantattn's whole call, per GPU model: `backend="auto"`
hands those calls to torch's SDPA (exact, and faster there).

A speed table is a JSON file per GPU model, named by the GPU's normalized name
(`normalized_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"`), written from benchmark results by
`python -m quantattn.bench ... --write-speed-table` (quantattn.bench.speed_table). Each entry is one
shape class, (quantattn backend, QuantConfig, head_dim, causal), with the sequence lengths the benchmark
measured (Nq = Nk) and, at each, whether the fastest torch SDPA backend of the same run beat the whole call,
and which SDPA backend that was (the fallback runs with that one: torch's own priority would pick another).

Lookup, per call: the table of the call's GPU is found once per device index (a dict and a few span
comparisons afterwards, no file IO). A sequence length N takes SDPA when
  - N is a measured length where SDPA was faster, or
  - N lies between two measured lengths where both were SDPA-faster (never on one side's word alone), or
  - N lies beyond the shortest (longest) measured length and that one was SDPA-faster: quantization's
    fixed costs weigh more on shorter sequences and less on longer ones, so a verdict at an end of the
    measured range holds past it.
Head dims, configurations and backends that the table does not name keep the kernels; GPUs without a
table keep the kernels.

Where tables are looked for, first found wins:
  1. $QUANTATTN_SPEED_TABLE_DIR/<name>.json, else $XDG_CACHE_HOME/quantattn/speed_tables/<name>.json
     (default ~/.cache/quantattn/speed_tables/): what `--write-speed-table` writes by default;
  2. the tables shipped in quantattn/backends/speed_tables/.
QUANTATTN_AUTO_SDPA=0 turns the whole mechanism off. Both variables are read when a device's table is
first needed; `reload()` forgets what was read (after writing a table in a running process).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from quantattn import settings
from quantattn.backends.sdpa import SDPA_BACKENDS, SdpaBackend
from quantattn.config import QuantConfig

logger = logging.getLogger("quantattn")

FORMAT = 1
KIND = "quantattn speed table"
SHIPPED_DIR = Path(__file__).resolve().parent / "speed_tables"
ENV_OFF = "QUANTATTN_AUTO_SDPA"
ENV_DIR = "QUANTATTN_SPEED_TABLE_DIR"
ENTRY_FIELDS = ("backend", "config", "head_dim", "causal", "seq_lens", "sdpa_faster", "sdpa_fastest")


def normalized_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the table's file stem."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown-gpu"


def user_dir() -> Path:
    """Where `--write-speed-table` writes by default and `auto` looks first."""
    explicit = settings.current.speed_table_dir
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "quantattn" / "speed_tables"


def search_paths(device_name: str) -> list[Path]:
    file = normalized_name(device_name) + ".json"
    return [user_dir() / file, SHIPPED_DIR / file]


def auto_sdpa_enabled() -> bool:
    return settings.current.auto_sdpa


def seq_len_text(n: float) -> str:
    return f"{int(n) // 1024}K" if n % 1024 == 0 else str(int(n))


@dataclass(frozen=True)
class Span:
    """Sequence lengths lo <= N <= hi (hi may be infinite) where SDPA takes the call; `reason` is what the
    fallback counter and the log say; `sdpa` the SDPA backend to run (torch's name, None: torch's choice)."""

    lo: float
    hi: float
    reason: str
    sdpa: str | None = None


class SpeedTable:
    """One GPU model's table, ready for lookups: (backend, head_dim, causal, QuantConfig) -> spans."""

    def __init__(self, doc: dict, source: str = "<memory>"):
        check_document(doc, source)
        self.device = doc["device"]
        self.compute_capability = doc.get("compute_capability")
        self.source = source
        self.spans: dict[tuple, tuple[Span, ...]] = {}
        for e in doc["entries"]:
            cfg = QuantConfig(**e["config"])
            key = (e["backend"], int(e["head_dim"]), bool(e["causal"]), cfg)
            self.spans[key] = sdpa_spans(e["seq_lens"], e["sdpa_faster"], self._reason_prefix(e), e["sdpa_fastest"])

    def _reason_prefix(self, e: dict) -> str:
        what = f"{e['backend']} ({e['implementation']})" if e.get("implementation") else e["backend"]
        return (
            f"speed table of {self.device} ({self.source}): torch SDPA measured faster than quantattn's "
            f"{what} whole call at head_dim {e['head_dim']}, causal {'on' if e['causal'] else 'off'}"
        )

    def lookup(self, backend: str, head_dim: int, causal: bool, cfg: QuantConfig, seq_len: int) -> Span | None:
        """The span that gives this shape to SDPA, or None (the kernels take it)."""
        for span in self.spans.get((backend, head_dim, causal, cfg), ()):
            if span.lo <= seq_len <= span.hi:
                return span
        return None


def sdpa_spans(
    seq_lens, sdpa_faster, reason_prefix="torch SDPA measured faster", sdpa_fastest=None
) -> tuple[Span, ...]:
    """The spans of N where SDPA takes the call, from the measured (N, SDPA faster?, fastest SDPA backend)
    points (module docstring: a run of SDPA-faster points covers the lengths between them, and past the
    measured range when it reaches an end of it). A span runs the SDPA backend fastest at most of its
    points (the first of a tie)."""
    fastest = list(sdpa_fastest) if sdpa_fastest is not None else [None] * len(seq_lens)
    points = sorted(
        zip((int(n) for n in seq_lens), (bool(f) for f in sdpa_faster), fastest, strict=True), key=lambda p: p[0]
    )
    spans, i = [], 0
    while i < len(points):
        if not points[i][1]:
            i += 1
            continue
        j = i
        while j + 1 < len(points) and points[j + 1][1]:
            j += 1
        lo = 0 if i == 0 else points[i][0]
        hi = math.inf if j == len(points) - 1 else points[j][0]
        if lo == 0 and hi == math.inf:
            where = "every N"
        elif lo == 0:
            where = f"N <= {seq_len_text(hi)}"
        elif hi == math.inf:
            where = f"N >= {seq_len_text(lo)}"
        else:
            where = f"N {seq_len_text(lo)}..{seq_len_text(hi)}"
        kernels = [p[2] for p in points[i : j + 1]]
        sdpa = max(dict.fromkeys(kernels), key=kernels.count)
        spans.append(Span(lo, hi, f"{reason_prefix}, {where}" + (f" ({sdpa})" if sdpa else ""), sdpa))
        i = j + 1
    return tuple(spans)


def check_document(doc, source: str) -> None:
    """Raise ValueError naming what is wrong with a speed-table document."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("format") != FORMAT:
        raise ValueError(f"{source}: not a {KIND} of format {FORMAT}")
    if not isinstance(doc.get("device"), str) or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{source}: needs 'device' (the GPU's name) and a list of 'entries'")
    for i, e in enumerate(doc["entries"]):
        missing = [f for f in ENTRY_FIELDS if f not in e]
        if missing:
            raise ValueError(f"{source}: entry {i} lacks {', '.join(missing)}")
        if not len(e["seq_lens"]) == len(e["sdpa_faster"]) == len(e["sdpa_fastest"]):
            raise ValueError(f"{source}: entry {i}: seq_lens, sdpa_faster and sdpa_fastest differ in length")
        unknown = set(e["sdpa_fastest"]) - set(SDPA_BACKENDS)
        if unknown:
            raise ValueError(f"{source}: entry {i} names unknown SDPA backends {sorted(map(str, unknown))}")


def load(path, device_name: str | None = None) -> SpeedTable:
    """A table from its file; with device_name, refuse a table written for another GPU."""
    path = Path(path)
    table = SpeedTable(json.loads(path.read_text()), str(path))
    if device_name is not None and table.device != device_name:
        raise ValueError(f"{path}: written for {table.device!r}, not {device_name!r}")
    return table


def find_table(device_name: str) -> SpeedTable | None:
    """The first usable table for this GPU model (see the module docstring), or None; a broken file is
    said once and skipped."""
    for path in search_paths(device_name):
        if not path.is_file():
            continue
        try:
            return load(path, device_name)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("quantattn: ignoring speed table %s: %s", path, exc)
    return None


@functools.cache
def table_for_device(index: int) -> SpeedTable | None:
    """The speed table of CUDA device `index`, looked up once (it is on every auto call's path)."""
    if not auto_sdpa_enabled():
        return None
    return find_table(torch.cuda.get_device_name(index))


def reload() -> None:
    """Forget the tables and settings read so far (quantattn.settings included): the next call reads them
    again."""
    settings.reload()
    table_for_device.cache_clear()


def sdpa_span(call, backend: str) -> Span | None:
    """Where `backend="auto"` hands this call to torch's SDPA instead of `backend` (the quantized backend it
    chose): the table's span (its reason, its SDPA backend), or None. Cheap: a cached table, a dict lookup,
    a few comparisons."""
    device = call.q.device
    if device.type != "cuda":
        return None
    table = table_for_device(device.index if device.index is not None else torch.cuda.current_device())
    if table is None:
        return None
    if not SdpaBackend.eligible(call):
        return None
    return table.lookup(backend, call.q.shape[3], call.is_causal, call.cfg, call.q.shape[2])
