"""`epic-ort evaluate`: methods (specs from the settings table), the run, the metrics and the report."""

from .methods import DEFAULT_METHODS, parse_method, parse_methods
from .report import format_markdown, format_table, plot_curves, write_outputs
from .run import evaluate

__all__ = ["DEFAULT_METHODS", "evaluate", "format_markdown", "format_table", "parse_method", "parse_methods",
           "plot_curves", "write_outputs"]
