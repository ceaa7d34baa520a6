"""Selective attention (Leviathan, Kalman & Matias 2024, "Selective Attention Improves
Transformer", §3 and the sketch of its Figure 2), causal.

A token may mask earlier tokens for every later query. Per head h, with the causal
document mask and ``z^h_ts = scale q^h_t . k^h_s``::

    S_ks = ReLU(z^c_ks)     for s < k in k's document, c = selection_head   (selection)
    S_ks = 0                for s = k (no token masks itself) and for s the first token of
                            its document (the <BOS> is never masked)
    F_ts = sum_{k < t} S_ks                           (accumulated, strictly before t)
    o^h_t = sum_s softmax_s(z^h_ts - F_ts) v^h_s      (F subtracted in every head)

The selection reuses one head's logits, so the mechanism has no parameters.

Tiers: ``reference`` builds the dense ``[B, H, T, T]`` logits and ``F`` by a prefix sum
over the query axis. ``xla`` is blockwise online softmax over key blocks of
``block_size`` with all queries at once: ``F`` restricted to a block of key columns is
the prefix sum down those columns, so each block is self-contained and nothing
``[T, T]`` exists (memory ``O(T block_size)`` per head). Its ``custom_vjp`` saves the
output and the log-sum-exp and runs one backward pass; the gradient of ``F`` is the
reverse prefix sum of ``-sum_h dlogits`` down each column, through the ReLU into the
selection head's scores.

``output_final_state=True`` also returns ``F_{next, s} = sum_{k < lengths[b]} S_ks``
``[B, T]`` float32, the row the next token subtracts: the ``"f"`` of the decode cache
(:func:`selective_attn_cache`), whose step subtracts it, then adds the new
token's selection row.
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
from attnlab.ops.learned_feature_maps import _default_scale
from attnlab.ops.sparse_softmax import (KeyBlocks, allowed_pairs, block_scores,
                                        check_attention_args, check_step, documents,
                                        masked_softmax, sparse_attention_cache,
                                        valid_positions, write_cache)

__all__ = ["selective_attn", "selective_attn_step", "selective_attn_cache"]

_HIGHEST = lax.Precision.HIGHEST
MECHANISM = "selective_attention"


@dataclasses.dataclass(frozen=True)
class SelectiveCall:
  """The canonical arguments of every tier."""

  q: Any
  k: Any
  v: Any
  selection_head: int
  scale: float
  segment_ids: Any
  lengths: Any
  block_size: int


def _layout(call):
  """``(docs, valid, bos)`` ``[B, T]``: document index, real positions, first tokens."""
  batch, length = call.q.shape[:2]
  docs = documents(call.segment_ids, batch, length)
  bos = jnp.concatenate([jnp.ones((batch, 1), bool), docs[:, 1:] != docs[:, :-1]], axis=1)
  return docs, valid_positions(call.lengths, batch, length), bos


def _may_select(allowed, q_valid, bos_k, q_pos, k_pos):
  """``[B, Tq, Tk]``: token q may mask key k (an earlier key of its document, not its
  <BOS>; padded tokens select nothing)."""
  return (allowed & (k_pos[None, None, :] < q_pos[None, :, None]) & q_valid[:, :, None]
          & ~bos_k[:, None, :])


def _selection(z_sel, allowed, q_valid, bos_k, q_pos, k_pos):
  """``S [B, Tq, Tk]``: the ReLU of the selection head's scores where a token may mask."""
  return jnp.where(_may_select(allowed, q_valid, bos_k, q_pos, k_pos), jax.nn.relu(z_sel),
                   0.0)


def _exclusive_prefix(x):
  """``y[:, t] = sum_{k < t} x[:, k]`` along axis 1."""
  return jnp.cumsum(jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1), axis=1)


def _reference(call: SelectiveCall, output_final_state):
  batch, length = call.q.shape[:2]
  cdt = jnp.promote_types(call.q.dtype, jnp.float32)
  z = call.scale * jnp.einsum("bthk,bshk->bhts", call.q.astype(cdt), call.k.astype(cdt),
                              precision=_HIGHEST)
  docs, valid, bos = _layout(call)
  pos = jnp.arange(length)
  allowed = allowed_pairs(docs, docs, valid, pos, pos, True)
  sel = _selection(z[:, call.selection_head], allowed, valid, bos, pos, pos)
  f = _exclusive_prefix(sel)
  p = masked_softmax(z - f[:, None], allowed[:, None])
  o = jnp.einsum("bhts,bshv->bthv", p, call.v.astype(cdt), precision=_HIGHEST)
  final = jnp.sum(sel, axis=1).astype(jnp.float32) if output_final_state else None
  return o.astype(call.v.dtype), final


# ----------------------------------------------------------------------- the xla tier


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  selection_head: int
  block: int


