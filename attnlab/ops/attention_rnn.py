"""Softmax attention as an RNN: the prefix-scan form (Feng et al. 2024, "Attention as an
RNN", Aaren).

With one query per head, fixed over time (Aaren's learned query token), softmax attention
over every prefix is a many-to-many RNN::

    o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i),   s_i = scale q . k_i

computed from the state ``(m_t, u_t, w_t)``: the running max ``m_t = max_{i<=t} s_i``, the
sum ``u_t = sum_i exp(s_i - m_t)`` and the weighted sum ``w_t = sum_i exp(s_i - m_t) v_i``;
``o_t = w_t / u_t``. Two states combine associatively (the paper's parallel prefix scan)::

    (m_a, u_a, w_a) + (m_b, u_b, w_b) = (m, u_a e^{m_a - m} + u_b e^{m_b - m},
                                           w_a e^{m_a - m} + w_b e^{m_b - m}),  m = max(m_a, m_b)

Layout: ``q [B, H, K]``, ``k [B, T, H, K]``, ``v [B, T, H, V]``; state ``[B, H, V + 2]``
float32 holding ``[w | u | m]`` (zeros = empty: a state with ``u = 0`` has no keys).
``segment_ids [B, T]`` restart the scan at each document; ``lengths [B]`` right-pad (keys
at ``t >= lengths[b]`` leave the state unchanged). Causal only (the non-causal output is
the last prefix).

Tiers: ``reference`` the dense ``[T, T]`` softmax weights with the causal / document mask;
``xla`` :func:`jax.lax.associative_scan` of the states (O(log T) depth, memory linear in
T, gradients by autodiff through the scan with the maxima held constant, which leaves
``o`` unchanged: it does not depend on the choice of ``m``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import registry
from attnlab.ops.softmax import _check_int_array as _check_ints

__all__ = ["aaren", "aaren_step"]

_HIGHEST = lax.Precision.HIGHEST
# The max of an empty state: finite, so that max(-1e30, s) = s and no inf - inf appears.
_EMPTY = -1e30


@dataclasses.dataclass(frozen=True)
class AarenCall:
  """Canonical call: q, k, v, scale, documents, padding, initial state."""

  q: Any
  k: Any
  v: Any
  scale: float
  segment_ids: Any
  lengths: Any
  initial_state: Any


def _scores(q, k, scale):
  """``[B, T, H]`` float32 scores of the one query per head against every key."""
  return scale * jnp.einsum("bhk,bthk->bth", q.astype(jnp.float32), k.astype(jnp.float32),
                            precision=_HIGHEST)


def _layout(call):
  """``(documents [B, T] int32, starts [B, T] bool, valid [B, T] bool)``."""
  b, t = call.k.shape[:2]
  if call.segment_ids is None:
    starts = jnp.zeros((b, t), bool)
  else:
    ids = call.segment_ids
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  valid = (jnp.ones((b, t), bool) if call.lengths is None
           else jnp.arange(t)[None] < call.lengths[:, None])
  return jnp.cumsum(starts, axis=1, dtype=jnp.int32), starts, valid


def _split(state):
  """``[B, H, V + 2]`` -> ``(m [B, H], u [B, H], w [B, H, V])``; an empty state's m is
  the finite sentinel."""
  state = state.astype(jnp.float32)
  w, u, m = state[..., :-2], state[..., -2], state[..., -1]
  return jnp.where(u > 0, m, _EMPTY), u, w


def _join(m, u, w):
  m = jnp.where(u > 0, m, 0.0)
  return jnp.concatenate([w, u[..., None], m[..., None]], axis=-1)


def _combine(a, b):
  """The associative operator on states ``(m, u, w)`` (any leading shape)."""
  (ma, ua, wa), (mb, ub, wb) = a, b
  m = jnp.maximum(ma, mb)
  ea, eb = jnp.exp(ma - m), jnp.exp(mb - m)
  return m, ua * ea + ub * eb, wa * ea[..., None] + wb * eb[..., None]


# ---------------------------------------------------------------------- tiers


def _reference(call):
  docs, _, valid = _layout(call)
  return _dense(call.q, call.k, call.v, docs, valid, call.initial_state, scale=call.scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def _dense(q, k, v, docs, valid, initial_state, *, scale):
  """Dense causal softmax per document, plus the initial state for the first document
  (compiled as one program when called eagerly)."""
  s = _scores(q, k, scale)  # [B, T, H]
  v = v.astype(jnp.float32)
  t = s.shape[1]
  allowed = ((docs[:, :, None] == docs[:, None, :]) & valid[:, None, :]
             & jnp.tril(jnp.ones((t, t), bool))[None])  # [B, T(query), T(key)]
  logits = jnp.where(allowed[..., None], s[:, None], -jnp.inf)  # [B, T, T, H]
  top = jnp.max(logits, axis=2)  # [B, T, H]
  first = docs == 0
  if initial_state is not None:
    m0, u0, w0 = _split(initial_state)
    top = jnp.where(first[..., None] & (u0[:, None] > 0), jnp.maximum(top, m0[:, None]), top)
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  e = jnp.where(allowed[..., None], jnp.exp(logits - top[:, :, None]), 0.0)
  num = jnp.einsum("btih,bihv->bthv", e, v, precision=_HIGHEST)
  den = jnp.sum(e, axis=2)
  if initial_state is not None:
    carry = jnp.where(first[..., None], jnp.exp(m0[:, None] - top), 0.0)  # [B, T, H]
    num = num + carry[..., None] * w0[:, None]
    den = den + carry * u0[:, None]
  o = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  # The final state: the last document's valid keys (and the initial state when the last
  # document is the first), relative to their max.
  last = (docs == docs[:, -1:]) & valid
  s_last = jnp.where(last[..., None], s, _EMPTY)
  m = jnp.max(s_last, axis=1)
  has_init = docs[:, -1] == 0
  if initial_state is not None:
    m = jnp.where(has_init[:, None], jnp.maximum(m, m0), m)
  m = lax.stop_gradient(m)
  e_last = jnp.where(last[..., None], jnp.exp(s_last - m[:, None]), 0.0)
  u = jnp.sum(e_last, axis=1)
  w = jnp.einsum("bth,bthv->bhv", e_last, v, precision=_HIGHEST)
  if initial_state is not None:
    c0 = jnp.where(has_init[:, None], jnp.exp(m0 - m), 0.0)
    u, w = u + c0 * u0, w + c0[..., None] * w0
  return o, _join(m, u, w)


def _xla(call):
  _, starts, valid = _layout(call)
  return _scan(call.q, call.k, call.v, starts, valid, call.initial_state, scale=call.scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def _scan(q, k, v, starts, valid, initial_state, *, scale):
  """Segmented associative scan of the per-token states ``(s_t, 1, v_t)`` (compiled as one
  program when called eagerly)."""
  s = _scores(q, k, scale)
  v = v.astype(jnp.float32)
  # The maxima carry no gradient: o = w / u is the same for any m, and u_t = e^{s_t - m_t}
  # then has the exact derivative with respect to s_t.
  m = jnp.where(valid[..., None], lax.stop_gradient(s), _EMPTY)
  u = jnp.where(valid[..., None], jnp.exp(s - lax.stop_gradient(s)), 0.0)
  w = u[..., None] * v
  if initial_state is not None:
    first = jax.tree.map(lambda x: x[:, 0], (m, u, w))
    m0, u0, w0 = _split(initial_state)
    m0_, u0_, w0_ = _combine((m0, u0, w0), first)
    m, u, w = m.at[:, 0].set(m0_), u.at[:, 0].set(u0_), w.at[:, 0].set(w0_)

  def combine(a, b):
    fa, xa = a
    fb, xb = b
    joined = _combine(xa, xb)
    keep = lambda old, new: jnp.where(fb.reshape(fb.shape + (1,) * (new.ndim - fb.ndim)),
                                      old, new)
    return fa | fb, jax.tree.map(keep, xb, joined)

  _, (m, u, w) = lax.associative_scan(combine, (starts, (m, u, w)), axis=1)
  o = jnp.where(u[..., None] > 0, w / jnp.where(u > 0, u, 1.0)[..., None], 0.0)
  return o, _join(m[:, -1], u[:, -1], w[:, -1])


registry.describe("aaren", registry.MechanismInfo(
    paper="Feng et al. 2024, Attention as an RNN (Aaren: softmax attention of a fixed query "
          "over every prefix)",
    family="softmax", causal=True, non_causal=False, state="V + 2 (w, u, m)",
    cost="O(T V) work, O(log T) depth", step="aaren_step",
    xla_path="associative scan of (max, sum, weighted sum)"))
registry.register("aaren", registry.Implementation(
    "reference", _reference, priority=0, automatic=False))
registry.register("aaren", registry.Implementation("xla", _xla, priority=10))


# ----------------------------------------------------------------------- the op


def _check_state(name, state, batch, heads, value_dim):
  state = jnp.asarray(state)
  want = (batch, heads, value_dim + 2)
  if state.shape != want:
    raise ValueError(f"{name} must have shape [B, H, V + 2]={want}, got {name}.shape="
                     f"{state.shape}")
  if not jnp.issubdtype(state.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {name}.dtype={state.dtype}")
  return state


def _check_scale(scale, dim):
  if scale is None:
    return dim ** -0.5
  if (not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool)
      or not np.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale must be a positive finite Python float, got scale={scale!r}")
  return float(scale)


def aaren(q, k, v, *, scale=None, segment_ids=None, lengths=None, initial_state=None,
                  output_final_state=False, implementation=None):
  """Softmax attention of one query per head over every prefix (Aaren's many-to-many RNN).

  ``q [B, H, K]`` (the same query at every step), ``k [B, T, H, K]``, ``v [B, T, H, V]``
  of one floating dtype; ``scale`` (default ``K ** -0.5``); ``segment_ids [B, T]`` ints
  (packed documents: a change of id restarts the scan); ``lengths [B]`` ints (right
  padding); ``initial_state [B, H, V + 2]`` (``[w | u | m]``, zeros = empty, seen by the
  first document); ``output_final_state``; ``implementation`` (None, ``"reference"``,
  ``"xla"``). Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, V + 2] float32
  or None)``.
  """
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  if q.ndim != 3:
    raise ValueError(f"q must be [B, H, K] (one query per head), got q.shape={q.shape}")
  for name, x in (("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, H, dim], got {name}.shape={x.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  batch, length, heads, dim = k.shape
  if q.shape != (batch, heads, dim):
    raise ValueError(f"q must be [B, H, K] with k's B, H, K, got {q.shape=}, {k.shape=}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, T, H, V] with k's B, T, H, got {k.shape=}, {v.shape=}")
  if length == 0:
    raise ValueError(f"sequence length must be positive, got {k.shape=}")
  scale = _check_scale(scale, dim)
  if segment_ids is not None:
    segment_ids = _check_ints("segment_ids", segment_ids, (batch, length))
  if lengths is not None:
    lengths = _check_ints("lengths", lengths, (batch,))
  if initial_state is not None:
    initial_state = _check_state("initial_state", initial_state, batch, heads, v.shape[-1])
  if not isinstance(output_final_state, bool):
    raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
  call = AarenCall(q, k, v, scale, segment_ids, lengths, initial_state)
  o, state = registry.select("aaren", implementation, call).fn(call)
  return o.astype(v.dtype), (state if output_final_state else None)


def aaren_step(q, k_t, v_t, state, *, scale=None):
  """One step of :func:`aaren`: ``q [B, H, K]``, ``k_t [B, H, K]``, ``v_t [B, H,
  V]``, ``state [B, H, V + 2]`` -> ``(o_t [B, H, V] in v_t's dtype, state)``."""
  q, k_t, v_t = (jnp.asarray(x) for x in (q, k_t, v_t))
  for name, x in (("q", q), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, dim], got {name}.shape={x.shape}")
  if q.shape != k_t.shape or v_t.shape[:2] != k_t.shape[:2]:
    raise ValueError(f"q and k_t must be [B, H, K] and v_t [B, H, V], got {q.shape=}, "
                     f"{k_t.shape=}, {v_t.shape=}")
  batch, heads, dim = q.shape
  state = _check_state("state", state, batch, heads, v_t.shape[-1])
  scale = _check_scale(scale, dim)
  s = scale * jnp.einsum("bhk,bhk->bh", q.astype(jnp.float32), k_t.astype(jnp.float32),
                         precision=_HIGHEST)
  m, u, w = _combine(_split(state), (s, jnp.ones_like(s), v_t.astype(jnp.float32)))
  return (w / u[..., None]).astype(v_t.dtype), _join(m, u, w)
