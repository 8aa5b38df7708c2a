"""Evaluation tasks, metrics and checkpoint sweeps."""