def _block_logits(st, q32, q_docs, q_valid, blk):
  """Logits ``z - F [B, T, H, bk]``, ``allowed [B, T, 1, bk]``, the selection ``S``
  ``[B, T, bk]`` and the selection head's scores of one key block."""
  z, allowed = block_scores(st.scale, True, q32, q_docs, blk)
  z_sel = z[:, :, st.selection_head]
  sel = _selection(z_sel, allowed[:, :, 0], q_valid, blk[5], jnp.arange(q32.shape[1]),
                   blk[4])
  return z - _exclusive_prefix(sel)[:, :, None, :], allowed, sel, z_sel


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selective(st, q, k, v, docs, valid, bos):
  return _selective_fwd(st, q, k, v, docs, valid, bos)[0]


def _selective_fwd(st, q, k, v, docs, valid, bos):
  q32 = q.astype(jnp.float32)
  keys = KeyBlocks(k, v, docs, valid, st.block, flag=bos)
  batch, length, heads = q.shape[:3]

  def body(carry, blk):
    top, den, acc = carry
    logits, allowed, _, _ = _block_logits(st, q32, docs, valid, blk)
    logits = jnp.where(allowed, logits, -jnp.inf)
    new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
    safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
    decay = jnp.exp(jnp.where(jnp.isfinite(top), top, safe) - safe)
    p = jnp.where(allowed, jnp.exp(logits - safe[..., None]), 0.0)
    acc = decay[..., None] * acc + jnp.einsum("bths,bshv->bthv", p,
                                              blk[1].astype(jnp.float32),
                                              precision=_HIGHEST)
    return (new_top, decay * den + jnp.sum(p, -1), acc), None

  init = (jnp.full((batch, length, heads), -jnp.inf, jnp.float32),
          jnp.zeros((batch, length, heads), jnp.float32),
          jnp.zeros((batch, length, heads, v.shape[-1]), jnp.float32))
  (top, den, acc), _ = lax.scan(body, init, keys.xs())
  seen = den > 0
  o = acc / jnp.where(seen, den, 1.0)[..., None]
  lse = jnp.where(seen, jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(
      jnp.where(seen, den, 1.0)), 0.0)
  return o.astype(v.dtype), (q, k, v, docs, valid, bos, o, lse)


def _selective_bwd(st, res, do):
  q, k, v, docs, valid, bos, o, lse = res
  q32, do32 = q.astype(jnp.float32), do.astype(jnp.float32)
  keys = KeyBlocks(k, v, docs, valid, st.block, flag=bos)
  row = jnp.sum(do32 * o, axis=-1)  # sum_s p_ts dL/dp_ts

  def body(dq, blk):
    logits, allowed, _, z_sel = _block_logits(st, q32, docs, valid, blk)
    p = jnp.where(allowed, jnp.exp(logits - lse[..., None]), 0.0)
    kb, vb = blk[0].astype(jnp.float32), blk[1].astype(jnp.float32)
    dv = jnp.einsum("bths,bthv->bshv", p, do32, precision=_HIGHEST)
    dlogits = p * (jnp.einsum("bthv,bshv->bths", do32, vb, precision=_HIGHEST)
                   - row[..., None])
    # F_ts = sum_{k<t} S_ks  =>  dS_ks = sum_{t>k} dF_ts, with dF = -sum_h dlogits.
    df = -jnp.sum(dlogits, axis=2)
    ds = jnp.flip(_exclusive_prefix(jnp.flip(df, 1)), 1)
    may = _may_select(allowed[:, :, 0], valid, blk[5], jnp.arange(q.shape[1]), blk[4])
    dsel = jnp.where(may & (z_sel > 0), ds, 0.0)
    heads = jnp.arange(q.shape[2]) == st.selection_head
    dz = st.scale * (dlogits + jnp.where(heads[None, None, :, None], dsel[:, :, None], 0.0))
    dk = jnp.einsum("bths,bthk->bshk", dz, q32, precision=_HIGHEST)
    dq = dq + jnp.einsum("bths,bshk->bthk", dz, kb, precision=_HIGHEST)
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(body, jnp.zeros(q.shape, jnp.float32), keys.xs())
  return (dq.astype(q.dtype), keys.unblock(dk).astype(k.dtype),
          keys.unblock(dv).astype(v.dtype), None, None, None)


_selective.defvjp(_selective_fwd, _selective_bwd)


def _selection_totals(st, q, k, v, docs, valid, bos):
  """``sum_k S_ks [B, T]`` by key blocks (differentiable by autodiff)."""
  q32 = q.astype(jnp.float32)
  keys = KeyBlocks(k, v, docs, valid, st.block, flag=bos)

  def body(_, blk):
    return None, jnp.sum(_block_logits(st, q32, docs, valid, blk)[2], axis=1)

  return keys.unblock(lax.scan(body, None, keys.xs())[1])


# Compiled once per shape: eager callers would otherwise retrace the scans on every call.
_selective_jit = jax.jit(_selective, static_argnums=0)
_selection_totals_jit = jax.jit(_selection_totals, static_argnums=0)


