"""Sparse attention weights: sparsemax and 1.5-entmax in place of softmax (CATALOG.md §1).

Per head, over the keys ``s`` query ``t`` sees (``s <= t`` when causal, same document, not
padding), with ``z_ts = scale q_t . k_s``::

    sparsemax   p_t = argmin_{p in simplex} |p - z_t|^2 = [z_t - tau_t]_+
                (Martins & Astudillo 2016, "From Softmax to Sparsemax", eqs. 2-3)
    1.5-entmax  p_t = [z_t / 2 - tau_t]_+^2
                (Correia et al. 2019, "Adaptively Sparse Transformers": alpha-entmax
                 [(alpha - 1) z - tau]_+^{1 / (alpha - 1)} at alpha = 1.5)
    o_t = sum_s p_ts v_s

``tau_t`` is the unique threshold that makes ``p_t`` sum to one; keys below it get exactly
zero weight. A query that sees no key returns zeros.

Gradients are the maps' Jacobians (Martins & Astudillo §2.5; Correia et al. Prop. 2):
``dp/dz = diag(s) - s s^T / sum(s)`` with ``s = p^{2 - alpha}`` on the support (the
support's indicator for sparsemax, ``sqrt(p)`` for 1.5-entmax), so
``dL/dz_ts = s_ts (dL/dp_ts - sum_u s_tu dL/dp_tu / sum_u s_tu)``.

Tiers:

* ``reference``: the dense ``[B, H, T, T]`` scores and the exact threshold by sorting
  (Martins & Astudillo, Algorithm 1; for 1.5-entmax the sort-based algorithm of Peters et
  al. 2019, "Sparse Sequence-to-Sequence Models", Algorithm 2); gradients by autodiff
  through the sort, which is the Jacobian above.
* ``xla``: never holds a ``[T, T]`` matrix. Every pass visits the keys in blocks of
  ``block_size`` (all queries at once, so memory is ``O(T block_size)`` per head) and
  recomputes the scores. A threshold needs the whole row, so the forward makes
  ``THRESHOLD_STEPS + 3`` passes: the row maximum ``m``; ``THRESHOLD_STEPS`` bisection
  passes on ``tau`` in ``[m' - 1, m']`` (``m' = (alpha - 1) m``; the bracket holds because
  the largest weight lies in ``[1 / T, 1]``), each also moving the lower end by a Newton
  step, which never passes the root because ``sum_s p_ts(tau) - 1`` is convex and
  decreasing; one pass that solves exactly on the support of the lower end (the exact
  threshold once that support is the true one, the usual case after a few steps; never
  outside the bracket, whose width is at most ``2^-THRESHOLD_STEPS``); one pass for the
  output. A ``custom_vjp`` saves ``m``, ``tau`` and ``w_t = sum_s s_ts v_s / sum_s s_ts``
  and runs the Jacobian above in one backward pass (dq carried, dk and dv per block).

Decode (causal): :func:`sparse_attention_cache` holds the keys and values by position;
the step writes the token at its position and attends over the slots up to it with the
exact (sorted) threshold.

The first section below (argument checks, masks, the key-value cache, key blocks) is
shared with :mod:`attnlab.ops.selective_attention` and
:mod:`attnlab.ops.multi_token_attention`.
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
from attnlab.ops.learned_feature_maps import _default_scale, check_lengths
from attnlab.ops.linear_attention import _check_qkv  # the shared q/k/v checks

__all__ = ["sparse_attention_cache", "sparsemax_attention", "sparsemax_attention_step",
           "entmax15_attention", "entmax15_attention_step"]

THRESHOLD_STEPS = 20   # bisection passes of the xla tier (bracket width 2^-20 at worst)
_HIGHEST = lax.Precision.HIGHEST
# Shifted scores of keys that may not enter the support: below every threshold, which
# lies in [m' - 1, m'] (relative to the row maximum m' = 0).
_OUTSIDE = -2.0


# ------------------------------------------------------------ shared by the score ops


def check_attention_args(q, k, v, *, causal, scale, segment_ids, lengths, block_size=None):
  """The checks every score-variant op shares (sparse maps, selective, multi-token).

  Returns ``(q, k, v, scale, segment_ids, lengths)`` with the defaults filled in; raises
  ValueError naming the argument before any computation."""
  q, k, v = _check_qkv(q, k, v)
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share a dtype, got {q.dtype=}, {k.dtype=}, "
                     f"{v.dtype=}")
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  batch, length = q.shape[:2]
  scale = _default_scale(scale, q.shape[-1])
  lengths = check_lengths(lengths, batch, length)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
      raise ValueError(f"segment_ids must be [B, T]={(batch, length)}, got "
                       f"segment_ids.shape={segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers, got segment_ids.dtype="
                       f"{segment_ids.dtype}")
  if block_size is not None and (not isinstance(block_size, (int, np.integer))
                                 or isinstance(block_size, bool) or block_size < 1):
    raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
  return q, k, v, scale, segment_ids, lengths


def documents(segment_ids, batch, length):
  """``[B, T]`` int32: each position's document (a new one starts where the id changes)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  starts = jnp.concatenate([jnp.zeros((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def valid_positions(lengths, batch, length):
  """``[B, T]`` bool: positions before ``lengths[b]`` (all when lengths is None)."""
  if lengths is None:
    return jnp.ones((batch, length), bool)
  return jnp.arange(length)[None] < lengths[:, None]


