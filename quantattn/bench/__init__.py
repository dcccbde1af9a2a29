"""quantattn's speed benchmark: `python -m quantattn.bench` (see cli.py and README "Performance").

Importable without a GPU: the tables and charts are drawn from saved JSON on any machine.
"""

from quantattn.bench.chart import plot
from quantattn.bench.report import format_table, load

__all__ = ["format_table", "load", "plot"]
