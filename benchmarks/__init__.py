"""The mimo-mlx benchmark harness: `python -m benchmarks.run --scale small` (see benchmarks/README.md)."""
