"""Linear attention through kernel feature maps (CATALOG.md section 3).

Seven mechanisms, each with a causal and a non-causal form, layout ``[B, T, H, D]``:

========================  ==================================================================
op                        per head, for the keys ``s`` a query ``t`` sees
========================  ==================================================================
efficient_attention       ``o_t = sum_d softmax_d(q_t) sum_s softmax_s(k_{s,d}) v_s``
                          (Shen et al. 2021, "Efficient Attention", eq. 4 with the softmax
                          rho_q / rho_k of its §3.2); causally the key softmax runs over s <= t
performer                 FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with
                          Performers", Lemma 1 and eq. 3): ``phi(x) = exp(w^T x - |x|^2/2) /
                          sqrt(m)`` with ``x = q (scale)^{1/2}``, normalized by
                          ``phi(q)^T sum_s phi(k_s)``
cosformer                 cosFormer (Qin et al. 2022, §3.3-3.4): ReLU features re-weighted by
                          ``cos(pi/2 (i - j) / M)``, split into cos and sin parts, normalized
cottention                Cottention (Mongaras et al. 2024): ``o_t = sum_s (q^_t . k^_s) v_s /
                          n_s^p``, q^ / k^ rows L2-normalized, each value divided by the
                          sequence length n_s at its own position to the power p
lln_attention             LLN (Nahshan et al. 2024, §4): ``phi_q = exp(alpha q)``,
                          ``phi_k = exp(beta k)``, normalized; alpha, beta by the §4.1
                          moment matching (:func:`lln_moment_matching`)
focused_linear_attention  FLatten (Han et al. 2023, eqs. 5-6): ``phi_p(x) = f_p(ReLU(x))``,
                          ``f_p(x) = |x| / |x^p| x^p``, normalized
slab_attention            SLAB (Guo et al. 2024, §3.2): ``ReLU(q)^T ReLU(k)``, normalized
========================  ==================================================================

Normalized means ``o_t = phi(q_t)^T sum_s phi(k_s) v_s^T / (phi(q_t)^T sum_s phi(k_s) +
eps)`` with ``eps = 1e-6`` for the ReLU-based maps (whose denominator can be 0), and no eps
for the exponential maps (performer, lln, efficient_attention), whose denominators are
positive and are computed relative to a running maximum instead.

Every op takes ``causal`` and returns ``(o [B, T, H, V], final_state or None)``; the
non-causal form returns ``(o, None)`` and refuses ``initial_state`` / ``output_final_state``.
``segment_ids [B, T]`` packs documents (a new document starts where the id changes; a
query sees only keys of its own document), ``lengths [B]`` right-pads (keys at
``t >= lengths[b]`` contribute nothing, also to the final state). FLatten's and SLAB's
depthwise convolution on V is a layer term, added by their mixers
(``attnlab.layers.feature_map_mixers``).

Tiers: ``reference`` builds the dense ``[T, T]`` weights with the causal / document mask;
``xla`` computes the features and runs the chunked ops of
:mod:`attnlab.ops.linear_attention` (``linear_attn``, ``simple_gla`` and ``gla`` with log
gates that carry running maxima / log-normalizers; non-causal forms as a forward pass plus
an exclusive backward pass within documents).

Decode states (float32, zeros = empty):

* normalized maps (cosformer ``[B, H, 2K, V + 1]``, flatten / slab ``[B, H, K, V + 1]``):
  ``[S | z]`` as in ``linear_attn(normalize=True)``;
* cottention ``[B, H, K, V + 1]``: ``[S | n]``, ``S = sum_s k^_s v_s^T / n_s^p``, n the count
  of keys (same in every row);
* performer ``[B, H, M, V + 2]``, lln ``[B, H, K, V + 2]``: ``[S~ | z~ | m]`` with
  ``S~ = sum_s e^{-m} phi(k_s) v_s^T``, ``z~ = sum_s e^{-m} phi(k_s)``, m a per-head log
  offset (same in every row);
* efficient_attention ``[B, H, K, V + 2]``: ``[S~ | z~ | m]`` per key channel d:
  ``S~_d = sum_s e^{k_{s,d} - m_d} v_s``, ``z~_d = sum_s e^{k_{s,d} - m_d}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import registry
from attnlab.ops.linear_attention import _check_qkv  # the shared q/k/v checks
from attnlab.ops.linear_attention import gla, linear_attn, simple_gla

__all__ = [
    "efficient_attention", "efficient_attention_step", "performer", "performer_step",
    "performer_features", "cosformer", "cosformer_step", "cottention", "cottention_step",
    "lln_attention", "lln_attention_step", "lln_moment_matching",
    "focused_linear_attention", "focused_linear_attention_step", "slab_attention",
    "slab_attention_step",
]

NORMALIZE_EPS = 1e-6   # the ReLU-based maps: num / (den + eps)
L2NORM_EPS = 1e-6      # cottention: x / sqrt(sum x^2 + eps)
_EMPTY = -1e30         # log of an empty sum (finite: no inf - inf anywhere)
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class FeatureMapCall:
  """The canonical arguments of every tier: raw q, k, v, the form, the mechanism's own
  parameters (``params``, after defaults and checks) and the packing arguments."""

  q: Any
  k: Any
  v: Any
  causal: bool
  params: dict
  initial_state: Any
  segment_ids: Any
  lengths: Any
  chunk_size: int


# --------------------------------------------------------------------------- helpers


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _trail(x, ndim):
  """``x [H]`` (or a scalar) -> broadcastable against ``[B, T, H, ...]`` of rank ndim."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    return x.reshape((1,) * ndim)
  return x.reshape((1, 1, x.shape[0]) + (1,) * (ndim - 3))


def _layout(call):
  """``(documents [B, T], starts [B, T], valid [B, T])``: the document index per position,
  where a document starts (t > 0), and which keys count."""
  b, t = call.q.shape[:2]
  if call.segment_ids is None:
    starts = jnp.zeros((b, t), bool)
  else:
    ids = call.segment_ids
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  docs = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  if call.lengths is None:
    valid = jnp.ones((b, t), bool)
  else:
    valid = jnp.arange(t)[None] < call.lengths[:, None]
  return docs, starts, valid