def allowed_pairs(q_docs, k_docs, k_valid, q_pos, k_pos, causal):
  """``[B, Tq, Tk]`` bool: query sees key (same document, valid key, ``k <= q`` if causal).

  ``q_docs [B, Tq]``, ``k_docs``/``k_valid [B, Tk]``, positions ``q_pos [Tq]``,
  ``k_pos [Tk]``."""
  allowed = (q_docs[:, :, None] == k_docs[:, None, :]) & k_valid[:, None, :]
  if causal:
    allowed &= (k_pos[None, :] <= q_pos[:, None])[None]
  return allowed


def sparse_attention_cache(batch, max_len, num_heads, key_dim, value_dim,
                           dtype=jnp.float32):
  """An empty decode cache of keys and values by position: ``{"k": [B, L, H, K],
  "v": [B, L, H, V]}``."""
  return {"k": jnp.zeros((batch, max_len, num_heads, key_dim), dtype),
          "v": jnp.zeros((batch, max_len, num_heads, value_dim), dtype)}


def check_step(q_t, k_t, v_t, cache, positions, extra=()):
  """Checks of a decode step over :func:`sparse_attention_cache` (plus ``extra`` entries)."""
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, D], got {name}.shape={x.shape}")
  if q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, K] and v_t [B, H, V] with the same B, H, "
                     f"got {q_t.shape=}, {k_t.shape=}, {v_t.shape=}")
  batch, heads, key_dim = q_t.shape
  want = {"k", "v", *extra}
  if not isinstance(cache, dict) or set(cache) != want:
    raise ValueError(f"cache must be a dict with keys {sorted(want)}, got "
                     f"{sorted(cache) if isinstance(cache, dict) else type(cache).__name__}")
  length = cache["k"].shape[1] if cache["k"].ndim == 4 else -1
  if (cache["k"].shape != (batch, length, heads, key_dim)
      or cache["v"].shape != (batch, length, heads, v_t.shape[-1])):
    raise ValueError(f"cache['k'] must be [B, L, H, K]={(batch, 'L', heads, key_dim)} and "
                     f"cache['v'] [B, L, H, V], got {cache['k'].shape}, {cache['v'].shape}")
  positions = jnp.asarray(positions)
  if positions.shape != (batch,) or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be [B]=({batch},) integers, got "
                     f"positions.shape={positions.shape}, dtype={positions.dtype}")
  return q_t, k_t, v_t, positions


def write_cache(cache_kv, x_t, positions):
  """``cache_kv [B, L, ...]`` with ``x_t [B, ...]`` written at slot ``positions [B]``."""
  slots = cache_kv.shape[1]
  write = (jnp.arange(slots)[None] == positions[:, None]).reshape(
      (cache_kv.shape[0], slots) + (1,) * (cache_kv.ndim - 2))
  return jnp.where(write, x_t[:, None].astype(cache_kv.dtype), cache_kv)


def masked_softmax(logits, allowed):
  """Softmax over the last axis among the ``allowed`` entries; a row with none gives zeros
  (and zero gradients), never NaN."""
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  p = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(den > 0, den, 1.0)


