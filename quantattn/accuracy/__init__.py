"""Accuracy tools: see, before shipping, how far low-bit attention moves a model's outputs.

- Ablations (`python -m quantattn.accuracy`; ablation.py, chart.py): one knob of the default variant at a
  time against FP64 attention, on inputs with and without channel outliers; table, JSON, PNG.
- The inspector (`inspect_attention`; inspector.py): every attention call of a model, each candidate
  variant's error on exactly that call, and the statistics that predict trouble.
- Calibration (`calibrate`, `load_plan`; calibration.py): per call site the fastest variant within a
  tolerance, saved to a file and applied at inference.
"""

from quantattn.accuracy.ablation import ABLATION_GROUPS, ABLATIONS, ablation_rows, format_summary, format_tables
from quantattn.accuracy.calibration import AppliedPlan, LayerChoice, Plan, calibrate, load_plan
from quantattn.accuracy.cli import main
from quantattn.accuracy.inspector import InspectionReport, Inspector, LayerRecord, inspect_attention
from quantattn.accuracy.speeds import SPEEDS, SPEEDS_SOURCE, speeds_from_bench

__all__ = [
    "ABLATIONS",
    "ABLATION_GROUPS",
    "AppliedPlan",
    "InspectionReport",
    "Inspector",
    "LayerChoice",
    "LayerRecord",
    "Plan",
    "SPEEDS",
    "SPEEDS_SOURCE",
    "ablation_rows",
    "calibrate",
    "format_summary",
    "format_tables",
    "inspect_attention",
    "load_plan",
    "main",
    "speeds_from_bench",
]
