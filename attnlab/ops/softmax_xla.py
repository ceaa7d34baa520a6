"""Softmax attention, xla tier: blockwise online softmax in pure JAX.

"Self-attention Does Not Need O(n^2) Memory" (Rabe & Staats 2021) and FlashAttention
(Dao et al. 2022) in XLA: the keys are visited in blocks with a running max and sum per
query row, so no ``[T, S]`` matrix ever exists. A ``custom_vjp`` saves only the output
and the log-sum-exp and recomputes scores in two backward passes (one over query blocks
for dq and the bias gradient, one over key blocks for dk and dv).

Blocks: query block ``i`` covers rows ``[i * bq, min((i + 1) * bq, T))``. The mask's
block summary lists, for every query block, the key blocks that are not EMPTY; the loops
visit only those (and, in the dk/dv pass, the transposed lists). Ragged ends need no
padding: the last block's window is shifted back to end at ``T`` (or ``S``) and the rows
or keys it shares with the previous block are masked out and left unwritten.

Layout: arrays stay ``[B, T, N, H]``; each query block is viewed as ``[B, bq, K, G, H]``
(``G = N // K``) so that GQA/MQA never repeats keys or values in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block lengths of the blockwise tiers (capped at T and S)."""

  block_q: int = 512
  block_k: int = 512

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  soft_cap: float | None
  block_q: int
  block_k: int


def _block_lists(mask, q_len, kv_len, block_q, block_k):
  """Non-empty key blocks per query block, and query blocks per key block.

  Returns ``(kv_order [nq, nk], kv_count [nq], q_order [nk, nq], q_count [nk])``: row
  ``i`` of ``kv_order`` starts with the ``kv_count[i]`` non-empty key blocks, ascending.
  """
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  if mask is None:
    summary = np.full((nq, nk), masks_lib.FULL, np.int8)
  else:
    summary = mask.block_summary(q_len, kv_len, block_q, block_k)
  if isinstance(summary, np.ndarray):
    live = summary != masks_lib.EMPTY
    lists = (np.argsort(~live, axis=1, kind="stable"), live.sum(1),
             np.argsort(~live.T, axis=1, kind="stable"), live.sum(0))
  else:
    live = summary != masks_lib.EMPTY
    lists = (jnp.argsort(~live, axis=1, stable=True), live.sum(1),
             jnp.argsort(~live.T, axis=1, stable=True), live.sum(0))
  return tuple(jnp.asarray(x, jnp.int32) for x in lists)


def _to_groups(x, num_kv, groups):
  """``[..., bq, bk]`` (leading dims broadcastable to ``[B, N]``) -> rank 5 ``[B', K', G', bq, bk]``."""
  x = jnp.asarray(x)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv, groups, *x.shape[2:])


