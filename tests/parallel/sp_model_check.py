"""Run as a script with 8 simulated CPU devices (see test_sequence_parallel_model.py).

A small DecoderLM (a Gated DeltaNet layer with its short convolution, then a softmax
layer) with packed documents, its loss and parameter gradients on a ``(data 2, sequence
4)`` mesh, where the mixers run ring attention and state passing, against the same
model on one device; one train step of ``attnlab.train.run`` with ``mesh_shape``
``(4, 1, 1, 2)`` against ``(8, 1, 1)``; and the messages of the options ring attention
lacks. Prints one JSON object.
"""

import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import layers, models
from attnlab.train import run as run_lib
from attnlab.train import sharding, step as step_lib
from configs import mqar as mqar_config
from tests.parallel.sp_ring_check import executed_collectives, rel_err

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_cpu_enable_async_dispatch", False)  # as tests/conftest.py

BATCH, LENGTH, VOCAB, SEQUENCE = 4, 32, 64, 4
# Document starts over 4 spans of 8 tokens: on a span edge (8, 16), inside a span (5, 11,
# 21), a one-token document (11), documents crossing span edges.
STARTS = ((5, 11, 12, 16), (8, 21), (), (3,))


def model_config(**changes):
  fields = dict(vocab_size=VOCAB, width=32, num_layers=2, num_heads=2, chunk_size=4,
                pattern=("gated_deltanet", "softmax"))
  return models.ModelConfig(**{**fields, **changes})


def problem():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
  starts = np.zeros((BATCH, LENGTH), bool)
  for row, positions in enumerate(STARTS):
    starts[row, list(positions)] = True
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.cumsum(starts, axis=1).astype(np.int32),
          "weights": rng.uniform(0.5, 1.0, (BATCH, LENGTH)).astype(np.float32)}


def loss_and_grads(graph, state, batch):
  model = nnx.merge(graph, state)
  (loss, _), grads = nnx.value_and_grad(step_lib.lm_loss, has_aux=True)(model, batch)
  return loss, grads


def model_case():
  """Loss and gradients, ``(data 2, sequence 4)`` against one device."""
  graph, state = nnx.split(models.DecoderLM(model_config(), rngs=nnx.Rngs(0)))
  batch = {k: jnp.asarray(v) for k, v in problem().items()}
  loss1, grads1 = jax.jit(loss_and_grads, static_argnums=0)(graph, state, batch)

  mesh = sharding.make_mesh((2, 1, 1, SEQUENCE))
  state8 = jax.device_put(state, sharding.state_shardings(state, mesh))
  batch8 = jax.device_put(batch, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    compiled = jax.jit(loss_and_grads, static_argnums=0).lower(graph, state8,
                                                               batch8).compile()
  loss8, grads8 = compiled(state8, batch8)
  leaves1 = jax.tree_util.tree_flatten_with_path(grads1)[0]
  leaves8 = jax.tree.leaves(grads8)
  grad_errors = {jax.tree_util.keystr(path): rel_err(g8, g1)
                 for (path, g1), g8 in zip(leaves1, leaves8)}
  return {"loss": rel_err(loss8, loss1), "grads": grad_errors,
          "finite": bool(np.isfinite(float(loss8))
                         and all(np.isfinite(np.asarray(g)).all() for g in leaves8)),
          "collectives": executed_collectives(compiled.as_text())}


def train_case():
  """The first step's loss of ``run`` with a sequence axis of 2 and without one."""
  losses = {}
  for name, shape in (("sequence2", (4, 1, 1, 2)), ("sequence1", (8, 1, 1))):
    config = mqar_config.get_config("smoke")
    config.mesh_shape = shape
    config.model.pattern = ("gated_deltanet", "softmax")
    config.model.chunk_size = 8
    config.train.steps = 2
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 0
    with tempfile.TemporaryDirectory() as workdir:
      result = run_lib.run(config, workdir, quiet=True)
    losses[name] = result["train_losses"] + [result["eval_loss"]]
  return losses


def errors_raised():
  """The messages of options ring attention lacks, under a sequence mesh."""
  mesh = sharding.make_mesh((2, 1, 1, SEQUENCE))
  x = jnp.ones((2, LENGTH, 16))
  calls = {
      "alibi": (dict(position="alibi"), {}),
      "sinks": (dict(sinks=True), {}),
      "implementation": (dict(implementation="reference"), {}),
      "lengths": ({}, dict(lengths=jnp.full((2,), LENGTH - 3))),
  }
  messages = {}
  for name, (fields, kwargs) in calls.items():
    mixer = layers.make_mixer("softmax", layers.MixerConfig(width=16, num_heads=2, **fields),
                              rngs=nnx.Rngs(0))
    try:
      with jax.set_mesh(mesh):
        mixer(x, **kwargs)
      messages[name] = None
    except ValueError as e:
      messages[name] = str(e)
  return messages


def main():
  assert len(jax.devices()) == 8, jax.devices()
  times, result = {}, {}
  for name, fn in (("model", model_case), ("errors", errors_raised), ("train", train_case)):
    start = time.perf_counter()
    result[name] = fn()
    times[name] = time.perf_counter() - start
  json.dump({**result, "seconds": times}, sys.stdout)


if __name__ == "__main__":
  main()
