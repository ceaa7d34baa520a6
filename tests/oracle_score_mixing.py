"""Float64 oracle of the attentions that mix scores: selective and multi-token attention.

It imports nothing from attnlab; every formula is written out per query row or per tap
index from the papers. ``m [B, T, S]`` is 1 where query t may see key s (causal, same
document), ``docs [B, T]`` each position's document.

    selective   (Leviathan et al. 2024, §3 and Figure 2) with z^h = scale q^h k^h^T:
                S_ks = ReLU(z^c_ks) m_ks [s != k] [s not its document's first token],
                F_t = sum_{k < t} S_k (a loop over t), o^h_t = softmax(z^h_t - F_t) v^h
                over the keys m_t allows.
    multi-token (Golovneva et al. 2025, §3.1-3.2): C_ij = sum_{i', j'} theta_{i', j'}
                [m A^]_{i - i', j - j'}, each term taken by index (zero outside the
                sequence or when i - i' leaves i's document); A = softmax over m of C
                (after "pre" head mixing of C), then "post" head mixing of A; o = A v.
                Head mixing: A'^{g c + a} = sum_b w_{g, a, b} A^{g c + b}, a loop over
                output heads.

Gradients come from ``jax.vjp`` of this float64 code (see ``oracle_feature_maps.grads``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def documents(segment_ids, batch, length):
  """``[B, T]`` int: a new document wherever the id changes."""
  if segment_ids is None:
    return np.zeros((batch, length), np.int64)
  ids = np.asarray(segment_ids)
  return np.concatenate([np.zeros((batch, 1), np.int64),
                         np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)


def _softmax_rows(logits, m):
  """Softmax over the keys with ``m = 1`` (every oracle row sees at least one key)."""
  # The shift cancels in the ratio, so it carries no gradient.
  top = jax.lax.stop_gradient(jnp.max(jnp.where(m > 0, logits, -jnp.inf), axis=-1,
                                      keepdims=True))
  shifted = logits - top
  w = jnp.where(m > 0, jnp.exp(jnp.where(m > 0, shifted, 0.0)), 0.0)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def selective_attention(q, k, v, *, m, bos, scale, selection_head):
  """``bos [B, S]``: 1 at each document's first token."""
  z = scale * jnp.einsum("bthd,bshd->bhts", q, k)
  length = z.shape[-1]
  not_self = 1.0 - np.eye(length)
  sel = jnp.maximum(z[:, selection_head], 0.0) * m * not_self[None] * (1.0 - bos[:, None, :])
  rows = []
  for t in range(length):
    rows.append(jnp.sum(sel[:, :t], axis=1))   # F_t = sum_{k < t} S_k
  f = jnp.stack(rows, axis=1)
  p = _softmax_rows(z - f[:, None], m[:, None])
  return jnp.einsum("bhts,bshv->bthv", p, v)


def _mix(a, w):
  """Head mixing of ``a [B, H, T, S]`` by ``w [G, c, c]``."""
  if w is None:
    return a
  size = w.shape[1]
  heads = []
  for h in range(a.shape[1]):
    g, row = divmod(h, size)
    heads.append(sum(w[g, row, b] * a[:, g * size + b] for b in range(size)))
  return jnp.stack(heads, axis=1)


def multi_token_attention(q, k, v, kernel, head_mix, *, m, docs, scale, position):
  z = scale * jnp.einsum("bthd,bshd->bhts", q, k) * m[:, None]
  _, c_q, c_k = kernel.shape
  length, keys = z.shape[-2:]
  i = np.arange(length)[:, None]
  j = np.arange(keys)[None, :]
  conv = jnp.zeros_like(z)
  for lag in range(c_q):
    for off in range(-(c_k // 2), (c_k + 1) // 2):   # j' in [-floor(c_k/2), ceil(c_k/2) - 1]
      a, b = i - lag, j - off
      inside = (a >= 0) & (b >= 0) & (b < keys)                                # [T, S]
      a_c, b_c = np.clip(a, 0, length - 1), np.clip(b, 0, keys - 1)
      same_doc = docs[:, a_c[:, 0]] == docs[:, i[:, 0]]                        # [B, T]
      term = z[:, :, a_c, b_c] * (inside[None, None] & same_doc[:, None, :, None])
      conv = conv + kernel[:, lag, off + c_k // 2][None, :, None, None] * term
  if position == "pre":
    conv = _mix(conv, head_mix)
  a = _softmax_rows(conv, m[:, None])
  if position == "post":
    a = _mix(a, head_mix)
  return jnp.einsum("bhts,bshv->bthv", a, v)