def _window(x, start, size, axis):
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _group(x, num_kv):
  """``[B, bq, N, H]`` -> ``[B, bq, K, G, H]`` (a block, so the relayout stays small)."""
  return x.reshape(x.shape[0], x.shape[1], num_kv, x.shape[2] // num_kv, x.shape[3])


def _write(buffer, block, start, keep, axis):
  """Write ``block`` at ``start`` along ``axis``, keeping the old values where ``~keep``."""
  old = _window(buffer, start, block.shape[axis], axis)
  shape = [1] * block.ndim
  shape[axis] = keep.shape[0]
  new = jnp.where(keep.reshape(shape), block.astype(buffer.dtype), old)
  return lax.dynamic_update_slice_in_dim(buffer, new, start, axis=axis)


class _Blocks:
  """Index arithmetic and score recomputation shared by the forward and backward."""

  def __init__(self, static: _Static, q, k, bias, mask):
    self.static = static
    self.batch, self.q_len, num_heads, self.head_dim = q.shape
    self.kv_len, self.num_kv = k.shape[1], k.shape[2]
    self.groups = num_heads // self.num_kv
    self.bq = static.block_q
    self.bk = static.block_k
    self.nq = -(-self.q_len // self.bq)
    self.nk = -(-self.kv_len // self.bk)
    self.bias, self.mask = bias, mask
    self.cdt = jnp.promote_types(q.dtype, jnp.float32)

  def q_block(self, i):
    """Start of query block ``i``'s window, its indices ``[bq]`` and which rows it owns."""
    start = jnp.minimum(i * self.bq, self.q_len - self.bq)
    idx = start + jnp.arange(self.bq, dtype=jnp.int32)
    return start, idx, idx >= i * self.bq

  def kv_block(self, j):
    start = jnp.minimum(j * self.bk, self.kv_len - self.bk)
    idx = start + jnp.arange(self.bk, dtype=jnp.int32)
    return start, idx, idx >= j * self.bk

  def scores(self, qb, kb, q_idx, kv_idx, row_ok, col_ok):
    """Logits ``[B, K, G, bq, bk]``, the allowed pairs, and tanh of the soft cap."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=self.cdt)
    s = s * self.static.scale
    tanh = None
    if self.static.soft_cap is not None:
      tanh = jnp.tanh(s / self.static.soft_cap)
      s = self.static.soft_cap * tanh
    qi, ki = q_idx[:, None], kv_idx[None, :]
    if self.bias is not None:
      s = s + _to_groups(self.bias.bias(qi, ki), self.num_kv, self.groups).astype(self.cdt)
    allowed = _to_groups(row_ok[:, None] & col_ok[None, :], self.num_kv, self.groups)
    if self.mask is not None:
      allowed = allowed & _to_groups(self.mask.predicate(qi, ki), self.num_kv, self.groups)
    return s, allowed, tanh


def _forward(static: _Static, q, k, v, bias, mask, sinks):
  """Returns the output ``[B, T, N, H]`` and the log-sum-exp ``[B, K, G, T]``."""
  blk = _Blocks(static, q, k, bias, mask)
  kv_order, kv_count, _, _ = _block_lists(mask, blk.q_len, blk.kv_len, blk.bq, blk.bk)
  cdt = blk.cdt
  stat_shape = (blk.batch, blk.num_kv, blk.groups, blk.bq)
  if sinks is None:
    m0, l0 = jnp.full(stat_shape, -jnp.inf, cdt), jnp.zeros(stat_shape, cdt)
  else:
    sink = sinks.astype(cdt).reshape(1, blk.num_kv, blk.groups, 1)
    m0, l0 = jnp.broadcast_to(sink, stat_shape), jnp.ones(stat_shape, cdt)
  acc0 = jnp.zeros(stat_shape + (blk.head_dim,), cdt)

  def q_step(i, carry):
    out, lse = carry
    q_start, q_idx, row_ok = blk.q_block(i)
    qb = _group(_window(q, q_start, blk.bq, 1), blk.num_kv)

    def kv_step(s, state):
      m, l, acc = state
      j = kv_order[i, s]
      kv_start, kv_idx, col_ok = blk.kv_block(j)
      kb, vb = _window(k, kv_start, blk.bk, 1), _window(v, kv_start, blk.bk, 1)
      logits, allowed, _ = blk.scores(qb, kb, q_idx, kv_idx, row_ok, col_ok)
      logits = jnp.where(allowed, logits, -jnp.inf)
      m_new = jnp.maximum(m, logits.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(allowed, jnp.exp(logits - m_safe[..., None]), 0.0)
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vb,
                      preferred_element_type=cdt)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    m, l, acc = lax.fori_loop(0, kv_count[i], kv_step, (m0, l0, acc0))
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    lse_b = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    o = o.transpose(0, 3, 1, 2, 4).reshape(blk.batch, blk.bq, -1, blk.head_dim)
    out = _write(out, o, q_start, row_ok, 1)
    lse = _write(lse, lse_b, q_start, row_ok, 3)
    return out, lse

  # Every row of the output is written by its query block, so the loop may start from
  # any buffer of the right shape. Starting from a copy of q rather than zeros keeps XLA
  # from materialising one shared zero array beside the loop buffers.
  out0 = q
  lse0 = jnp.zeros((blk.batch, blk.num_kv, blk.groups, blk.q_len), cdt)
  return lax.fori_loop(0, blk.nq, q_step, (out0, lse0))


def _backward(static: _Static, q, k, v, bias, mask, sinks, out, lse, dout):
  blk = _Blocks(static, q, k, bias, mask)
  kv_order, kv_count, q_order, q_count = _block_lists(
      mask, blk.q_len, blk.kv_len, blk.bq, blk.bk)
  cdt = blk.cdt
  # D_i = sum_h dO_ih O_ih, the row term of the softmax backward.
  delta = jnp.einsum("btnh,btnh->bnt", dout.astype(cdt), out.astype(cdt))
  delta = delta.reshape(blk.batch, blk.num_kv, blk.groups, blk.q_len)

  def probs_and_dlogits(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok, lse_b, delta_b):
    logits, allowed, tanh = blk.scores(qb, kb, q_idx, kv_idx, row_ok, col_ok)
    p = jnp.where(allowed, jnp.exp(logits - lse_b[..., None]), 0.0)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb, preferred_element_type=cdt)
    ds = p * (dp - delta_b[..., None])  # gradient of the logits after cap and bias
    dz = ds if tanh is None else ds * (1.0 - tanh * tanh)
    return p, ds, dz * static.scale

  def q_rows(i):
    q_start, q_idx, row_ok = blk.q_block(i)
    return (q_start, q_idx, row_ok, _group(_window(q, q_start, blk.bq, 1), blk.num_kv),
            _group(_window(dout, q_start, blk.bq, 1), blk.num_kv),
            _window(lse, q_start, blk.bq, 3),
            _window(delta, q_start, blk.bq, 3))

  def kv_cols(j):
    kv_start, kv_idx, col_ok = blk.kv_block(j)
    return (kv_start, kv_idx, col_ok, _window(k, kv_start, blk.bk, 1),
            _window(v, kv_start, blk.bk, 1))

  # Pass 1, over query blocks: dq and the bias / score-mod gradient.
  def dq_step(i, carry):
    dq, dbias = carry
    q_start, q_idx, row_ok, qb, dob, lse_b, delta_b = q_rows(i)

    def kv_step(s, state):
      dq_acc, dbias = state
      _, kv_idx, col_ok, kb, vb = kv_cols(kv_order[i, s])
      _, ds, dz = probs_and_dlogits(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok,
                                    lse_b, delta_b)
      if bias is not None:
        ds_heads = ds.reshape(blk.batch, blk.num_kv * blk.groups, blk.bq, blk.bk)
        dbias = bias.accumulate_grad(dbias, ds_heads, q_idx[:, None], kv_idx[None, :])
      dq_acc = dq_acc + jnp.einsum("bkgqs,bskh->bqkgh", dz.astype(k.dtype), kb,
                                   preferred_element_type=cdt)
      return dq_acc, dbias

    dq_acc0 = jnp.zeros(qb.shape, cdt)
    dq_acc, dbias = lax.fori_loop(0, kv_count[i], kv_step, (dq_acc0, dbias))
    dq_acc = dq_acc.reshape(blk.batch, blk.bq, -1, blk.head_dim)
    return _write(dq, dq_acc, q_start, row_ok, 1), dbias

  dbias0 = None if bias is None else jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), bias)
  # As in the forward, every block writes all its rows: the buffers start as copies.
  dq, dbias = lax.fori_loop(0, blk.nq, dq_step, (q, dbias0))

  # Pass 2, over key blocks: dk and dv.
  def dkv_step(j, carry):
    dk, dv = carry
    kv_start, kv_idx, col_ok, kb, vb = kv_cols(j)

    def q_step(s, state):
      dk_acc, dv_acc = state
      _, q_idx, row_ok, qb, dob, lse_b, delta_b = q_rows(q_order[j, s])
      p, _, dz = probs_and_dlogits(qb, dob, kb, vb, q_idx, kv_idx, row_ok, col_ok,
                                   lse_b, delta_b)
      dv_acc = dv_acc + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dout.dtype), dob,
                                   preferred_element_type=cdt)
      dk_acc = dk_acc + jnp.einsum("bkgqs,bqkgh->bskh", dz.astype(q.dtype), qb,
                                   preferred_element_type=cdt)
      return dk_acc, dv_acc

    zeros = jnp.zeros(kb.shape, cdt)
    dk_acc, dv_acc = lax.fori_loop(0, q_count[j], q_step, (zeros, zeros))
    return (_write(dk, dk_acc, kv_start, col_ok, 1), _write(dv, dv_acc, kv_start, col_ok, 1))

  dk, dv = lax.fori_loop(0, blk.nk, dkv_step, (k, v))
  dsinks = None
  if sinks is not None:
    sink = sinks.astype(cdt).reshape(1, blk.num_kv, blk.groups, 1)
    # d lse / d sink = p_sink, and d out / d lse = -out: dsink = -sum_t p_sink * D_t.
    dsinks = -(jnp.exp(sink - lse) * delta).sum((0, 3)).reshape(-1).astype(sinks.dtype)
  if bias is not None:
    dbias = jax.tree.map(lambda g, x: g.astype(x.dtype), dbias, bias)
  return dq, dk, dv, dbias, dsinks


def _zero_cotangent(tree):
  def zero(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)
  return jax.tree.map(zero, tree)


def _attention_plain(static, q, k, v, bias, mask, sinks):
  return _forward(static, q, k, v, bias, mask, sinks)[0]


def _attention_fwd(static, q, k, v, bias, mask, sinks):
  out, lse = _forward(static, q, k, v, bias, mask, sinks)
  return out, (q, k, v, bias, mask, sinks, out, lse)


def _attention_bwd(static, residuals, dout):
  q, k, v, bias, mask, sinks, out, lse = residuals
  dq, dk, dv, dbias, dsinks = _backward(static, q, k, v, bias, mask, sinks, out, lse, dout)
  return dq, dk, dv, dbias, _zero_cotangent(mask), dsinks


_attention = jax.custom_vjp(_attention_plain, nondiff_argnums=(0,))
_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention_xla(query, key, value, bias=None, mask=None, *, scale,
                              logits_soft_cap=None, sinks=None, block_sizes=None):
  """Blockwise softmax attention. Same arguments and result as the reference tier.

  ``query [B, T, N, H]``, ``key``/``value [B, S, K, H]``; ``bias`` a ScoreMod or None;
  ``mask`` a Mask or None; ``sinks [N]`` or None. Memory: O(B * T * N * H) plus one
  ``[B, N, block_q, block_k]`` block of scores; never a ``[T, S]`` matrix.
  """
  sizes = block_sizes or BlockSizes()
  static = _Static(float(scale), logits_soft_cap, min(sizes.block_q, query.shape[1]),
                   min(sizes.block_k, key.shape[1]))
  return _attention(static, query, key, value, bias, mask, sinks)
