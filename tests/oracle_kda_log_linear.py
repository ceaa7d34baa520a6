"""Float64 NumPy oracles of Kimi Delta Attention and log-linear attention, written from
the papers' equations. Imports nothing from attnlab.

**KDA** (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture",
the KDA update rule ``S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t
v_t^T``, ``o_t = S_t^T q_t``; here ``alpha_t = exp(g_t)`` and the output carries
``scale``), per head, token by token, with the transition written out as a matrix::

    S'_{t-1} = 0 where a document starts at t (the segment id changes), else S_{t-1}
    S_t      = A_t S'_{t-1} + beta_t k_t v_t^T,    A_t = M_t D_t
    M_t      = I - beta_t k_t k_t^T,               D_t = diag(exp(g_t))
    o_t      = scale q_t^T S_t

Gradients of ``<o, dout> + <S_T, dfinal>`` by backpropagation through time::

    dS_t += scale q_t do_t^T                     dq_t = scale S_t do_t
    dA_t  = dS_t S'_{t-1}^T,   dM_t = dA_t D_t,  dD_t = M_t^T dA_t
    dg_t  = diag(dD_t) * exp(g_t)
    dbeta_t = k_t^T dS_t v_t - k_t^T dM_t k_t
    dk_t  = beta_t dS_t v_t - beta_t (dM_t + dM_t^T) k_t,   dv_t = beta_t dS_t^T k_t
    dS'_{t-1} = A_t^T dS_t   (zero across a document start; at t = 0 it is d initial_state)

**Log-linear attention** (Guo et al. 2025, "Log-Linear Attention": §3.1, the Fenwick-tree
buckets and the hierarchical matrix ``M^H``; §3.3, log-linear Mamba-2 ``O = (Q K^T ⊙
M^S ⊙ M^H) V``), the masked matrix form per head::

    O     = scale (Q K^T ⊙ M^S ⊙ M^H) V
    M^S_ts = exp(sum_{s<u<=t} g_u)  for s <= t in the same document, both kept (else 0)
    M^H_ts = lambda_t^{l(t,s)}

with ``p`` the position in the document and the bucket of level ``l`` of a query at ``p``
taken from §3.1's construction: level 0 is ``{p}``; for ``l >= 1``, when bit ``l-1`` of
``p`` is set, the ``2^(l-1)`` positions ``[p - p mod 2^(l-1) - 2^(l-1), p - p mod
2^(l-1))``, else empty. Tokens at ``t >= lengths[b]`` are dropped (output 0). The final
state of the last kept token ``n`` is ``F^l = sum_{s in bucket l of n} M^S_ns k_s v_s^T``.
Gradients of ``<O, dout> + sum_l <F^l, dfinal^l>`` with ``A = scale Q K^T``, ``P = M^S``,
``W = P ⊙ M^H``, ``E_ts = dout_t . v_s``::

    dq = scale (E ⊙ W) K,  dk = scale (E ⊙ W)^T Q,  dv = (A ⊙ W)^T dout
    dlambda_t^l = sum_{s: l(t,s) = l} E_ts A_ts P_ts
    dP = E ⊙ A ⊙ M^H  (+ k_s^T dfinal^l v_s on row n),   dg_u = sum_{s < u <= t} dP_ts P_ts

and the final state's own terms ``dk_s += P_ns dfinal^l v_s``, ``dv_s += P_ns dfinal^l^T
k_s``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

L2NORM_EPS = 1e-6


@dataclasses.dataclass
class Result:
  """Output ``[B, T, H, V]``, final state and, when a cotangent was given, the gradients
  keyed by argument name, all float64."""

  out: np.ndarray
  final_state: np.ndarray
  grads: dict | None = None


def _f64(x):
  return None if x is None else np.asarray(x, np.float64)


def document_starts(segment_ids, batch, length):
  """bool ``[B, T]``: True where the segment id differs from the previous position."""
  starts = np.zeros((batch, length), bool)
  if segment_ids is not None:
    ids = np.asarray(segment_ids)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  return starts


def _l2norm(x):
  """``x / sqrt(sum x^2 + eps)`` and its vector-Jacobian product."""
  norm = np.sqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)
  y = x / norm

  def vjp(dy):
    return (dy - y * (y * dy).sum(-1, keepdims=True)) / norm

  return y, vjp


# ------------------------------------------------------------------------------ KDA


def kda(q, k, v, g, beta, *, use_qk_l2norm=False, scale=None, initial_state=None,
        segment_ids=None, dout=None, dfinal=None) -> Result:
  """KDA as above. ``g [B, T, H, K]``, ``beta [B, T, H]``. Gradients (q, k, v, g, beta,
  initial_state) only when ``dout`` is given (``dfinal`` defaults to zero)."""
  q, k, v, g, beta = (_f64(x) for x in (q, k, v, g, beta))
  dout, dfinal = _f64(dout), _f64(dfinal)
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  scale = key_dim ** -0.5 if scale is None else scale
  q_vjp = k_vjp = lambda d: d
  if use_qk_l2norm:
    (q, q_vjp), (k, k_vjp) = _l2norm(q), _l2norm(k)
  eye = np.eye(key_dim)
  starts = document_starts(segment_ids, batch, length)
  state = (np.zeros((batch, heads, key_dim, value_dim)) if initial_state is None
           else np.array(initial_state, np.float64))

  def factors(t):
    kt, bt = k[:, t], beta[:, t]
    m = eye - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
    d = np.exp(g[:, t])                                      # the diagonal of D_t
    return m, d, m * d[..., None, :]                         # A = M D

  out = np.empty((batch, length, heads, value_dim))
  prevs, states = [], []
  for t in range(length):
    prev = np.where(starts[:, t, None, None, None], 0.0, state)
    _, _, a = factors(t)
    state = (np.einsum("bhij,bhjv->bhiv", a, prev)
             + beta[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t, :, None, :])
    out[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], state)
    prevs.append(prev)
    states.append(state)
  if dout is None:
    return Result(out, state)

  grads = {name: np.zeros_like(x) for name, x in
           (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta))}
  d_state = np.zeros_like(state) if dfinal is None else np.array(dfinal)
  for t in reversed(range(length)):
    do, kt, vt, bt, prev = dout[:, t], k[:, t], v[:, t], beta[:, t], prevs[t]
    grads["q"][:, t] = scale * np.einsum("bhkv,bhv->bhk", states[t], do)
    d_state = d_state + scale * q[:, t, :, :, None] * do[:, :, None, :]
    m, d, a = factors(t)
    d_a = np.einsum("bhiv,bhjv->bhij", d_state, prev)
    d_m = d_a * d[..., None, :]
    d_d = np.einsum("bhji,bhjk->bhik", m, d_a)
    grads["g"][:, t] = np.einsum("bhii->bhi", d_d) * d
    dsv = np.einsum("bhkv,bhv->bhk", d_state, vt)
    grads["beta"][:, t] = (np.einsum("bhk,bhk->bh", kt, dsv)
                           - np.einsum("bhi,bhij,bhj->bh", kt, d_m, kt))
    grads["k"][:, t] = bt[..., None] * (
        dsv - np.einsum("bhij,bhj->bhi", d_m + np.swapaxes(d_m, -1, -2), kt))
    grads["v"][:, t] = bt[..., None] * np.einsum("bhkv,bhk->bhv", d_state, kt)
    d_state = np.einsum("bhij,bhiv->bhjv", a, d_state)
    d_state = np.where(starts[:, t, None, None, None], 0.0, d_state)
  grads["initial_state"] = d_state
  grads["q"], grads["k"] = q_vjp(grads["q"]), k_vjp(grads["k"])
  return Result(out, state, grads)


# ----------------------------------------------------------------------- log-linear


def document_positions(segment_ids, batch, length):
  """``[B, T]`` int: each token's position in its document."""
  starts = document_starts(segment_ids, batch, length)
  pos = np.zeros((batch, length), np.int64)
  for b in range(batch):
    for t in range(1, length):
      pos[b, t] = 0 if starts[b, t] else pos[b, t - 1] + 1
  return pos


