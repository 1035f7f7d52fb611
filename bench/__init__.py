"""Benchmarks: each figure is reported next to the raw library ceiling measured in the same run."""
