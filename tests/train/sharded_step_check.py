"""Run as a script with 8 simulated CPU devices (see test_sharding.py): a train step on a
2x2x2 (data, fsdp, tensor) mesh against the same step on one device."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import models
from attnlab.data.mqar import MQARConfig, mqar_batch
from attnlab.train import optim, sharding, step as step_lib

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_cpu_enable_async_dispatch", False)  # as tests/conftest.py


def run(mesh):
  config = models.ModelConfig(vocab_size=64, width=32, num_layers=2, num_heads=4,
                              chunk_size=8, pattern=("gated_deltanet", "softmax"))
  tx = optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10)
  graph, state, shardings = step_lib.create_train_state(
      lambda: models.DecoderLM(config, rngs=nnx.Rngs(0)), tx, mesh,
      sharding.DEFAULT_RULES)
  batch = mqar_batch(MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4), 8, 0, 0)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()},
                         sharding.batch_sharding(mesh))

  @jax.jit
  def grads(state, batch):
    model = nnx.merge(graph, state).model
    return nnx.value_and_grad(step_lib.lm_loss, has_aux=True)(model, batch)

  (loss, _), g = grads(state, batch)
  train_step = step_lib.make_train_step(graph, shardings, mesh)
  new_state, metrics = train_step(state, batch)
  return float(loss), g, new_state, metrics


def main():
  assert len(jax.devices()) == 8, jax.devices()
  mesh8 = sharding.make_mesh((2, 2, 2))
  mesh1 = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  loss8, g8, s8, m8 = run(mesh8)
  loss1, g1, s1, m1 = run(mesh1)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b))
                           / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))
  grad_err = max(rel(a, b) for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)))
  state_err = max(rel(a, b) for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)))
  # The shardings the parameters and their Adam moments actually have on the 8 devices.
  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(s8)[0]:
    key = jax.tree_util.keystr(path)
    if key.endswith(("['kernel'].value", "['embedding'].value")):
      specs[key] = tuple(leaf.sharding.spec)
  json.dump({"loss8": loss8, "loss1": loss1, "grad_err": grad_err, "state_err": state_err,
             "skipped": bool(m8["skipped"]), "specs": specs}, sys.stdout)


if __name__ == "__main__":
  main()
