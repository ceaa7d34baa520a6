"""Learned and polynomial feature maps for normalized linear attention: Hedgehog and Based.

Both are normalized linear attention (Katharopoulos et al. 2020, eq. 5-6) with their own
feature map phi, per head::

    o_i = sum_{j in N(i)} phi(q_i)^T phi(k_j) v_j / (sum_{j in N(i)} phi(q_i)^T phi(k_j) + eps)

with ``N(i) = {j <= i}`` (causal) or all keys of the query's document (non-causal), and
``eps = 1e-6`` (the ``normalize=True`` convention of :func:`attnlab.ops.linear_attn`).

* Hedgehog (Zhang et al., ICLR 2024, "The Hedgehog & the Porcupine: Expressive Linear
  Attentions with Softmax Mimicry", arXiv:2402.04347, the Hedgehog method section): a
  trainable single-layer map per head (untied across heads), shared by q and k. The paper
  describes a linear layer followed by an element-wise exp; the authors' released code
  (HazyResearch/based ``Hedgehog`` with ``SoftmaxDim``, HazyResearch/lolcats
  ``SoftmaxDim``) applies it to ``h`` and to ``-h`` and evaluates each half as a softmax
  over the feature axis, which is what this op implements (features in (0, 1], no
  overflow)::

      h = x W + b,   phi(x) = [softmax(h), softmax(-h)]       W [H, D, F], b [H, F]

  so phi has 2F features. Note that the softmax form is not a rescaling of the exp form
  that cancels in the normalized weights: each token's two halves get their own factors
  ``1 / sum exp(h)`` and ``1 / sum exp(-h)``. :func:`hedgehog_distillation_loss` is the
  paper's attention-weight distillation: the cross-entropy between the softmax weights
  ``a_ij = softmax_j(q_i^T k_j / sqrt(D))`` and the Hedgehog weights
  ``a^_ij = phi(q_i)^T phi(k_j) / sum_j' phi(q_i)^T phi(k_j')`` over the same q, k and the
  same allowed (causal) keys.
* Based (Arora et al. 2024, "Simple linear attention language models balance the recall-
  throughput tradeoff", arXiv:2402.18668, its Taylor linear attention): the 2nd-order
  Taylor expansion of the softmax kernel, ``exp(s q^T k) ~ 1 + s q^T k + (s q^T k)^2 / 2``
  with ``s = D^(-1/2)``, as the inner product of::

      phi(x) = [1, s^(1/2) x, s vec(x x^T) / sqrt(2)]           (1 + D + D^2 features)

  the same map as the authors' ``TaylorExp`` (``[1, x / D^(1/4), vec(x x^T) / (sqrt(2)
  sqrt(D))]``), with q, k projected to a small D (16 in the paper's models).

The paper equation numbers could not be checked against the papers' full text (only their
abstracts were retrievable); the forms above were checked against the authors' code.

The causal forms carry the state ``[B, H, F', V + 1]`` (float32) of
:func:`attnlab.ops.linear_attn` with ``normalize=True``: ``S = sum phi(k) v^T`` in
``[..., :V]`` and the normalizer ``z = sum phi(k)`` in ``[..., V]``. The ``xla`` tier maps
q and k and runs the chunked ``linear_attn``; the non-causal form is the causal pass plus
the reversed causal pass minus the diagonal term (each key counted once), so it too is
chunked. ``reference`` is the token-by-token recurrence (causal) or the dense ``[T, T]``
weight matrix (non-causal).

``lengths [B]`` marks right padding: keys at ``t >= lengths[b]`` are ignored (their
features and values are zeroed after the map, since ``phi(0) != 0`` here), so a causal
call's final state is the state after ``lengths[b]`` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import linear_attention as la
from attnlab.ops import registry

__all__ = ["hedgehog", "hedgehog_step", "hedgehog_feature_map", "hedgehog_distillation_loss",
           "based", "based_step", "based_feature_map"]

NORMALIZE_EPS = la.NORMALIZE_EPS


# ----------------------------------------------------------------------- feature maps


def hedgehog_feature_map(x, w, b):
  """Hedgehog's map of ``x [..., H, D]`` with ``w [H, D, F]``, ``b [H, F]`` (one map per
  head): ``[softmax(x W + b), softmax(-(x W + b))]`` over the feature axis, ``[..., H,
  2F]``, computed in float32 (the authors' code's softmax form of the paper's exp map)."""
  h = jnp.einsum("...hd,hdf->...hf", x.astype(jnp.float32), w.astype(jnp.float32))
  h = h + b.astype(jnp.float32).reshape((1,) * (h.ndim - 2) + b.shape)
  return jnp.concatenate([jax.nn.softmax(h, axis=-1), jax.nn.softmax(-h, axis=-1)], axis=-1)


def based_feature_map(x, scale):
  """Based's 2nd-order Taylor map of ``x [..., D]``: ``[1, s^(1/2) x, s vec(x x^T) /
  sqrt(2)]``, ``[..., 1 + D + D^2]``, so that ``phi(q)^T phi(k) = 1 + s q^T k + (s q^T
  k)^2 / 2``; computed in float32."""
  x = x.astype(jnp.float32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,))
  ones = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  return jnp.concatenate([ones, np.sqrt(scale) * x, (scale / np.sqrt(2.0)) * outer], axis=-1)


