"""Linear attention with decay or gating: the public ops, their checks and decode steps.

Six ops share one contract (layout ``[B, T, H, D]``, state ``[B, H, K, V]`` float32,
gates in log space). Per head, with ``S_0`` the initial state (zeros by default) and
``o_t = scale * q_t^T S_t`` (the current token included):

==================  =======================  ==============================================
op                  gates                    recurrence
==================  =======================  ==============================================
linear_attn         --                       S_t = S_{t-1} + k_t v_t^T
retention           g_gamma [H]              S_t = exp(g_gamma) S_{t-1} + k_t v_t^T
simple_gla          g [B, T, H]              S_t = exp(g_t) S_{t-1} + k_t v_t^T
gla                 g [B, T, H, K]           S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
delta_rule          beta [B, T, H]           S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
gated_delta_rule    g, beta [B, T, H]        S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + ...
==================  =======================  ==============================================

Sources: Katharopoulos et al. 2020 (linear attention); RetNet, Sun et al. 2023
(retention); Yang et al. 2023, GLA (gla, simple_gla = the Mamba-2 SSD core); Schlag et
al. 2021 and Yang et al. 2024 (DeltaNet); Yang et al. 2024, Gated DeltaNet.

Every op returns ``(o, final_state)``: ``o [B, T, H, V]`` in v's dtype, and the float32
state after the last token when ``output_final_state=True`` (else None). With
``segment_ids [B, T]`` the state restarts from zeros wherever the id changes from the
previous position (packed documents); ``initial_state`` applies at t = 0 only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import registry
from attnlab.ops.linear_reference import linear_recurrence_reference, recurrent_step
from attnlab.ops.linear_pallas import (linear_pallas_automatic, linear_pallas_supports,
                                       linear_recurrence_pallas)
from attnlab.ops.linear_xla import linear_recurrence_chunked

NORMALIZE_EPS = 1e-6   # linear_attn(normalize=True): o = num / (den + eps)
L2NORM_EPS = 1e-6      # use_qk_l2norm: x / sqrt(sum x^2 + eps)

FEATURE_MAPS: dict[str, Callable] = {
    "identity": lambda x: x,
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}

MECHANISMS = ("linear_attn", "retention", "simple_gla", "gla", "delta_rule",
              "gated_delta_rule")


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """The canonical arguments of every tier (after feature maps, norms and defaults)."""

  q: Any
  k: Any
  v: Any
  g: Any          # None, [B, T, H] or [B, T, H, K] log decay
  beta: Any       # None or [B, T, H]
  scale: float
  initial_state: Any
  segment_ids: Any
  chunk_size: int

  def run(self, fn):
    return fn(self.q, self.k, self.v, self.g, self.beta, scale=self.scale,
              initial_state=self.initial_state, segment_ids=self.segment_ids,
              chunk_size=self.chunk_size)


_PAPERS = {
    "linear_attn": "Katharopoulos et al. 2020, Transformers are RNNs",
    "retention": "Sun et al. 2023, Retentive Network (RetNet)",
    "simple_gla": "Yang et al. 2023, GLA (head-wise gate); Dao & Gu 2024, Mamba-2 (SSD)",
    "gla": "Yang et al. 2023, Gated Linear Attention Transformers",
    "delta_rule": "Schlag et al. 2021; Yang et al. 2024, Parallelizing Linear "
                  "Transformers with the Delta Rule",
    "gated_delta_rule": "Yang et al. 2025, Gated Delta Networks",
}

for _name in MECHANISMS:
  registry.describe(_name, registry.MechanismInfo(
      paper=_PAPERS[_name], family="gated linear", causal=True, non_causal=False,
      state="K x V", cost="O(T C (K + V)) chunked, C = chunk size", step=_name + "_step",
      xla_path="chunk-parallel recurrence (its own)"))
  registry.register(_name, registry.Implementation(
      "reference", linear_recurrence_reference, priority=0, automatic=False))
  registry.register(_name, registry.Implementation(
      "xla", linear_recurrence_chunked, priority=10))
  registry.register(_name, registry.Implementation(
      "pallas", linear_recurrence_pallas, supports=linear_pallas_supports, priority=15,
      automatic_supports=linear_pallas_automatic))


# ----------------------------------------------------------------------------- checks


def _shape(x):
  return tuple(np.shape(x))


def _check_qkv(q, k, v):
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, H, D], got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape [B, T, H, K], got "
                     f"{q.shape=}, {k.shape=}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must be [B, T, H, V] with q's B, T, H, got {q.shape=}, {v.shape=}")
  if q.shape[1] == 0:
    raise ValueError(f"sequence length must be positive, got {q.shape=}")
  return q, k, v


def _check_gate(name, x, shape):
  x = jnp.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {name}.shape={x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  return x


def _check_common(q, v, scale, initial_state, segment_ids, chunk_size, value_dim):
  batch, length, heads, key_dim = q.shape
  if scale is None:
    scale = key_dim ** -0.5
  if not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got scale={scale!r}")
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    want = (batch, heads, key_dim, value_dim)
    if initial_state.shape != want:
      raise ValueError(f"initial_state must be [B, H, K, V]={want}, got "
                       f"initial_state.shape={initial_state.shape}")
    if not jnp.issubdtype(initial_state.dtype, jnp.floating):
      raise ValueError(f"initial_state must be floating point, got {initial_state.dtype}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
      raise ValueError(f"segment_ids must be [B, T]={(batch, length)}, got "
                       f"segment_ids.shape={segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers, got segment_ids.dtype="
                       f"{segment_ids.dtype}")
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  return float(scale), initial_state, segment_ids, int(chunk_size)


def _l2norm(x):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + L2NORM_EPS)).astype(
      x.dtype)


def _run(mechanism, implementation, q, k, v, g, beta, *, scale, initial_state,
         output_final_state, segment_ids, chunk_size, value_dim=None):
  value_dim = v.shape[-1] if value_dim is None else value_dim
  scale, initial_state, segment_ids, chunk_size = _check_common(
      q, v, scale, initial_state, segment_ids, chunk_size, value_dim)
  call = LinearCall(q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size)
  impl = registry.select(mechanism, implementation, call)
  o, final = call.run(impl.fn)
  return o, (final if output_final_state else None)


def _common_doc(fn):
  fn.__doc__ += """
  Common arguments: ``scale`` (default ``K ** -0.5``), ``initial_state [B, H, K, V]``,
  ``output_final_state``, ``segment_ids [B, T]`` (packed documents), ``chunk_size``
  (chunk length of the ``xla`` tier), ``implementation`` (None, ``"reference"`` or
  ``"xla"``). Returns ``(o [B, T, H, V], final_state or None)``.
  """
  return fn


# -------------------------------------------------------------------------------- ops


def _feature_map(feature_map):
  if callable(feature_map):
    return feature_map
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, "
                     f"got feature_map={feature_map!r}")
  return FEATURE_MAPS[feature_map]


def _normalized_values(v):
  """``[v, 1]``: the extra column accumulates ``z_t = sum k`` beside ``S_t``."""
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _normalize_output(o_aug):
  num, den = o_aug[..., :-1], o_aug[..., -1:]
  return num / (den + NORMALIZE_EPS)


@_common_doc
def linear_attn(q, k, v, *, normalize=False, feature_map="identity", scale=None,
                initial_state=None, output_final_state=False, segment_ids=None,
                chunk_size=64, implementation=None):
  """Linear attention (Katharopoulos et al. 2020): ``S_t = S_{t-1} + phi(k_t) v_t^T``.

  ``feature_map`` phi: ``"identity"``, ``"elu_plus_one"``, ``"relu"`` or a callable,
  applied to q and k. ``normalize=True`` divides by ``scale * phi(q_t)^T z_t + 1e-6``
  with ``z_t = sum_{s<=t} phi(k_s)``; the state then carries z as an extra last column,
  ``[B, H, K, V + 1]`` (``S`` in ``[..., :V]``, ``z`` in ``[..., V]``).
  """
  q, k, v = _check_qkv(q, k, v)
  phi = _feature_map(feature_map)
  q, k = phi(q), phi(k)
  values = _normalized_values(v) if normalize else v
  o, final = _run("linear_attn", implementation, q, k, values, None, None, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  if normalize:
    o = _normalize_output(o)
  return o.astype(v.dtype), final


def retention_gammas(num_heads: int) -> np.ndarray:
  """RetNet's per-head log decays ``log(1 - 2 ** (-5 - h))``, h = 0..H-1 (Sun et al. 2023,
  §2.2 uses ``gamma = 1 - 2^(-5 - arange(0, h))``)."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