class KeyBlocks:
  """The keys in blocks, for ``lax.scan`` over ``xs()``: ``k``/``v [nk, B, bk, H, D]`` and,
  per key, its document, whether it counts, its position and an optional ``flag``
  (padding to ``nk * bk`` counts not)."""

  def __init__(self, k, v, docs, valid, block, flag=None):
    batch, length = k.shape[:2]
    nk = -(-length // block)
    pad = nk * block - length

    def blocks(x, fill):
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
      return jnp.moveaxis(x.reshape((batch, nk, block) + x.shape[2:]), 1, 0)

    self.length = length
    self.k, self.v = blocks(k, 0), blocks(v, 0)
    self.docs, self.valid = blocks(docs, -1), blocks(valid, False)
    self.pos = jnp.arange(nk * block, dtype=jnp.int32).reshape(nk, block)
    self.flag = None if flag is None else blocks(flag, False)

  def xs(self):
    base = (self.k, self.v, self.docs, self.valid, self.pos)
    return base if self.flag is None else base + (self.flag,)

  def unblock(self, x):
    """``[nk, B, bk, ...]`` per-key results -> ``[B, T, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :self.length]


def block_scores(scale, causal, q32, q_docs, blk):
  """``z [B, T, H, bk]`` float32 and ``allowed [B, T, 1, bk]`` of one key block."""
  kb, _, k_docs, k_valid, k_pos = blk[:5]
  z = scale * jnp.einsum("bthk,bshk->bths", q32, kb.astype(jnp.float32),
                         precision=_HIGHEST)
  allowed = allowed_pairs(q_docs, k_docs, k_valid, jnp.arange(q32.shape[1]), k_pos, causal)
  return z, allowed[:, :, None, :]


# ---------------------------------------------------------------------- the two maps


def _weights(r, alpha):
  """``p = r^{1 / (alpha - 1)}`` of ``r = [x - tau]_+``."""
  return r if alpha == 2.0 else r * r


def _slopes(r, alpha):
  """``s = p^{2 - alpha}``: the support's indicator (sparsemax) or ``sqrt(p) = r``."""
  return (r > 0).astype(r.dtype) if alpha == 2.0 else r


def _sorted_threshold(x, alpha):
  """``tau [...]`` of ``x [..., S]`` (already scaled by ``alpha - 1``) by sorting.

  Support sizes k = 1..S of the sorted ``u_1 >= u_2 >= ...`` each give the threshold that
  makes the top k sum to one; the support is the largest k with ``u_k > tau_k``
  (Martins & Astudillo, Algorithm 1; Peters et al. 2019, Algorithm 2 for alpha = 1.5)."""
  u = -jnp.sort(-x, axis=-1)
  size = x.shape[-1]
  ranks = jnp.arange(1, size + 1).reshape((1,) * (x.ndim - 1) + (size,))
  k = ranks.astype(x.dtype)
  c1 = jnp.cumsum(u, axis=-1)
  if alpha == 2.0:
    tau = (c1 - 1.0) / k
  else:
    mean = c1 / k
    # sum_{j <= k} (u_j - tau)^2 = 1  =>  tau = mean - sqrt(1 / k - variance)
    delta = 1.0 / k - (jnp.cumsum(u * u, axis=-1) / k - mean * mean)
    ok = delta > 0
    tau = mean - jnp.where(ok, jnp.sqrt(jnp.where(ok, delta, 1.0)), 0.0)
  support = jnp.max(jnp.where(u > tau, ranks, 1), axis=-1, keepdims=True)
  return jnp.take_along_axis(tau, support - 1, axis=-1)[..., 0]


def _dense_weights(z, allowed, alpha):
  """The sparse weights ``[..., S]`` of scores ``z`` over the ``allowed`` keys."""
  top = jnp.max(jnp.where(allowed, z, -jnp.inf), axis=-1, keepdims=True)
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # tau shifts with it
  x = jnp.where(allowed, (alpha - 1.0) * (z - top), _OUTSIDE)
  tau = _sorted_threshold(x, alpha)
  return jnp.where(allowed, _weights(jax.nn.relu(x - tau[..., None]), alpha), 0.0)


# -------------------------------------------------------------------------- the call


@dataclasses.dataclass(frozen=True)
class SparseCall:
  """The canonical arguments of every tier."""

  q: Any
  k: Any
  v: Any
  alpha: float
  causal: bool
  scale: float
  segment_ids: Any
  lengths: Any
  block_size: int


def _reference(call: SparseCall):
  batch, length = call.q.shape[:2]
  cdt = jnp.promote_types(call.q.dtype, jnp.float32)
  z = call.scale * jnp.einsum("bthk,bshk->bhts", call.q.astype(cdt), call.k.astype(cdt),
                              precision=_HIGHEST)
  docs = documents(call.segment_ids, batch, length)
  pos = jnp.arange(length)
  allowed = allowed_pairs(docs, docs, valid_positions(call.lengths, batch, length), pos,
                          pos, call.causal)[:, None]
  p = _dense_weights(z, allowed, call.alpha)
  o = jnp.einsum("bhts,bshv->bthv", p, call.v.astype(cdt), precision=_HIGHEST)
  return o.astype(call.v.dtype)


# ----------------------------------------------------------------------- the xla tier


@dataclasses.dataclass(frozen=True)
class _Static:
  alpha: float
  causal: bool
  scale: float
  block: int


def _block_scores(st, q32, q_docs, blk):
  return block_scores(st.scale, st.causal, q32, q_docs, blk)


def _row_max(st, q32, q_docs, keys):
  def body(m, blk):
    z, allowed = _block_scores(st, q32, q_docs, blk)
    return jnp.maximum(m, jnp.max(jnp.where(allowed, z, -jnp.inf), axis=-1)), None

  m, _ = lax.scan(body, jnp.full(q32.shape[:3], -jnp.inf, jnp.float32), keys.xs())
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _shifted(st, z, m):
  return (st.alpha - 1.0) * (z - m[..., None])


def _sums_at(st, q32, q_docs, keys, m, tau):
  """``(sum_s p_ts(tau), sum_s dp_ts/d(-tau))`` per row, one pass."""
  def body(acc, blk):
    z, allowed = _block_scores(st, q32, q_docs, blk)
    r = jnp.where(allowed, jax.nn.relu(_shifted(st, z, m) - tau[..., None]), 0.0)
    total = jnp.sum(_weights(r, st.alpha), axis=-1)
    slope = jnp.sum(_slopes(r, st.alpha), axis=-1) / (st.alpha - 1.0)
    return (acc[0] + total, acc[1] + slope), None

  zero = jnp.zeros(q32.shape[:3], jnp.float32)
  return lax.scan(body, (zero, zero), keys.xs())[0]


def _support_sums(st, q32, q_docs, keys, m, lo):
  """``(k, sum y, sum y^2)`` of ``y = x - lo`` over the support of ``lo``, one pass."""
  def body(acc, blk):
    z, allowed = _block_scores(st, q32, q_docs, blk)
    y = _shifted(st, z, m) - lo[..., None]
    y = jnp.where(allowed & (y > 0), y, 0.0)
    return (acc[0] + jnp.sum((y > 0).astype(jnp.float32), -1), acc[1] + jnp.sum(y, -1),
            acc[2] + jnp.sum(y * y, -1)), None

  zero = jnp.zeros(q32.shape[:3], jnp.float32)
  return lax.scan(body, (zero, zero, zero), keys.xs())[0]


def _threshold(st, q32, q_docs, keys, m):
  """``tau [B, T, H]`` in the shifted coordinates (see the module docstring)."""
  lo = jnp.full(q32.shape[:3], -1.0, jnp.float32)
  hi = jnp.zeros(q32.shape[:3], jnp.float32)

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    total, slope = _sums_at(st, q32, q_docs, keys, m, mid)
    excess = total - 1.0
    above = excess >= 0  # mid <= tau: raise lo, by a Newton step where it helps
    newton = mid + excess / jnp.where(slope > 0, slope, 1.0)
    lo = jnp.where(above, jnp.clip(newton, mid, hi), lo)
    hi = jnp.where(above, hi, mid)
    return lo, hi

  lo, hi = lax.fori_loop(0, THRESHOLD_STEPS, step, (lo, hi))
  count, s1, s2 = _support_sums(st, q32, q_docs, keys, m, lo)
  # Solve sum_S (y - t)^{1/(alpha-1)} = 1 on the support S of lo, in a form without
  # cancellation near the root (s1 - 1, s2 - 1 are the small excess at lo).
  if st.alpha == 2.0:
    t = (s1 - 1.0) / jnp.where(count > 0, count, 1.0)
  else:
    disc = jnp.maximum(s1 * s1 - count * (s2 - 1.0), 0.0)
    den = s1 + jnp.sqrt(disc)
    t = (s2 - 1.0) / jnp.where(den > 0, den, 1.0)
  return lo + jnp.clip(t, 0.0, hi - lo)


def _output(st, q32, q_docs, keys, m, tau):
  """``o = sum p v`` and ``w = sum s v / sum s`` (the Jacobian's mean), one pass."""
  batch, length, heads = q32.shape[:3]
  value_dim = keys.v.shape[-1]

  def body(acc, blk):
    z, allowed = _block_scores(st, q32, q_docs, blk)
    r = jnp.where(allowed, jax.nn.relu(_shifted(st, z, m) - tau[..., None]), 0.0)
    vb = blk[1].astype(jnp.float32)
    o = acc[0] + jnp.einsum("bths,bshv->bthv", _weights(r, st.alpha), vb, precision=_HIGHEST)
    s = _slopes(r, st.alpha)
    u = acc[1] + jnp.einsum("bths,bshv->bthv", s, vb, precision=_HIGHEST)
    return (o, u, acc[2] + jnp.sum(s, -1)), None

  zeros = jnp.zeros((batch, length, heads, value_dim), jnp.float32)
  o, u, ssum = lax.scan(body, (zeros, zeros, jnp.zeros((batch, length, heads))), keys.xs())[0]
  w = u / jnp.where(ssum > 0, ssum, 1.0)[..., None]
  return o, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_attention(st, q, k, v, q_docs, k_docs, k_valid):
  return _sparse_fwd(st, q, k, v, q_docs, k_docs, k_valid)[0]


def _sparse_fwd(st, q, k, v, q_docs, k_docs, k_valid):
  q32 = q.astype(jnp.float32)
  keys = KeyBlocks(k, v, k_docs, k_valid, st.block)
  m = _row_max(st, q32, q_docs, keys)
  tau = _threshold(st, q32, q_docs, keys, m)
  o, w = _output(st, q32, q_docs, keys, m, tau)
  return o.astype(v.dtype), (q, k, v, q_docs, k_docs, k_valid, m, tau, w)


def _sparse_bwd(st, res, do):
  q, k, v, q_docs, k_docs, k_valid, m, tau, w = res
  q32, do32 = q.astype(jnp.float32), do.astype(jnp.float32)
  keys = KeyBlocks(k, v, k_docs, k_valid, st.block)
  mean = jnp.sum(do32 * w, axis=-1)  # sum_u s_tu dL/dp_tu / sum_u s_tu

  def body(dq, blk):
    z, allowed = _block_scores(st, q32, q_docs, blk)
    r = jnp.where(allowed, jax.nn.relu(_shifted(st, z, m) - tau[..., None]), 0.0)
    kb, vb = blk[0].astype(jnp.float32), blk[1].astype(jnp.float32)
    dp = jnp.einsum("bthv,bshv->bths", do32, vb, precision=_HIGHEST)
    dz = st.scale * _slopes(r, st.alpha) * (dp - mean[..., None])
    dv = jnp.einsum("bths,bthv->bshv", _weights(r, st.alpha), do32, precision=_HIGHEST)
    dk = jnp.einsum("bths,bthk->bshk", dz, q32, precision=_HIGHEST)
    dq = dq + jnp.einsum("bths,bshk->bthk", dz, kb, precision=_HIGHEST)
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(body, jnp.zeros(q.shape, jnp.float32), keys.xs())
  return (dq.astype(q.dtype), keys.unblock(dk).astype(k.dtype),
          keys.unblock(dv).astype(v.dtype), None, None, None)


_sparse_attention.defvjp(_sparse_fwd, _sparse_bwd)
# Compiled once per shape: eager callers (a mixer outside jit) would otherwise retrace the
# scans on every call.
_sparse_attention_jit = jax.jit(_sparse_attention, static_argnums=0)


def _xla(call: SparseCall):
  batch, length = call.q.shape[:2]
  docs = documents(call.segment_ids, batch, length)
  st = _Static(call.alpha, call.causal, call.scale, min(call.block_size, length))
  return _sparse_attention_jit(st, call.q, call.k, call.v, docs, docs,
                               valid_positions(call.lengths, batch, length))


# -------------------------------------------------------------------- registration


_PAPERS = {
    "sparsemax_attention": "Martins & Astudillo 2016, From Softmax to Sparsemax",
    "entmax15_attention": "Correia et al. 2019, Adaptively Sparse Transformers "
                          "(alpha = 1.5 fixed); Peters et al. 2019 for the exact threshold",
}

for _name in _PAPERS:
  registry.describe(_name, registry.MechanismInfo(
      paper=_PAPERS[_name], family="softmax", causal=True, non_causal=True,
      state="KV cache, T x (K + V)",
      cost=f"O(T^2 K) x {THRESHOLD_STEPS + 3} passes forward, 1 backward",
      step=_name + "_step",
      xla_path=f"blockwise over keys: row max, {THRESHOLD_STEPS} bisection/Newton passes "
               "for the threshold, an exact solve on its support, the output (a threshold "
               "needs the whole row, so no single pass)"))
  registry.register(_name, registry.Implementation("reference", _reference, automatic=False))
  registry.register(_name, registry.Implementation("xla", _xla, priority=10))


def _run(name, alpha, q, k, v, causal, scale, segment_ids, lengths, block_size,
         implementation):
  q, k, v, scale, segment_ids, lengths = check_attention_args(
      q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, lengths=lengths,
      block_size=block_size)
  call = SparseCall(q, k, v, alpha, causal, scale, segment_ids, lengths, int(block_size))
  return registry.select(name, implementation, call).fn(call)


def sparsemax_attention(q, k, v, *, causal=True, scale=None, segment_ids=None,
                        lengths=None, block_size=256, implementation=None):
  """Sparsemax attention: ``o_t = sum_s [z_ts - tau_t]_+ v_s``, ``z = scale q k^T``.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype.
    causal: query t sees keys s <= t; False: the whole (document of the) sequence.
    scale: score scale (default ``K ** -0.5``).
    segment_ids: ``[B, T]`` ints, packed documents (a new one where the id changes).
    lengths: ``[B]`` ints, right padding: keys at ``t >= lengths[b]`` get no weight.
    block_size: keys per block of the xla tier.
    implementation: None (the xla tier), ``"reference"`` or ``"xla"``.

  Returns:
    ``o [B, T, H, V]`` in v's dtype (computed in float32).
  """
  return _run("sparsemax_attention", 2.0, q, k, v, causal, scale, segment_ids, lengths,
              block_size, implementation)


def entmax15_attention(q, k, v, *, causal=True, scale=None, segment_ids=None,
                       lengths=None, block_size=256, implementation=None):
  """1.5-entmax attention: ``o_t = sum_s [z_ts / 2 - tau_t]_+^2 v_s``,
  ``z = scale q k^T``. Arguments and result as :func:`sparsemax_attention`."""
  return _run("entmax15_attention", 1.5, q, k, v, causal, scale, segment_ids, lengths,
              block_size, implementation)


def _step(alpha, q_t, k_t, v_t, cache, positions, scale):
  q_t, k_t, v_t, positions = check_step(q_t, k_t, v_t, cache, positions)
  scale = _default_scale(scale, q_t.shape[-1])
  cache = {"k": write_cache(cache["k"], k_t, positions),
           "v": write_cache(cache["v"], v_t, positions)}
  z = scale * jnp.einsum("bhk,bshk->bhs", q_t.astype(jnp.float32),
                         cache["k"].astype(jnp.float32), precision=_HIGHEST)
  allowed = (jnp.arange(z.shape[-1])[None] <= positions[:, None])[:, None]
  p = _dense_weights(z, allowed, alpha)
  o = jnp.einsum("bhs,bshv->bhv", p, cache["v"].astype(jnp.float32), precision=_HIGHEST)
  return o.astype(v_t.dtype), cache


def sparsemax_attention_step(q_t, k_t, v_t, cache, positions, *, scale=None):
  """One decode step of causal :func:`sparsemax_attention`.

  ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``cache`` from :func:`sparse_attention_cache`,
  ``positions [B]`` (the token's slot; it sees slots ``<= positions[b]``). Returns
  ``(o_t [B, H, V], cache)``."""
  return _step(2.0, q_t, k_t, v_t, cache, positions, scale)


def entmax15_attention_step(q_t, k_t, v_t, cache, positions, *, scale=None):
  """One decode step of causal :func:`entmax15_attention` (as
  :func:`sparsemax_attention_step`)."""
  return _step(1.5, q_t, k_t, v_t, cache, positions, scale)
