"""The per-layer inspector: run a model on the user's inputs and measure, for every attention call, the
error of each candidate variant against FP64 attention on exactly that call's q, k and v.

    report = quantattn.inspect_attention(model, inputs)
    print(report.table())
    report.to_json("attention_report.json")

The model runs in full precision while it is inspected (torch's SDPA gives every call's output), so each
call sees the activations it would see without quantattn, and its error is its own, not the sum of the
layers before it. Per call it records, besides the candidates' errors (cosine, relative L1, max abs), the
statistics that predict trouble: K's channel-mean outliers (what smooth K removes), token outliers in K
(several keys much larger than the rest make smooth K's trimmed mean a poor centre), max |Q|, |K|, |V|,
the lengths, and warnings derived from them. Calls quantattn cannot take with SDPA's meaning (dropout, float32,
...) are recorded with the reason; a plan sends them to torch's SDPA.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantattn import metrics
from quantattn.accuracy.hooks import CallSites, call_sdpa, intercepted_sdpa, why_not_quantizable
from quantattn.accuracy.speeds import FULL_PRECISION
from quantattn.api import sageattn
from quantattn.config import VARIANTS, QuantConfig
from quantattn.reference import attention_fp64

ERROR_METRICS = ("cosine", "rel_l1", "max_abs")
FORMAT = "quantattn-attention-report/1"


def write_document(path, doc: dict) -> Path:
    """A report or plan as indented JSON, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_document(path, fmt: str, what: str) -> dict:
    """A JSON document written by write_document, refused unless its "format" is `fmt`."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{path}: not a quantattn {what} ({fmt})")
    return d


# Warnings: statistic, threshold, message. Thresholds are where the ablations and the guard tests of
# docs/accuracy.md saw the error grow.
K_CHANNEL_OUTLIER = 3.0  # max |mean_c K| / rms(K - mean): smooth K matters (it is on in every variant)
K_TOKEN_OUTLIER = 20.0  # largest key / median key (max |.|): several such keys skew smooth K's trimmed mean
FP16_ACC_V = 65504.0 / 64  # an FP16 accumulator of 64 products of P <= 1 overflows beyond this |V|
# |q| |k| sm_scale: beyond ~1e5 the kernels' fused exponent, exp2(s * q_scale - m) as one FMA against the
# rounded row maximum m, lets the row's largest P pass 1 by half an ulp of the score (docs/accuracy.md)
LARGE_LOGITS = 1e5


def _candidate_configs(candidates) -> dict[str, QuantConfig]:
    if candidates is None:
        return dict(VARIANTS)
    if isinstance(candidates, dict):
        return dict(candidates)
    return {name: VARIANTS[name] for name in candidates if name != FULL_PRECISION}


@dataclass
class CallStats:
    """What one attention call looked like (the largest over the calls of one key)."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str
    is_causal: bool
    max_abs_q: float = 0.0
    max_abs_k: float = 0.0
    max_abs_v: float = 0.0
    k_channel_outlier: float = 0.0
    k_token_outlier: float = 0.0
    score_bound: float = 0.0

    def merge(self, other: CallStats) -> None:
        for f in ("max_abs_q", "max_abs_k", "max_abs_v", "k_channel_outlier", "k_token_outlier", "score_bound"):
            setattr(self, f, max(getattr(self, f), getattr(other, f)))
        self.seq_q, self.seq_k = max(self.seq_q, other.seq_q), max(self.seq_k, other.seq_k)
        self.batch = max(self.batch, other.batch)

    def warnings(self) -> list[str]:
        out = []
        if self.k_token_outlier > K_TOKEN_OUTLIER:
            out.append(
                f"a key {self.k_token_outlier:.0f}x the median: smooth K's centre drops one such key per channel, several skew it"
            )
        if self.max_abs_v > 65504.0:
            out.append("|V| beyond float16: FP16 PV would overflow (bf16 inputs run BF16 PV)")
        elif self.max_abs_v > FP16_ACC_V:
            out.append(f"|V| > {FP16_ACC_V:.0f}: an FP16 accumulator (sage1-fp16acc) can overflow")
        if self.score_bound > LARGE_LOGITS:
            out.append(f"softmax logits up to {self.score_bound:.2g}: beyond ~1e5 the kernels lose accuracy")
        if self.seq_k < 16:
            out.append(f"only {self.seq_k} keys")
        return out


