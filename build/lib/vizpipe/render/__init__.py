"""Figures drawn from a results file alone; nothing here recomputes an analysis."""

from vizpipe.render.figures import render_results, resolve_results_path

__all__ = ["render_results", "resolve_results_path"]