def _expand(mask, ndim):
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _segmented_scan(x, starts, op):
  """Inclusive scan of ``op`` along axis 1 of ``x [B, T, ...]``, restarting at ``starts``."""
  flags = jnp.broadcast_to(_expand(starts, x.ndim), x.shape)

  def combine(a, b):
    fa, xa = a
    fb, xb = b
    return fa | fb, jnp.where(fb, xb, op(xa, xb))

  return lax.associative_scan(combine, (flags, x), axis=1)[1]


def _document_total(prefix, starts):
  """The value of an inclusive segmented scan at each document's last position, spread over
  the document (a scan of "keep the first" over the reversed sequence)."""
  ends = jnp.concatenate([starts[:, 1:], jnp.zeros_like(starts[:, :1])], axis=1)
  rev = _segmented_scan(jnp.flip(prefix, 1), jnp.flip(ends, 1), lambda a, b: a)
  return jnp.flip(rev, 1)


def _shift_right(x, fill):
  """``y[:, t] = x[:, t - 1]``, ``y[:, 0] = fill`` (broadcast)."""
  head = jnp.broadcast_to(jnp.asarray(fill, x.dtype), x[:, :1].shape)
  return jnp.concatenate([head, x[:, :-1]], axis=1)


def _document_sum(qf, kf, vals, segment_ids, chunk_size):
  """Non-causal ``o_t = qf_t^T sum_{s in doc(t)} kf_s vals_s^T`` (float32).

  Without documents it is two einsums; with documents a forward chunked pass (s <= t) plus
  a backward one over the strictly later keys (the reversed sequence with keys shifted by
  one), so nothing is subtracted."""
  if segment_ids is None:
    kv = jnp.einsum("bshk,bshv->bhkv", kf, vals, precision=_HIGHEST)
    return jnp.einsum("bthk,bhkv->bthv", qf, kv, precision=_HIGHEST)
  run = lambda q, k, v, ids: linear_attn(q, k, v, scale=1.0, segment_ids=ids,
                                         chunk_size=chunk_size, implementation="xla")[0]
  forward = run(qf, kf, vals, segment_ids)
  flip = lambda a: jnp.flip(a, 1)
  ids = flip(segment_ids)
  same = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] == ids[:, :-1]], 1)
  keep = _expand(same, 4)
  k_later = jnp.where(keep, _shift_right(flip(kf), 0.0), 0.0)
  v_later = jnp.where(keep, _shift_right(flip(vals), 0.0), 0.0)
  backward = run(flip(qf), k_later, v_later, ids)
  return forward + flip(backward)


def _allowed(call):
  """``[B, T, S]``: key s counts for query t (same document, valid key, s <= t if causal)."""
  docs, _, valid = _layout(call)
  allowed = (docs[:, :, None] == docs[:, None, :]) & valid[:, None, :]
  if call.causal:
    t = docs.shape[1]
    allowed &= jnp.tril(jnp.ones((t, t), bool))[None]
  return allowed


def _first_doc(call):
  """``[B, T]`` rows that see the initial state; ``[B]`` whether the final state does."""
  docs, _, _ = _layout(call)
  return docs == 0, docs[:, -1] == 0


def _last_doc_keys(call):
  docs, _, valid = _layout(call)
  return (docs == docs[:, -1:]) & valid


def _with_ones(v):
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


# ----------------------------------------------------- family 1: normalized nonneg maps


def _normalized_reference(qf, kf, call):
  v = _f32(call.v)
  a = jnp.einsum("bthf,bshf->bhts", qf, kf, precision=_HIGHEST)
  a = a * _allowed(call)[:, None].astype(a.dtype)
  vals = _with_ones(v)
  out = jnp.einsum("bhts,bshw->bthw", a, vals, precision=_HIGHEST)
  final = None
  if call.causal:
    first, final_has_init = _first_doc(call)
    s0 = call.initial_state
    if s0 is not None:
      init = jnp.einsum("bthf,bhfw->bthw", qf, _f32(s0), precision=_HIGHEST)
      out = out + init * _expand(first, 4)
    last = _expand(_last_doc_keys(call), 4)
    final = jnp.einsum("bshf,bshw->bhfw", kf * last, vals, precision=_HIGHEST)
    if s0 is not None:
      final = final + _f32(s0) * _expand(final_has_init, 4)
  return out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS), final


def _normalized_xla(qf, kf, call):
  v = _f32(call.v)
  _, _, valid = _layout(call)
  kf = kf * _expand(valid, 4)
  if call.causal:
    return linear_attn(qf, kf, v, normalize=True, scale=1.0,
                       initial_state=call.initial_state, output_final_state=True,
                       segment_ids=call.segment_ids, chunk_size=call.chunk_size,
                       implementation="xla")
  out = _document_sum(qf, kf, _with_ones(v), call.segment_ids, call.chunk_size)
  return out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS), None


def _normalized_step(qf, kf, v_t, state):
  state = state + jnp.einsum("bhf,bhw->bhfw", kf, _with_ones(_f32(v_t)), precision=_HIGHEST)
  out = jnp.einsum("bhf,bhfw->bhw", qf, state, precision=_HIGHEST)
  return out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS), state


def _relu_features(call):
  return jax.nn.relu(_f32(call.q)), jax.nn.relu(_f32(call.k))


def _focused(x, power):
  """FLatten eq. 5, ``f_p(x) = |x| / |x^p| x^p`` of ``x = ReLU(.)`` (float32).

  ``f_p`` is homogeneous of degree 1, so it is evaluated on ``x / max(x)`` (no overflow of
  ``x^p``) and scaled back; an all-zero row maps to zeros."""
  r = jax.nn.relu(x)
  top = jnp.max(r, axis=-1, keepdims=True)
  nonzero = top > 0
  u = r / jnp.where(nonzero, top, 1.0)
  up = u ** power
  n1 = jnp.sum(u * u, axis=-1, keepdims=True)
  n2 = jnp.sum(up * up, axis=-1, keepdims=True)
  safe = lambda n: jnp.where(nonzero, n, 1.0)
  return jnp.where(nonzero, top * jnp.sqrt(safe(n1)) / jnp.sqrt(safe(n2)) * up, 0.0)