def call_stats(q, k, v, is_causal, scale) -> CallStats:
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    finite = lambda t: torch.where(torch.isfinite(t), t, 0.0)  # noqa: E731
    qf, kf, vf = finite(qf), finite(kf), finite(vf)
    k_mean = kf.mean(-2, keepdim=True)
    spread = (kf - k_mean).square().mean(dim=(-1, -2)).sqrt().clamp_min(1e-30)  # [B, H]
    channel = (k_mean.squeeze(-2).abs().amax(-1) / spread).amax() if kf.numel() else torch.zeros(())
    token = kf.abs().amax(-1)  # [B, H, N]
    token_ratio = (token.amax(-1) / token.median(-1).values.clamp_min(1e-30)).amax() if kf.numel() else channel
    norms = [t.norm(dim=-1).amax() if t.numel() else torch.zeros(()) for t in (qf, kf)]
    amax = [t.abs().amax() if t.numel() else torch.zeros(()) for t in (qf, kf, vf)]
    values = torch.stack([*amax, channel, token_ratio, norms[0] * norms[1] * abs(scale)]).tolist()
    return CallStats(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                     str(q.dtype).replace("torch.", ""), bool(is_causal), *values)  # fmt: skip


@dataclass
class LayerRecord:
    """Every call of one key: how many, what they looked like, and each candidate's worst error."""

    key: str
    calls: int
    stats: CallStats
    fallback: str | None = None  # why quantattn cannot take these calls (they stay on torch's SDPA)
    # candidate -> {"cosine": worst (lowest), "rel_l1": worst (highest), "max_abs": worst}, or {"error": why}
    errors: dict[str, dict] = field(default_factory=dict)

    def merge_errors(self, name: str, errs: dict) -> None:
        old = self.errors.get(name)
        if old is None or "error" in errs:
            self.errors[name] = dict(errs)
        elif "error" not in old:
            old["cosine"] = min(old["cosine"], errs["cosine"])
            old["rel_l1"] = max(old["rel_l1"], errs["rel_l1"])
            old["max_abs"] = max(old["max_abs"], errs["max_abs"])

    def to_dict(self) -> dict:
        return {"key": self.key, "calls": self.calls, "fallback": self.fallback, "stats": dataclasses.asdict(self.stats),
                "warnings": self.stats.warnings(), "errors": self.errors}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> LayerRecord:
        return cls(d["key"], d["calls"], CallStats(**d["stats"]), d.get("fallback"), d.get("errors", {}))


