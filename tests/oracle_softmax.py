"""Float64 NumPy oracle of softmax attention, written from the definition.

It imports nothing from attnlab: the allowed matrices below come from the index formulas
of the mask vocabulary, the gradients from the calculus of the softmax, so a bug shared
by the library's tiers (which all read ``attnlab.ops.masks``) cannot hide here.

Per head ``n`` of query ``[B, T, N, H]`` and key/value ``[B, S, K, H]`` (key head
``n // (N // K)``)::

    s      = scale * q k^T
    z      = cap * tanh(s / cap)        (or s without a soft cap)
    l      = z + bias
    p_j    = allowed_j exp(l_j) / (sum_allowed exp(l) + exp(sink))
    out    = sum_j p_j v_j

A row with no allowed key has ``p = 0`` and so ``out = 0``.

Backward, for the upstream cotangent ``dO``::

    dp_j   = dO . v_j,     D = sum_j p_j dp_j  (= dO . out)
    dl_j   = p_j (dp_j - D),       d sink = -p_sink D
    ds     = dl (1 - tanh^2(s / cap)),   dq = scale ds k,   dk = scale ds^T q
    dv     = p^T dO
"""

from __future__ import annotations

import dataclasses

import numpy as np

# ------------------------------------------------------------------------ masks
# Each returns bool [T, S] (position-only masks) or [B, 1, T, S] (data masks).


def _positions(q_len, kv_len):
  return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def full(q_len, kv_len):
  return np.ones((q_len, kv_len), bool)


def causal(q_len, kv_len):
  i, j = _positions(q_len, kv_len)
  return j <= i


def local_window(q_len, kv_len, left, right):
  i, j = _positions(q_len, kv_len)
  return (i - left <= j) & (j <= i + right)