def bucket_level(p_query, p_key):
  """The level of key position ``p_key`` for a query at ``p_query`` (§3.1's buckets), or
  -1 when the key is after the query."""
  if p_key == p_query:
    return 0
  level = 1
  while (1 << (level - 1)) <= p_query:
    size = 1 << (level - 1)
    if p_query & size:
      end = p_query - p_query % size
      if end - size <= p_key < end:
        return level
    level += 1
  return -1


def log_linear(q, k, v, g, level_weights, *, scale=None, segment_ids=None, lengths=None,
               dout=None, dfinal=None) -> Result:
  """Log-linear attention (simple-GLA core) as above. ``g [B, T, H]``, ``level_weights
  [B, T, H, L]``; final state ``[B, H, L, K, V]``. Gradients (q, k, v, g,
  level_weights) only when ``dout`` is given."""
  q, k, v, g, lam = (_f64(x) for x in (q, k, v, g, level_weights))
  dout, dfinal = _f64(dout), _f64(dfinal)
  batch, length, heads, key_dim = q.shape
  num_levels = lam.shape[-1]
  scale = key_dim ** -0.5 if scale is None else scale
  pos = document_positions(segment_ids, batch, length)
  doc = np.cumsum(document_starts(segment_ids, batch, length), axis=1)
  kept_len = (np.full(batch, length) if lengths is None else np.asarray(lengths))
  out = np.zeros((batch, length, heads, v.shape[-1]))
  final = np.zeros((batch, heads, num_levels, key_dim, v.shape[-1]))
  grads = None
  if dout is not None:
    grads = {name: np.zeros_like(x) for name, x in
             (("q", q), ("k", k), ("v", v), ("g", g), ("level_weights", lam))}
  for b in range(batch):
    n = kept_len[b] - 1
    level = np.full((length, length), -1)
    for t in range(kept_len[b]):
      for s in range(t + 1):
        if doc[b, s] == doc[b, t]:
          level[t, s] = bucket_level(pos[b, t], pos[b, s])
    allowed = level >= 0
    for h in range(heads):
      cum = np.cumsum(g[b, :, h])
      p_mat = np.where(allowed, np.exp(np.where(allowed, cum[:, None] - cum[None, :], 0.0)),
                       0.0)
      lam_mat = np.where(allowed, np.take_along_axis(lam[b, :, h], np.maximum(level, 0),
                                                     axis=1), 0.0)
      a_mat = scale * q[b, :, h] @ k[b, :, h].T
      w_mat = p_mat * lam_mat
      out[b, :, h] = (a_mat * w_mat) @ v[b, :, h]
      for s in range(length):
        if level[n, s] >= 0:
          final[b, h, level[n, s]] += p_mat[n, s] * np.outer(k[b, s, h], v[b, s, h])
      if dout is None:
        continue
      e_mat = dout[b, :, h] @ v[b, :, h].T
      grads["q"][b, :, h] = scale * (e_mat * w_mat) @ k[b, :, h]
      grads["k"][b, :, h] = scale * (e_mat * w_mat).T @ q[b, :, h]
      grads["v"][b, :, h] = (a_mat * w_mat).T @ dout[b, :, h]
      for t in range(length):
        for s in range(length):
          if allowed[t, s]:
            grads["level_weights"][b, t, h, level[t, s]] += (
                e_mat[t, s] * a_mat[t, s] * p_mat[t, s])
      d_p = e_mat * a_mat * lam_mat
      if dfinal is not None:
        for s in range(length):
          if level[n, s] >= 0:
            d_f = dfinal[b, h, level[n, s]]
            grads["k"][b, s, h] += p_mat[n, s] * d_f @ v[b, s, h]
            grads["v"][b, s, h] += p_mat[n, s] * d_f.T @ k[b, s, h]
            d_p[n, s] += k[b, s, h] @ d_f @ v[b, s, h]
      x_mat = d_p * p_mat
      for u in range(length):
        grads["g"][b, u, h] = x_mat[u:, :u].sum()
  return Result(out, final, grads)


OPS = {"kda": kda, "log_linear_attention": log_linear}
