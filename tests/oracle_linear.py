"""Float64 NumPy oracle of the linear-attention family, written from the definitions.

It imports nothing from attnlab. Every op is one token-by-token recurrence per head,
written literally as a transition matrix ``A_t [K, K]`` applied to the state::

    S'_{t-1} = 0 where a document starts at t (segment id changes), else S_{t-1}
    S_t      = A_t S'_{t-1} + c_t k_t v_t^T
    o_t      = scale q_t^T S_t

    linear_attn        A_t = I                                  c_t = 1
    retention          A_t = exp(g_gamma[h]) I                  c_t = 1
    simple_gla         A_t = exp(g_t) I                         c_t = 1
    gla                A_t = diag(exp(g_t))                     c_t = 1
    delta_rule         A_t = I - beta_t k_t k_t^T               c_t = beta_t
    gated_delta_rule   A_t = exp(g_t) (I - beta_t k_t k_t^T)    c_t = beta_t

with ``S_0`` the initial state (zeros by default) and ``scale`` defaulting to
``K ** -0.5``. ``normalize`` (linear_attn) appends a column of ones to v, so the last
state column is ``z_t = sum k``, and returns ``num / (den + 1e-6)``.

Gradients are backpropagation through time by hand, for the loss
``<o, dout> + <S_T, dfinal>``: with ``dS_t`` the loss's gradient w.r.t. ``S_t``::

    dS_t      += scale q_t do_t^T,            dq_t = scale S_t do_t
    dA_t       = dS_t S'_{t-1}^T,              dS'_{t-1} = A_t^T dS_t
    dk_t      += c_t dS_t v_t,   dv_t = c_t dS_t^T k_t,   dc_t = k_t^T dS_t v_t

and ``dA_t`` is pulled back to the gates: ``dg = sum(dA * A)`` (row sums for gla), and
through ``M = I - beta k k^T`` (``dM = exp(g) dA``): ``dbeta -= k^T dM k``,
``dk -= beta (dM + dM^T) k``. ``dS_{t-1} = dS'_{t-1}`` unless a document starts at t,
where it is zero; the gradient of the initial state is ``dS'_0``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

NORMALIZE_EPS = 1e-6
L2NORM_EPS = 1e-6


@dataclasses.dataclass
class Result:
  """Output ``[B, T, H, V]``, final state ``[B, H, K, V]`` and, when a cotangent was
  given, the gradients keyed by argument name (``q``, ``k``, ``v``, ``g``, ``beta``,
  ``g_gamma``, ``initial_state``), all float64."""

  out: np.ndarray
  final_state: np.ndarray
  grads: dict | None = None


def _f64(x):
  return None if x is None else np.asarray(x, np.float64)


# -------------------------------------------------------------------- feature maps
# Each: x -> (phi(x), phi'(x)).


def _identity(x):
  return x, np.ones_like(x)


def _relu(x):
  return np.maximum(x, 0.0), (x > 0).astype(np.float64)


def _elu_plus_one(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))), np.where(
      x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def softplus(x):
  """A feature map for tests of callables: ``log(1 + e^x)`` and its derivative."""
  return np.logaddexp(0.0, x), 1.0 / (1.0 + np.exp(-x))


FEATURE_MAPS: dict[str, Callable] = {
    "identity": _identity, "relu": _relu, "elu_plus_one": _elu_plus_one,
}


def _l2norm(x):
  """``x / sqrt(sum x^2 + eps)`` and its vector-Jacobian product."""
  norm = np.sqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)
  y = x / norm

  def vjp(dy):
    return (dy - y * (y * dy).sum(-1, keepdims=True)) / norm

  return y, vjp


def retention_gammas(num_heads):
  """RetNet's log decays ``log(1 - 2^(-5 - h))``."""
  return np.log(1.0 - 2.0 ** (-5.0 - np.arange(num_heads)))


def document_starts(segment_ids, batch, length):
  """bool ``[B, T]``: True where the segment id differs from the previous position."""
  starts = np.zeros((batch, length), bool)
  if segment_ids is not None:
    ids = np.asarray(segment_ids)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  return starts