@_common_doc
def retention(q, k, v, g_gamma=None, *, scale=None, initial_state=None,
              output_final_state=False, segment_ids=None, chunk_size=64,
              implementation=None):
  """Retention (RetNet): ``S_t = exp(g_gamma) S_{t-1} + k_t v_t^T`` with a fixed log decay
  per head, ``g_gamma [H]`` (default :func:`retention_gammas`)."""
  q, k, v = _check_qkv(q, k, v)
  batch, length, heads, _ = q.shape
  if g_gamma is None:
    g_gamma = jnp.asarray(retention_gammas(heads), jnp.float32)
  g_gamma = _check_gate("g_gamma", g_gamma, (heads,))
  g = jnp.broadcast_to(g_gamma.astype(jnp.float32), (batch, length, heads))
  o, final = _run("retention", implementation, q, k, v, g, None, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


@_common_doc
def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=64, implementation=None):
  """Simple GLA / Mamba-2 SSD core: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``g [B, T, H]``."""
  q, k, v = _check_qkv(q, k, v)
  g = _check_gate("g", g, q.shape[:3])
  o, final = _run("simple_gla", implementation, q, k, v, g, None, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


@_common_doc
def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, chunk_size=64, implementation=None):
  """GLA (Yang et al. 2023): ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
  ``g [B, T, H, K]`` per key channel."""
  q, k, v = _check_qkv(q, k, v)
  g = _check_gate("g", g, q.shape)
  o, final = _run("gla", implementation, q, k, v, g, None, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


@_common_doc
def delta_rule(q, k, v, beta, *, use_qk_l2norm=False, scale=None, initial_state=None,
               output_final_state=False, segment_ids=None, chunk_size=64,
               implementation=None):
  """DeltaNet: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
  ``beta [B, T, H]``. ``use_qk_l2norm`` normalizes q and k over K inside the op."""
  q, k, v = _check_qkv(q, k, v)
  beta = _check_gate("beta", beta, q.shape[:3])
  if use_qk_l2norm:
    q, k = _l2norm(q), _l2norm(k)
  o, final = _run("delta_rule", implementation, q, k, v, None, beta, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


@_common_doc
def gated_delta_rule(q, k, v, g, beta, *, use_qk_l2norm=False, scale=None,
                     initial_state=None, output_final_state=False, segment_ids=None,
                     chunk_size=64, implementation=None):
  """Gated DeltaNet: ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
  ``g, beta [B, T, H]``."""
  q, k, v = _check_qkv(q, k, v)
  g = _check_gate("g", g, q.shape[:3])
  beta = _check_gate("beta", beta, q.shape[:3])
  if use_qk_l2norm:
    q, k = _l2norm(q), _l2norm(k)
  o, final = _run("gated_delta_rule", implementation, q, k, v, g, beta, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


# ------------------------------------------------------------------------------ steps


def _check_step(q_t, k_t, v_t, state, scale, value_dim=None):
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, D], got {name}.shape={x.shape}")
  if q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, K] and v_t [B, H, V] with the same B, H, "
                     f"got {q_t.shape=}, {k_t.shape=}, {v_t.shape=}")
  value_dim = v_t.shape[-1] if value_dim is None else value_dim
  want = q_t.shape + (value_dim,)
  if jnp.shape(state) != want:
    raise ValueError(f"state must be [B, H, K, V]={want}, got state.shape={jnp.shape(state)}")
  if scale is None:
    scale = q_t.shape[-1] ** -0.5
  return q_t, k_t, v_t, jnp.asarray(state, jnp.float32), float(scale)