# ----------------------------------------------------------------------- shared core


@dataclasses.dataclass(frozen=True)
class FeatureCall:
  """Canonical call of a feature-map linear attention (after checks and defaults).

  ``phi`` maps ``[..., H, D] -> [..., H, F]`` float32 (its parameters bound), ``params``
  are the differentiable map parameters passed to it (so tiers stay pure functions).
  """

  q: Any
  k: Any
  v: Any
  params: tuple
  phi: Callable
  causal: bool
  normalize: bool
  lengths: Any
  segment_ids: Any
  initial_state: Any
  chunk_size: int

  def run(self, fn):
    return fn(self.q, self.k, self.v, self.params, phi=self.phi, causal=self.causal,
              normalize=self.normalize, lengths=self.lengths, segment_ids=self.segment_ids,
              initial_state=self.initial_state, chunk_size=self.chunk_size)


def _key_valid(lengths, batch, length):
  if lengths is None:
    return None
  return jnp.arange(length)[None, :] < lengths[:, None]


def _features(q, k, v, params, phi, lengths):
  """phi(q), phi(k) (float32) and v, with padded keys and values zeroed."""
  fq, fk = phi(q, *params), phi(k, *params)
  valid = _key_valid(lengths, q.shape[0], q.shape[1])
  if valid is not None:
    fk = fk * valid[:, :, None, None]
    v = v * valid[:, :, None, None].astype(v.dtype)
  return fq, fk, v


def _augment(v, normalize):
  return la._normalized_values(v) if normalize else v


def _finish(o, normalize):
  return la._normalize_output(o) if normalize else o