def _focused_features(call):
  p = call.params["power"]
  return _focused(_f32(call.q), p), _focused(_f32(call.k), p)


def _cosformer_angles(positions, max_len):
  return (math.pi / 2.0) * positions.astype(jnp.float32) / max_len


def _cosformer_map(x, angle):
  """``[ReLU(x) cos(a), ReLU(x) sin(a)]`` (cosFormer eq. 11's decomposition)."""
  r = jax.nn.relu(_f32(x))
  a = angle[..., None, None] if angle.ndim == x.ndim - 2 else angle
  return jnp.concatenate([r * jnp.cos(a), r * jnp.sin(a)], axis=-1)


def _cosformer_features(call):
  angle = _cosformer_angles(call.params["positions"], call.params["max_len"])
  return _cosformer_map(call.q, angle), _cosformer_map(call.k, angle)


# ---------------------------------------------------------- family 2: exponential maps


def _performer_logits(x, projection, scale):
  """``log phi(x) = w^T x' - |x'|^2 / 2 - log(m) / 2`` with ``x' = x scale^{1/2}``."""
  x = _f32(x) * math.sqrt(scale)
  m = projection.shape[0]
  wx = jnp.einsum("bthd,md->bthm", x, _f32(projection), precision=_HIGHEST)
  return wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True) - 0.5 * math.log(m)


def _performer_log_features(call):
  p = call.params
  return (_performer_logits(call.q, p["projection"], p["scale"]),
          _performer_logits(call.k, p["projection"], p["scale"]))


def _lln_log_features(call):
  p = call.params
  return _f32(call.q) * _trail(p["alpha"], 4), _f32(call.k) * _trail(p["beta"], 4)


def _split_exp_state(s0):
  """``[S~ | z~ | m]`` -> ``([S~ | z~] [B, H, M, V + 1], m [B, H])``."""
  s0 = _f32(s0)
  return s0[..., :-1], s0[..., 0, -1]


def _exp_reference(lq, lk, call):
  v = _f32(call.v)
  la = jax.nn.logsumexp(lq[:, :, None] + lk[:, None, :], axis=-1)  # [B, T, S, H]
  la = jnp.where(_allowed(call)[..., None], la, -jnp.inf)
  vals = _with_ones(v)
  s0 = call.initial_state
  first, final_has_init = _first_doc(call)
  shift = jnp.max(la, axis=2)  # [B, T, H]
  if s0 is not None:
    sz0, m0 = _split_exp_state(s0)
    init_log = lq + m0[:, None, :, None]  # [B, T, H, M]: log of phi(q)_i e^{m0}
    init_log = jnp.where(_expand(first, 4), init_log, -jnp.inf)
    shift = jnp.maximum(shift, jnp.max(init_log, axis=-1))
  shift = lax.stop_gradient(shift)
  w = jnp.exp(la - shift[:, :, None])
  out = jnp.einsum("btsh,bshw->bthw", w, vals, precision=_HIGHEST)
  if s0 is not None:
    out = out + jnp.einsum("bthm,bhmw->bthw", jnp.exp(init_log - shift[..., None]), sz0,
                           precision=_HIGHEST)
  o = out[..., :-1] / out[..., -1:]
  final = None
  if call.causal:
    last = _last_doc_keys(call)
    top = jnp.max(jnp.where(_expand(last, 4), lk, _EMPTY), axis=(1, 3))  # [B, H]
    if s0 is not None:
      top = jnp.where(final_has_init[:, None], jnp.maximum(top, m0), top)
    top = lax.stop_gradient(top)
    kf = jnp.where(_expand(last, 4), jnp.exp(lk - top[:, None, :, None]), 0.0)
    sz = jnp.einsum("bshm,bshw->bhmw", kf, vals, precision=_HIGHEST)
    if s0 is not None:
      carry = jnp.exp(m0 - top) * final_has_init[:, None]
      sz = sz + sz0 * carry[..., None, None]
    final = _join_exp_state(sz, top)
  return o, final


def _join_exp_state(sz, m):
  return jnp.concatenate([sz, jnp.broadcast_to(m[..., None, None], sz.shape[:-1] + (1,))],
                         axis=-1)


def _exp_xla(lq, lk, call):
  v = _f32(call.v)
  _, starts, valid = _layout(call)
  lk = jnp.where(_expand(valid, 4), lk, _EMPTY)
  qf = jnp.exp(lq - lax.stop_gradient(jnp.max(lq, axis=-1, keepdims=True)))
  key_top = lax.stop_gradient(jnp.max(lk, axis=-1))  # [B, T, H]
  running = _segmented_scan(key_top, starts, jnp.maximum)
  vals = _with_ones(v)
  if not call.causal:
    top = _document_total(running, starts)
    kf = jnp.exp(lk - top[..., None])
    out = _document_sum(qf, kf, vals, call.segment_ids, call.chunk_size)
    return out[..., :-1] / out[..., -1:], None
  s0 = call.initial_state
  first, _ = _first_doc(call)
  if s0 is not None:
    sz0, m0 = _split_exp_state(s0)
    running = jnp.where(first[..., None], jnp.maximum(running, m0[:, None]), running)
    previous = _shift_right(running, m0[:, None])
  else:
    sz0 = None
    previous = _shift_right(running, running[:, :1])
  # The state is kept relative to the running maximum: S~_t = e^{m_{t-1} - m_t} S~_{t-1}
  # + e^{log phi(k_t) - m_t} v_t, a simple_gla whose log gate is the drop of the offset.
  g = jnp.where(starts[..., None], 0.0, previous - running)
  kf = jnp.exp(lk - running[..., None])
  out, sz = simple_gla(qf, kf, vals, g, scale=1.0, initial_state=sz0,
                       output_final_state=True, segment_ids=call.segment_ids,
                       chunk_size=call.chunk_size, implementation="xla")
  return out[..., :-1] / out[..., -1:], _join_exp_state(sz, running[:, -1])


