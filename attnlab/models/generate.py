"""Generation: prefill the prompts, then decode one token at a time under one ``jit``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits.

  ``temperature=0`` is greedy (argmax). Otherwise logits are divided by the temperature,
  restricted to the ``top_k`` largest (0 = no limit) and to the smallest set whose
  probability reaches ``top_p`` (1.0 = no limit), then sampled.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"Sampling.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits, sampling: Sampling):
  """Temperature, top-k and top-p applied to ``logits [B, V]``; dropped tokens get -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p (the first is always kept).
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample(logits, key, sampling: Sampling):
  """Next tokens ``[B]`` from ``logits [B, V]``."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling)).astype(jnp.int32)


def generate(model, prompts, lengths, max_new_tokens: int, *, key=None,
             sampling: Sampling = Sampling(), eos_id: int | None = None):
  """Continue right-padded ``prompts [B, T]`` of ``lengths [B]`` by ``max_new_tokens``.

  Returns ``[B, max_new_tokens]`` int32 tokens; after a row emits ``eos_id`` it keeps
  emitting it. Runs under one ``jit`` (the model is split into graph and state).
  """
  prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if lengths.shape != prompts.shape[:1] or prompts.ndim != 2:
    raise ValueError(f"prompts must be [B, T] and lengths [B], got {prompts.shape=}, "
                     f"{lengths.shape=}")
  if sampling.temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key, got key=None")
  key = jax.random.key(0) if key is None else key
  graph, state = nnx.split(model)
  max_len = prompts.shape[1] + max_new_tokens
  return _generate(graph, state, prompts, lengths, key, max_new_tokens, max_len,
                   sampling, eos_id)


@jax.jit(static_argnums=(0, 5, 6, 7, 8))
def _generate(graph, state, prompts, lengths, key, steps, max_len, sampling, eos_id):
  model = nnx.merge(graph, state)
  logits, cache = model.prefill(prompts, lengths, max_len)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  key, sub = jax.random.split(key)
  first = sample(last, sub, sampling)

  def step(carry, _):
    # The weights ride in the carry: nnx transforms inside decode (the scan over layer
    # repeats) need them at this trace level.
    state, token, cache, positions, key, done = carry
    logits, cache = nnx.merge(graph, state).decode(token, cache, positions)
    key, sub = jax.random.split(key)
    nxt = sample(logits, sub, sampling)
    if eos_id is not None:
      done = done | (token == eos_id)
      nxt = jnp.where(done, eos_id, nxt)
    return (state, nxt, cache, positions + 1, key, done), nxt

  done = jnp.zeros(lengths.shape, bool)
  carry = (state, first, cache, lengths, key, done)
  _, rest = jax.lax.scan(step, carry, None, length=steps - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)