def linear_attn_step(q_t, k_t, v_t, state, *, normalize=False, feature_map="identity",
                     scale=None):
  """One decode step of :func:`linear_attn`: returns ``(o_t [B, H, V], state)``."""
  phi = _feature_map(feature_map)
  values = _normalized_values(jnp.asarray(v_t)) if normalize else v_t
  q_t, k_t, values, state, scale = _check_step(q_t, k_t, values, state, scale)
  o_t, state = recurrent_step(phi(q_t), phi(k_t), values, None, None, state, scale)
  if normalize:
    o_t = _normalize_output(o_t)
  return o_t.astype(jnp.asarray(v_t).dtype), state


def retention_step(q_t, k_t, v_t, state, g_gamma=None, *, scale=None):
  """One decode step of :func:`retention` (``g_gamma [H]``, default RetNet's)."""
  q_t, k_t, v_t, state, scale = _check_step(q_t, k_t, v_t, state, scale)
  heads = q_t.shape[1]
  if g_gamma is None:
    g_gamma = jnp.asarray(retention_gammas(heads), jnp.float32)
  g_gamma = _check_gate("g_gamma", g_gamma, (heads,))
  g_t = jnp.broadcast_to(g_gamma.astype(jnp.float32), q_t.shape[:2])
  o_t, state = recurrent_step(q_t, k_t, v_t, g_t, None, state, scale)
  return o_t.astype(v_t.dtype), state