def chunked_causal(q_len, kv_len, chunk_size):
  i, j = _positions(q_len, kv_len)
  return (j <= i) & (j // chunk_size == i // chunk_size)


def prefix_lm(q_len, kv_len, prefix_length):
  i, j = _positions(q_len, kv_len)
  return (j < prefix_length) | (j <= i)


def strided_sparse(q_len, kv_len, stride):
  i, j = _positions(q_len, kv_len)
  d = i - j
  return (d >= 0) & ((d < stride) | (d % stride == 0))


def fixed_sparse(q_len, kv_len, stride, summary=1):
  i, j = _positions(q_len, kv_len)
  return (j <= i) & ((j // stride == i // stride) | (j % stride >= stride - summary))


def global_local(q_len, kv_len, num_global, window):
  i, j = _positions(q_len, kv_len)
  return (i < num_global) | (j < num_global) | (np.abs(i - j) <= window)


def power_of_two(q_len, kv_len, block_size=1):
  """Written with loops and a table of powers, unlike the library's bit trick."""
  powers = {1 << e for e in range(40)}
  out = np.zeros((q_len, kv_len), bool)
  for i in range(q_len):
    for j in range(min(i + 1, kv_len)):
      d = i // block_size - j // block_size
      out[i, j] = d == 0 or d in powers
  return out


def documents(q_segment_ids, kv_segment_ids):
  q_ids, kv_ids = np.asarray(q_segment_ids), np.asarray(kv_segment_ids)
  return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def padding(q_len, kv_len, q_lengths=None, kv_lengths=None):
  """Right padding; either length array may be None (that side unpadded)."""
  batch = len(q_lengths if q_lengths is not None else kv_lengths)
  q_lengths = np.full(batch, q_len) if q_lengths is None else np.asarray(q_lengths)
  kv_lengths = np.full(batch, kv_len) if kv_lengths is None else np.asarray(kv_lengths)
  i, j = _positions(q_len, kv_len)
  return ((i[None] < q_lengths[:, None, None]) & (j[None] < kv_lengths[:, None, None]))[:, None]


# ------------------------------------------------------------------ score mods


def _distance(q_len, kv_len):
  i, j = _positions(q_len, kv_len)
  return np.abs(i - j)


def alibi_bias(slopes, q_len, kv_len):
  """``[1, N, T, S]``: ``-slopes[n] * |i - j|``."""
  slopes = np.asarray(slopes, np.float64)
  return (-slopes[:, None, None] * _distance(q_len, kv_len))[None]


def alibi_slopes_grad(dlogits):
  """d/d slopes of ``sum(dlogits * alibi_bias)``; ``dlogits [B, N, T, S]`` -> ``[N]``."""
  return -(dlogits * _distance(*dlogits.shape[2:])).sum((0, 2, 3))


def _relative_index(q_len, kv_len, max_distance):
  i, j = _positions(q_len, kv_len)
  return np.clip(j - i, -max_distance, max_distance) + max_distance


def relative_position_bias(table, q_len, kv_len):
  """``[1, N, T, S]``: ``table[n, clip(j - i, -M, M) + M]`` for ``table [N, 2M + 1]``."""
  table = np.asarray(table, np.float64)
  idx = _relative_index(q_len, kv_len, (table.shape[1] - 1) // 2)
  return table[:, idx][None]


def relative_position_table_grad(dlogits, table_width):
  """d/d table of ``sum(dlogits * relative_position_bias)`` -> ``[N, 2M + 1]``."""
  per_head = dlogits.sum(0)
  idx = _relative_index(*dlogits.shape[2:], (table_width - 1) // 2)
  return np.stack([per_head[:, idx == r].sum(-1) for r in range(table_width)], axis=1)


def reduce_to_shape(x, shape):
  """Sum ``x [B, N, T, S]`` down to a bias shape it was broadcast from."""
  lead = x.ndim - len(shape)
  x = x.sum(tuple(range(lead))) if lead else x
  axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
  return x.sum(axes, keepdims=True) if axes else x


# ------------------------------------------------------------------- attention


@dataclasses.dataclass
class Result:
  """Forward output and, when a cotangent was given, every gradient (float64).

  ``dlogits [B, N, T, S]`` is the gradient of the logits after cap and bias, i.e. of
  any additive bias; reduce it with ``reduce_to_shape`` / ``alibi_slopes_grad`` /
  ``relative_position_table_grad``. ``probs [B, N, T, S]`` excludes the sink.
  """

  out: np.ndarray
  probs: np.ndarray
  dq: np.ndarray | None = None
  dk: np.ndarray | None = None
  dv: np.ndarray | None = None
  dlogits: np.ndarray | None = None
  dsinks: np.ndarray | None = None


def _f64(x):
  return None if x is None else np.asarray(x, np.float64)


def attention(query, key, value, *, allowed=None, bias=None, scale=None,
              logits_soft_cap=None, sinks=None, dout=None) -> Result:
  """Softmax attention and its analytic gradients in float64.

  Args:
    query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` with ``N % K == 0``.
    allowed: bool broadcastable to ``[B, N, T, S]`` (True = attend), None for all.
    bias: float broadcastable to ``[B, N, T, S]`` (already evaluated score mods).
    scale: defaults to ``H ** -0.5``.
    logits_soft_cap: ``c`` for ``c * tanh(s / c)``.
    sinks: ``[N]`` sink logits (in the denominator, no value).
    dout: ``[B, T, N, H]`` cotangent of the output; gradients are computed if given.
  """
  q, k, v, dout = _f64(query), _f64(key), _f64(value), _f64(dout)
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv = k.shape[1], k.shape[2]
  assert num_heads % num_kv == 0
  groups = num_heads // num_kv
  scale = head_dim ** -0.5 if scale is None else scale
  # head n reads key head n // groups
  k_heads = np.repeat(k, groups, axis=2)
  v_heads = np.repeat(v, groups, axis=2)

  s = scale * np.einsum("btnh,bsnh->bnts", q, k_heads)
  if logits_soft_cap is not None:
    tanh = np.tanh(s / logits_soft_cap)
    logits = logits_soft_cap * tanh
  else:
    logits = s
  if bias is not None:
    logits = logits + _f64(bias)
  full_shape = (batch, num_heads, q_len, kv_len)
  logits = np.broadcast_to(logits, full_shape)
  allowed = np.ones(full_shape, bool) if allowed is None else np.broadcast_to(
      np.asarray(allowed, bool), full_shape)

  masked = np.where(allowed, logits, -np.inf)
  row_max = masked.max(-1, keepdims=True)
  if sinks is not None:
    sink = _f64(sinks)[None, :, None, None]
    row_max = np.maximum(row_max, sink)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  weights = np.exp(masked - row_max)
  denom = weights.sum(-1, keepdims=True)
  if sinks is not None:
    sink_weight = np.exp(sink - row_max)
    denom = denom + sink_weight
  safe = np.where(denom > 0, denom, 1.0)
  probs = weights / safe
  out = np.einsum("bnts,bsnh->btnh", probs, v_heads)
  result = Result(out=out, probs=probs)
  if dout is None:
    return result

  dp = np.einsum("btnh,bsnh->bnts", dout, v_heads)
  row_term = (probs * dp).sum(-1, keepdims=True)
  dlogits = probs * (dp - row_term)
  if sinks is not None:
    result.dsinks = (-(sink_weight / safe) * row_term).sum((0, 2, 3))
  ds = dlogits if logits_soft_cap is None else dlogits * (1.0 - tanh**2)
  result.dq = scale * np.einsum("bnts,bsnh->btnh", ds, k_heads)
  dk_heads = scale * np.einsum("bnts,btnh->bsnh", ds, q)
  dv_heads = np.einsum("bnts,btnh->bsnh", probs, dout)
  result.dk = dk_heads.reshape(batch, kv_len, num_kv, groups, head_dim).sum(3)
  result.dv = dv_heads.reshape(batch, kv_len, num_kv, groups, head_dim).sum(3)
  result.dlogits = dlogits
  return result
