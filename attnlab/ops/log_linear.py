"""Log-linear attention over the simple-GLA (Mamba-2) core: Fenwick-tree states.

Guo, Yang, Goel, Xing, Dao and Kim 2025, "Log-Linear Attention" (arXiv:2506.04761): §3.1
(the Fenwick-tree partition of the prefix and the hierarchical mask ``M^H``) and §3.3
(log-linear Mamba-2, ``O = (Q K^T ⊙ M^S ⊙ M^H) V``). Positions ``t`` count from the
start of each document (0, 1, ...). The level of key ``s`` for query ``t`` is::

    l(t, s) = 0                              if s = t
            = floor(log2(t xor s)) + 1       if s < t

so the keys of level ``l >= 1`` are the aligned block of ``2^(l-1)`` positions just before
t's own aligned block of that size (empty unless bit ``l-1`` of t is set): the prefix is
cut into at most ``log2(t) + 2`` buckets, finer towards t. Per head::

    o_t = scale * sum_{s <= t} lambda_t^{l(t,s)} exp(sum_{s<u<=t} g_u) (q_t . k_s) v_s

with ``g [B, T, H]`` the scalar log decay of simple GLA / Mamba-2 and ``lambda
[B, T, H, L]`` the per-token level weights. With every ``lambda = 1`` it is simple GLA.

Decoding keeps one ``[K, V]`` state per level, ``[B, H, L, K, V]`` float32: level ``l`` is
the bucket of level ``l`` of the last token, decayed to it (level 0: ``k v^T`` of the last
token). A token at document position ``p > 0`` first merges levels ``0..j`` into level
``j + 1``, ``j`` the number of trailing zero bits of ``p`` (the Fenwick carry), then
decays every level by ``exp(g)`` and puts its own ``k v^T`` at level 0; at ``p = 0`` the
state restarts. ``L`` levels cover documents of up to ``2^(L-1)`` tokens, the op's limit
(it raises beyond); past it, :func:`log_linear_attention_step` merges into the top level,
which then absorbs every older bucket.

Tiers:

* ``reference``: that token recurrence as a ``lax.scan`` (time ``O(T L K V)``).
* ``xla``: level 0 is element-wise; each level ``l >= 1`` is one chunked simple GLA
  (:func:`attnlab.ops.linear_xla.linear_recurrence_chunked`) whose queries are the tokens
  with bit ``l-1`` set and keys the tokens with it clear, restarting at every aligned
  block of ``2^l`` positions (and at every document): the upper half of a block reads its
  lower half, decayed. The levels run in a ``lax.scan`` under a custom VJP whose backward
  recomputes one level at a time, so time is ``O(T log T)`` (a simple GLA per level that
  can occur, ``min(L, ceil(log2 T) + 1)``) and memory is one level's plus a few ``[T, .]``
  accumulators: linear in T, independent of the number of levels.

``lengths [B]`` right-pads: tokens at ``t >= lengths[b]`` are dropped (no contribution,
output 0) and the final state is the state after token ``lengths[b] - 1``. There is no
``initial_state``: a Fenwick state is tied to its position; continue a prefix with
:func:`log_linear_attention_step`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import linear_attention as la
from attnlab.ops import registry
from attnlab.ops.linear_xla import linear_recurrence_chunked

__all__ = ["log_linear_attention", "log_linear_attention_step", "fenwick_levels"]

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LogLinearCall:
  """The canonical arguments of every tier (after checks and defaults)."""

  q: Any
  k: Any
  v: Any
  g: Any                # [B, T, H] log decay
  level_weights: Any    # [B, T, H, L]
  scale: float
  segment_ids: Any
  lengths: Any
  chunk_size: int

  def run(self, fn):
    return fn(self.q, self.k, self.v, self.g, self.level_weights, scale=self.scale,
              segment_ids=self.segment_ids, lengths=self.lengths,
              chunk_size=self.chunk_size)


def fenwick_levels(length: int) -> int:
  """The number of levels a document of ``length`` tokens uses: ``ceil(log2 T) + 1``
  (levels ``0 .. bit_length(T - 1)``)."""
  return (max(int(length), 1) - 1).bit_length() + 1


# --------------------------------------------------------------------------- layout


def _layout(segment_ids, lengths, batch, length):
  """``(position [B, T] int32, starts [B, T] bool, valid [B, T] bool)``: each token's
  position in its document, where a document starts (t > 0) and which tokens count."""
  t = jnp.arange(length, dtype=jnp.int32)[None]
  starts = jnp.zeros((batch, length), bool)
  if segment_ids is not None:
    starts = starts.at[:, 1:].set(segment_ids[:, 1:] != segment_ids[:, :-1])
  begin = lax.cummax(jnp.where(starts, t, 0), axis=1)
  valid = (jnp.ones((batch, length), bool) if lengths is None
           else t < lengths[:, None].astype(jnp.int32))
  return t - begin, starts, valid


def _last_index(lengths, batch, length):
  return (jnp.full((batch,), length - 1, jnp.int32) if lengths is None
          else jnp.clip(lengths.astype(jnp.int32) - 1, 0, length - 1))


def _take_time(x, index):
  """``x[b, index[b]]`` of ``x [B, T, ...]``."""
  idx = index.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, idx, axis=1)[:, 0]


# -------------------------------------------------------------------- reference tier


def _fenwick_step(q_t, k_t, v_t, g_t, lam_t, state, position, scale):
  """One token for a batch of heads (float32): ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``,
  ``g_t [B, H]``, ``lam_t [B, H, L]``, ``state [B, H, L, K, V]``, ``position [B]``.
  Returns ``(o_t [B, H, V], state)``."""
  f32 = jnp.float32
  num_levels = state.shape[2]
  position = position.astype(jnp.int32)
  lowest_bit = position & -position
  zeros_below = 31 - lax.clz(lowest_bit)                 # trailing zeros of position > 0
  target = jnp.clip(zeros_below + 1, 1, num_levels - 1)[:, None, None, None, None]
  level = jnp.arange(num_levels)[None, None, :, None, None]
  merged = jnp.sum(jnp.where(level <= target, state, 0.0), axis=2, keepdims=True)
  state = jnp.where(level == target, merged, jnp.where(level < target, 0.0, state))
  state = jnp.where((position == 0)[:, None, None, None, None], 0.0, state)
  state = jnp.exp(g_t.astype(f32))[..., None, None, None] * state
  newest = k_t.astype(f32)[..., :, None] * v_t.astype(f32)[..., None, :]
  state = jnp.where(level == 0, newest[:, :, None], state)
  read = jnp.einsum("bhl,bhlkv->bhkv", lam_t.astype(f32), state, precision=_HIGHEST)
  o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32), read, precision=_HIGHEST)
  return o_t, state


def log_linear_reference(q, k, v, g, level_weights, *, scale, segment_ids=None,
                         lengths=None, chunk_size=None):
  """The Fenwick-state recurrence token by token. Returns ``(o [B, T, H, V] float32,
  final_state [B, H, L, K, V] float32)``; ``chunk_size`` is unused."""
  del chunk_size
  batch, length, heads, key_dim = q.shape
  num_levels = level_weights.shape[-1]
  position, _, valid = _layout(segment_ids, lengths, batch, length)
  state0 = jnp.zeros((batch, heads, num_levels, key_dim, v.shape[-1]), jnp.float32)

  def step(state, xs):
    q_t, k_t, v_t, g_t, lam_t, p_t, valid_t = xs
    o_t, new = _fenwick_step(q_t, k_t, v_t, g_t, lam_t, state, p_t, scale)
    state = jnp.where(valid_t[:, None, None, None, None], new, state)
    return state, jnp.where(valid_t[:, None, None], o_t, 0.0)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(time_major(x) for x in (q, k, v, g, level_weights, position, valid))
  final, o = lax.scan(step, state0, xs)
  return time_major(o), final


# -------------------------------------------------------------------------- xla tier


def _level(level, q, k, v, g, position, starts, valid, scale, chunk_size):
  """Level ``level >= 1`` (a traced int) without its weight: ``(y [B, T, H, V], state
  [B, H, K, V])``, the upper half of every aligned ``2^level`` block reading its lower
  half through a chunked simple GLA."""
  upper = (jnp.right_shift(position, level - 1) & 1) == 1             # [B, T]
  block_start = (position & (jnp.left_shift(1, level) - 1)) == 0
  ids = jnp.cumsum(valid & (starts | block_start), axis=1, dtype=jnp.int32)
  q_l = jnp.where(upper[..., None, None], q, jnp.zeros_like(q))
  k_l = jnp.where((valid & ~upper)[..., None, None], k, jnp.zeros_like(k))
  return linear_recurrence_chunked(q_l, k_l, v, g, None, scale=scale, segment_ids=ids,
                                   chunk_size=chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _levels(q, k, v, g, lam, position, starts, valid, scale, chunk_size):
  """``(sum_l lam[l-1] * y_l [B, T, H, V], final states [L', B, H, K, V])`` over levels
  ``l = 1 .. L'`` (``lam [L', B, T, H]``). The backward pass recomputes each level, so
  no per-level residual is kept."""
  return _levels_forward(q, k, v, g, lam, position, starts, valid, scale, chunk_size)


def _levels_forward(q, k, v, g, lam, position, starts, valid, scale, chunk_size):
  def body(acc, xs):
    level, lam_l = xs
    y, final = _level(level, q, k, v, g, position, starts, valid, scale, chunk_size)
    return acc + lam_l[..., None] * y, final

  acc0 = jnp.zeros(q.shape[:3] + (v.shape[-1],), jnp.float32)
  levels = jnp.arange(1, lam.shape[0] + 1, dtype=jnp.int32)
  return lax.scan(body, acc0, (levels, lam))


def _levels_fwd(q, k, v, g, lam, position, starts, valid, scale, chunk_size):
  out = _levels_forward(q, k, v, g, lam, position, starts, valid, scale, chunk_size)
  return out, (q, k, v, g, lam, position, starts, valid)


def _levels_bwd(scale, chunk_size, res, cotangents):
  q, k, v, g, lam, position, starts, valid = res
  d_out, d_finals = cotangents
  f32 = jnp.float32

  def body(acc, xs):
    level, lam_l, d_final = xs
    (y, _), vjp = jax.vjp(
        lambda q, k, v, g: _level(level, q, k, v, g, position, starts, valid, scale,
                                  chunk_size), q, k, v, g)
    d_lam = jnp.sum(d_out * y, axis=-1)
    grads = vjp((lam_l[..., None] * d_out, d_final))
    return tuple(a + d.astype(f32) for a, d in zip(acc, grads)), d_lam

  acc0 = tuple(jnp.zeros(x.shape, f32) for x in (q, k, v, g))
  levels = jnp.arange(1, lam.shape[0] + 1, dtype=jnp.int32)
  (dq, dk, dv, dg), d_lam = lax.scan(body, acc0, (levels, lam, d_finals))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
          d_lam, None, None, None)


_levels.defvjp(_levels_fwd, _levels_bwd)


def log_linear_chunked(q, k, v, g, level_weights, *, scale, segment_ids=None, lengths=None,
                       chunk_size=64):
  """The level-by-level chunked form; arguments and result of the reference tier."""
  f32 = jnp.float32
  batch, length, heads, key_dim = q.shape
  num_levels = level_weights.shape[-1]
  used = min(num_levels, fenwick_levels(length))
  position, starts, valid = _layout(segment_ids, lengths, batch, length)
  lam = level_weights.astype(f32)
  # Dropped tokens keep the state as it is: no key, no decay.
  g = jnp.where(valid[..., None], g.astype(f32), 0.0)
  scores0 = jnp.einsum("bthk,bthk->bth", q.astype(f32), k.astype(f32), precision=_HIGHEST)
  out = scale * (lam[..., 0] * scores0)[..., None] * v.astype(f32)
  finals = jnp.zeros((0, batch, heads, key_dim, v.shape[-1]), f32)
  if used > 1:
    upper, finals = _levels(q, k, v, g, jnp.moveaxis(lam[..., 1:used], -1, 0), position,
                            starts, valid, scale, chunk_size)
    out = out + upper
  out = jnp.where(valid[..., None, None], out, 0.0)

  last = _last_index(lengths, batch, length)
  last_position = _take_time(position, last)                          # [B]
  bits = (jnp.right_shift(last_position[:, None], jnp.arange(used - 1)[None]) & 1) == 1
  finals = jnp.where(bits.T[:, :, None, None, None], finals, 0.0)     # empty buckets
  newest = (_take_time(k, last).astype(f32)[..., :, None]
            * _take_time(v, last).astype(f32)[..., None, :])
  final = jnp.concatenate([newest[None], finals,
                           jnp.zeros((num_levels - used,) + newest.shape, f32)], axis=0)
  final = jnp.where(valid[:, 0][None, :, None, None, None], final, 0.0)   # empty rows
  return out, jnp.moveaxis(final, 0, 2)


registry.describe("log_linear_attention", registry.MechanismInfo(
    paper="Guo et al. 2025, Log-Linear Attention (log-linear Mamba-2 / simple GLA)",
    family="gated linear", causal=True, non_causal=False,
    state="L x K x V (L = log2 T + 1 Fenwick levels)",
    cost="O(T log T C (K + V)) chunked: one simple GLA per level; memory O(T)",
    step="log_linear_attention_step",
    xla_path="chunked simple_gla per Fenwick level (scan, recomputed backward)"))
registry.register("log_linear_attention", registry.Implementation(
    "reference", log_linear_reference, priority=0, automatic=False))
# One program per shape when called eagerly (a scan of chunked GLAs); inlined under jit.
registry.register("log_linear_attention", registry.Implementation(
    "xla", jax.jit(log_linear_chunked, static_argnames=("scale", "chunk_size")),
    priority=10))


# ------------------------------------------------------------------------------ ops


def _check_level_weights(name, x, lead, dims):
  """``x [*lead, L]`` floating with ``L >= 2``; ``dims`` names the lead (``"B, T, H"``)."""
  x = jnp.asarray(x)
  if x.ndim != len(lead) + 1 or x.shape[:-1] != tuple(lead):
    raise ValueError(f"{name} must be [{dims}, L] with [{dims}]={tuple(lead)}, got "
                     f"{name}.shape={x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if x.shape[-1] < 2:
    raise ValueError(f"{name} needs at least 2 levels (L >= 2), got {name}.shape={x.shape}")
  return x


def _check_lengths(lengths, batch):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be [B]=({batch},) integers, got lengths.shape="
                     f"{lengths.shape}, dtype={lengths.dtype}")
  return lengths


def log_linear_attention(q, k, v, g, level_weights, *, scale=None, output_final_state=False,
                         segment_ids=None, lengths=None, chunk_size=64, implementation=None):
  """Log-linear attention over simple GLA: ``o_t = scale sum_{s<=t} lambda_t^{l(t,s)}
  exp(sum_{s<u<=t} g_u) (q_t . k_s) v_s`` with Fenwick levels ``l(t, s)``.

  ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]`` (log decay), ``level_weights
  [B, T, H, L]`` (lambda; ``L >= 2`` levels cover documents of up to ``2^(L-1)`` tokens,
  :func:`fenwick_levels` gives the count a length needs). ``scale`` (default ``K **
  -0.5``), ``output_final_state``, ``segment_ids [B, T]`` (packed documents: positions
  and state restart where the id changes), ``lengths [B]`` (right padding: later tokens
  dropped, output 0), ``chunk_size`` (of the ``xla`` tier), ``implementation`` (None,
  ``"reference"`` or ``"xla"``). Returns ``(o [B, T, H, V] in v's dtype, final_state
  [B, H, L, K, V] float32 or None)``.
  """
  q, k, v = la._check_qkv(q, k, v)
  batch, length, heads, _ = q.shape
  g = la._check_gate("g", g, q.shape[:3])
  level_weights = _check_level_weights("level_weights", level_weights, q.shape[:3],
                                       "B, T, H")
  num_levels = level_weights.shape[-1]
  if length > 2 ** (num_levels - 1):
    raise ValueError(f"level_weights has L={num_levels} levels, which cover documents of "
                     f"up to 2^(L-1)={2 ** (num_levels - 1)} tokens; T={length} needs "
                     f"L >= {fenwick_levels(length)}")
  lengths = _check_lengths(lengths, batch)
  scale, _, segment_ids, chunk_size = la._check_common(q, v, scale, None, segment_ids,
                                                       chunk_size, v.shape[-1])
  call = LogLinearCall(q, k, v, g, level_weights, scale, segment_ids, lengths, chunk_size)
  o, final = call.run(registry.select("log_linear_attention", implementation, call).fn)
  return o.astype(v.dtype), (final if output_final_state else None)


def log_linear_attention_step(q_t, k_t, v_t, g_t, level_weights_t, state, positions, *,
                              scale=None):
  """One decode step of :func:`log_linear_attention`.

  ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``g_t [B, H]``, ``level_weights_t [B, H, L]``,
  ``state [B, H, L, K, V]`` (zeros = empty), ``positions [B]`` (the token's position in
  its document; 0 restarts the state). Returns ``(o_t [B, H, V], state)``.
  """
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, D], got {name}.shape={x.shape}")
  if q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, K] and v_t [B, H, V] with the same B, H, "
                     f"got {q_t.shape=}, {k_t.shape=}, {v_t.shape=}")
  g_t = la._check_gate("g_t", g_t, q_t.shape[:2])
  level_weights_t = _check_level_weights("level_weights_t", level_weights_t,
                                         q_t.shape[:2], "B, H")
  want = q_t.shape[:2] + (level_weights_t.shape[-1], q_t.shape[-1], v_t.shape[-1])
  if jnp.shape(state) != want:
    raise ValueError(f"state must be [B, H, L, K, V]={want}, got state.shape="
                     f"{jnp.shape(state)}")
  positions = jnp.asarray(positions)
  if positions.shape != q_t.shape[:1] or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be [B]=({q_t.shape[0]},) integers, got "
                     f"positions.shape={positions.shape}, dtype={positions.dtype}")
  scale = q_t.shape[-1] ** -0.5 if scale is None else scale
  if not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got scale={scale!r}")
  o_t, state = _fenwick_step(q_t, k_t, v_t, g_t, level_weights_t,
                             jnp.asarray(state, jnp.float32), positions, float(scale))
  return o_t.astype(v_t.dtype), state
