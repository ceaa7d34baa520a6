"""The two forms of the delta rules' UT transform ``(I + L)^{-1} rhs`` (the CPU path by
products, the GPU path by a triangular solve) against NumPy's float64 solve."""

import jax
import numpy as np
import pytest

from attnlab.ops import linear_xla


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("solve", ["by_products", "by_substitution"])
def test_unit_lower_solve(chunk, solve):
  rng = np.random.default_rng(chunk)
  # Entries as the delta rule makes them: beta_t e^{b_t - b_s} k_t . k_s with unit keys.
  keys = rng.normal(size=(3, chunk, 8))
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  beta = rng.uniform(size=(3, chunk, 1))
  lower = np.tril(beta * keys @ np.swapaxes(keys, -1, -2), -1)
  rhs = rng.normal(size=(3, chunk, 7))
  expected = np.linalg.solve(np.eye(chunk) + lower, rhs)
  with jax.enable_x64():
    got = getattr(linear_xla, f"_unit_lower_solve_{solve}")(lower, rhs)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-10)