def _exp_step(lq, lk, v_t, state):
  sz, m = _split_exp_state(state)
  m_new = jnp.maximum(m, jnp.max(lk, axis=-1))
  kf = jnp.exp(lk - m_new[..., None])
  sz = sz * jnp.exp(m - m_new)[..., None, None] + jnp.einsum(
      "bhm,bhw->bhmw", kf, _with_ones(_f32(v_t)), precision=_HIGHEST)
  qf = jnp.exp(lq - jnp.max(lq, axis=-1, keepdims=True))
  out = jnp.einsum("bhm,bhmw->bhw", qf, sz, precision=_HIGHEST)
  return out[..., :-1] / out[..., -1:], _join_exp_state(sz, m_new)


# ------------------------------------------------------------ efficient attention


def _split_efficient_state(s0):
  s0 = _f32(s0)
  return s0[..., :-2], s0[..., -2], s0[..., -1]  # S~ [B,H,K,V], z~ [B,H,K], m [B,H,K]


def _efficient_reference(call):
  q, k, v = _f32(call.q), _f32(call.k), _f32(call.v)
  rho_q = jax.nn.softmax(q, axis=-1)
  logits = jnp.where(_allowed(call)[..., None, None], k[:, None], -jnp.inf)  # [B,T,S,H,K]
  shift = jnp.max(logits, axis=2)  # [B, T, H, K]
  s0 = call.initial_state
  first, final_has_init = _first_doc(call)
  if s0 is not None:
    sv0, z0, m0 = _split_efficient_state(s0)
    init_log = jnp.where(first[:, :, None, None] & (z0 > 0)[:, None], m0[:, None], -jnp.inf)
    shift = jnp.maximum(shift, init_log)
  shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
  w = jnp.exp(logits - shift[:, :, None])
  num = jnp.einsum("btshk,bshv->bthkv", w, v, precision=_HIGHEST)
  den = jnp.sum(w, axis=2)
  if s0 is not None:
    carry = jnp.exp(init_log - shift)  # [B, T, H, K]
    num = num + carry[..., None] * sv0[:, None]
    den = den + carry * z0[:, None]
  o = jnp.einsum("bthk,bthkv->bthv", rho_q, num / den[..., None], precision=_HIGHEST)
  final = None
  if call.causal:
    last = _expand(_last_doc_keys(call), 4)
    logs = jnp.where(last, k, -jnp.inf)
    if s0 is not None:
      init = jnp.where(final_has_init[:, None, None] & (z0 > 0),
                       m0 + jnp.log(jnp.where(z0 > 0, z0, 1.0)), -jnp.inf)
      logs = jnp.concatenate([logs, init[:, None]], axis=1)
    total = jax.nn.logsumexp(logs, axis=1)  # [B, H, K]
    total = jnp.where(jnp.isfinite(total), total, _EMPTY)
    w_last = jnp.where(last, jnp.exp(k - total[:, None]), 0.0)
    sv = jnp.einsum("bshk,bshv->bhkv", w_last, v, precision=_HIGHEST)
    if s0 is not None:
      carry = jnp.where(final_has_init[:, None, None] & (z0 > 0),
                        jnp.exp(m0 - total) * z0, 0.0)
      sv = sv + carry[..., None] * jnp.where((z0 > 0)[..., None], sv0 / jnp.where(
          z0 > 0, z0, 1.0)[..., None], 0.0)
    final = _join_efficient_state(sv, total)
  return o, final


def _join_efficient_state(sv, log_total):
  z = (log_total > 0.5 * _EMPTY).astype(jnp.float32)
  return jnp.concatenate([sv, z[..., None], log_total[..., None]], axis=-1)


def _efficient_xla(call):
  q, k, v = _f32(call.q), _f32(call.k), _f32(call.v)
  _, starts, valid = _layout(call)
  rho_q = jax.nn.softmax(q, axis=-1)
  k = jnp.where(_expand(valid, 4), k, _EMPTY)
  log_total = _segmented_scan(k, starts, jnp.logaddexp)  # L_t = log sum_{s<=t} e^{k_s}
  if not call.causal:
    log_total = _document_total(log_total, starts)
    kf = jnp.where(_expand(valid, 4), jnp.exp(k - log_total), 0.0)
    return _document_sum(rho_q, kf, v, call.segment_ids, call.chunk_size), None
  s0 = call.initial_state
  first, _ = _first_doc(call)
  if s0 is not None:
    sv0, z0, m0 = _split_efficient_state(s0)
    nonempty = z0 > 0
    log0 = jnp.where(nonempty, m0 + jnp.log(jnp.where(nonempty, z0, 1.0)), _EMPTY)
    log_total = jnp.where(first[..., None, None], jnp.logaddexp(log_total, log0[:, None]),
                          log_total)
    previous = _shift_right(log_total, log0[:, None])
    init = jnp.where(nonempty[..., None], sv0 / jnp.where(nonempty, z0, 1.0)[..., None], 0.0)
  else:
    previous = _shift_right(log_total, log_total[:, :1])
    init = None
  # S~_t = sum_{s<=t} e^{k_s - L_t} v_s per key channel: gla with the log gate
  # L_{t-1} - L_t <= 0 and keys e^{k_t - L_t} <= 1 (an empty channel keeps gate 0).
  g = jnp.where(starts[..., None, None] | (previous < 0.5 * _EMPTY), 0.0,
                previous - log_total)
  kf = jnp.where(_expand(valid, 4), jnp.exp(k - log_total), 0.0)
  o, sv = gla(rho_q, kf, v, g, scale=1.0, initial_state=init, output_final_state=True,
              segment_ids=call.segment_ids, chunk_size=call.chunk_size,
              implementation="xla")
  return o, _join_efficient_state(sv, log_total[:, -1])


# -------------------------------------------------------------------------- cottention


def _l2normalize(x):
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def _cottention_scale(count, exponent):
  """``n^{-p}`` (``count [B, T, H]`` or ``[B, H]``, p a float or ``[H]``); a row that sees
  no key gets 0."""
  p = jnp.asarray(exponent, jnp.float32)
  if p.ndim:
    p = p.reshape((1,) * (count.ndim - 1) + (-1,))
  return jnp.where(count > 0, jnp.where(count > 0, count, 1.0) ** -p, 0.0)


