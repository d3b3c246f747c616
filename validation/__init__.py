"""Measurements of whether the scores mean something (benchmarks/ measures speed)."""
