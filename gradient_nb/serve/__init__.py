"""Serving: shard runtime, sampling, and (elsewhere in this package) the mesh-facing parts."""