@dataclass
class InspectionReport:
    """Per attention call site (key), the candidates' errors against FP64 attention and the statistics."""

    layers: dict[str, LayerRecord]
    candidates: dict[str, QuantConfig]
    metadata: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [FULL_PRECISION, *self.candidates]

    def error(self, key: str, name: str, metric: str = "rel_l1") -> float | None:
        """A candidate's worst error on a key (None where it could not run)."""
        e = self.layers[key].errors.get(name)
        return None if e is None or "error" in e else e[metric]

    def table(self, metric: str = "rel_l1") -> str:
        """Markdown: one row per call site, the candidates' worst `metric`, the trouble statistics."""
        if metric not in ERROR_METRICS:
            raise ValueError(f"metric must be one of {ERROR_METRICS}, got {metric!r}")
        head = ["layer", "calls", "B x Hq/Hkv x Nq x Nk x d", *self.names, "K chan. outlier", "K token outlier",
                "max|Q|", "max|K|", "max|V|", "notes"]  # fmt: skip
        lines = [f"{metric} against FP64 attention (worst call; {FULL_PRECISION}: torch SDPA in the input dtype)",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        spec = ".6f" if metric == "cosine" else ".4f" if metric == "rel_l1" else ".3g"
        for rec in self.layers.values():
            s = rec.stats
            shape = f"{s.batch} x {s.heads_q}/{s.heads_kv} x {s.seq_q} x {s.seq_k} x {s.head_dim}"
            cells = [rec.key, str(rec.calls), shape + (" causal" if s.is_causal else "")]
            for name in self.names:
                e = rec.errors.get(name)
                cells.append("-" if e is None else "n/a" if "error" in e else format(e[metric], spec))
            notes = ([f"torch SDPA: {rec.fallback}"] if rec.fallback else []) + s.warnings()
            cells += [f"{s.k_channel_outlier:.1f}", f"{s.k_token_outlier:.1f}", f"{s.max_abs_q:.3g}",
                      f"{s.max_abs_k:.3g}", f"{s.max_abs_v:.3g}", "; ".join(notes)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "metadata": self.metadata,
            "candidates": {n: dataclasses.asdict(c) for n, c in self.candidates.items()},
            "layers": [rec.to_dict() for rec in self.layers.values()],
        }

    def to_json(self, path) -> Path:
        return write_document(path, self.to_dict())

    @classmethod
    def from_json(cls, path) -> InspectionReport:
        d = read_document(path, FORMAT, "attention report")
        layers = {r["key"]: LayerRecord.from_dict(r) for r in d["layers"]}
        cands = {n: QuantConfig(**c) for n, c in d["candidates"].items()}
        return cls(layers, cands, d.get("metadata", {}))


class Inspector:
    """Context manager: while active, every SDPA call of `model` is measured.

        with Inspector(model) as insp:
            model(x)
        report = insp.report()

    candidates: variant names (default every quantattn.VARIANTS entry), or {name: QuantConfig}.
    backend: quantattn backend for the candidates ("auto": auto's quantized kernels on a GPU, never torch's
    SDPA; CPU tensors always run the reference). targets: see hooks.intercepted_sdpa.
    """

    def __init__(self, model: torch.nn.Module, candidates=None, backend: str = "auto", targets=None):
        self.model = model
        self.candidates = _candidate_configs(candidates)
        self.backend = backend
        self.targets = targets
        self.layers: dict[str, LayerRecord] = {}
        self._sites: CallSites | None = None
        self._patch = None

    def __enter__(self) -> Inspector:
        self._sites = CallSites(self.model)
        self._patch = intercepted_sdpa(self._on_call, self.targets)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)
        self._sites.remove()

    def _on_call(self, original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        out = call_sdpa(original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        site = self._sites.next_key()
        with torch.no_grad():
            self._measure(site, out, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out

    def _measure(self, site, out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        reason = why_not_quantizable(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, scale)
        if reason is None or reason.startswith("dtype") or reason.startswith("attn_mask"):
            stats = call_stats(q, k, v, is_causal, scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        else:
            stats = CallStats(*(_dim(t, i) for t, i in ((q, 0), (q, 1), (k, 1), (q, 2), (k, 2), (q, 3))),
                              str(getattr(q, "dtype", "?")), bool(is_causal))  # fmt: skip
        rec = self.layers.get(site)
        if rec is None:
            rec = self.layers[site] = LayerRecord(site, 0, stats, reason)
        else:
            rec.stats.merge(stats)
            rec.fallback = rec.fallback or reason
        rec.calls += 1
        if reason is not None:
            return
        truth = attention_fp64(q, k, v, is_causal, scale, chunk=_chunk(q, k), attn_mask=attn_mask)
        rec.merge_errors(FULL_PRECISION, _errors(out, truth))
        # the candidates' own numerics: "auto" would hand short calls to torch's SDPA (its speed table)
        backend = "reference" if q.device.type == "cpu" else "quantized" if self.backend == "auto" else self.backend
        for name, cfg in self.candidates.items():
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="quantattn: CPU tensors")
                    res = sageattn(q, k, v, "HND", is_causal, scale, attn_mask=attn_mask, config=cfg, backend=backend)
                rec.merge_errors(name, _errors(res, truth))
            except Exception as exc:  # a candidate this device cannot run (FP8 below sm_89, ...)
                rec.merge_errors(name, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})

    def report(self) -> InspectionReport:
        meta = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "device": _device_name(self.model),
            "torch": torch.__version__,
            "backend": self.backend,
            "model": type(self.model).__name__,
        }
        return InspectionReport(dict(self.layers), dict(self.candidates), meta)


def _dim(t, i):
    return t.shape[i] if isinstance(t, torch.Tensor) and t.dim() > i else 0


def _chunk(q, k) -> int:
    """FP64 score rows per block, so that one block of B x Hq x rows x Nk doubles stays near 256 MiB."""
    per_row = max(1, q.shape[0] * q.shape[1] * k.shape[2] * 8)
    return max(16, min(1024, (256 << 20) // per_row))


def _errors(out, truth) -> dict:
    return {
        "cosine": metrics.cosine_similarity(out, truth),
        "rel_l1": metrics.relative_l1(out, truth),
        "max_abs": metrics.max_abs_error(out, truth),
    }


def _device_name(model) -> str:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == "cuda":
        return torch.cuda.get_device_name(p.device)
    return p.device.type if p is not None else "cpu"


def run_inputs(model: torch.nn.Module, inputs) -> None:
    """Run the model on `inputs`: a callable (called with the model), a tensor (model(x)), a tuple
    (model(*args)), a dict (model(**kwargs)), or a list of those (one forward each)."""
    batches = inputs if isinstance(inputs, list) else [inputs]
    with torch.no_grad():
        for batch in batches:
            if callable(batch) and not isinstance(batch, torch.Tensor):
                batch(model)
            elif isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, tuple):
                model(*batch)
            else:
                model(batch)


def inspect_attention(model: torch.nn.Module, inputs, candidates=None, backend: str = "auto", targets=None):
    """Run `model` on `inputs` (see run_inputs) and return the InspectionReport of its attention calls."""
    with Inspector(model, candidates, backend, targets) as insp:
        run_inputs(model, inputs)
    return insp.report()