def _cottention_reference(call):
  qh, kh, v = _l2normalize(_f32(call.q)), _l2normalize(_f32(call.k)), _f32(call.v)
  allowed = _allowed(call)
  a = jnp.einsum("bthk,bshk->bhts", qh, kh, precision=_HIGHEST) * allowed[:, None]
  # n_s: the keys row s sees (its own sequence length), plus the state's count.
  count = jnp.broadcast_to(jnp.sum(allowed, axis=2).astype(jnp.float32)[..., None],
                           v.shape[:3])
  s0 = call.initial_state
  first, final_has_init = _first_doc(call)
  if s0 is not None:
    s0 = _f32(s0)
    count = count + s0[:, None, :, 0, -1] * first[..., None]
  v = v * _cottention_scale(count, call.params["length_exponent"])[..., None]
  o = jnp.einsum("bhts,bshv->bthv", a, v, precision=_HIGHEST)
  if s0 is not None:
    o = o + jnp.einsum("bthk,bhkv->bthv", qh, s0[..., :-1],
                       precision=_HIGHEST) * _expand(first, 4)
  final = None
  if call.causal:
    last = _last_doc_keys(call)
    sv = jnp.einsum("bshk,bshv->bhkv", kh * _expand(last, 4), v, precision=_HIGHEST)
    n = jnp.broadcast_to(jnp.sum(last, axis=1).astype(jnp.float32)[:, None], sv.shape[:2])
    if s0 is not None:
      sv = sv + s0[..., :-1] * final_has_init[:, None, None, None]
      n = n + s0[..., 0, -1] * final_has_init[:, None]
    final = jnp.concatenate([sv, jnp.broadcast_to(n[..., None, None], sv.shape[:-1] + (1,))],
                            axis=-1)
  return o, final


def _cottention_xla(call):
  qh, kh, v = _l2normalize(_f32(call.q)), _l2normalize(_f32(call.k)), _f32(call.v)
  _, starts, valid = _layout(call)
  kh = kh * _expand(valid, 4)
  heads = qh.shape[2]
  count = _segmented_scan(jnp.broadcast_to(valid[..., None], valid.shape + (heads,)).astype(
      jnp.float32), starts, jnp.add)
  exponent = call.params["length_exponent"]
  if not call.causal:
    count = _document_total(count, starts)
    v = v * _cottention_scale(count, exponent)[..., None]
    return _document_sum(qh, kh, v, call.segment_ids, call.chunk_size), None
  s0 = call.initial_state
  first, _ = _first_doc(call)
  if s0 is not None:
    s0 = _f32(s0)
    count = count + s0[:, None, :, 0, -1] * first[..., None]
  v = v * _cottention_scale(count, exponent)[..., None]
  out, sv = linear_attn(qh, kh, v, scale=1.0,
                        initial_state=None if s0 is None else s0[..., :-1],
                        output_final_state=True, segment_ids=call.segment_ids,
                        chunk_size=call.chunk_size, implementation="xla")
  n = count[:, -1]
  final = jnp.concatenate([sv, jnp.broadcast_to(n[..., None, None], sv.shape[:-1] + (1,))],
                          axis=-1)
  return out, final


# ------------------------------------------------------------------ registration


_FEATURES = {"cosformer": _cosformer_features, "focused_linear_attention": _focused_features,
             "slab_attention": _relu_features}
_LOG_FEATURES = {"performer": _performer_log_features, "lln_attention": _lln_log_features}


def _tier(mechanism, reference):
  if mechanism in _FEATURES:
    fn = _normalized_reference if reference else _normalized_xla
    return lambda call: fn(*_FEATURES[mechanism](call), call)
  if mechanism in _LOG_FEATURES:
    fn = _exp_reference if reference else _exp_xla
    return lambda call: fn(*_LOG_FEATURES[mechanism](call), call)
  if mechanism == "efficient_attention":
    return _efficient_reference if reference else _efficient_xla
  return _cottention_reference if reference else _cottention_xla


_INFO = {
    "efficient_attention": ("Shen et al. 2021, Efficient Attention: Attention with Linear "
                            "Complexities", "K x (V + 2)"),
    "performer": ("Choromanski et al. 2021, Rethinking Attention with Performers (FAVOR+)",
                  "M x (V + 2)"),
    "cosformer": ("Qin et al. 2022, cosFormer: Rethinking Softmax in Attention",
                  "2K x (V + 1)"),
    "cottention": ("Mongaras et al. 2024, Cottention: Linear Transformers With Cosine "
                   "Attention", "K x (V + 1)"),
    "lln_attention": ("Nahshan et al. 2024, Linear Log-Normal Attention with Unbiased "
                      "Concentration", "K x (V + 2)"),
    "focused_linear_attention": ("Han et al. 2023, FLatten Transformer: Vision Transformer "
                                 "using Focused Linear Attention", "K x (V + 1)"),
    "slab_attention": ("Guo et al. 2024, SLAB: Efficient Transformers with Simplified "
                       "Linear Attention and Progressive Re-parameterized BatchNorm",
                       "K x (V + 1)"),
}

# The chunked op of attnlab.ops.linear_attention each xla tier runs on its features.
_XLA_PATH = {
    "efficient_attention": "chunked gla (per-channel running normalizer as the gate)",
    "performer": "chunked simple_gla (running max of the key features as the gate)",
    "lln_attention": "chunked simple_gla (running max of the key features as the gate)",
    "cosformer": "chunked linear_attn",
    "cottention": "chunked linear_attn",
    "focused_linear_attention": "chunked linear_attn",
    "slab_attention": "chunked linear_attn",
}

for _name, (_paper, _state) in _INFO.items():
  registry.describe(_name, registry.MechanismInfo(
      paper=_paper, family="feature map", causal=True, non_causal=True, state=_state,
      cost="O(T C (K + V)) chunked, C = chunk size", step=_name + "_step",
      xla_path=_XLA_PATH[_name]))
  registry.register(_name, registry.Implementation(
      "reference", _tier(_name, True), automatic=False))
  registry.register(_name, registry.Implementation("xla", _tier(_name, False), priority=10))


# ------------------------------------------------------------------------ checks




def _check_array(name, x, shape, kind=jnp.floating):
  x = jnp.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {name}.shape={x.shape}")
  if not jnp.issubdtype(x.dtype, kind):
    raise ValueError(f"{name} must be {kind.__name__}, got {name}.dtype={x.dtype}")
  return x


