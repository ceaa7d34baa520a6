"""The optimizer: weight decay reaches matrices only."""

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.train import optim


def test_weight_decay_shrinks_matrices_and_leaves_vectors(rng):
  params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
            "dt_bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
            "scale": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}
  tx = optim.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10,
                            weight_decay=0.5)
  state = tx.init(params)
  # A zero gradient isolates the decay term: Adam's own update is 0 / (0 + eps) = 0.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_allclose(new["w"], params["w"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(new["dt_bias"], params["dt_bias"])
  np.testing.assert_array_equal(new["scale"], params["scale"])
