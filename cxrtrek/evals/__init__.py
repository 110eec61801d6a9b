"""Metrics, the evaluation runner, reports, plots and benchmarks."""
