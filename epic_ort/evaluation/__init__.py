"""`epic-ort evaluate`: methods (specs from the settings table), the run (resumable), the metrics, the
judge, the figures per method and the report (table, plot)."""

from .methods import DEFAULT_METHODS, parse_method, parse_methods
from .report import format_markdown, format_table, plot_report, write_outputs
from .run import EvaluationSettings, evaluate

__all__ = ["DEFAULT_METHODS", "EvaluationSettings", "evaluate", "format_markdown", "format_table", "parse_method",
           "parse_methods", "plot_report", "write_outputs"]
