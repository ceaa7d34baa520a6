"""Per-chunk math of the (gated) delta rule, on values inside a Mosaic TPU kernel.

Gated DeltaNet (Yang et al. 2025, §3.3; DeltaNet's chunk form: Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule", §3), per head::

    S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale q_t^T S_t

(the plain delta rule is g = 0). With ``S'_t = e^{g_t} S_{t-1}`` the update is
``S_t = S'_t + k_t d_t^T`` with ``d_t = beta_t (v_t - S'_t^T k_t)``. Unrolled over a chunk
with entering state ``S`` and the pair decay ``D_ts = e^{sum_{s<u<=t} g_u}``::

    (I + L) d = beta v - (beta e^b k) S,        L_ts = beta_t D_ts k_t . k_s  (s < t)
    d = U - W S,   U = (I + L)^{-1} (beta v),   W = (I + L)^{-1} (beta e^b k)   (the UT form)
    o = scale ((q e^b) S + (D * q k^T) d),      S_out = e^G S + (k e^a)^T d

with ``b``, ``a``, ``G`` the gates up to t, after s and in all the chunk, as in
``chunk_math.py`` (all exponents sums of gates; a document start is a gate of ``-inf``).

``(I + L)^{-1}`` is never formed. The solves are blocked forward substitution over
16-row blocks: each block subtracts the solved blocks above it with one matrix product,
then applies the inverse of its unit-triangular ``16 x 16`` diagonal block (computed once
per chunk by column elimination on the VPU, applied on the MXU). Substitution is stable;
the product form ``(I - L)(I + L^2)(I + L^4)...`` is not (with correlated keys the powers
of ``L`` reach binomial sizes and cancel). The backward solves with ``(I + L)^T`` the same
way, from the last block up, with the transposed block inverses. The block inverses are
float32; the products take the input dtype like every other product (bf16 operands,
float32 accumulation), so the solve costs one MXU pass, not six.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.tpu.chunk_math import (SUB_CHUNK, col_to_row, cols_iota, cumsum, dot,
                                           dot_t, row_to_col, rows_iota, scalar_decays, t_dot)

_F32 = jnp.float32


def _unit_lower_inverse(block):
  """``(I + block)^{-1}`` for a strictly lower triangular ``block [n, n]`` (float32): column
  elimination on the identity, one rank-1 update per column."""
  n = block.shape[0]
  rows, cols = rows_iota(n, n), cols_iota(n, n)

  def eliminate(s, inverse):
    column = jnp.sum(jnp.where(cols == s, block, 0.0), axis=1, keepdims=True)   # (n, 1)
    solved = jnp.sum(jnp.where(rows == s, inverse, 0.0), axis=0, keepdims=True)  # (1, n)
    return inverse - column * solved

  return lax.fori_loop(0, n, eliminate, jnp.where(rows == cols, 1.0, 0.0))


def diagonal_inverses(lower):
  """The inverses of the unit-lower ``16 x 16`` diagonal blocks of ``I + lower``."""
  size = min(SUB_CHUNK, lower.shape[0])
  return [_unit_lower_inverse(lower[i:i + size, i:i + size])
          for i in range(0, lower.shape[0], size)]


def solve_unit_triangular(lower, inverses, rhs, io, *, transpose=False):
  """``(I + lower)^{-1} x`` (or ``(I + lower)^{-T} x``) for each ``x [C, W]`` in ``rhs``;
  ``lower [C, C]`` strictly lower triangular, ``inverses`` from ``diagonal_inverses``, all
  float32. Blocked substitution over 16-row blocks, first to last (last to first when
  transposed): one product with the solved blocks, one with the block's inverse, both
  with operands in ``io`` (float32 accumulation)."""
  chunk = lower.shape[0]
  count = len(inverses)
  size = chunk // count
  matrix = lower.T if transpose else lower
  order = range(count - 1, -1, -1) if transpose else range(count)
  solved = [[None] * count for _ in rhs]
  for i in order:
    rows = slice(i * size, (i + 1) * size)
    band = matrix[rows]                                                          # [L, C]
    inverse = inverses[i].T if transpose else inverses[i]
    for x, done in zip(rhs, solved):
      part = x[rows]
      if any(b is not None for b in done):
        known = jnp.concatenate(
            [b if b is not None else jnp.zeros((size, x.shape[1]), _F32) for b in done],
            axis=0)
        part = part - dot(band.astype(io), known.astype(io))
      done[i] = dot(inverse.astype(io), part.astype(io))
  return [jnp.concatenate(done, axis=0) for done in solved]


class _Chunk:
  """The forward quantities of one chunk, shared by the forward, the state recompute
  and the backward."""

  def __init__(self, k, v, g_row, beta_row, state):
    self.io = k.dtype
    chunk = k.shape[0]
    self.strict = rows_iota(chunk, chunk) > cols_iota(chunk, chunk)
    self.decay, self.into, self.out_of, self.total = scalar_decays(g_row)
    self.beta = row_to_col(beta_row)
    self.k32, self.v32 = k.astype(_F32), v.astype(_F32)
    self.kk = dot_t(k, k)
    self.lower = jnp.where(self.strict, self.beta * self.decay * self.kk, 0.0)
    self.gain_k = self.beta * self.into * self.k32                  # beta e^b k
    self.inverses = diagonal_inverses(self.lower)
    self.u, self.w = solve_unit_triangular(self.lower, self.inverses,
                                           (self.beta * self.v32, self.gain_k), self.io)
    self.delta = self.u - dot(self.w.astype(self.io), state.astype(self.io))
    self.k_out = self.k32 * self.out_of

  def state_out(self, state):
    return self.total * state + t_dot(self.k_out, self.delta, self.io)


def delta_state_update(k, v, g_row, beta_row, state):
  """The state leaving the chunk."""
  return _Chunk(k, v, g_row, beta_row, state).state_out(state)


def delta_forward(q, k, v, g_row, beta_row, state, scale):
  """One chunk of the gated delta rule. ``q, k [C, K]``, ``v [C, V]`` (input dtype),
  ``g_row, beta_row (1, C)`` float32, ``state [K, V]`` float32. Returns
  ``(o [C, V], state_out [K, V])``, float32."""
  io = q.dtype
  c = _Chunk(k, v, g_row, beta_row, state)
  scores = dot_t(q, k) * c.decay
  q_in = (q.astype(_F32) * c.into).astype(io)
  o = dot(scores.astype(io), c.delta.astype(io)) + dot(q_in, state.astype(io))
  return scale * o, c.state_out(state)


def delta_backward(q, k, v, g_row, beta_row, state, d_o, d_state, scale):
  """Gradients of one gated-delta-rule chunk: ``(dq, dk, dv, dg_row, dbeta_row,
  d_state_in)``, float32 (arguments as ``delta_forward`` plus ``d_o [C, V]`` and
  ``d_state``, the gradient of the state leaving the chunk)."""
  io = q.dtype
  c = _Chunk(k, v, g_row, beta_row, state)
  q32 = q.astype(_F32)
  d_o = (scale * d_o.astype(_F32)).astype(io)
  state_io, d_state_io = state.astype(io), d_state.astype(io)

  scores = dot_t(q, k) * c.decay                                   # A = D * q k^T
  q_in = q32 * c.into
  d_delta = t_dot(scores, d_o, io) + dot(c.k_out.astype(io), d_state_io)
  d_scores = dot_t(d_o, c.delta.astype(io))                        # dA = dO d^T
  d_qk = d_scores * c.decay
  dq_in = dot_t(d_o, state_io)
  dk_out = dot_t(c.delta.astype(io), d_state_io)
  dq = dot(d_qk.astype(io), k) + c.into * dq_in
  dk = t_dot(d_qk, q, io) + c.out_of * dk_out
  d_state_in = (c.total * d_state + t_dot(q_in, d_o, io)
                - t_dot(c.w, d_delta.astype(io), io))               # d = U - W S

  # Through the solve X = (I + L)^{-1} R, R = [beta v, beta e^b k]: dR = (I + L)^{-T} dX,
  # dL = -dR X^T on the strict lower triangle.
  d_w = -dot_t(d_delta.astype(io), state_io)
  d_rv, d_rk = solve_unit_triangular(c.lower, c.inverses, (d_delta, d_w), io,
                                     transpose=True)
  d_lower = -jnp.where(c.strict, dot_t(d_rv, c.u) + dot_t(d_rk, c.w), 0.0)
  dv = c.beta * d_rv
  dk = dk + c.beta * c.into * d_rk
  d_gain = jnp.sum(c.k32 * d_rk, axis=1, keepdims=True)            # d(beta e^b) per row
  d_kk = d_lower * c.beta * c.decay
  dk = dk + dot(d_kk, c.k32) + t_dot(d_kk, c.k32, _F32)
  d_beta = (jnp.sum(c.v32 * d_rv, axis=1, keepdims=True) + c.into * d_gain
            + jnp.sum(d_lower * c.decay * c.kk, axis=1, keepdims=True))

  # The gates: every pair spans s < u <= t (scores and L), plus e^b, e^a and e^G.
  pair = jnp.where(c.strict, d_scores * scores + d_lower * c.lower, 0.0)
  below = cumsum(pair, reverse=True)
  spanned = jnp.sum(jnp.where(c.strict, below, 0.0), axis=1, keepdims=True)
  d_into = (jnp.sum(q_in * dq_in, axis=1, keepdims=True)
            + c.beta * c.into * d_gain)
  d_out_of = jnp.sum(c.k_out * dk_out, axis=1, keepdims=True)
  d_total = c.total * jnp.sum(state * d_state, keepdims=True)
  dg = (spanned + cumsum(d_into, reverse=True) + cumsum(d_out_of, exclusive=True)
        + d_total)
  return dq, dk, dv, col_to_row(dg), col_to_row(d_beta), d_state_in
