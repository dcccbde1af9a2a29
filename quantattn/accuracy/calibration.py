"""Calibration: per attention call site, the fastest variant whose error stays under a tolerance, saved to
a file and applied at inference.

    plan = quantattn.calibrate(model, inputs, tolerance=0.03); plan.save("attn_plan.json")
    quantattn.load_plan("attn_plan.json").apply(model)

`calibrate` inspects the model (quantattn.accuracy.inspector), then for each call site ranks the
candidates by measured speed (quantattn.accuracy.speeds: the H100 table by default, `speeds=` to give
others) and keeps the first whose worst error over the calibration inputs is within the tolerance.
"sdpa" (torch's SDPA in the input dtype, full precision) is a candidate like the others where it is
faster, and where no quantized variant meets the tolerance, and always for calls quantattn cannot take
with SDPA's meaning (dropout, float32, ...). The plan is a JSON file; `Plan.apply(model)` makes the model's
SDPA calls run their chosen variant while the model runs, and returns a handle whose `remove()` undoes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantattn.accuracy.hooks import CallSites, call_sdpa, sdpa_targets, why_not_quantizable
from quantattn.accuracy.inspector import InspectionReport, inspect_attention, read_document, write_document
from quantattn.accuracy.speeds import FULL_PRECISION, SPEEDS, SPEEDS_SOURCE
from quantattn.api import sageattn
from quantattn.config import VARIANTS, QuantConfig
from quantattn.integrations.torch_sdpa import ForwardRoute

logger = logging.getLogger("quantattn")
FORMAT = "quantattn-plan/1"
METRICS = ("rel_l1", "cosine", "max_abs")


@dataclass
class LayerChoice:
    variant: str  # a candidate name, or "sdpa"
    config: QuantConfig | None  # None for "sdpa"
    error: float | None  # the chosen candidate's worst error (None: not measured, e.g. a masked call)
    why: str

    def to_dict(self) -> dict:
        return {"variant": self.variant, "config": dataclasses.asdict(self.config) if self.config else None,
                "error": self.error, "why": self.why}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> LayerChoice:
        cfg = QuantConfig(**d["config"]) if d.get("config") else None
        return cls(d["variant"], cfg, d.get("error"), d.get("why", ""))


def _badness(metric: str, value: float) -> float:
    """Error in the direction "smaller is better": 1 - cosine for cosine similarity."""
    return 1.0 - value if metric == "cosine" else value


def choose(report: InspectionReport, key: str, tolerance: float, metric: str, speeds: dict[str, float]) -> LayerChoice:
    """The fastest candidate whose worst `metric` on this call site is within `tolerance`."""
    rec = report.layers[key]
    if rec.fallback:
        return LayerChoice(FULL_PRECISION, None, None, f"quantattn cannot take it: {rec.fallback}")
    names = sorted(report.names, key=lambda n: -speeds.get(n, 0.0))  # stable: unknown speeds keep their order
    unit = "1 - cosine" if metric == "cosine" else metric
    for rank, name in enumerate(names):
        err = report.error(key, name, metric)
        if err is None or not math.isfinite(err) or not _badness(metric, err) <= tolerance:
            continue  # a NaN or infinite measurement never passes (NaN > tolerance would be False)
        if name == FULL_PRECISION and rank > 0:
            why = f"full precision: no faster candidate within {unit} <= {tolerance:g}"
        else:
            speed = f"{speeds[name]:.0f} TOPS" if name in speeds else "speed unknown"
            why = f"fastest ({speed}) with {unit} {_badness(metric, err):.3g} <= {tolerance:g}"
        return LayerChoice(name, report.candidates.get(name), err, why)
    err = report.error(key, FULL_PRECISION, metric)
    return LayerChoice(FULL_PRECISION, None, err, f"full precision: no candidate within {unit} <= {tolerance:g}")


@dataclass
class Plan:
    """The variant each attention call site runs: {key: LayerChoice}; `default` for keys the plan lacks."""

    layers: dict[str, LayerChoice]
    tolerance: float
    metric: str = "rel_l1"
    default: str = FULL_PRECISION
    speeds: dict[str, float] = field(default_factory=lambda: dict(SPEEDS))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.default != FULL_PRECISION and self.default not in VARIANTS:
            raise ValueError(f"default must be {FULL_PRECISION!r} or one of {sorted(VARIANTS)}, got {self.default!r}")
        for key, choice in self.layers.items():
            if (choice.variant == FULL_PRECISION) != (choice.config is None):
                raise ValueError(f"layers[{key!r}]: variant {choice.variant!r} with config {choice.config}: "
                                 f"{FULL_PRECISION!r} takes no config, every other variant needs one")  # fmt: skip

    @classmethod
    def from_report(cls, report: InspectionReport, tolerance: float, metric: str = "rel_l1", speeds=None) -> Plan:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
        speeds = dict(SPEEDS if speeds is None else speeds)
        layers = {key: choose(report, key, tolerance, metric, speeds) for key in report.layers}
        meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                "speeds_source": SPEEDS_SOURCE if speeds == SPEEDS else "given", "report": report.metadata}  # fmt: skip
        return cls(layers, tolerance, metric, FULL_PRECISION, speeds, meta)

    # -------------------------------------------------------------------------------------------------
    # File

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "tolerance": self.tolerance,
            "metric": self.metric,
            "default": self.default,
            "speeds": self.speeds,
            "metadata": self.metadata,
            "layers": {key: choice.to_dict() for key, choice in self.layers.items()},
        }

    def save(self, path) -> Path:
        return write_document(path, self.to_dict())

    @classmethod
    def load(cls, path) -> Plan:
        """The plan in the file at `path`, checked whole here: a ValueError names the first bad field."""
        d = read_document(path, FORMAT, "plan")
        check_plan_document(d, str(path))
        layers = {key: LayerChoice.from_dict(c) for key, c in d["layers"].items()}
        return cls(layers, d["tolerance"], d.get("metric", "rel_l1"), d.get("default", FULL_PRECISION),
                   d.get("speeds", {}), d.get("metadata", {}))  # fmt: skip

    # -------------------------------------------------------------------------------------------------
    # Use

    def table(self) -> str:
        lines = [f"plan: {self.metric} <= {self.tolerance:g}", "", "| layer | variant | error | why |",
                 "|---|---|---|---|"]  # fmt: skip
        for key, c in self.layers.items():
            err = "" if c.error is None else f"{c.error:.4g}"
            lines.append(f"| {key} | {c.variant} | {err} | {c.why} |")
        counts = Counter(c.variant for c in self.layers.values())
        lines += ["", "variants: " + ", ".join(f"{n} x{k}" for n, k in counts.most_common())]
        return "\n".join(lines)

    def config_for(self, key: str) -> QuantConfig | None:
        """The configuration a call site runs (None: torch's SDPA)."""
        choice = self.layers.get(key)
        if choice is None:
            return None if self.default == FULL_PRECISION else _variant(self.default)
        return choice.config

    def apply(self, model: torch.nn.Module, targets=None, hook: str = "all") -> AppliedPlan:
        """Make `model`'s SDPA calls run their planned variants whenever `model` runs, until
        `handle.remove()`. targets: as quantattn.accuracy.hooks.intercepted_sdpa.

        hook="all" (default) tracks every module, as the inspector did, so every call gets the key it had
        at calibration even on a code path calibration never took (such calls run the plan's default).
        hook="planned" tracks only the modules that own planned calls: two hooks per planned module
        instead of per module (less host time per forward), and the same keys as long as the model takes
        the code paths it took at calibration; a call from a module calibration never saw would count
        towards its nearest planned ancestor."""
        if hook not in ("all", "planned"):
            raise ValueError(f"hook must be 'all' or 'planned', got {hook!r}")
        return AppliedPlan(self, model, targets, hook)

    def applied(self, model: torch.nn.Module, targets=None, hook: str = "all"):
        """`with plan.applied(model): model(x)` (applies on entry, removes on exit)."""
        return _Applied(self, model, targets, hook)


def _variant(name: str) -> QuantConfig:
    return VARIANTS[name]


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_plan_document(d: dict, where: str) -> None:
    """Raise a ValueError naming the field, "<where>: layers['a#0'].config: ...", unless `d` (a plan
    file's JSON, format checked already) describes a plan that runs as its counts say."""

    def bad(name: str, message: str):
        raise ValueError(f"{where}: {name}: {message}")

    if "layers" not in d:
        bad("layers", "missing (an object {call key: choice})")
    if not isinstance(d["layers"], dict):
        bad("layers", f"must be an object {{call key: choice}}, got {type(d['layers']).__name__}")
    if "tolerance" not in d or not _is_number(d["tolerance"]) or not d["tolerance"] >= 0:
        bad("tolerance", f"must be a non-negative number, got {d.get('tolerance')!r}")
    if d.get("metric", "rel_l1") not in METRICS:
        bad("metric", f"must be one of {METRICS}, got {d['metric']!r}")
    default = d.get("default", FULL_PRECISION)
    if default != FULL_PRECISION and default not in VARIANTS:
        bad("default", f"must be {FULL_PRECISION!r} or one of {sorted(VARIANTS)}, got {default!r}")
    speeds = d.get("speeds", {})
    if not isinstance(speeds, dict) or not all(_is_number(x) for x in speeds.values()):
        bad("speeds", f"must be an object {{variant: TOPS}} of numbers, got {speeds!r}")
    if not isinstance(d.get("metadata", {}), dict):
        bad("metadata", f"must be an object, got {type(d['metadata']).__name__}")
    for key, choice in d["layers"].items():
        name = f"layers[{key!r}]"
        owner, _, index = key.rpartition("#")
        if not owner or not index.isdigit():
            bad(name, "a call key is '<module name>#<index>' (as the inspector writes it)")
        if not isinstance(choice, dict):
            bad(name, f"must be an object with variant, config, error and why, got {type(choice).__name__}")
        variant, config = choice.get("variant"), choice.get("config")
        if not isinstance(variant, str) or not variant:
            bad(f"{name}.variant", f"must be a variant name or {FULL_PRECISION!r}, got {variant!r}")
        if variant == FULL_PRECISION:
            if config is not None:
                bad(f"{name}.config", f"must be null for variant {FULL_PRECISION!r} (torch's SDPA), got {config!r}")
        elif not isinstance(config, dict):
            bad(f"{name}.config", f"variant {variant!r} needs a QuantConfig's fields, got {config!r}")
        else:
            try:
                QuantConfig(**config)
            except (TypeError, ValueError) as exc:
                bad(f"{name}.config", str(exc))
        if choice.get("error") is not None and not _is_number(choice["error"]):
            bad(f"{name}.error", f"must be a number or null, got {choice['error']!r}")
        if not isinstance(choice.get("why", ""), str):
            bad(f"{name}.why", f"must be a string, got {choice['why']!r}")


class AppliedPlan:
    """A plan attached to a model. `counts` holds how many calls ran each variant (by key and variant).

    The plan routes the SDPA calls of the thread that runs the model's forward, while it runs: the same
    model in two threads, or two models with two plans, each run their own plan, and other threads keep
    torch's SDPA."""

    def __init__(self, plan: Plan, model: torch.nn.Module, targets=None, hook: str = "all"):
        self.plan = plan
        self.counts: Counter = Counter()
        self._counts_lock = threading.Lock()
        modules = dict(model.named_modules())
        owners = {key.rsplit("#", 1)[0] for key in plan.layers}
        owners = {"" if o == "<model>" else o for o in owners}
        missing = sorted(o for o in owners if o not in modules)
        if missing:
            logger.warning("quantattn plan: the model has no module %s; their calls run the plan's default", missing)
        self._sites = CallSites(model, None if hook == "all" else owners | {""})
        # registered after the call-site hooks, so the root's own frame is on the stack first
        self._route = ForwardRoute(model, self._on_call, sdpa_targets(targets))

    def _on_call(self, original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        site = self._sites.next_key()
        choice = self.plan.layers.get(site)
        name = choice.variant if choice is not None else self.plan.default
        cfg = self.plan.config_for(site)
        if cfg is not None and why_not_quantizable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa,
                                                   scale):  # fmt: skip
            cfg, name = None, FULL_PRECISION
        with self._counts_lock:
            self.counts[(site, name)] += 1
        if cfg is None:
            return call_sdpa(original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        backend = "reference" if query.device.type == "cpu" else "auto"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="quantattn: CPU tensors")
            return sageattn(
                query, key, value, "HND", is_causal, scale, attn_mask=attn_mask, config=cfg, backend=backend
            )

    def remove(self) -> None:
        """Detach the plan (a forward running meanwhile finishes on it)."""
        self._route.remove()
        self._sites.remove()


class _Applied:
    def __init__(self, plan, model, targets, hook):
        self._args = (plan, model, targets, hook)
        self.handle = None

    def __enter__(self) -> AppliedPlan:
        self.handle = AppliedPlan(*self._args)
        return self.handle

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def calibrate(model: torch.nn.Module, inputs, tolerance: float = 0.05, *, metric: str = "rel_l1", candidates=None,
              speeds=None, backend: str = "auto", targets=None) -> Plan:  # fmt: skip
    """Inspect `model` on `inputs` and choose, per attention call site, the fastest candidate whose worst
    `metric` against FP64 attention is within `tolerance` (rel_l1 and max_abs: at most the tolerance;
    cosine: 1 - cosine at most the tolerance).

    inputs: a tensor, a tuple of positional arguments, a dict of keyword arguments, a callable taking the
    model, or a list of those (one forward each). candidates: variant names or {name: QuantConfig}
    (default: every quantattn.VARIANTS entry; "sdpa" is always one). speeds: {name: TOPS}, the ranking
    (default quantattn.accuracy.speeds.SPEEDS, measured on an H100)."""
    report = inspect_attention(model, inputs, candidates, backend, targets)
    return Plan.from_report(report, tolerance, metric, speeds)


def load_plan(path) -> Plan:
    return Plan.load(path)
