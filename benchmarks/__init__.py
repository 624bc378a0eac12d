"""Benchmarks: scripts (not tests) that show precompute and cached training sit near their limits.

``python -m benchmarks --quick`` runs them all; see docs/benchmarks.md.
"""
