"""Linear attention, reference tier: the token-by-token recurrence as a ``lax.scan``.

One recurrence covers the whole core family (per head, state ``S [K, V]`` in float32)::

    S'  = decay_t * S_{t-1}        decay_t = exp(g_t): 1, a scalar, or a [K] vector
    S_t = S' + k_t v_t^T                         (no beta: linear attention, GLA family)
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T     (beta: the (gated) delta rule)
    o_t = scale * q_t^T S_t

and ``S_{t-1}`` is replaced by zeros where a packed document starts. It is the oracle of
the chunked tier and the decode step of every op.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def recurrent_step(q_t, k_t, v_t, g_t, beta_t, state, scale):
  """One token for a batch of heads. ``q_t, k_t [..., K]``, ``v_t [..., V]``,
  ``g_t`` None, ``[...]`` or ``[..., K]`` (log decay), ``beta_t`` None or ``[...]``,
  ``state [..., K, V]`` float32. Returns ``(o_t [..., V], state)`` in float32."""
  f32 = jnp.float32
  q_t, k_t, v_t = q_t.astype(f32), k_t.astype(f32), v_t.astype(f32)
  if g_t is not None:
    g_t = g_t.astype(f32)
    decay = jnp.exp(g_t)[..., None, None] if g_t.ndim == k_t.ndim - 1 else \
        jnp.exp(g_t)[..., None]
    state = decay * state
  if beta_t is None:
    state = state + k_t[..., :, None] * v_t[..., None, :]
  else:
    prediction = jnp.einsum("...k,...kv->...v", k_t, state, precision="highest")
    delta = beta_t.astype(f32)[..., None] * (v_t - prediction)
    state = state + k_t[..., :, None] * delta[..., None, :]
  o_t = scale * jnp.einsum("...k,...kv->...v", q_t, state, precision="highest")
  return o_t, state


def linear_recurrence_reference(q, k, v, g=None, beta=None, *, scale, initial_state=None,
                                segment_ids=None, chunk_size=None):
  """The recurrence over ``[B, T, H, *]`` inputs. Returns ``(o [B, T, H, V] float32,
  final_state [B, H, K, V] float32)``. ``chunk_size`` is accepted for the common
  signature and unused."""
  del chunk_size
  batch, _, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  state0 = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
            if initial_state is None else initial_state.astype(jnp.float32))
  if segment_ids is None:
    starts = jnp.zeros(q.shape[:2], bool)
  else:
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

  def step(state, xs):
    q_t, k_t, v_t, g_t, beta_t, start_t = xs
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    o_t, state = recurrent_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
    return state, o_t

  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  xs = tuple(time_major(x) for x in (q, k, v, g, beta, starts))
  final, o = lax.scan(step, state0, xs)
  return jnp.moveaxis(o, 0, 1), final

