"""Evaluation: benchmarks, eval tasks, training reports."""
