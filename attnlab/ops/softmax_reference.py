"""Softmax attention, reference tier: the dense ``[B, N, T, S]`` definition.

The oracle of the other tiers and the slowest of them. Gradients come from autodiff.
Every tier of ``dot_product_attention`` takes the canonical arguments built by
``attnlab.ops.softmax`` (``mask`` a :class:`~attnlab.ops.masks.Mask` or None, ``bias`` a
:class:`~attnlab.ops.masks.ScoreMod` or None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _to_heads(x, num_heads):
  """Broadcast a ``[..., T, S]`` mask or bias to rank 4 ``[B', N', T, S]``."""
  x = jnp.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape) if x.ndim < 4 else x


def dot_product_attention_reference(query, key, value, bias=None, mask=None, *, scale,
                                    logits_soft_cap=None, sinks=None):
  """Dense softmax attention. ``query [B, T, N, H]``, ``key``/``value [B, S, K, H]``.

  Returns ``[B, T, N, H]`` in the query dtype. Computes in float32 (float64 when the
  inputs are float64) at the highest matmul precision.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv = key.shape[1], key.shape[2]
  groups = num_heads // num_kv
  cdt = jnp.promote_types(query.dtype, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  q = query.astype(cdt).reshape(batch, q_len, num_kv, groups, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(cdt), precision=hi)
  logits = (logits * scale).reshape(batch, num_heads, q_len, kv_len)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + _to_heads(bias.dense(q_len, kv_len), num_heads).astype(cdt)
  allowed = jnp.ones((1, 1, q_len, kv_len), bool)
  if mask is not None:
    allowed = allowed & _to_heads(mask.dense(q_len, kv_len), num_heads)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = logits.max(-1, keepdims=True)
  if sinks is not None:
    sink = sinks.astype(cdt)[None, :, None, None]
    row_max = jnp.maximum(row_max, sink)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = weights.sum(-1, keepdims=True)
  if sinks is not None:
    denom = denom + jnp.exp(sink - row_max)
  safe = jnp.where(denom > 0, denom, 1.0)
  probs = jnp.where(denom > 0, weights / safe, 0.0)
  probs = probs.reshape(batch, num_kv, groups, q_len, kv_len)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(cdt), precision=hi)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)

