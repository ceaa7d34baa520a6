"""Float64 oracle of Hedgehog, Based and TransNormer, written from the papers' equations.

It imports nothing from attnlab. Every function is the dense ``[T, T]`` definition in
``jax.numpy``, meant to run under ``jax.enable_x64()`` on float64 inputs, so that
``jax.grad`` of it gives the oracle gradients. Shapes: ``q, k [B, T, H, D]``, ``v [B, T,
H, V]``.

Which key ``j`` a query ``i`` sees (:func:`allowed`): the same document (the document
index counts the changes of ``segment_ids`` up to the position), ``j < lengths[b]``, and
``j <= i`` when causal.

* Normalized linear attention (Katharopoulos et al. 2020, eq. 5), with a kernel
  ``kappa(q, k)`` and the first document starting from ``(S_0, z_0)``::

      o_i = (sum_j kappa_ij v_j + [i in doc 0] phi(q_i)^T S_0)
            / (sum_j kappa_ij + [i in doc 0] phi(q_i)^T z_0 + 1e-6)

* Hedgehog (Zhang et al. 2024, arXiv:2402.04347): ``kappa = phi(q)^T phi(k)`` with
  ``phi(x) = [softmax(x W + b), softmax(-(x W + b))]`` per head (the paper's trainable
  linear layer with exp activation, each half taken as a softmax over the feature axis as
  in the authors' released code); attention-weight distillation loss: mean over valid
  queries of ``-sum_j a_ij log(kappa_ij / sum_j' kappa_ij')``, ``a = softmax(q k^T /
  sqrt(D))``, both over the same allowed keys.
* Based (Arora et al. 2024, arXiv:2402.18668): ``kappa = 1 + s q^T k + (s q^T k)^2 / 2`` (the 2nd-order
  Taylor polynomial of ``exp(s q^T k)``, written from the polynomial, not the features).
  Its state uses the features ``[1, sqrt(s) x, s vec(x x^T) / sqrt(2)]`` (row-major vec).
* TransNormer NormAttention (Qin et al. 2022, arXiv:2210.10340): ``O = XNorm(phi(Q)
  (phi(K)^T V))``, i.e. ``o_i = XNorm(sum_j phi(q_i)^T phi(k_j) v_j)`` (no denominator),
  XNorm = RMS norm or LayerNorm without scale over each head's values.
* TransNormer DiagAttention (softmax variant): softmax attention where ``j`` is in
  ``i``'s non-overlapping block of ``w`` tokens, counted from the document's start.

Equation numbers are not cited: the papers' full text could not be retrieved to check them.

The causal final state is ``S = [S_0 if one document] + sum_{j in the last document, j <
lengths} phi(k_j) [v_j, 1]^T`` (without the ones column for NormAttention).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

EPS = 1e-6


def document_index(segment_ids, batch, length):
  if segment_ids is None:
    return np.zeros((batch, length), np.int64)
  ids = np.asarray(segment_ids)
  change = np.concatenate([np.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  return np.cumsum(change, axis=1)


def allowed(batch, length, *, causal, segment_ids=None, lengths=None):
  """bool ``[B, 1, T, T]`` (query i, key j)."""
  doc = document_index(segment_ids, batch, length)
  ok = doc[:, :, None] == doc[:, None, :]
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  if causal:
    ok = ok & (j <= i)
  if lengths is not None:
    ok = ok & (j < np.asarray(lengths)[:, None, None])
  return ok[:, None]


# ------------------------------------------------------------------------- feature maps


def _softmax(x):
  x = x - jnp.max(x, axis=-1, keepdims=True)
  e = jnp.exp(x)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def hedgehog_phi(x, w, b):
  h = jnp.einsum("...hd,hdf->...hf", x, w)
  h = h + b.reshape((1,) * (h.ndim - 2) + b.shape)
  return jnp.concatenate([_softmax(h), _softmax(-h)], axis=-1)


def based_phi(x, s):
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,)), np.sqrt(s) * x,
                          s * outer / np.sqrt(2.0)], axis=-1)


def elu_plus_one(x):
  return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


KERNELS = {"elu_plus_one": elu_plus_one, "relu": lambda x: jnp.maximum(x, 0.0),
           "identity": lambda x: x}


# ------------------------------------------------------------------ linear attentions


def _final_state(fk, values, batch, length, segment_ids, lengths, initial_state):
  doc = document_index(segment_ids, batch, length)
  last = doc == doc[:, -1:]
  if lengths is not None:
    last = last & (np.arange(length)[None] < np.asarray(lengths)[:, None])
  state = jnp.einsum("bthf,bthv->bhfv", fk * last[:, :, None, None], values)
  if initial_state is not None:
    single = (doc[:, -1] == 0)[:, None, None, None]
    state = state + jnp.where(single, initial_state, 0.0)
  return state


def normalized_linear(fq, fk, kernel, v, *, causal, segment_ids=None, lengths=None,
                      initial_state=None):
  """Normalized linear attention with the kernel matrix ``kernel [B, H, T, T]`` (given
  independently of the features), ``fq, fk`` for the initial and final state only.
  Returns ``(o, final_state or None)``."""
  batch, length = v.shape[:2]
  ok = allowed(batch, length, causal=causal, segment_ids=segment_ids, lengths=lengths)
  a = jnp.where(ok, kernel, 0.0)
  num = jnp.einsum("bhij,bjhv->bihv", a, v)
  den = jnp.sum(a, axis=-1).transpose(0, 2, 1)[..., None]
  if initial_state is not None:
    first = (document_index(segment_ids, batch, length) == 0)[:, :, None, None]
    num = num + jnp.where(first, jnp.einsum("bthf,bhfv->bthv", fq, initial_state[..., :-1]),
                          0.0)
    den = den + jnp.where(first, jnp.einsum("bthf,bhf->bth", fq, initial_state[..., -1])[
        ..., None], 0.0)
  o = num / (den + EPS)
  if not causal:
    return o, None
  values = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,))], axis=-1)
  return o, _final_state(fk, values, batch, length, segment_ids, lengths, initial_state)


def hedgehog(q, k, v, w, b, *, causal, segment_ids=None, lengths=None, initial_state=None):
  fq, fk = hedgehog_phi(q, w, b), hedgehog_phi(k, w, b)
  kernel = jnp.einsum("bihf,bjhf->bhij", fq, fk)
  return normalized_linear(fq, fk, kernel, v, causal=causal, segment_ids=segment_ids,
                           lengths=lengths, initial_state=initial_state)


def based(q, k, v, *, causal, scale=None, segment_ids=None, lengths=None,
          initial_state=None):
  s = q.shape[-1] ** -0.5 if scale is None else scale
  dot = s * jnp.einsum("bihd,bjhd->bhij", q, k)
  kernel = 1.0 + dot + dot * dot / 2.0
  fq, fk = based_phi(q, s), based_phi(k, s)
  return normalized_linear(fq, fk, kernel, v, causal=causal, segment_ids=segment_ids,
                           lengths=lengths, initial_state=initial_state)


def xnorm(o, norm, eps=1e-6):
  if norm == "layernorm":
    o = o - jnp.mean(o, axis=-1, keepdims=True)
  return o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps)


def norm_attention(q, k, v, *, causal, feature_map="elu_plus_one", norm="rmsnorm",
                   segment_ids=None, lengths=None, initial_state=None):
  phi = KERNELS[feature_map]
  fq, fk = phi(q), phi(k)
  batch, length = v.shape[:2]
  ok = allowed(batch, length, causal=causal, segment_ids=segment_ids, lengths=lengths)
  a = jnp.where(ok, jnp.einsum("bihf,bjhf->bhij", fq, fk), 0.0)
  o = jnp.einsum("bhij,bjhv->bihv", a, v)
  if initial_state is not None:
    first = (document_index(segment_ids, batch, length) == 0)[:, :, None, None]
    o = o + jnp.where(first, jnp.einsum("bthf,bhfv->bthv", fq, initial_state), 0.0)
  final = None
  if causal:
    final = _final_state(fk, v, batch, length, segment_ids, lengths, initial_state)
  return xnorm(o, norm), final


def diag_attention(q, k, v, *, block_size, causal, scale=None, segment_ids=None,
                   lengths=None):
  batch, length = q.shape[:2]
  doc = document_index(segment_ids, batch, length)
  t = np.arange(length)[None]
  start = np.zeros_like(doc)
  for row in range(batch):
    for i in range(length):
      start[row, i] = i if i == 0 or doc[row, i] != doc[row, i - 1] else start[row, i - 1]
  block = doc * (length + 1) + (t - start) // block_size
  ok = allowed(batch, length, causal=causal, segment_ids=segment_ids, lengths=lengths)
  ok = ok & (block[:, None, :, None] == block[:, None, None, :])
  s = (q.shape[-1] ** -0.5 if scale is None else scale) * jnp.einsum("bihd,bjhd->bhij", q, k)
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(jnp.where(ok, s, -1e300), axis=-1, keepdims=True)
  p = jnp.where(ok, jnp.exp(s - m), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhij,bjhv->bihv", p, v)


def hedgehog_distillation_loss(q, k, w, b, *, causal, scale=None, lengths=None):
  batch, length = q.shape[:2]
  ok = allowed(batch, length, causal=causal, lengths=lengths)
  s = (q.shape[-1] ** -0.5 if scale is None else scale) * jnp.einsum("bihd,bjhd->bhij", q, k)
  teacher = _softmax(jnp.where(ok, s, -jnp.inf))
  kernel = jnp.einsum("bihf,bjhf->bhij", hedgehog_phi(q, w, b), hedgehog_phi(k, w, b))
  kernel = jnp.where(ok, kernel, 0.0)
  student = kernel / jnp.sum(kernel, axis=-1, keepdims=True)
  ce = -jnp.sum(jnp.where(ok, teacher * jnp.log(jnp.where(ok, student, 1.0)), 0.0), -1)
  rows = np.ones((batch, 1, length), bool)
  if lengths is not None:
    rows = np.arange(length)[None, None] < np.asarray(lengths)[:, None, None]
  rows = np.broadcast_to(rows, ce.shape)
  return jnp.sum(jnp.where(rows, ce, 0.0)) / rows.sum()