# ----------------------------------------------------------------------- recurrence


def recurrence(q, k, v, g=None, beta=None, *, scale, initial_state=None,
               segment_ids=None, dout=None, dfinal=None):
  """The generic recurrence above on already-transformed q, k (float64).

  ``g``: None, ``[B, T, H]`` (scalar decay) or ``[B, T, H, K]`` (per key row), log space.
  ``beta``: None or ``[B, T, H]`` (turns on the delta rule). Returns
  ``(out, final_state, grads)``; grads (keys q, k, v, g, beta, initial_state) only when
  ``dout`` is given (``dfinal`` defaults to zero).
  """
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  eye = np.eye(key_dim)
  starts = document_starts(segment_ids, batch, length)
  state = (np.zeros((batch, heads, key_dim, value_dim)) if initial_state is None
           else np.array(initial_state, np.float64))

  def transition(t):
    """``A_t [B, H, K, K]``, ``M_t`` (the delta factor or None) and ``c_t [B, H]``."""
    if beta is None:
      m, c = None, np.ones((batch, heads))
      a = np.broadcast_to(eye, (batch, heads, key_dim, key_dim))
    else:
      kt, c = k[:, t], beta[:, t]
      m = eye - c[..., None, None] * kt[..., :, None] * kt[..., None, :]
      a = m
    if g is not None:
      decay = np.exp(g[:, t])
      a = a * (decay[..., None, None] if decay.ndim == 2 else decay[..., :, None])
    return a, m, c

  out = np.empty((batch, length, heads, value_dim))
  prevs, states = [], []
  for t in range(length):
    prev = np.where(starts[:, t, None, None, None], 0.0, state)
    a, _, c = transition(t)
    state = (np.einsum("bhij,bhjv->bhiv", a, prev)
             + c[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :])
    out[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], state)
    prevs.append(prev)
    states.append(state)
  if dout is None:
    return out, state, None

  grads = {name: np.zeros_like(x) for name, x in
           (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)) if x is not None}
  d_state = np.zeros_like(state) if dfinal is None else np.array(dfinal, np.float64)
  for t in reversed(range(length)):
    do = dout[:, t]
    grads["q"][:, t] = scale * np.einsum("bhkv,bhv->bhk", states[t], do)
    d_state = d_state + scale * q[:, t, :, :, None] * do[:, :, None, :]
    a, m, c = transition(t)
    kt, vt, prev = k[:, t], v[:, t], prevs[t]
    grads["k"][:, t] = c[..., None] * np.einsum("bhkv,bhv->bhk", d_state, vt)
    grads["v"][:, t] = c[..., None] * np.einsum("bhkv,bhk->bhv", d_state, kt)
    d_c = np.einsum("bhk,bhkv,bhv->bh", kt, d_state, vt)
    d_a = np.einsum("bhiv,bhjv->bhij", d_state, prev)
    if g is not None:
      per_row = (d_a * a).sum(-1)  # [B, H, K]
      grads["g"][:, t] = per_row if g.ndim == 4 else per_row.sum(-1)
    if beta is not None:
      d_m = d_a if g is None else d_a * np.exp(g[:, t])[..., None, None]
      grads["beta"][:, t] = d_c - np.einsum("bhi,bhij,bhj->bh", kt, d_m, kt)
      grads["k"][:, t] -= c[..., None] * np.einsum(
          "bhij,bhj->bhi", d_m + np.swapaxes(d_m, -1, -2), kt)
    d_state = np.einsum("bhij,bhiv->bhjv", a, d_state)
    d_state = np.where(starts[:, t, None, None, None], 0.0, d_state)
  grads["initial_state"] = d_state
  return out, state, grads


def _default_scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else scale


def _pull_back_qk(grads, q_vjp, k_vjp):
  if grads is not None:
    grads["q"] = q_vjp(grads["q"])
    grads["k"] = k_vjp(grads["k"])


# ---------------------------------------------------------------------------- ops