def _check_per_head(name, x, heads):
  """A float or an array ``[H]``."""
  if isinstance(x, (int, float, np.floating)) and not isinstance(x, bool):
    if not np.isfinite(x):
      raise ValueError(f"{name} must be finite, got {name}={x!r}")
    return float(x)
  return _check_array(name, x, (heads,))


def _run(mechanism, implementation, q, k, v, causal, params, *, initial_state,
         output_final_state, segment_ids, lengths, chunk_size, state_shape):
  batch, length = q.shape[:2]
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  if not causal and (initial_state is not None or output_final_state):
    raise ValueError("initial_state and output_final_state need causal=True, got "
                     f"initial_state={'given' if initial_state is not None else None}, "
                     f"output_final_state={output_final_state}")
  if initial_state is not None:
    initial_state = _check_array("initial_state", initial_state, state_shape)
  if segment_ids is not None:
    segment_ids = _check_array("segment_ids", segment_ids, (batch, length), jnp.integer)
  if lengths is not None:
    lengths = _check_array("lengths", lengths, (batch,), jnp.integer)
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  call = FeatureMapCall(q, k, v, causal, params, initial_state, segment_ids, lengths,
                        int(chunk_size))
  o, final = registry.select(mechanism, implementation, call).fn(call)
  return o.astype(v.dtype), (final if output_final_state else None)


def _doc(fn):
  fn.__doc__ += """
  Common arguments: ``causal`` (decoder form, default True), ``initial_state`` and
  ``output_final_state`` (causal only; state layout in the module docstring),
  ``segment_ids [B, T]`` (packed documents), ``lengths [B]`` (right padding),
  ``chunk_size`` (of the ``xla`` tier), ``implementation`` (None, ``"reference"``,
  ``"xla"``). Returns ``(o [B, T, H, V] in v's dtype, final_state float32 or None)``.
  """
  return fn


def _common(q, v, rows, extra):
  b, _, h, _ = q.shape
  return (b, h, rows, v.shape[-1] + extra)


# -------------------------------------------------------------------------------- ops


@_doc
def efficient_attention(q, k, v, *, causal=True, initial_state=None,
                        output_final_state=False, segment_ids=None, lengths=None,
                        chunk_size=64, implementation=None):
  """Efficient Attention, ``E = rho_q(Q) (rho_k(K)^T V)`` (Shen et al. 2021, eq. 4):
  ``rho_q`` a softmax over each query's K features, ``rho_k`` a softmax over the sequence
  for each key channel. Causally, channel d of ``rho_k`` normalizes over ``s <= t``:
  ``o_t = sum_d rho_q(q_t)_d sum_{s<=t} e^{k_{s,d}} v_s / sum_{s<=t} e^{k_{s,d}}``."""
  q, k, v = _check_qkv(q, k, v)
  return _run("efficient_attention", implementation, q, k, v, causal, {},
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, q.shape[-1], 2))


def performer_features(key, num_features: int, dim: int, orthogonal: bool = True):
  """FAVOR+ random features ``W [num_features, dim]`` float32, rows ``w ~ N(0, I_dim)``.

  ``orthogonal=True`` draws them in blocks of ``dim`` exactly orthogonal rows (QR of a
  Gaussian matrix), each row then rescaled to the norm of an independent Gaussian vector
  so that its marginal stays ``N(0, I)`` (Choromanski et al. 2021, §2.4, ORFs). Redraw by
  passing a new ``key``."""
  if not isinstance(num_features, int) or num_features < 1:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}")
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be a positive int, got {dim!r}")
  if not orthogonal:
    return jax.random.normal(key, (num_features, dim), jnp.float32)
  blocks = -(-num_features // dim)
  block_key, norm_key = jax.random.split(key)
  gauss = jax.random.normal(block_key, (blocks, dim, dim), jnp.float32)
  orth, upper = jnp.linalg.qr(gauss)  # [blocks, dim, dim], orthonormal columns
  # Signs of R's diagonal make Q Haar-distributed (without them its columns lean one way).
  orth = orth * jnp.sign(jnp.diagonal(upper, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(orth, -1, -2).reshape(blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim)), axis=-1)
  return rows * norms[:, None]


def _check_projection(projection, key_dim):
  projection = jnp.asarray(projection)
  if projection.ndim != 2 or projection.shape[1] != key_dim:
    raise ValueError(f"projection must be [M, K={key_dim}], got "
                     f"projection.shape={projection.shape}")
  if not jnp.issubdtype(projection.dtype, jnp.floating):
    raise ValueError(f"projection must be floating point, got {projection.dtype}")
  return projection


def _check_scale(scale, key_dim):
  if scale is None:
    return key_dim ** -0.5
  if (not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool)
      or not np.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale must be a positive finite float, got scale={scale!r}")
  return float(scale)


@_doc
def performer(q, k, v, projection, *, scale=None, causal=True, initial_state=None,
              output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
              implementation=None):
  """Performer FAVOR+: ``o_t = phi(q_t)^T sum_s phi(k_s) v_s^T / phi(q_t)^T sum_s phi(k_s)``
  with the positive random features ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M)``,
  ``x' = x scale^{1/2}`` (default ``scale = K ** -0.5``), an unbiased estimate of the
  softmax kernel ``exp(scale q^T k)`` (Lemma 1). ``projection [M, K]``: see
  :func:`performer_features`. Numerically, phi(q) is taken relative to its largest entry
  and phi(k) relative to a running (causal) or per-document maximum, which cancel."""
  q, k, v = _check_qkv(q, k, v)
  projection = _check_projection(projection, q.shape[-1])
  params = {"projection": projection, "scale": _check_scale(scale, q.shape[-1])}
  return _run("performer", implementation, q, k, v, causal, params,
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, projection.shape[0], 2))