def document_index(segment_ids, batch, length):
  """``[B, T]`` int: the number of id changes up to t (0 for the first document)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  change = jnp.concatenate([jnp.zeros((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(change.astype(jnp.int32), axis=1)


def linear_core_reference(q, k, v, params, *, phi, causal, normalize, lengths, segment_ids,
                          initial_state, chunk_size):
  """Causal: the token-by-token recurrence; non-causal: the dense ``[T, T]`` weights."""
  fq, fk, v = _features(q, k, v, params, phi, lengths)
  values = _augment(v.astype(jnp.float32), normalize)
  if causal:
    o, final = la.linear_attn(fq, fk, values, scale=1.0, initial_state=initial_state,
                              output_final_state=True, segment_ids=segment_ids,
                              chunk_size=chunk_size, implementation="reference")
    return _finish(o, normalize), final
  doc = document_index(segment_ids, q.shape[0], q.shape[1])
  same = doc[:, :, None] == doc[:, None, :]
  scores = jnp.einsum("bihf,bjhf->bhij", fq, fk, precision="highest")
  scores = scores * same[:, None]
  o = jnp.einsum("bhij,bjhv->bihv", scores, values, precision="highest")
  return _finish(o, normalize), None


def linear_core_xla(q, k, v, params, *, phi, causal, normalize, lengths, segment_ids,
                    initial_state, chunk_size):
  """The chunked ``linear_attn``; non-causal = forward + reversed pass - diagonal."""
  fq, fk, v = _features(q, k, v, params, phi, lengths)
  fq, fk = fq.astype(q.dtype), fk.astype(q.dtype)
  values = _augment(v, normalize)
  run = lambda a, b, c, ids, s0: la.linear_attn(
      a, b, c, scale=1.0, initial_state=s0, output_final_state=causal, segment_ids=ids,
      chunk_size=chunk_size, implementation="xla")
  if causal:
    o, final = run(fq, fk, values, segment_ids, initial_state)
    return _finish(o.astype(jnp.float32), normalize), final
  flip = lambda a: None if a is None else jnp.flip(a, axis=1)
  fwd, _ = run(fq, fk, values, segment_ids, None)
  bwd, _ = run(flip(fq), flip(fk), flip(values), flip(segment_ids), None)
  diag = jnp.sum(fq.astype(jnp.float32) * fk.astype(jnp.float32), -1, keepdims=True)
  o = (fwd.astype(jnp.float32) + jnp.flip(bwd, axis=1).astype(jnp.float32)
       - diag * values.astype(jnp.float32))
  return _finish(o, normalize), None


# ----------------------------------------------------------------------------- checks


def check_lengths(lengths, batch, length):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must be [B]=({batch},), got lengths.shape={lengths.shape}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integers, got lengths.dtype={lengths.dtype}")
  return lengths


def check_causal_options(causal, initial_state, output_final_state):
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  if not causal and (initial_state is not None or output_final_state):
    raise ValueError("initial_state and output_final_state need causal=True (the "
                     f"non-causal form has no state), got causal={causal}")


def run_feature_op(mechanism, q, k, v, params, phi, *, causal, normalize, lengths,
                   segment_ids, initial_state, output_final_state, chunk_size,
                   implementation, feature_dim):
  """Check the common arguments, build the :class:`FeatureCall` and dispatch."""
  value_dim = v.shape[-1] + (1 if normalize else 0)
  check_causal_options(causal, initial_state, output_final_state)
  lengths = check_lengths(lengths, q.shape[0], q.shape[1])
  fake_q = jax.ShapeDtypeStruct(q.shape[:3] + (feature_dim,), q.dtype)
  _, initial_state, segment_ids, chunk_size = la._check_common(
      fake_q, v, 1.0, initial_state, segment_ids, chunk_size, value_dim)
  call = FeatureCall(q, k, v, tuple(params), phi, causal, normalize, lengths, segment_ids,
                     initial_state, chunk_size)
  o, final = call.run(registry.select(mechanism, implementation, call).fn)
  return o.astype(v.dtype), (final if output_final_state else None)


def _check_hedgehog_params(w, b, heads, head_dim, prefix=""):
  w, b = jnp.asarray(w), jnp.asarray(b)
  if w.ndim != 3 or w.shape[:2] != (heads, head_dim):
    raise ValueError(f"{prefix}w must be [H, D, F] with H={heads}, D={head_dim}, got "
                     f"{prefix}w.shape={w.shape}")
  if b.shape != (heads, w.shape[2]):
    raise ValueError(f"{prefix}b must be [H, F]={(heads, w.shape[2])}, got "
                     f"{prefix}b.shape={b.shape}")
  for name, x in (("w", w), ("b", b)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{prefix}{name} must be floating point, got {x.dtype}")
  return w, b


def _default_scale(scale, head_dim):
  if scale is None:
    return head_dim ** -0.5
  if not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a positive finite Python float, got scale={scale!r}")
  return float(scale)


def _register(name, paper, state, cost):
  registry.describe(name, registry.MechanismInfo(
      paper=paper, family="feature map", causal=True, non_causal=True, state=state,
      cost=cost, step=name + "_step", xla_path="chunked linear_attn"))
  registry.register(name, registry.Implementation(
      "reference", linear_core_reference, automatic=False))
  registry.register(name, registry.Implementation("xla", linear_core_xla, priority=10))


_register("hedgehog", "Zhang et al. 2024, The Hedgehog & the Porcupine",
          "2F x (V + 1)", "O(T C (2F + V)) chunked, C = chunk size")
_register("based", "Arora et al. 2024, Simple linear attention language models balance "
          "the recall-throughput tradeoff (Based)", "(1 + K + K^2) x (V + 1)",
          "O(T C (K^2 + V)) chunked, C = chunk size")

_COMMON = """
  Common arguments: ``causal`` (True: the decoder form with a state; False: every key of
  the query's document), ``lengths [B]`` (right padding), ``segment_ids [B, T]`` (packed
  documents: attention restarts where the id changes), ``initial_state [B, H, F', V + 1]``
  and ``output_final_state`` (causal only), ``chunk_size`` (of the ``xla`` tier),
  ``implementation`` (None, ``"reference"`` or ``"xla"``). Returns ``(o [B, T, H, V] in
  v's dtype, final_state or None)``.
  """


# --------------------------------------------------------------------------------- ops


def hedgehog(q, k, v, w, b, *, causal=True, lengths=None, segment_ids=None,
             initial_state=None, output_final_state=False, chunk_size=64,
             implementation=None):
  """Hedgehog linear attention: normalized linear attention with the learned map
  ``phi(x) = [softmax(x W + b), softmax(-(x W + b))]`` (one map per head, shared by q and
  k); ``q, k [B, T, H, D]``, ``v [B, T, H, V]``, ``w [H, D, F]``, ``b [H, F]``.
  """
  q, k, v = la._check_qkv(q, k, v)
  w, b = _check_hedgehog_params(w, b, q.shape[2], q.shape[3])
  return run_feature_op("hedgehog", q, k, v, (w, b), hedgehog_feature_map, causal=causal,
                        normalize=True, lengths=lengths, segment_ids=segment_ids,
                        initial_state=initial_state, output_final_state=output_final_state,
                        chunk_size=chunk_size, implementation=implementation,
                        feature_dim=2 * w.shape[2])


def based(q, k, v, *, scale=None, causal=True, lengths=None, segment_ids=None,
          initial_state=None, output_final_state=False, chunk_size=64, implementation=None):
  """Based's Taylor linear attention: normalized linear attention with ``phi(q)^T phi(k)
  = 1 + s q^T k + (s q^T k)^2 / 2``, ``s = scale`` (default ``D ** -0.5``); ``q, k [B, T,
  H, D]`` (the paper projects to a small D, e.g. 16), ``v [B, T, H, V]``.
  """
  q, k, v = la._check_qkv(q, k, v)
  scale = _default_scale(scale, q.shape[-1])
  d = q.shape[-1]
  return run_feature_op("based", q, k, v, (), lambda x: based_feature_map(x, scale),
                        causal=causal, normalize=True, lengths=lengths,
                        segment_ids=segment_ids, initial_state=initial_state,
                        output_final_state=output_final_state, chunk_size=chunk_size,
                        implementation=implementation, feature_dim=1 + d + d * d)


hedgehog.__doc__ += _COMMON
based.__doc__ += _COMMON


# ------------------------------------------------------------------------------- steps


def _feature_step(fq, fk, v_t, state):
  o_t, state = la.linear_attn_step(fq, fk, v_t, state, normalize=True, scale=1.0)
  return o_t, state


def hedgehog_step(q_t, k_t, v_t, state, w, b):
  """One decode step of causal :func:`hedgehog`: ``q_t, k_t [B, H, D]``, ``v_t [B, H,
  V]``, ``state [B, H, 2F, V + 1]`` -> ``(o_t [B, H, V], state)``."""
  q_t, k_t = jnp.asarray(q_t), jnp.asarray(k_t)
  if q_t.ndim != 3:
    raise ValueError(f"q_t must be [B, H, D], got q_t.shape={q_t.shape}")
  w, b = _check_hedgehog_params(w, b, q_t.shape[1], q_t.shape[2])
  fq, fk = hedgehog_feature_map(q_t, w, b), hedgehog_feature_map(k_t, w, b)
  return _feature_step(fq.astype(q_t.dtype), fk.astype(q_t.dtype), v_t, state)


def based_step(q_t, k_t, v_t, state, *, scale=None):
  """One decode step of causal :func:`based`: ``state [B, H, 1 + D + D^2, V + 1]``."""
  q_t, k_t = jnp.asarray(q_t), jnp.asarray(k_t)
  if q_t.ndim != 3:
    raise ValueError(f"q_t must be [B, H, D], got q_t.shape={q_t.shape}")
  scale = _default_scale(scale, q_t.shape[-1])
  fq, fk = based_feature_map(q_t, scale), based_feature_map(k_t, scale)
  return _feature_step(fq.astype(q_t.dtype), fk.astype(q_t.dtype), v_t, state)


# ------------------------------------------------------------------ distillation loss


def hedgehog_distillation_loss(q, k, w, b, *, causal=True, scale=None, lengths=None):
  """Hedgehog's attention-weight distillation loss (Zhang et al. 2024, arXiv:2402.04347).

  For each batch row, head and query i (valid, i.e. ``i < lengths[b]``), the cross-entropy
  ``-sum_j a_ij log a^_ij`` between the softmax teacher ``a_ij = softmax_j(scale q_i^T
  k_j)`` (scale default ``D ** -0.5``) and the Hedgehog weights ``a^_ij = phi(q_i)^T
  phi(k_j) / sum_j' phi(q_i)^T phi(k_j')``, both over the allowed keys ``j`` (``j <= i``
  when ``causal``, and ``j < lengths[b]``); returns the mean over those (b, h, i), a
  float32 scalar. Gradients flow to q, k, w, b; stop them on q, k to fit the map alone.
  Costs ``O(T^2)``: a training loss for distilling into the map.
  """
  q, k = jnp.asarray(q), jnp.asarray(k)
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, H, D], got q.shape={q.shape}")
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}, got k.shape={k.shape}")
  w, b = _check_hedgehog_params(w, b, q.shape[2], q.shape[3])
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  scale = _default_scale(scale, q.shape[-1])
  batch, length = q.shape[:2]
  lengths = check_lengths(lengths, batch, length)
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  allowed = jnp.broadcast_to(j <= i if causal else j >= 0, (batch, 1, length, length))
  row_valid = jnp.ones((batch, 1, length), bool)
  if lengths is not None:
    allowed = allowed & (j[None, None] < lengths[:, None, None, None])
    row_valid = row_valid & (jnp.arange(length)[None, None] < lengths[:, None, None])
  logits = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32),
                              k.astype(jnp.float32), precision="highest")
  logits = jnp.where(allowed, logits, -jnp.inf)
  teacher = jax.nn.softmax(logits, axis=-1)
  teacher = jnp.where(allowed, teacher, 0.0)
  fq, fk = hedgehog_feature_map(q, w, b), hedgehog_feature_map(k, w, b)
  kernel = jnp.einsum("bihf,bjhf->bhij", fq, fk, precision="highest")
  log_kernel = jnp.log(jnp.where(allowed, kernel, 1.0))
  log_norm = jnp.log(jnp.sum(jnp.where(allowed, kernel, 0.0), -1, keepdims=True))
  ce = -jnp.sum(teacher * (log_kernel - log_norm), axis=-1)  # [B, H, T]
  weight = jnp.broadcast_to(row_valid, ce.shape).astype(jnp.float32)
  return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
