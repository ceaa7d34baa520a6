"""The train state (model + optimizer) created already sharded, and the jitted steps."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnlab.train.sharding import batch_sharding, state_shardings


class TrainBundle(nnx.Module):
  """The model and its optimizer, split and merged together."""

  def __init__(self, model, tx):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


def create_train_state(model_fn: Callable[[], nnx.Module], tx, mesh, rules):
  """``(graph, state, shardings)``: the state is created on device already sharded
  (``eval_shape`` -> shardings from the logical names -> ``jit(out_shardings=...)``)."""
  abstract = nnx.eval_shape(lambda: TrainBundle(model_fn(), tx))
  graph, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(TrainBundle(model_fn(), tx))[1],
                  out_shardings=shardings)()
  return graph, state, shardings


def lm_loss(model, batch):
  """Weighted next-token cross entropy and accuracy over ``batch["weights"]``."""
  logits = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"].astype(jnp.float32)
  total = jnp.maximum(weights.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  loss = (ce * weights).sum() / total
  return loss, {"loss": loss, "accuracy": (correct * weights).sum() / total,
                "weight": weights.sum()}


def _under_mesh(fn, mesh):
  """``fn`` called with ``mesh`` in effect (``jax.set_mesh``): the mixers read it while
  tracing, and shard the sequence when its ``sequence`` axis has more than one device."""

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return call


def make_train_step(graph, shardings, mesh, loss_fn=lm_loss):
  """``step(state, batch) -> (state, metrics)``, jitted with the state's shardings and
  the batch split over the data axes (and its tokens over ``sequence``), run with
  ``mesh`` in effect. A step whose loss or gradient norm is not finite leaves the state
  unchanged (``metrics["skipped"]``)."""

  def step(state, batch):
    bundle = nnx.merge(graph, state)
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(bundle.model, batch)
    grad_norm = optax.global_norm(grads)
    bundle.optimizer.update(bundle.model, grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                             nnx.state(bundle), state)
    return new_state, {**metrics, "grad_norm": grad_norm, "skipped": ~ok}

  return _under_mesh(jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                             out_shardings=(shardings, None), donate_argnums=0), mesh)


def make_eval_step(graph, shardings, mesh, loss_fn=lm_loss):
  def evaluate(state, batch):
    return loss_fn(nnx.merge(graph, state).model, batch)[1]
  return _under_mesh(jax.jit(evaluate, in_shardings=(shardings, batch_sharding(mesh))),
                     mesh)
