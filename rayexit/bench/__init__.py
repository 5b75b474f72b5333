"""Benchmarks: each names its data slice, runs side by side in one process, and writes JSON."""
