"""Per-chunk math of gated linear attention, on values inside a Mosaic TPU kernel.

The kernels in ``chunked_linear.py`` load one chunk of ``C`` tokens at a time and call the
functions here on plain arrays (time on sublanes, features on lanes), so the same code
also runs outside Pallas. Per head, with ``S`` the float32 state ``[K, V]`` entering the
chunk and log gates ``g`` (a document start inside the chunk is a gate of ``-inf``)::

    o_t   = scale (q_t^T diag(e^{b_t}) S + sum_{s<=t} sum_k q_tk k_sk e^{sum_{s<u<=t} g_uk} v_s)
    S_out = diag(e^{sum_u g_u}) S + sum_s (k_s * e^{sum_{u>s} g_u}) v_s^T

with ``b_t = sum_{u<=t} g_u`` (GLA, Yang et al. 2023, §4; a scalar gate is the same with
one decay for every k). Every exponent is computed as a **sum of gates over its range**,
never as a difference of cumulative sums: with gates of -20 per token a difference of
two sums of ~1000 loses the small decays of nearby pairs, and with them the gate
gradient, which the tests check at ~1e-5. The sums come from prefix scans (log2 steps of
``roll`` + add along sublanes), so they are exact up to a few ulps of the terms they add.
Since the gates are <= 0 every exponent is <= 0: ``exp`` never overflows.

* Scalar gate (simple GLA): the pair decay ``[C, C]`` is one sublane scan of the gates
  spread over the pairs (Mamba-2's segment sum), and the scores ``(q k^T) * decay`` one
  matrix product.
* Per-channel gate (GLA): the decay sits inside the dot product. Secondary chunking
  (GLA §4.2) in sub-chunks of 16: a pair in different sub-chunks is split at the last
  position ``r`` before the query's sub-chunk, ``q_t e^{sum_{r<u<=t} g}`` times
  ``k_s e^{sum_{s<u<=r} g}`` (both factors <= 1), one matrix product per sub-chunk; a pair
  inside a sub-chunk is computed lag by lag on the VPU, its exponent a running sum of
  the gates it spans.

Gate gradients avoid cancellation the same way: a pair ``(t, s)`` contributes its
``P_ts = dA_ts A_ts`` (per channel) to exactly the gates ``s < u <= t`` it spans, summed
by scans over the pair's range; the diagonal (exponent 0) contributes nothing. The
"row sums minus column sums, then a reverse cumulative sum" shortcut would subtract
O(1) diagonal terms to get an ``e^{-20}`` result.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

SUB_CHUNK = 16   # GLA's secondary chunk; also the bf16 sublane tile, so slices stay aligned

_F32 = jnp.float32


# ------------------------------------------------------------------------- primitives


def dot(a, b):
  """``a @ b`` with float32 accumulation (float32 operands at full precision)."""
  precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32,
                         precision=precision)


def dot_t(a, b):
  """``a @ b^T`` with float32 accumulation."""
  precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32,
                         precision=precision)


def t_dot(a, b, dtype):
  """``a^T @ b`` for a float32 ``a``: an explicit 2-D transpose, then a plain product in
  ``dtype`` (Mosaic transposes 32-bit tiles; a transposed-lhs contraction is avoided)."""
  return dot(a.T.astype(dtype), b.astype(dtype))


def rows_iota(n, width=1):
  return lax.broadcasted_iota(jnp.int32, (n, width), 0)


def cols_iota(n, height=1):
  return lax.broadcasted_iota(jnp.int32, (height, n), 1)


def shift_down(x, n):
  """``y[i] = x[i - n]`` along axis 0, zeros in the first ``n`` rows."""
  if n == 0:
    return x
  rolled = pltpu.roll(x, n, 0)
  return jnp.where(rows_iota(x.shape[0], x.shape[1]) >= n, rolled, 0.0)


def shift_up(x, n):
  """``y[i] = x[i + n]`` along axis 0, zeros in the last ``n`` rows."""
  if n == 0:
    return x
  rows = x.shape[0]
  rolled = pltpu.roll(x, rows - n, 0)
  return jnp.where(rows_iota(rows, x.shape[1]) < rows - n, rolled, 0.0)


def cumsum(x, *, reverse=False, exclusive=False, segment=None):
  """Prefix sums along axis 0 (suffix sums if ``reverse``), restarting every ``segment``
  rows (default: one segment). Hillis-Steele: ``log2(segment)`` roll-and-add steps, each
  output a sum of exactly the terms of its range. ``exclusive`` leaves the own row out."""
  rows = x.shape[0]
  segment = segment or rows
  local = rows_iota(rows, x.shape[1])
  if segment != rows:
    local = lax.rem(local, segment)
  if reverse:
    local = segment - 1 - local
  step = 1
  while step < segment:
    shifted = shift_up(x, step) if reverse else shift_down(x, step)
    x = x + jnp.where(local >= step, shifted, 0.0)
    step *= 2
  if exclusive:
    shifted = shift_up(x, 1) if reverse else shift_down(x, 1)
    x = jnp.where(local >= 1, shifted, 0.0)
  return x


def row_to_col(x):
  """``(1, n) -> (n, 1)`` by a masked lane reduction (no relayout through memory)."""
  n = x.shape[1]
  eye = rows_iota(n, n) == cols_iota(n, n)
  return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


def col_to_row(x):
  """``(n, 1) -> (1, n)`` by a masked sublane reduction."""
  n = x.shape[0]
  eye = rows_iota(n, n) == cols_iota(n, n)
  return jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True)


def _causal(n):
  return rows_iota(n, n) >= cols_iota(n, n)


def _strict(n):
  return rows_iota(n, n) > cols_iota(n, n)


# ---------------------------------------------------------------------- scalar gate


def scalar_decays(g_row):
  """From the chunk's gates ``(1, C)``: the pair decay ``[C, C]`` (``e^{sum_{s<u<=t} g}``
  on and below the diagonal, 0 above), ``e^{b}`` (``(C, 1)``, gates up to and including
  t), ``e^{a}`` (``(C, 1)``, gates after s) and ``e^{G}`` (``(1, 1)``, all gates)."""
  g = row_to_col(g_row)
  chunk = g.shape[0]
  spread = jnp.where(_strict(chunk), g, 0.0)          # [u, s] = g_u for u > s
  pair = cumsum(spread)                                # [t, s] = sum_{s<u<=t} g_u
  decay = jnp.where(_causal(chunk), jnp.exp(pair), 0.0)
  into = jnp.exp(cumsum(g))
  out_of = jnp.exp(cumsum(g, reverse=True, exclusive=True))
  total = jnp.exp(jnp.sum(g, axis=0, keepdims=True))
  return decay, into, out_of, total


def scalar_state_update(k, v, g_row, state):
  """The state leaving the chunk: ``e^G S + (k * e^a)^T v``."""
  g = row_to_col(g_row)
  out_of = jnp.exp(cumsum(g, reverse=True, exclusive=True))
  total = jnp.exp(jnp.sum(g, axis=0, keepdims=True))
  return total * state + t_dot(k.astype(_F32) * out_of, v, v.dtype)


def scalar_forward(q, k, v, g_row, state, scale):
  """One chunk of simple GLA. ``q, k [C, K]``, ``v [C, V]`` (input dtype), ``g_row (1, C)``
  float32, ``state [K, V]`` float32. Returns ``(o [C, V], state_out [K, V])``, float32."""
  io = q.dtype
  decay, into, out_of, total = scalar_decays(g_row)
  scores = dot_t(q, k) * decay
  q_in = (q.astype(_F32) * into).astype(io)
  o = dot(scores.astype(io), v) + dot(q_in, state.astype(io))
  state_out = total * state + t_dot(k.astype(_F32) * out_of, v, io)
  return scale * o, state_out


def scalar_backward(q, k, v, g_row, state, d_o, d_state, scale):
  """Gradients of one simple-GLA chunk. ``state`` enters the chunk, ``d_state`` is the
  gradient of the state leaving it, ``d_o [C, V]`` of its output. Returns ``(dq, dk, dv,
  dg_row (1, C), d_state_in)``, float32."""
  io = q.dtype
  chunk = q.shape[0]
  decay, into, out_of, total = scalar_decays(g_row)
  d_o = (scale * d_o.astype(_F32)).astype(io)
  state_io, d_state_io = state.astype(io), d_state.astype(io)
  q32, k32 = q.astype(_F32), k.astype(_F32)

  scores = dot_t(q, k) * decay                          # A = (q k^T) * decay
  d_scores = dot_t(d_o, v)                              # dA = dO v^T
  d_qk = d_scores * decay                               # 0 above the diagonal
  dq_in = dot_t(d_o, state_io)                          # d(q e^b) = dO S^T
  dk_out = dot_t(v, d_state_io)                         # d(k e^a) = v dS^T
  dq = dot(d_qk.astype(io), k) + into * dq_in
  dk = t_dot(d_qk, q, io) + out_of * dk_out
  k_out = k32 * out_of
  dv = t_dot(scores, d_o, io) + dot(k_out.astype(io), d_state_io)

  # A pair (t, s), s < t, spans the gates s < u <= t: dg_u += sum of dA * A over the
  # pairs with s < u <= t. ``below[u, s]`` sums rows t >= u; keep the columns s < u.
  pair = jnp.where(_strict(chunk), d_scores * scores, 0.0)
  below = cumsum(pair, reverse=True)
  spanned = jnp.sum(jnp.where(_strict(chunk), below, 0.0), axis=1, keepdims=True)
  d_into = jnp.sum(q32 * into * dq_in, axis=1, keepdims=True)     # d b_t
  d_out_of = jnp.sum(k_out * dk_out, axis=1, keepdims=True)      # d a_s
  d_total = total * jnp.sum(state * d_state, keepdims=True)
  dg = (spanned + cumsum(d_into, reverse=True) + cumsum(d_out_of, exclusive=True)
        + d_total)
  d_state_in = total * d_state + t_dot(q32 * into, d_o, io)
  return dq, dk, dv, col_to_row(dg), d_state_in


# --------------------------------------------------------------------- vector gate


class _Split:
  """Sub-chunk bookkeeping of one chunk of per-channel gates ``g [C, K]`` (float32)."""

  def __init__(self, g):
    self.g = g
    self.chunk = g.shape[0]
    self.size = min(SUB_CHUNK, self.chunk)
    self.count = self.chunk // self.size
    rows = rows_iota(self.chunk)
    self.local = lax.rem(rows, self.size) if self.count > 1 else rows   # t mod L
    self.index = lax.div(rows, self.size) if self.count > 1 else None   # t // L
    # Sums of the gates from the sub-chunk's start to t, and from s + 1 to its end.
    self.within_prefix = cumsum(g, segment=self.size)
    self.within_suffix = cumsum(g, reverse=True, exclusive=True, segment=self.size)
    self.q_factor = jnp.exp(self.within_prefix)     # e^{sum_{r<u<=t} g}, r before t's sub

  def key_exponents(self):
    """Yield ``(i, X_i)`` for sub-chunks ``i >= 1``: ``X_i[s] = sum_{s<u<iL} g_u`` for
    ``s < iL`` and ``-inf`` below, accumulated as sums of whole sub-chunk totals."""
    exponent = jnp.full(self.g.shape, -jnp.inf, _F32)
    for i in range(1, self.count):
      previous = self.index == i - 1
      total = jnp.sum(jnp.where(previous, self.g, 0.0), axis=0, keepdims=True)
      exponent = jnp.where(previous, self.within_suffix, exponent + total)
      yield i, exponent

  def rows(self, x, i):
    return x[i * self.size:(i + 1) * self.size]


def _lag_exponents(split):
  """Yield ``(lag, E, valid)`` for lags ``1..L-1``: ``E[t] = sum_{t-lag<u<=t} g_u`` built as
  a running sum, ``valid`` the rows whose pair ``(t, t - lag)`` lies in one sub-chunk."""
  exponent = split.g
  for lag in range(1, split.size):
    if lag > 1:
      exponent = exponent + shift_down(split.g, lag - 1)
    yield lag, exponent, split.local >= lag


def _vector_scores(q, k, split, io):
  """``A_ts = sum_k q_tk k_sk e^{sum_{s<u<=t} g_uk}`` for ``s <= t``, 0 above; ``[C, C]``
  float32 from float32 ``q, k [C, K]`` (the cross-sub-chunk products in ``io``)."""
  chunk = split.chunk
  rows, cols = rows_iota(chunk, chunk), cols_iota(chunk, chunk)
  scores = jnp.where(rows == cols, jnp.sum(q * k, axis=1, keepdims=True), 0.0)
  for lag, exponent, valid in _lag_exponents(split):
    band = jnp.sum(q * shift_down(k, lag) * jnp.exp(exponent), axis=1, keepdims=True)
    scores = scores + jnp.where((rows - cols == lag) & valid, band, 0.0)
  if split.count == 1:
    return scores
  q_rel = q * split.q_factor
  blocks = [jnp.zeros((split.size, chunk), _F32)]
  for i, exponent in split.key_exponents():
    k_rel = k * jnp.exp(exponent)
    blocks.append(dot_t(split.rows(q_rel, i).astype(io), k_rel.astype(io)))
  return scores + jnp.concatenate(blocks, axis=0)


def vector_state_update(k, v, g, state):
  """The state leaving the chunk: ``diag(e^G) S + (k * e^a)^T v``; ``g [C, K]`` float32."""
  out_of = jnp.exp(cumsum(g, reverse=True, exclusive=True))
  total = row_to_col(jnp.exp(jnp.sum(g, axis=0, keepdims=True)))   # (K, 1)
  return total * state + t_dot(k.astype(_F32) * out_of, v, v.dtype)


def vector_forward(q, k, v, g, state, scale):
  """One chunk of GLA. ``q, k [C, K]``, ``v [C, V]`` (input dtype), ``g [C, K]`` float32,
  ``state [K, V]`` float32. Returns ``(o [C, V], state_out [K, V])``, float32."""
  io = q.dtype
  q32, k32 = q.astype(_F32), k.astype(_F32)
  split = _Split(g)
  scores = _vector_scores(q32, k32, split, io)
  q_in = (q32 * jnp.exp(cumsum(g))).astype(io)
  o = dot(scores.astype(io), v) + dot(q_in, state.astype(io))
  return scale * o, vector_state_update(k, v, g, state)


def vector_backward(q, k, v, g, state, d_o, d_state, scale):
  """Gradients of one GLA chunk (arguments as ``scalar_backward``, ``g [C, K]``).
  Returns ``(dq, dk, dv, dg [C, K], d_state_in)``, float32."""
  io = q.dtype
  chunk = q.shape[0]
  q32, k32 = q.astype(_F32), k.astype(_F32)
  split = _Split(g)
  d_o = (scale * d_o.astype(_F32)).astype(io)
  state_io, d_state_io = state.astype(io), d_state.astype(io)
  rows, cols = rows_iota(chunk, chunk), cols_iota(chunk, chunk)

  scores = _vector_scores(q32, k32, split, io)
  d_scores = jnp.where(rows >= cols, dot_t(d_o, v), 0.0)         # dA = dO v^T

  # Pairs inside a sub-chunk, lag by lag: P = dA_ts q_t k_s e^{E} per channel spans the
  # ``lag`` gates (t - lag, t]; spanned[u] = sum_lag sum_{j<lag} P_lag[u + j] is gathered
  # from the longest lag down, so each P is added once per gate it spans.
  diag = jnp.sum(jnp.where(rows == cols, d_scores, 0.0), axis=1, keepdims=True)
  dq, dk = diag * k32, diag * q32
  spans = []
  for lag, exponent, valid in _lag_exponents(split):
    band = jnp.sum(jnp.where(rows - cols == lag, d_scores, 0.0), axis=1, keepdims=True)
    weight = jnp.where(valid, band, 0.0) * jnp.exp(exponent)
    k_lag = shift_down(k32, lag)
    dq = dq + weight * k_lag
    dk = dk + shift_up(weight * q32, lag)
    spans.append(weight * q32 * k_lag)
  dg = jnp.zeros_like(g)
  running = jnp.zeros_like(g)
  for lag in range(len(spans), 0, -1):
    running = running + spans[lag - 1]
    dg = dg + shift_up(running, lag - 1)

  # Pairs across sub-chunks, split at r = iL - 1: the key factor spans the gates
  # s < u <= r (gradient to u < iL from the keys s < u), the query factor r < u <= t
  # (gradient to u from the queries t >= u of sub-chunk i).
  if split.count > 1:
    q_rel = q32 * split.q_factor
    dq_rel = [jnp.zeros((split.size, q.shape[1]), _F32)]
    for i, exponent in split.key_exponents():
      k_factor = jnp.exp(exponent)
      k_rel = k32 * k_factor
      d_block = jnp.where(cols_iota(chunk) < i * split.size, split.rows(d_scores, i), 0.0)
      q_block = split.rows(q_rel, i)
      dq_rel.append(dot(d_block.astype(io), k_rel.astype(io)))
      dk_rel = t_dot(d_block, q_block, io)                                     # [C, K]
      dk = dk + dk_rel * k_factor
      key_span = cumsum(dk_rel * k_rel, exclusive=True)
      dg = dg + jnp.where(rows_iota(chunk) < i * split.size, key_span, 0.0)
    dq_rel = jnp.concatenate(dq_rel, axis=0)
    dq = dq + dq_rel * split.q_factor
    dg = dg + cumsum(dq_rel * q_rel, reverse=True, segment=split.size)

  # The state: o += (q e^b) S, S_out = diag(e^G) S + (k e^a)^T v.
  into = jnp.exp(cumsum(g))
  out_of = jnp.exp(cumsum(g, reverse=True, exclusive=True))
  total = jnp.exp(jnp.sum(g, axis=0, keepdims=True))              # (1, K)
  dq_in = dot_t(d_o, state_io)
  dk_out = dot_t(v, d_state_io)
  dq = dq + into * dq_in
  dk = dk + out_of * dk_out
  k_out = k32 * out_of
  q_in = q32 * into
  dv = t_dot(scores, d_o, io) + dot(k_out.astype(io), d_state_io)
  d_total = total * col_to_row(jnp.sum(state * d_state, axis=1, keepdims=True))
  dg = (dg + cumsum(q_in * dq_in, reverse=True) + cumsum(k_out * dk_out, exclusive=True)
        + d_total)
  d_state_in = row_to_col(total) * d_state + t_dot(q_in, d_o, io)
  return dq, dk, dv, dg, d_state_in