@_doc
def cosformer(q, k, v, *, max_len=None, positions=None, causal=True, initial_state=None,
              output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
              implementation=None):
  """cosFormer: ``o_i = sum_j s_ij v_j / (sum_j s_ij + eps)``, ``s_ij = ReLU(q_i)^T
  ReLU(k_j) cos(pi/2 (i - j) / M)`` (Qin et al. 2022), computed through
  ``cos(a_i - a_j) = cos a_i cos a_j + sin a_i sin a_j``: features
  ``[ReLU(x) cos a, ReLU(x) sin a]`` with ``a_i = pi/2 i / M``. ``positions [B, T]``
  (default ``0..T-1``) give i; ``max_len`` M (default T) must exceed every distance
  ``|i - j|`` for the weights to stay non-negative."""
  q, k, v = _check_qkv(q, k, v)
  b, t = q.shape[:2]
  if max_len is None:
    max_len = t
  if (not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool)
      or max_len < 1):
    raise ValueError(f"max_len must be a positive int, got max_len={max_len!r}")
  if positions is None:
    if max_len < t:
      raise ValueError(f"max_len must be >= the sequence length {t}, got max_len={max_len}")
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  positions = _check_array("positions", positions, (b, t), jnp.integer)
  params = {"max_len": int(max_len), "positions": positions}
  return _run("cosformer", implementation, q, k, v, causal, params,
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, 2 * q.shape[-1], 1))


@_doc
def cottention(q, k, v, length_exponent=0.5, *, causal=True, initial_state=None,
               output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
               implementation=None):
  """Cottention: ``o_t = sum_s (q^_t . k^_s) v_s / n_s^p`` with ``x^ = x / |x|`` (cosine
  similarity, Mongaras et al. 2024, ``N(Q) N(K)^T V``) and the stabilizing division of the
  values by the sequence length to the power ``p = sigmoid(m)``, m a learned scalar per
  head (``V / s^sigmoid(m)``). ``n_s`` is the sequence length at value s: the document
  length non-causally, the number of keys up to s (``s + 1``) causally, so the recurrence
  ``S_t = S_{t-1} + k^_t v_t^T / t^p``, ``o_t = q^_t^T S_t`` (the paper's RNN form) holds;
  this follows the authors' code (github.com/gmongaras/Cottention_Transformer), which
  scales each value row by its own causal-mask row count. ``p = length_exponent``: a
  float or ``[H]``."""
  q, k, v = _check_qkv(q, k, v)
  params = {"length_exponent": _check_per_head("length_exponent", length_exponent,
                                               q.shape[2])}
  return _run("cottention", implementation, q, k, v, causal, params,
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, q.shape[-1], 1))


# The linear fit of LLN's log-variance (Nahshan et al. 2024, §4.1): sigma_lln^2 ~ 2 a
# sigma~^2 + b with sigma~ = alpha sigma_q = beta sigma_k (the authors' values, as in
# https://github.com/ynahshan/linear-lognormal-attention, lln/lln_attention.py).
LLN_FIT_A = 0.14855178144710912
LLN_FIT_B = -0.35487039130661086


def lln_moment_matching(sigma_q, sigma_k):
  """``(alpha, beta)`` of LLN attention by moment matching (Nahshan et al. 2024, §4.1).

  Softmax attention's log-weights ``q^T k / sqrt(d)`` have variance
  ``sigma_sm^2 = sigma_q^2 sigma_k^2`` for Gaussian q, k. The variance of LLN's log-weights
  is approximated by the paper's linear fit ``sigma_lln^2 = 2 a sigma~^2 + b`` (a, b:
  :data:`LLN_FIT_A`, :data:`LLN_FIT_B`) with ``sigma~ = alpha sigma_q = beta sigma_k``;
  equating the two gives ``sigma~^2 = (sigma_q^2 sigma_k^2 - b) / (2 a)``,
  ``alpha = sigma~ / sigma_q``, ``beta = sigma~ / sigma_k``. Independent of the head
  dimension. Works on floats or arrays."""
  s2 = (sigma_q * sigma_k) ** 2
  tilde = ((s2 - LLN_FIT_B) / (2 * LLN_FIT_A)) ** 0.5
  return tilde / sigma_q, tilde / sigma_k


@_doc
def lln_attention(q, k, v, alpha=None, beta=None, *, causal=True, initial_state=None,
                  output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
                  implementation=None):
  """Linear log-normal attention: ``phi_q(q) = exp(alpha q)``, ``phi_k(k) = exp(beta k)``,
  normalized linear attention (Nahshan et al. 2024, §4). ``alpha, beta``: floats or
  ``[H]``. Left None (non-causal form only) they are moment-matched by
  :func:`lln_moment_matching` to the per-head standard deviations of q and k over the
  batch and sequence (without gradient); the causal form needs them given, since such
  statistics would see the future."""
  q, k, v = _check_qkv(q, k, v)
  heads = q.shape[2]
  if alpha is None or beta is None:
    if alpha is not None or beta is not None:
      raise ValueError(f"give both alpha and beta or neither, got alpha={alpha!r}, "
                       f"beta={beta!r}")
    if causal:
      raise ValueError("the causal lln_attention needs alpha and beta (statistics of the "
                       "whole sequence would see the future); got alpha=None, beta=None")
    sd = lambda x: lax.stop_gradient(jnp.std(_f32(x), axis=(0, 1, 3)))
    alpha, beta = lln_moment_matching(sd(q), sd(k))
  params = {"alpha": _check_per_head("alpha", alpha, heads),
            "beta": _check_per_head("beta", beta, heads)}
  return _run("lln_attention", implementation, q, k, v, causal, params,
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, q.shape[-1], 2))


def _check_power(power):
  if (not isinstance(power, (int, float, np.floating)) or isinstance(power, bool)
      or not np.isfinite(power) or power <= 0):
    raise ValueError(f"power must be a positive finite number, got power={power!r}")
  return float(power)


@_doc
def focused_linear_attention(q, k, v, *, power=3.0, causal=True, initial_state=None,
                             output_final_state=False, segment_ids=None, lengths=None,
                             chunk_size=64, implementation=None):
  """FLatten's focused linear attention: ``phi_p(x) = f_p(ReLU(x))``,
  ``f_p(x) = |x| / |x^p| x^p`` (elementwise power p, default 3; Han et al. 2023, eq. 5),
  normalized linear attention (eq. 6). The depthwise-convolution rank restoration
  ``+ DWC(V)`` is the ``flatten`` mixer's."""
  q, k, v = _check_qkv(q, k, v)
  return _run("focused_linear_attention", implementation, q, k, v, causal,
              {"power": _check_power(power)}, initial_state=initial_state,
              output_final_state=output_final_state, segment_ids=segment_ids,
              lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, q.shape[-1], 1))


