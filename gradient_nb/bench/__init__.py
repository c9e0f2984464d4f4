"""Benchmarks: each prints one JSON object with ratios against a baseline measured in the same run."""