def _xla(call: SelectiveCall, output_final_state):
  docs, valid, bos = _layout(call)
  st = _Static(call.scale, call.selection_head, min(call.block_size, call.q.shape[1]))
  o = _selective_jit(st, call.q, call.k, call.v, docs, valid, bos)
  final = (_selection_totals_jit(st, call.q, call.k, call.v, docs, valid, bos)
           if output_final_state else None)
  return o, final


registry.describe(MECHANISM, registry.MechanismInfo(
    paper="Leviathan, Kalman & Matias 2024, Selective Attention Improves Transformer",
    family="softmax", causal=True, non_causal=False,
    state="KV cache T x (K + V) + accumulated selection F (T)",
    cost="O(T^2 K), one pass forward, one backward", step="selective_attn_step",
    xla_path="blockwise online softmax over key blocks with all queries (F is a prefix "
             "sum down each key column, so a key block needs no other)"))
registry.register(MECHANISM, registry.Implementation("reference", _reference,
                                                     automatic=False))
registry.register(MECHANISM, registry.Implementation("xla", _xla, priority=10))


def _check_selection_head(selection_head, heads):
  if (not isinstance(selection_head, (int, np.integer)) or isinstance(selection_head, bool)
      or not 0 <= selection_head < heads):
    raise ValueError(f"selection_head must be an int in [0, H={heads}), got "
                     f"selection_head={selection_head!r}")
  return int(selection_head)


def selective_attn(q, k, v, *, selection_head=0, scale=None, segment_ids=None,
                        lengths=None, output_final_state=False, block_size=256,
                        implementation=None):
  """Causal selective attention: softmax attention with the accumulated selection ``F``
  (the ReLU of ``selection_head``'s logits, summed over earlier queries) subtracted from
  every head's logits.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype.
    selection_head: the head whose logits select (the paper uses head 0).
    scale: logits scale (default ``K ** -0.5``).
    segment_ids: ``[B, T]`` ints, packed documents; each document's first token is its
      <BOS>.
    lengths: ``[B]`` ints, right padding: padded keys get no weight, padded queries
      select nothing.
    output_final_state: also return ``F`` for the next token ``[B, T]`` float32.
    block_size: keys per block of the xla tier.
    implementation: None (the xla tier), ``"reference"`` or ``"xla"``.

  Returns:
    ``(o [B, T, H, V] in v's dtype, F_next or None)``.
  """
  q, k, v, scale, segment_ids, lengths = check_attention_args(
      q, k, v, causal=True, scale=scale, segment_ids=segment_ids, lengths=lengths,
      block_size=block_size)
  selection_head = _check_selection_head(selection_head, q.shape[2])
  if not isinstance(output_final_state, bool):
    raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
  call = SelectiveCall(q, k, v, selection_head, scale, segment_ids, lengths,
                       int(block_size))
  return registry.select(MECHANISM, implementation, call).fn(call, output_final_state)


def selective_attn_cache(batch, max_len, num_heads, key_dim, value_dim,
                              dtype=jnp.float32):
  """An empty decode cache: ``{"k": [B, L, H, K], "v": [B, L, H, V], "f": [B, L]}``
  (``f`` float32, the accumulated selection of the slots)."""
  cache = sparse_attention_cache(batch, max_len, num_heads, key_dim, value_dim, dtype)
  cache["f"] = jnp.zeros((batch, max_len), jnp.float32)
  return cache


def selective_attn_step(q_t, k_t, v_t, cache, positions, *, selection_head=0,
                             scale=None):
  """One decode step of :func:`selective_attn` (one document per row, its <BOS> at
  slot 0).

  ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``cache`` from
  :func:`selective_attn_cache` (or a prefill's), ``positions [B]``: the token's
  slot; it sees slots ``<= positions[b]``. Returns ``(o_t [B, H, V], cache)``."""
  q_t, k_t, v_t, positions = check_step(q_t, k_t, v_t, cache, positions, extra=("f",))
  if cache["f"].shape != cache["k"].shape[:2]:
    raise ValueError(f"cache['f'] must be [B, L]={cache['k'].shape[:2]}, got "
                     f"{cache['f'].shape}")
  selection_head = _check_selection_head(selection_head, q_t.shape[1])
  scale = _default_scale(scale, q_t.shape[-1])
  keys = write_cache(cache["k"], k_t, positions)
  values = write_cache(cache["v"], v_t, positions)
  z = scale * jnp.einsum("bhk,bshk->bhs", q_t.astype(jnp.float32), keys.astype(jnp.float32),
                         precision=_HIGHEST)
  slots = jnp.arange(z.shape[-1])[None]
  f = cache["f"].astype(jnp.float32)
  p = masked_softmax(z - f[:, None], (slots <= positions[:, None])[:, None])
  o = jnp.einsum("bhs,bshv->bhv", p, values.astype(jnp.float32), precision=_HIGHEST)
  # The new token's selection row joins F for the tokens after it.
  may = (slots < positions[:, None]) & (slots > 0)
  f = f + jnp.where(may, jax.nn.relu(z[:, selection_head]), 0.0)
  return o.astype(v_t.dtype), {"k": keys, "v": values, "f": f}
