"""Benchmarking: careful timing and environment capture (the harness of issue 5 builds on these)."""