def simple_gla_step(q_t, k_t, v_t, g_t, state, *, scale=None):
  """One decode step of :func:`simple_gla` (``g_t [B, H]``)."""
  q_t, k_t, v_t, state, scale = _check_step(q_t, k_t, v_t, state, scale)
  g_t = _check_gate("g_t", g_t, q_t.shape[:2])
  o_t, state = recurrent_step(q_t, k_t, v_t, g_t, None, state, scale)
  return o_t.astype(v_t.dtype), state


def gla_step(q_t, k_t, v_t, g_t, state, *, scale=None):
  """One decode step of :func:`gla` (``g_t [B, H, K]``)."""
  q_t, k_t, v_t, state, scale = _check_step(q_t, k_t, v_t, state, scale)
  g_t = _check_gate("g_t", g_t, q_t.shape)
  o_t, state = recurrent_step(q_t, k_t, v_t, g_t, None, state, scale)
  return o_t.astype(v_t.dtype), state


def delta_rule_step(q_t, k_t, v_t, beta_t, state, *, use_qk_l2norm=False, scale=None):
  """One decode step of :func:`delta_rule` (``beta_t [B, H]``)."""
  q_t, k_t, v_t, state, scale = _check_step(q_t, k_t, v_t, state, scale)
  beta_t = _check_gate("beta_t", beta_t, q_t.shape[:2])
  if use_qk_l2norm:
    q_t, k_t = _l2norm(q_t), _l2norm(k_t)
  o_t, state = recurrent_step(q_t, k_t, v_t, None, beta_t, state, scale)
  return o_t.astype(v_t.dtype), state


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, *, use_qk_l2norm=False,
                          scale=None):
  """One decode step of :func:`gated_delta_rule` (``g_t, beta_t [B, H]``)."""
  q_t, k_t, v_t, state, scale = _check_step(q_t, k_t, v_t, state, scale)
  g_t = _check_gate("g_t", g_t, q_t.shape[:2])
  beta_t = _check_gate("beta_t", beta_t, q_t.shape[:2])
  if use_qk_l2norm:
    q_t, k_t = _l2norm(q_t), _l2norm(k_t)
  o_t, state = recurrent_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
  return o_t.astype(v_t.dtype), state

