"""Measuring mmpack: timing helpers, the paper's evaluation, the demo's workload."""
