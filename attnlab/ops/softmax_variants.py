"""Attention with other score functions than the softmax (CATALOG.md section 1).

Five ops, layout ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, Hv]`` (GQA/MQA when
``K < N``), scores ``s_ij = scale q_i . k_j`` over the keys ``j`` query ``i`` may see:

==================  =====================================================================
op                  output row ``o_i``
==================  =====================================================================
sigmoid_attention   ``sum_j sigmoid(s_ij + b) v_j``, no normalizer, ``b = -log(n)`` by
                    default with n the sequence length (Ramapuram et al. 2024, "Theory,
                    Analysis, and Best Practices for Sigmoid Self-Attention", §2 and its
                    ``b = -log n`` recommendation)
relu_attention      ``sum_j relu(s_ij) v_j`` (Zhang, Titov & Sennrich 2021, "Sparse
                    Attention with Linear Units": the ReLU in place of the softmax)
rela                ReLA: relu_attention, then the RMS norm of the heads' concatenation
                    ``z``: ``g * z / rms(z)``, times ``sigmoid(w * z)`` with the gate
                    vector ``w`` (ReLA-g) when ``norm_gate`` is given (same paper; the
                    gated RMSNorm as the authors' implementation writes it)
softplus_attention  ``sum_j R_ij v_j``: LSSA ``A_ij = softplus(lam_i s_ij) / sum_j'
                    softplus(lam_i s_ij')`` with ``lam_i = log(n_i) / log(H)``, ``n_i`` the
                    number of keys row i sees, then the re-weighting ``R_ij = A_ij^p /
                    sum_j' A_ij'^p`` (LSSAR; ``p = 1`` is LSSA) (Gao & Spratling 2025,
                    "Softplus Attention with Re-weighting Boosts Length Extrapolation")
cog_attention       ``sum_j sign(s_ij) e^{|s_ij|} v_j / sum_j' e^{|s_ij'|}`` (Lv et al. 2024,
                    "More Expressive Attention with Negative Weights": the signed softmax
                    of |s|, as the authors' implementation computes it)
==================  =====================================================================

The softplus re-weighting is written as we read the paper's description (sharpen the
l1-normalised weights with the power p, renormalise; p = 15 in its extrapolation results);
its full text could not be retrieved here, only its abstract and summaries, so the exact
placement of the power is not checked against the paper's equation.

Masks: ``causal``; ``segment_ids [B, T]`` (packed documents: a change of id starts a new
document, queries see keys of their own document); ``lengths [B]`` (right padding: keys at
``j >= lengths[b]`` are never seen). A query that sees no key returns zeros.

Tiers: ``reference`` builds the dense ``[B, N, T, T]`` weights. ``xla`` is one blockwise
pass over the key blocks each query block sees (the block lists and mask summaries of
:mod:`attnlab.ops.softmax_xla`), with a ``custom_vjp`` that recomputes the scores in a
pass over query blocks (dq) and one over key blocks (dk, dv). The unnormalized scores
(sigmoid, ReLU) need no row statistics; softplus and Cog keep softmax's running max and
sum: ``A^p`` normalised is the softmax of the logits ``p log softplus(lam s)``, and Cog's
weights are the softmax of ``|s|`` with signed numerators. Memory is O(T) plus one block
of scores; no ``[T, T]`` matrix exists. Everything computes in float32 (float64 for
float64 inputs) and returns the query dtype.

Decoding: a KV cache (:func:`variant_attention_cache`, ``{"k", "v", "pos"}``) and one
``*_step`` per op that writes the token at slot ``position`` and attends over the filled
slots up to it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import masks as masks_lib
from attnlab.ops import registry
from attnlab.ops.softmax import _check_int_array as _check_ints
# The blockwise machinery of the softmax xla tier: block lists from the mask's block
# summary, windows of blocks, score recomputation per block and masked writes.
from attnlab.ops.softmax_xla import (BlockSizes, _Blocks, _block_lists, _group, _Static,
                                     _window, _write, _zero_cotangent)

__all__ = [
    "sigmoid_attention", "sigmoid_attention_step", "relu_attention", "relu_attention_step",
    "rela", "rela_step", "softplus_attention", "softplus_attention_step", "cog_attention",
    "cog_attention_step", "variant_attention_cache",
]

_HIGHEST = lax.Precision.HIGHEST
# Below this argument log(softplus(u)) = u + log1p(...) is u to float precision.
_SOFTPLUS_LINEAR_BELOW = -30.0


# ------------------------------------------------------------------ score functions


def _log_softplus(u):
  """``log(softplus(u))`` and its derivative ``sigmoid(u) / softplus(u)``, finite for every
  u (for u << 0 softplus(u) ~ e^u underflows; there the log is u and the slope 1)."""
  low = u < _SOFTPLUS_LINEAR_BELOW
  safe = jnp.where(low, 0.0, u)
  sp = jax.nn.softplus(safe)
  return (jnp.where(low, u, jnp.log(sp)),
          jnp.where(low, 1.0, jax.nn.sigmoid(safe) / sp))


@dataclasses.dataclass(frozen=True)
class _Score:
  """How scores become weights. ``kind`` is one of ``sigmoid``, ``relu`` (unnormalized:
  ``phi(s)``), ``softplus``, ``cog`` (normalized: ``c e^{l(s)} / sum e^{l(s)}``)."""

  kind: str
  bias: float = 0.0    # sigmoid's b
  power: float = 1.0   # softplus's re-weighting power p

  @property
  def normalized(self) -> bool:
    return self.kind in ("softplus", "cog")

  def weight(self, s):
    """Unnormalized kinds: ``(phi(s), phi'(s))``."""
    if self.kind == "sigmoid":
      phi = jax.nn.sigmoid(s + self.bias)
      return phi, phi * (1.0 - phi)
    return jax.nn.relu(s), (s > 0).astype(s.dtype)

  def logit(self, s, row):
    """Normalized kinds: ``(l(s), c(s), l'(s))``; ``row`` the per-row factor lam (softplus),
    broadcastable to s."""
    if self.kind == "cog":
      sign = jnp.sign(s)
      return jnp.abs(s), sign, sign
    log_sp, slope = _log_softplus(row * s)
    return self.power * log_sp, jnp.ones_like(s), self.power * row * slope


# --------------------------------------------------------------------- dense form


def _dense_scores(q, k, scale):
  """``[B, K, G, T, S]`` float32 (float64 for float64 inputs) scores, G = N // K."""
  batch, length, heads, dim = q.shape
  num_kv = k.shape[2]
  cdt = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.astype(cdt).reshape(batch, length, num_kv, heads // num_kv, dim)
  return scale * jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(cdt), precision=_HIGHEST)


def _dense_weights(score, s, allowed, row):
  """The weights ``[B, K, G, T, S]`` of scores ``s`` where ``allowed`` (broadcastable);
  rows without an allowed key get zeros. ``row`` broadcastable to s (softplus only)."""
  if not score.normalized:
    return jnp.where(allowed, score.weight(s)[0], 0.0)
  if score.kind == "cog":
    mag = jnp.where(allowed, jnp.abs(s), -jnp.inf)
    top = lax.stop_gradient(jnp.max(mag, axis=-1, keepdims=True))
    e = jnp.where(allowed, jnp.exp(mag - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    return jnp.sign(s) * e / jnp.where(den > 0, den, 1.0)
  # LSSA: softplus, l1 normalisation; LSSAR: the power p, normalised again. A / max(A)
  # leaves the result unchanged and keeps A^p from underflowing to an all-zero row.
  a = jnp.where(allowed, jax.nn.softplus(row * s), 0.0)
  den = jnp.sum(a, axis=-1, keepdims=True)
  w = a / jnp.where(den > 0, den, 1.0)
  if score.power != 1.0:
    top = lax.stop_gradient(jnp.max(w, axis=-1, keepdims=True))
    w = (w / jnp.where(top > 0, top, 1.0)) ** score.power
    den = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(den > 0, den, 1.0)
  return w


def _dense_output(w, v):
  """``w [B, K, G, T, S]`` and ``v [B, S, K, Hv]`` -> ``[B, T, N, Hv]``."""
  batch, num_kv, groups, length = w.shape[:4]
  o = jnp.einsum("bkgts,bskh->btkgh", w, v.astype(w.dtype), precision=_HIGHEST)
  return o.reshape(batch, length, num_kv * groups, v.shape[-1])


# ---------------------------------------------------------------- canonical call


@dataclasses.dataclass(frozen=True)
class VariantCall:
  """The canonical arguments of every tier: q, k, v, the folded mask, the per-row factor
  (softplus's lam ``[B, T]``, else None), the score function, scale and block sizes."""

  q: Any
  k: Any
  v: Any
  mask: masks_lib.Mask | None
  row: Any
  score: _Score
  scale: float
  block_sizes: BlockSizes | None


def _reference(call: VariantCall):
  q = call.q
  batch, length = q.shape[:2]
  s = _dense_scores(q, call.k, call.scale)
  allowed = jnp.ones((1, 1, 1, length, length), bool)
  if call.mask is not None:
    dense = call.mask.dense(length, length)
    allowed = allowed & dense.reshape((-1, 1, 1, length, length))
  row = None if call.row is None else call.row.astype(s.dtype)[:, None, None, :, None]
  w = _dense_weights(call.score, s, allowed, row)
  return _dense_output(w, call.v).astype(q.dtype)


# ------------------------------------------------------------- blockwise (xla) form


@dataclasses.dataclass(frozen=True)
class _VariantStatic:
  score: _Score
  blocks: _Static  # softmax_xla's scale / block lengths (no soft cap)


def _row_block(row, q_start, bq):
  """The per-row factor of one query block, ``[B, 1, 1, bq, 1]`` against the scores."""
  if row is None:
    return None
  return _window(row, q_start, bq, 1)[:, None, None, :, None]


def _forward(static, q, k, v, row, mask):
  """Returns ``o [B, T, N, Hv]`` and, for normalized scores, the log-normalizer
  ``[B, K, G, T]`` (``+inf`` on rows that see nothing); None otherwise."""
  score = static.score
  blk = _Blocks(static.blocks, q, k, None, mask)
  kv_order, kv_count, _, _ = _block_lists(mask, blk.q_len, blk.kv_len, blk.bq, blk.bk)
  cdt = blk.cdt
  value_dim = v.shape[-1]
  stat_shape = (blk.batch, blk.num_kv, blk.groups, blk.bq)

  def q_step(i, carry):
    out, lse = carry
    q_start, q_idx, row_ok = blk.q_block(i)
    qb = _group(_window(q, q_start, blk.bq, 1), blk.num_kv)
    rb = _row_block(row, q_start, blk.bq)

    def kv_step(n, state):
      m, l, acc = state
      kv_start, kv_idx, col_ok = blk.kv_block(kv_order[i, n])
      kb = _window(k, kv_start, blk.bk, 1)
      vb = _window(v, kv_start, blk.bk, 1).astype(cdt)
      s, allowed, _ = blk.scores(qb, kb, q_idx, kv_idx, row_ok, col_ok)
      if not score.normalized:
        w = jnp.where(allowed, score.weight(s)[0], 0.0)
        return m, l, acc + jnp.einsum("bkgqs,bskh->bkgqh", w, vb)
      logit, sign, _ = score.logit(s, rb)
      logit = jnp.where(allowed, logit, -jnp.inf)
      m_new = jnp.maximum(m, logit.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(allowed, jnp.exp(logit - m_safe[..., None]), 0.0)
      alpha = jnp.exp(m - m_safe)
      acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskh->bkgqh", sign * p, vb)
      return m_new, alpha * l + p.sum(-1), acc

    init = (jnp.full(stat_shape, -jnp.inf, cdt), jnp.zeros(stat_shape, cdt),
            jnp.zeros(stat_shape + (value_dim,), cdt))
    m, l, acc = lax.fori_loop(0, kv_count[i], kv_step, init)
    if score.normalized:
      seen = l > 0
      acc = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
      m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
      lse_b = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
      lse = _write(lse, lse_b, q_start, row_ok, 3)
    o = acc.transpose(0, 3, 1, 2, 4).reshape(blk.batch, blk.bq, -1, value_dim)
    return _write(out, o, q_start, row_ok, 1), lse

  out0 = jnp.zeros(q.shape[:3] + (value_dim,), q.dtype)
  lse0 = jnp.zeros((blk.batch, blk.num_kv, blk.groups, blk.q_len), cdt)
  out, lse = lax.fori_loop(0, blk.nq, q_step, (out0, lse0))
  return out, (lse if score.normalized else None)


def _backward(static, q, k, v, row, mask, out, lse, dout):
  score = static.score
  blk = _Blocks(static.blocks, q, k, None, mask)
  kv_order, kv_count, q_order, q_count = _block_lists(
      mask, blk.q_len, blk.kv_len, blk.bq, blk.bk)
  cdt = blk.cdt
  scale = static.blocks.scale
  delta = None
  if score.normalized:
    # D_i = sum_h dO_ih O_ih: the row term of a normalized weight's backward.
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(cdt), out.astype(cdt))
    delta = delta.reshape(blk.batch, blk.num_kv, blk.groups, blk.q_len)

  def q_rows(i):
    q_start, q_idx, row_ok = blk.q_block(i)
    stats = None
    if score.normalized:
      stats = (_window(lse, q_start, blk.bq, 3), _window(delta, q_start, blk.bq, 3))
    return (q_start, q_idx, row_ok, _group(_window(q, q_start, blk.bq, 1), blk.num_kv),
            _group(_window(dout, q_start, blk.bq, 1), blk.num_kv).astype(cdt),
            _row_block(row, q_start, blk.bq), stats)

  def kv_cols(j):
    kv_start, kv_idx, col_ok = blk.kv_block(j)
    return (kv_start, kv_idx, col_ok, _window(k, kv_start, blk.bk, 1),
            _window(v, kv_start, blk.bk, 1).astype(cdt))

  def weights_and_dscores(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok, rb, stats):
    """The value weights ``w`` (dv = w^T dO) and the gradient of the scaled scores."""
    s, allowed, _ = blk.scores(qb, kb, q_idx, kv_idx, row_ok, col_ok)
    dw = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb)
    if not score.normalized:
      phi, slope = score.weight(s)
      w = jnp.where(allowed, phi, 0.0)
      return w, jnp.where(allowed, dw * slope, 0.0)
    lse_b, delta_b = stats
    logit, sign, slope = score.logit(s, rb)
    p = jnp.where(allowed, jnp.exp(logit - lse_b[..., None]), 0.0)
    # o_i = sum_j c_ij p_ij v_j with p = softmax(l): dl_ij = p_ij (c_ij dw_ij - D_i).
    dlogit = p * (sign * dw - delta_b[..., None])
    return sign * p, jnp.where(allowed, dlogit * slope, 0.0)

  def dq_step(i, dq):
    q_start, q_idx, row_ok, qb, dob, rb, stats = q_rows(i)

    def kv_step(n, acc):
      _, kv_idx, col_ok, kb, vb = kv_cols(kv_order[i, n])
      _, ds = weights_and_dscores(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok, rb, stats)
      return acc + scale * jnp.einsum("bkgqs,bskh->bqkgh", ds, kb.astype(cdt))

    acc = lax.fori_loop(0, kv_count[i], kv_step, jnp.zeros(qb.shape, cdt))
    return _write(dq, acc.reshape(blk.batch, blk.bq, -1, blk.head_dim), q_start, row_ok, 1)

  dq = lax.fori_loop(0, blk.nq, dq_step, jnp.zeros_like(q))

  def dkv_step(j, carry):
    dk, dv = carry
    kv_start, kv_idx, col_ok, kb, vb = kv_cols(j)

    def q_step(n, acc):
      dk_acc, dv_acc = acc
      _, q_idx, row_ok, qb, dob, rb, stats = q_rows(q_order[j, n])
      w, ds = weights_and_dscores(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok, rb, stats)
      dv_acc = dv_acc + jnp.einsum("bkgqs,bqkgh->bskh", w, dob)
      dk_acc = dk_acc + scale * jnp.einsum("bkgqs,bqkgh->bskh", ds, qb.astype(cdt))
      return dk_acc, dv_acc

    init = (jnp.zeros(kb.shape, cdt), jnp.zeros(vb.shape, cdt))
    dk_acc, dv_acc = lax.fori_loop(0, q_count[j], q_step, init)
    return (_write(dk, dk_acc, kv_start, col_ok, 1), _write(dv, dv_acc, kv_start, col_ok, 1))

  dk, dv = lax.fori_loop(0, blk.nk, dkv_step, (jnp.zeros_like(k), jnp.zeros_like(v)))
  return dq, dk, dv


def _core_plain(static, q, k, v, row, mask):
  return _forward(static, q, k, v, row, mask)[0]


def _core_fwd(static, q, k, v, row, mask):
  out, lse = _forward(static, q, k, v, row, mask)
  return out, (q, k, v, row, mask, out, lse)


def _core_bwd(static, residuals, dout):
  q, k, v, row, mask, out, lse = residuals
  dq, dk, dv = _backward(static, q, k, v, row, mask, out, lse, dout)
  # lam counts keys: it is no function of q, k, v and gets no gradient.
  drow = None if row is None else jnp.zeros_like(row)
  return dq, dk, dv, drow, _zero_cotangent(mask)


_core = jax.custom_vjp(_core_plain, nondiff_argnums=(0,))
_core.defvjp(_core_fwd, _core_bwd)
# Compiled as one program when called eagerly (a traced caller inlines it).
_core_jit = jax.jit(_core, static_argnums=(0,))


def _xla(call: VariantCall):
  sizes = call.block_sizes or BlockSizes()
  length = call.q.shape[1]
  blocks = _Static(call.scale, None, min(sizes.block_q, length), min(sizes.block_k, length))
  return _core_jit(_VariantStatic(call.score, blocks), call.q, call.k, call.v, call.row,
                   call.mask)


# ----------------------------------------------------------------- argument checks


def _check_qkv(q, k, v):
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, heads, dim], got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  batch, length, heads, dim = q.shape
  if k.shape[:2] != (batch, length) or k.shape[3] != dim:
    raise ValueError(f"k must be [B, T, K, H] with q's B, T and H, got {q.shape=}, {k.shape=}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, T, K, Hv] with k's B, T and K, got {k.shape=}, "
                     f"{v.shape=}")
  if k.shape[2] == 0 or heads % k.shape[2]:
    raise ValueError(f"the query heads N={heads} must be a multiple of the key/value heads "
                     f"K={k.shape[2]}, got {q.shape=}, {k.shape=}")
  if length == 0:
    raise ValueError(f"sequence length must be positive, got {q.shape=}")
  return q, k, v


def _check_float(name, value, *, positive=False):
  if (not isinstance(value, (int, float, np.floating)) or isinstance(value, bool)
      or not np.isfinite(value) or (positive and value <= 0)):
    kind = "a positive finite" if positive else "a finite"
    raise ValueError(f"{name} must be {kind} Python float, got {name}={value!r}")
  return float(value)


def _documents(segment_ids):
  """``[B, T]`` int32 document index: a change of segment id starts a new document."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                          jnp.cumsum(change, axis=1, dtype=jnp.int32)], axis=1)


def _key_counts(batch, length, causal, segment_ids, lengths):
  """``[B, T]`` int32: how many keys each query sees (its document's keys ``< lengths``,
  up to itself when causal)."""
  t = jnp.arange(length, dtype=jnp.int32)[None]
  start = jnp.zeros((batch, length), jnp.int32)
  end = jnp.full((batch, length), length, jnp.int32)
  if segment_ids is not None:
    change = jnp.concatenate([jnp.zeros((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(change, t, 0), axis=1)
    # end_i: the first document start after i (or T).
    nxt = jnp.where(change, t, length)
    nxt = jnp.concatenate([nxt[:, 1:], jnp.full((batch, 1), length, jnp.int32)], axis=1)
    end = lax.cummin(nxt, axis=1, reverse=True)
  hi = t + 1 if causal else end
  if lengths is not None:
    hi = jnp.minimum(hi, lengths[:, None].astype(jnp.int32))
  return jnp.maximum(hi - start, 0)


def _length_factor(counts, head_dim):
  """LSSA's ``lam = log_H(n) = log(n) / log(H)`` (1 key: lam = 0)."""
  return jnp.log(jnp.maximum(counts, 1).astype(jnp.float32)) / math.log(head_dim)


def _canonicalize(q, k, v, score, *, causal, segment_ids, lengths, scale, block_sizes):
  q, k, v = _check_qkv(q, k, v)
  batch, length, _, head_dim = q.shape
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  scale = head_dim ** -0.5 if scale is None else _check_float("scale", scale, positive=True)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be attnlab.ops.BlockSizes, got {block_sizes!r}")
  parts = [masks_lib.Causal() if causal else None]
  if segment_ids is not None:
    segment_ids = _check_ints("segment_ids", segment_ids, (batch, length))
    docs = _documents(segment_ids)
    parts.append(masks_lib.Documents(docs, docs))
  if lengths is not None:
    lengths = _check_ints("lengths", lengths, (batch,))
    parts.append(masks_lib.Padding(None, lengths))
  row = None
  if score.kind == "softplus":
    if head_dim < 2:
      raise ValueError(f"softplus_attention's log_H(n) needs head dim H >= 2, got {q.shape=}")
    row = _length_factor(_key_counts(batch, length, causal, segment_ids, lengths), head_dim)
  return VariantCall(q, k, v, masks_lib.combine_masks(*parts), row, score, scale,
                     block_sizes)


def _run(mechanism, call, implementation):
  return registry.select(mechanism, implementation, call).fn(call)


# ------------------------------------------------------------------------ the ops

_COMMON_ARGS = """
  ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, Hv]`` of one floating dtype, N a
  multiple of K. ``causal``; ``segment_ids [B, T]`` ints (packed documents: a change of id
  starts a document); ``lengths [B]`` ints (right padding: later keys are never seen);
  ``scale`` (default ``H ** -0.5``); ``implementation`` (None, ``"reference"``,
  ``"xla"``); ``block_sizes`` (:class:`~attnlab.ops.BlockSizes` of the xla tier). Returns
  ``o [B, T, N, Hv]`` in q's dtype; a query that sees no key gives zeros."""


def sigmoid_attention(q, k, v, *, bias=None, causal=True, segment_ids=None, lengths=None,
                      scale=None, implementation=None, block_sizes=None):
  """Sigmoid attention, ``o_i = sum_j sigmoid(scale q_i . k_j + b) v_j`` (no normalizer).

  ``bias`` b, a Python float; default ``-log(T)`` (Ramapuram et al. 2024 recommend
  ``b = -log n``, n the sequence length; a decoder should fix n, see the mixer)."""
  b = None if bias is None else _check_float("bias", bias)
  call = _canonicalize(q, k, v, _Score("sigmoid"), causal=causal, segment_ids=segment_ids,
                       lengths=lengths, scale=scale, block_sizes=block_sizes)
  b = -math.log(call.q.shape[1]) if b is None else b
  call = dataclasses.replace(call, score=_Score("sigmoid", bias=b))
  return _run("sigmoid_attention", call, implementation)


def relu_attention(q, k, v, *, causal=True, segment_ids=None, lengths=None, scale=None,
                   implementation=None, block_sizes=None):
  """ReLU attention, ``o_i = sum_j relu(scale q_i . k_j) v_j`` (no normalizer)."""
  call = _canonicalize(q, k, v, _Score("relu"), causal=causal, segment_ids=segment_ids,
                       lengths=lengths, scale=scale, block_sizes=block_sizes)
  return _run("relu_attention", call, implementation)


def _check_power(power):
  power = _check_float("power", power)
  if power < 1.0:
    raise ValueError(f"power must be >= 1 (1 = LSSA, > 1 sharpens), got power={power!r}")
  return power


def softplus_attention(q, k, v, *, power=1.0, causal=True, segment_ids=None, lengths=None,
                       scale=None, implementation=None, block_sizes=None):
  """LSSA / LSSAR: ``A_ij = softplus(lam_i s_ij) / sum_j' softplus(lam_i s_ij')`` with
  ``lam_i = log(n_i) / log(H)`` (n_i the keys row i sees), then ``R = A^p / sum A^p``.

  ``power`` p >= 1 (1: LSSA; the paper's re-weighting uses p = 15)."""
  call = _canonicalize(q, k, v, _Score("softplus", power=_check_power(power)),
                       causal=causal, segment_ids=segment_ids, lengths=lengths, scale=scale,
                       block_sizes=block_sizes)
  return _run("softplus_attention", call, implementation)


def cog_attention(q, k, v, *, causal=True, segment_ids=None, lengths=None, scale=None,
                  implementation=None, block_sizes=None):
  """Cog attention, ``o_i = sum_j sign(s_ij) softmax_j(|s_ij|) v_j``, ``s = scale q k^T``."""
  call = _canonicalize(q, k, v, _Score("cog"), causal=causal, segment_ids=segment_ids,
                       lengths=lengths, scale=scale, block_sizes=block_sizes)
  return _run("cog_attention", call, implementation)


for _fn in (sigmoid_attention, relu_attention, softplus_attention, cog_attention):
  _fn.__doc__ += "\n" + _COMMON_ARGS


def _check_norm(norm_scale, norm_gate, eps, heads, value_dim):
  shape = (heads, value_dim)
  for name, x in (("norm_scale", norm_scale), ("norm_gate", norm_gate)):
    if x is None:
      continue
    x = jnp.asarray(x)
    if x.shape != shape:
      raise ValueError(f"{name} must be [N, Hv]={shape}, got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  return _check_float("eps", eps, positive=True)


def _gated_rms_norm(o, norm_scale, norm_gate, eps):
  """ReLA's norm of the heads' concatenation ``z`` of ``o [..., N, Hv]``:
  ``g * z / sqrt(mean(z^2) + eps)``, times ``sigmoid(w * z)`` when the gate w is given."""
  z = o.astype(jnp.float32)
  flat = z.reshape(z.shape[:-2] + (-1,))
  inv = lax.rsqrt(jnp.mean(flat * flat, axis=-1) + eps)[..., None, None]
  lead = (1,) * (z.ndim - 2)
  y = z * inv * jnp.asarray(norm_scale, jnp.float32).reshape(lead + z.shape[-2:])
  if norm_gate is not None:
    gate = jnp.asarray(norm_gate, jnp.float32).reshape(lead + z.shape[-2:])
    y = y * jax.nn.sigmoid(gate * z)
  return y.astype(o.dtype)


@dataclasses.dataclass(frozen=True)
class RelaCall:
  """Canonical call of ReLA: relu_attention's call and the norm's parameters."""

  attention: VariantCall
  norm_scale: Any
  norm_gate: Any
  eps: float


def rela(q, k, v, norm_scale, norm_gate=None, *, eps=1e-6, causal=True, segment_ids=None,
         lengths=None, scale=None, implementation=None, block_sizes=None):
  """ReLA: ``z = relu_attention(q, k, v)`` of all heads, then ``norm_scale * z / rms(z)``
  (the RMS over the N * Hv channels of a token), times ``sigmoid(norm_gate * z)`` when
  ``norm_gate`` is given (ReLA-g); ``norm_scale``, ``norm_gate`` ``[N, Hv]``."""
  call = _canonicalize(q, k, v, _Score("relu"), causal=causal, segment_ids=segment_ids,
                       lengths=lengths, scale=scale, block_sizes=block_sizes)
  eps = _check_norm(norm_scale, norm_gate, eps, call.q.shape[2], call.v.shape[3])
  return _run("rela", RelaCall(call, norm_scale, norm_gate, eps), implementation)


rela.__doc__ += "\n" + _COMMON_ARGS


def _rela_tier(fn):
  def run(call: RelaCall):
    return _gated_rms_norm(fn(call.attention), call.norm_scale, call.norm_gate, call.eps)
  return run


# ---------------------------------------------------------------------- decoding


def variant_attention_cache(batch, max_len, num_kv_heads, head_dim, value_dim=None,
                            dtype=jnp.float32):
  """An empty decode cache: ``{"k": [B, L, K, H], "v": [B, L, K, Hv], "pos": [B, L]}``
  (``pos`` the position each slot holds, -1 when empty)."""
  value_dim = head_dim if value_dim is None else value_dim
  return {"k": jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
          "v": jnp.zeros((batch, max_len, num_kv_heads, value_dim), dtype),
          "pos": jnp.full((batch, max_len), -1, jnp.int32)}


def _check_step(q_t, k_t, v_t, cache, positions, scale):
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, heads, dim], got {name}.shape={x.shape}")
  batch, heads, head_dim = q_t.shape
  if k_t.shape[0] != batch or k_t.shape[2] != head_dim or v_t.shape[:2] != k_t.shape[:2]:
    raise ValueError(f"k_t must be [B, K, H] and v_t [B, K, Hv] with q_t's B, H, got "
                     f"{q_t.shape=}, {k_t.shape=}, {v_t.shape=}")
  if heads % k_t.shape[1]:
    raise ValueError(f"the query heads N={heads} must be a multiple of the key/value heads "
                     f"K={k_t.shape[1]}")
  if (not isinstance(cache, dict) or set(cache) != {"k", "v", "pos"}
      or cache["k"].shape[0] != batch or cache["k"].shape[2:] != k_t.shape[1:]
      or cache["v"].shape[:2] != cache["k"].shape[:2]
      or cache["v"].shape[2:] != v_t.shape[1:]
      or cache["pos"].shape != cache["k"].shape[:2]):
    raise ValueError("cache must be variant_attention_cache(...) for k_t and v_t, got "
                     f"{jax.tree.map(jnp.shape, cache)}")
  positions = _check_ints("positions", positions, (batch,))
  scale = head_dim ** -0.5 if scale is None else _check_float("scale", scale, positive=True)
  return q_t, k_t, v_t, positions, scale


def _step(score, q_t, k_t, v_t, cache, positions, scale):
  """Write token ``positions[b]`` into its slot and attend over the slots ``<=`` it."""
  q_t, k_t, v_t, positions, scale = _check_step(q_t, k_t, v_t, cache, positions, scale)
  slots = cache["pos"].shape[1]
  write = jnp.arange(slots)[None] == positions[:, None]
  k_cache = jnp.where(write[..., None, None], k_t[:, None].astype(cache["k"].dtype),
                      cache["k"])
  v_cache = jnp.where(write[..., None, None], v_t[:, None].astype(cache["v"].dtype),
                      cache["v"])
  pos = jnp.where(write, positions[:, None], cache["pos"])
  allowed = (pos >= 0) & (pos <= positions[:, None])
  s = _dense_scores(q_t[:, None], k_cache, scale)  # [B, K, G, 1, L]
  row = None
  if score.kind == "softplus":
    row = _length_factor(allowed.sum(-1), q_t.shape[-1])[:, None, None, None, None]
  w = _dense_weights(score, s, allowed[:, None, None, None, :], row)
  o_t = _dense_output(w, v_cache)[:, 0].astype(q_t.dtype)
  return o_t, {"k": k_cache, "v": v_cache, "pos": pos}


_STEP_DOC = """
  ``q_t [B, N, H]``, ``k_t [B, K, H]``, ``v_t [B, K, Hv]``, ``cache`` from
  :func:`variant_attention_cache` (``max_len`` slots), ``positions [B]`` (each row's
  position in its document, ``< max_len``): slot ``positions[b]`` receives the token and
  the query sees the filled slots up to it. Returns ``(o_t [B, N, Hv], cache)``."""


def sigmoid_attention_step(q_t, k_t, v_t, cache, positions, *, bias, scale=None):
  """One decode step of causal :func:`sigmoid_attention` with the fixed bias ``b``."""
  score = _Score("sigmoid", bias=_check_float("bias", bias))
  return _step(score, q_t, k_t, v_t, cache, positions, scale)


def relu_attention_step(q_t, k_t, v_t, cache, positions, *, scale=None):
  """One decode step of causal :func:`relu_attention`."""
  return _step(_Score("relu"), q_t, k_t, v_t, cache, positions, scale)


def rela_step(q_t, k_t, v_t, cache, positions, norm_scale, norm_gate=None, *, eps=1e-6,
              scale=None):
  """One decode step of causal :func:`rela` (``norm_scale``, ``norm_gate`` ``[N, Hv]``)."""
  q_t, _, v_t, _, _ = _check_step(q_t, k_t, v_t, cache, positions, scale)
  eps = _check_norm(norm_scale, norm_gate, eps, q_t.shape[1], v_t.shape[2])
  o_t, cache = _step(_Score("relu"), q_t, k_t, v_t, cache, positions, scale)
  return _gated_rms_norm(o_t, norm_scale, norm_gate, eps), cache


def softplus_attention_step(q_t, k_t, v_t, cache, positions, *, power=1.0, scale=None):
  """One decode step of causal :func:`softplus_attention` (n = the filled slots seen)."""
  return _step(_Score("softplus", power=_check_power(power)), q_t, k_t, v_t, cache,
               positions, scale)


def cog_attention_step(q_t, k_t, v_t, cache, positions, *, scale=None):
  """One decode step of causal :func:`cog_attention`."""
  return _step(_Score("cog"), q_t, k_t, v_t, cache, positions, scale)


for _fn in (sigmoid_attention_step, relu_attention_step, rela_step, softplus_attention_step,
            cog_attention_step):
  _fn.__doc__ += "\n" + _STEP_DOC


# ---------------------------------------------------------------------- registry

_STATE = "KV cache, T x (K + Hv)"
_COST = "O(T^2 K); block-sparse masks (causal, documents) skip empty blocks"
_ONE_PASS = "blockwise, one pass over the live key blocks (softmax_xla's block lists)"

for _name, _paper, _path in (
    ("sigmoid_attention",
     "Ramapuram et al. 2024, Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
     _ONE_PASS + ", no row statistics"),
    ("relu_attention", "Zhang, Titov & Sennrich 2021, Sparse Attention with Linear Units "
     "(ReLU scores)", _ONE_PASS + ", no row statistics"),
    ("rela", "Zhang, Titov & Sennrich 2021, Sparse Attention with Linear Units (ReLA, gated "
     "RMSNorm)", "relu_attention's blockwise pass, then the norm"),
    ("softplus_attention", "Gao & Spratling 2025, Softplus Attention with Re-weighting Boosts "
     "Length Extrapolation (LSSA / LSSAR)",
     _ONE_PASS + ", online softmax of p log softplus(lam s)"),
    ("cog_attention", "Lv et al. 2024, More Expressive Attention with Negative Weights (Cog)",
     _ONE_PASS + ", online softmax of |s| with signed numerators"),
):
  registry.describe(_name, registry.MechanismInfo(
      paper=_paper, family="softmax", causal=True, non_causal=True, state=_STATE,
      cost=_COST, step=f"{_name}_step", xla_path=_path))

for _name in ("sigmoid_attention", "relu_attention", "softplus_attention", "cog_attention"):
  registry.register(_name, registry.Implementation(
      "reference", _reference, priority=0, automatic=False))
  registry.register(_name, registry.Implementation("xla", _xla, priority=10))
registry.register("rela", registry.Implementation(
    "reference", _rela_tier(_reference), priority=0, automatic=False))
registry.register("rela", registry.Implementation("xla", _rela_tier(_xla), priority=10))
