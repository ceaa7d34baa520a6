"""absl entry points: ``benchmark.py`` measures attnlab's kernels against JAX's."""
