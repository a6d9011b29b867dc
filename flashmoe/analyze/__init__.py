"""Summarize flashmoe runs and sweeps: `python -m flashmoe.analyze PATH`, or the Python API."""
from __future__ import annotations

from flashmoe.analyze.report import Row, summarize, swept_keys, to_csv, to_markdown, write_plot
from flashmoe.analyze.runs import AnalyzeError, Run, load_runs

__all__ = [
    "AnalyzeError", "Row", "Run", "load_runs", "summarize", "swept_keys", "to_csv", "to_markdown",
    "write_plot",
]