@_doc
def slab_attention(q, k, v, *, causal=True, initial_state=None, output_final_state=False,
                   segment_ids=None, lengths=None, chunk_size=64, implementation=None):
  """SLAB's simplified linear attention: ``o_t = sum_s (ReLU(q_t)^T ReLU(k_s)) v_s /
  (sum_s ReLU(q_t)^T ReLU(k_s) + eps)`` (Guo et al. 2024, §3.2). The depthwise
  convolution on V that the paper adds is the ``slab`` mixer's."""
  q, k, v = _check_qkv(q, k, v)
  return _run("slab_attention", implementation, q, k, v, causal, {},
              initial_state=initial_state, output_final_state=output_final_state,
              segment_ids=segment_ids, lengths=lengths, chunk_size=chunk_size,
              state_shape=_common(q, v, q.shape[-1], 1))


# ------------------------------------------------------------------------------ steps


def _check_step(q_t, k_t, v_t, state, rows, extra):
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, D], got {name}.shape={x.shape}")
  if q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, K] and v_t [B, H, V] with the same B, H, "
                     f"got {q_t.shape=}, {k_t.shape=}, {v_t.shape=}")
  want = q_t.shape[:2] + (rows, v_t.shape[-1] + extra)
  if jnp.shape(state) != want:
    raise ValueError(f"state must be {want}, got state.shape={jnp.shape(state)}")
  return q_t, k_t, v_t, _f32(state)


def efficient_attention_step(q_t, k_t, v_t, state):
  """One decode step of :func:`efficient_attention` (state ``[B, H, K, V + 2]``)."""
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, q_t.shape[-1], 2)
  sv, z, m = _split_efficient_state(state)
  k = _f32(k_t)
  m_new = jnp.where(z > 0, jnp.maximum(m, k), k)
  decay = jnp.where(z > 0, jnp.exp(m - m_new), 0.0)
  w = jnp.exp(k - m_new)
  sv = decay[..., None] * sv + w[..., None] * _f32(v_t)[:, :, None]
  z = decay * z + w
  rho_q = jax.nn.softmax(_f32(q_t), axis=-1)
  o = jnp.einsum("bhk,bhkv->bhv", rho_q, sv / z[..., None], precision=_HIGHEST)
  state = jnp.concatenate([sv, z[..., None], m_new[..., None]], axis=-1)
  return o.astype(v_t.dtype), state


def _step_call(q_t, k_t, params):
  return FeatureMapCall(q_t[:, None], k_t[:, None], None, True, params, None, None, None, 1)


def performer_step(q_t, k_t, v_t, state, projection, *, scale=None):
  """One decode step of :func:`performer` (state ``[B, H, M, V + 2]``)."""
  projection = _check_projection(projection, jnp.shape(q_t)[-1])
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, projection.shape[0], 2)
  params = {"projection": projection, "scale": _check_scale(scale, q_t.shape[-1])}
  lq, lk = _performer_log_features(_step_call(q_t, k_t, params))
  o, state = _exp_step(lq[:, 0], lk[:, 0], v_t, state)
  return o.astype(v_t.dtype), state


def lln_attention_step(q_t, k_t, v_t, state, alpha, beta):
  """One decode step of :func:`lln_attention` (state ``[B, H, K, V + 2]``)."""
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, q_t.shape[-1], 2)
  heads = q_t.shape[1]
  params = {"alpha": _check_per_head("alpha", alpha, heads),
            "beta": _check_per_head("beta", beta, heads)}
  lq, lk = _lln_log_features(_step_call(q_t, k_t, params))
  o, state = _exp_step(lq[:, 0], lk[:, 0], v_t, state)
  return o.astype(v_t.dtype), state


def cosformer_step(q_t, k_t, v_t, state, position, *, max_len):
  """One decode step of :func:`cosformer` at ``position [B]`` (state ``[B, H, 2K, V + 1]``).
  """
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, 2 * q_t.shape[-1], 1)
  position = _check_array("position", position, q_t.shape[:1], jnp.integer)
  angle = _cosformer_angles(position, max_len)[:, None, None]
  o, state = _normalized_step(_cosformer_map(q_t, angle), _cosformer_map(k_t, angle), v_t,
                              state)
  return o.astype(v_t.dtype), state


def cottention_step(q_t, k_t, v_t, state, length_exponent=0.5):
  """One decode step of :func:`cottention` (state ``[B, H, K, V + 1]``)."""
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, q_t.shape[-1], 1)
  p = _check_per_head("length_exponent", length_exponent, q_t.shape[1])
  qh, kh = _l2normalize(_f32(q_t)), _l2normalize(_f32(k_t))
  n = state[..., 0, -1] + 1.0
  v = _f32(v_t) * _cottention_scale(n, p)[..., None]
  sv = state[..., :-1] + jnp.einsum("bhk,bhv->bhkv", kh, v, precision=_HIGHEST)
  o = jnp.einsum("bhk,bhkv->bhv", qh, sv, precision=_HIGHEST)
  state = jnp.concatenate([sv, jnp.broadcast_to(n[..., None, None], sv.shape[:-1] + (1,))],
                          axis=-1)
  return o.astype(v_t.dtype), state


def focused_linear_attention_step(q_t, k_t, v_t, state, *, power=3.0):
  """One decode step of :func:`focused_linear_attention` (state ``[B, H, K, V + 1]``)."""
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, q_t.shape[-1], 1)
  power = _check_power(power)
  o, state = _normalized_step(_focused(_f32(q_t), power), _focused(_f32(k_t), power), v_t,
                              state)
  return o.astype(v_t.dtype), state


def slab_attention_step(q_t, k_t, v_t, state):
  """One decode step of :func:`slab_attention` (state ``[B, H, K, V + 1]``)."""
  q_t, k_t, v_t, state = _check_step(q_t, k_t, v_t, state, q_t.shape[-1], 1)
  o, state = _normalized_step(jax.nn.relu(_f32(q_t)), jax.nn.relu(_f32(k_t)), v_t, state)
  return o.astype(v_t.dtype), state