def linear_attn(q, k, v, *, normalize=False, feature_map="identity", scale=None,
                initial_state=None, segment_ids=None, dout=None, dfinal=None) -> Result:
  """``feature_map``: a name or an oracle-side callable ``x -> (phi(x), phi'(x))``."""
  q, k, v, dout = _f64(q), _f64(k), _f64(v), _f64(dout)
  phi = feature_map if callable(feature_map) else FEATURE_MAPS[feature_map]
  (fq, dfq), (fk, dfk) = phi(q), phi(k)
  values = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1) if normalize else v
  common = dict(scale=_default_scale(q, scale), initial_state=_f64(initial_state),
                segment_ids=segment_ids)
  out, final, grads = recurrence(fq, fk, values, **common)
  if normalize:
    num, den = out[..., :-1], out[..., -1:] + NORMALIZE_EPS
    out = num / den
    if dout is not None:
      dout = np.concatenate([dout / den, -(dout * num).sum(-1, keepdims=True) / den**2], -1)
  if dout is not None:
    _, _, grads = recurrence(fq, fk, values, dout=dout, dfinal=_f64(dfinal), **common)
  if grads is not None:
    grads["q"] = grads["q"] * dfq
    grads["k"] = grads["k"] * dfk
    if normalize:
      grads["v"] = grads["v"][..., :-1]
  return Result(out, final, grads)


def retention(q, k, v, g_gamma=None, *, scale=None, initial_state=None, segment_ids=None,
              dout=None, dfinal=None) -> Result:
  q = _f64(q)
  batch, length, heads, _ = q.shape
  gamma = retention_gammas(heads) if g_gamma is None else _f64(g_gamma)
  g = np.broadcast_to(gamma, (batch, length, heads)).copy()
  out, final, grads = recurrence(q, _f64(k), _f64(v), g, scale=_default_scale(q, scale),
                                 initial_state=_f64(initial_state), segment_ids=segment_ids,
                                 dout=_f64(dout), dfinal=_f64(dfinal))
  if grads is not None:
    grads["g_gamma"] = grads.pop("g").sum((0, 1))
    if g_gamma is None:
      del grads["g_gamma"]
  return Result(out, final, grads)


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, dout=None,
               dfinal=None) -> Result:
  q = _f64(q)
  return Result(*recurrence(q, _f64(k), _f64(v), _f64(g), scale=_default_scale(q, scale),
                            initial_state=_f64(initial_state), segment_ids=segment_ids,
                            dout=_f64(dout), dfinal=_f64(dfinal)))


def gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, dout=None,
        dfinal=None) -> Result:
  q = _f64(q)
  return Result(*recurrence(q, _f64(k), _f64(v), _f64(g), scale=_default_scale(q, scale),
                            initial_state=_f64(initial_state), segment_ids=segment_ids,
                            dout=_f64(dout), dfinal=_f64(dfinal)))


def gated_delta_rule(q, k, v, g, beta, *, use_qk_l2norm=False, scale=None,
                     initial_state=None, segment_ids=None, dout=None,
                     dfinal=None) -> Result:
  """``g=None`` gives the (ungated) delta rule."""
  q, k = _f64(q), _f64(k)
  scale = _default_scale(q, scale)
  q_vjp = k_vjp = lambda d: d
  if use_qk_l2norm:
    (q, q_vjp), (k, k_vjp) = _l2norm(q), _l2norm(k)
  out, final, grads = recurrence(q, k, _f64(v), _f64(g), _f64(beta), scale=scale,
                                 initial_state=_f64(initial_state), segment_ids=segment_ids,
                                 dout=_f64(dout), dfinal=_f64(dfinal))
  _pull_back_qk(grads, q_vjp, k_vjp)
  return Result(out, final, grads)


def delta_rule(q, k, v, beta, *, use_qk_l2norm=False, scale=None, initial_state=None,
               segment_ids=None, dout=None, dfinal=None) -> Result:
  return gated_delta_rule(q, k, v, None, beta, use_qk_l2norm=use_qk_l2norm, scale=scale,
                          initial_state=initial_state, segment_ids=segment_ids, dout=dout,
                          dfinal=dfinal)


OPS = {
    "linear_attn": linear_attn, "retention": retention, "simple_gla": simple_gla,
    "gla": gla, "delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule,
}
