"""Float64 oracle of the diagonal state-space recurrences, written from the papers.

It imports nothing from attnlab and never scans: each recurrence is unrolled into its
closed form, a sum over the earlier tokens ``s <= t`` of the same document
(``mask[t, s]``), with the products of the per-token decays written out as exponentials
of sums, plus the initial state carried to the tokens of the first document.

    mamba     h_t = sum_s exp(A sum_{r=s+1..t} delta_r) delta_s B_s x_s
                    + exp(A sum_{r<=t} delta_r) h_0          (unrolled from Gu & Dao 2023,
              y_t = C_t^T h_t + D x_t                         eq. 2a-2b with Abar = exp(delta
                                                              A) (eq. 4), Bbar = delta B)
    rg_lru    a_t = sigmoid(Lambda) ** (c r_t)               (De et al. 2024, eq. 3)
              h_t = sum_s (prod_{r=s+1..t} a_r) sqrt(1 - a_s^2) i_s x_s
                    + (prod_{r<=t} a_r) h_0                  (unrolled eq. 4)
    mega_ema  y_t = sum_s K_{t-s} x_s + eta^T q^{t+1} h_0,    (Ma et al. 2022, §3.1: the
              K_k = sum_n eta_n alpha_n beta_n q_n^k,         EMA of eq. 3 as the
              q = 1 - alpha delta                             convolution with its kernel)
              non-causal: sum_{s<=t} K_{t-s} x_s + sum_{s>=t} K'_{s-t} x_s
              final state h_T = sum_s q^{T-1-s} alpha beta x_s + q^T h_0 (unrolled eq. 3)

Gradients come from ``jax.vjp`` of the same float64 code (:func:`grads`), with x64
switched on only inside :func:`float64`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


def documents(segment_ids, batch, length):
  """``[B, T]`` int: the index of each token's document (0 for the first)."""
  if segment_ids is None:
    return np.zeros((batch, length), np.int64)
  ids = np.asarray(segment_ids)
  return np.concatenate([np.zeros((batch, 1), np.int64),
                         np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)


def masks(segment_ids, batch, length):
  """``(past [B, T, S], future [B, T, S], first [B, T])`` float64: s <= t in the same
  document, s >= t in the same document, token t in the first document."""
  docs = documents(segment_ids, batch, length)
  same = docs[:, :, None] == docs[:, None, :]
  lower = np.tril(np.ones((length, length), bool))[None]
  return ((same & lower).astype(np.float64), (same & lower.transpose(0, 2, 1)).astype(
      np.float64), (docs == 0).astype(np.float64))


def _masked_exp(exponent, m):
  """``exp(exponent) * m`` without evaluating exp where m = 0 (its exponent may be
  large and positive there)."""
  return jnp.exp(jnp.where(m > 0, exponent, 0.0)) * m


def mamba(x, delta, A, B, C, D, initial_state, *, segment_ids):
  """``(y [B, T, D], h_T [B, D, N])``; ``B, C`` are ``[B, T, G, N]``."""
  batch, length, channels = x.shape
  past, _, first = masks(segment_ids, batch, length)
  per_group = channels // B.shape[2]
  b_ch = jnp.repeat(B, per_group, axis=2)  # [B, T, D, N]: the group of each channel
  c_ch = jnp.repeat(C, per_group, axis=2)
  total = jnp.cumsum(delta, axis=1)  # sum_{r<=t} delta_r
  between = total[:, :, None] - total[:, None, :]  # sum_{r=s+1..t} delta_r [B, T, S, D]
  m = past[..., None, None]
  decay = _masked_exp(between[..., None] * A[None, None, None], m)  # [B, T, S, D, N]
  h = jnp.einsum("btsdn,bsd,bsdn,bsd->btdn", decay, delta, b_ch, x)
  carried = jnp.exp(total[..., None] * A[None, None])  # [B, T, D, N]
  h = h + carried * initial_state[:, None] * first[..., None, None]
  y = jnp.einsum("btdn,btdn->btd", c_ch, h) + D[None, None] * x
  return y, h[:, -1]


def rg_lru(x, gate_r, gate_i, lam, initial_state, *, segment_ids, c=8.0):
  """``(y [B, T, D], h_T [B, D])``."""
  batch, length, _ = x.shape
  past, _, first = masks(segment_ids, batch, length)
  a_t = jax.nn.sigmoid(lam)[None, None] ** (c * gate_r)
  log_prod = jnp.cumsum(jnp.log(a_t), axis=1)  # log prod_{r<=t} a_r
  between = log_prod[:, :, None] - log_prod[:, None, :]
  w = _masked_exp(between, past[..., None])  # prod_{r=s+1..t} a_r, [B, T, S, D]
  h = jnp.einsum("btsd,bsd->btd", w, jnp.sqrt(1.0 - a_t ** 2) * gate_i * x)
  h = h + jnp.exp(log_prod) * initial_state[:, None] * first[..., None]
  return h, h[:, -1]


def _ema_kernel_matrix(alpha, delta, beta, eta, m, lags):
  """``[B, T, S, D]``: ``K_{lag(t, s)}`` where m, else 0."""
  q = 1.0 - alpha * delta  # [D, N]
  powers = q[None, None, None] ** jnp.where(m > 0, lags, 0)[..., None, None]  # [B, T, S, D, N]
  return jnp.einsum("dn,btsdn->btsd", eta * alpha * beta, powers) * m[..., None]


def mega_ema(x, alpha, delta, beta, eta, initial_state, *, segment_ids):
  """Causal: ``(y [B, T, D], h_T [B, D, N])``."""
  batch, length, _ = x.shape
  past, _, first = masks(segment_ids, batch, length)
  t = np.arange(length)
  lags = np.broadcast_to(t[:, None] - t[None, :], past.shape)
  y = jnp.einsum("btsd,bsd->btd", _ema_kernel_matrix(alpha, delta, beta, eta, past, lags), x)
  q = 1.0 - alpha * delta
  carried = q[None] ** (t + 1.0)[:, None, None]  # q^{t+1}: [T, D, N]
  y = y + jnp.einsum("tdn,dn,bdn->btd", carried, eta, initial_state) * first[..., None]
  # h_T of the last document: the last row of the unrolled eq. 3.
  last = past[:, -1]  # [B, S]
  weights = q[None] ** (length - 1.0 - t)[:, None, None]  # q^{T-1-s}: [S, D, N]
  h = jnp.einsum("bs,sdn,dn,bsd->bdn", last, weights, alpha * beta, x)
  h = h + q[None] ** float(length) * initial_state * first[:, -1][:, None, None]
  return y, h


def mega_ema_bidirectional(x, alpha, delta, beta, eta, *, segment_ids):
  """Non-causal, parameters ``[2, D, N]`` (forward, backward): ``y [B, T, D]``."""
  batch, length, _ = x.shape
  past, future, _ = masks(segment_ids, batch, length)
  t = np.arange(length)
  lags = t[:, None] - t[None, :]
  fwd = _ema_kernel_matrix(alpha[0], delta[0], beta[0], eta[0], past,
                           np.broadcast_to(lags, past.shape))
  bwd = _ema_kernel_matrix(alpha[1], delta[1], beta[1], eta[1], future,
                           np.broadcast_to(-lags, past.shape))
  return jnp.einsum("btsd,bsd->btd", fwd + bwd, x)


def grads(fn, diff: dict, dout, **static):
  """``(out, {name: d<out, dout>/d name})`` of ``fn(**diff, **static)`` in float64;
  ``out`` and ``dout`` are matching pytrees of arrays."""
  with float64():
    to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    diff = {n: to64(x) for n, x in diff.items()}
    dout = jax.tree.map(to64, dout)

    def out_and_grads(diff, dout):
      out, vjp = jax.vjp(lambda d: fn(**d, **static), diff)
      return out, vjp(dout)[0]

    out, g = jax.jit(out_and_grads)(diff, dout)
    return jax.tree.map(np.asarray, out), {n: np.asarray(x) for n, x in g.items()}
