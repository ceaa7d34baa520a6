"""Kimi Delta Attention (KDA): Gated DeltaNet with a per-channel decay.

Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture" (the KDA
update rule of its section "Kimi Delta Attention"). Per head, with state ``S [K, V]``
float32, ``beta_t`` a scalar and the log gate ``g_t in R^K`` (the paper's ``alpha_t =
exp(g_t)``)::

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * q_t^T S_t

The decay acts first and the delta rule corrects the decayed state: with ``S' =
diag(exp(g_t)) S_{t-1}``, ``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``. With a gate equal
across channels KDA is the gated delta rule; with ``beta = 0`` it only decays, like GLA.

Tiers (one signature, :class:`attnlab.ops.linear_attention.LinearCall`):

* ``reference``: the token-by-token recurrence (``lax.scan``), shared with the other
  linear ops (:mod:`attnlab.ops.linear_reference`, which applies the decay before the
  delta correction).
* ``xla``: chunks of ``C`` tokens, the WY / UT-transform form of the delta rule with
  per-channel decays. Inside a chunk, with ``b_t = sum_{u<=t} g_u`` (a ``[K]`` vector,
  prefix from the chunk's start) and ``S_0`` the state entering it, the pseudo-values
  ``u_t = beta_t (v_t - (diag(e^{g_t}) S_{t-1})^T k_t)`` solve ``(I + A) U = beta V - W0``
  with ``A_ts = beta_t sum_c k_tc k_sc exp(b_tc - b_sc)`` (s < t) and ``W0 = beta (K *
  e^b) S_0``; then ``o_t = scale ((q_t * e^{b_t})^T S_0 + sum_{s<=t} (sum_c q_tc k_sc
  exp(b_tc - b_sc)) u_s)`` and the state leaving the chunk is ``(diag(e^{b_C}) - K_out^T
  W) S_0 + K_out^T T beta V`` with ``K_out = K * exp(b_C - b)``, ``T = (I + A)^{-1}``,
  ``W = T beta (K * e^b)``. The decayed Gram matrices use GLA's secondary chunking
  (:func:`attnlab.ops.linear_xla._vector_gate_scores`): every exponent is a sum of gates
  over a span (``<= 0``), relative to a sub-chunk's end between sub-chunks, so a gate of
  -20 per token underflows to 0 and never overflows. The chunk transitions ``[K, K]``
  are chained by a sequential scan over chunks (one state per chunk: memory linear in T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import linear_attention as la
from attnlab.ops import linear_xla as lx
from attnlab.ops import registry
from attnlab.ops.linear_reference import linear_recurrence_reference, recurrent_step

__all__ = ["kimi_delta_attention", "kimi_delta_attention_step"]


def kda_chunked(q, k, v, g, beta, *, scale, initial_state=None, segment_ids=None,
                chunk_size=64):
  """Chunk-parallel KDA; the arguments and result of the reference tier.

  ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` (log decay, <= 0),
  ``beta [B, T, H]``. Returns ``(o [B, T, H, V] float32, final_state [B, H, K, V]
  float32)``. Per chunk ``[C, C]`` blocks and ``[K, K]`` transitions; memory linear in T.
  """
  f32 = jnp.float32
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  chunk = chunk_size
  num = -(-length // chunk)
  pad = num * chunk - length
  io = q.dtype  # matrix-unit operand dtype; every sum and state is float32

  def prep(x, dtype):
    x = x.astype(dtype)
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return lx._chunked(x, num, chunk)

  # Padded tail tokens have k = v = 0, g = 0 and beta = 0: they leave the state alone.
  q, k, v = (prep(x, io) for x in (q, k, v))
  g, beta = prep(g, f32), prep(beta, f32)                       # [B,H,N,C,K], [B,H,N,C]
  docs = lx._documents(segment_ids, batch, length)
  if pad:
    docs = jnp.pad(docs, ((0, 0), (0, pad)), mode="edge")
  docs = docs.reshape(batch, 1, num, chunk)                      # [B, 1, N, C]
  doc_last = docs[..., -1]
  doc_prev = jnp.concatenate([jnp.zeros_like(doc_last[..., :1]), doc_last[..., :-1]], -1)
  first = docs == doc_prev[..., None]   # tokens that see the state entering the chunk
  last = docs == doc_last[..., None]    # tokens that reach the state leaving it
  keep = doc_last == doc_prev           # no document starts inside the chunk
  pos = jnp.arange(chunk)
  same_doc = docs[..., :, None] == docs[..., None, :]            # [B, 1, N, C, C]
  allowed = (pos[:, None] >= pos[None, :])[None, None, None] & same_doc
  below = (pos[:, None] > pos[None, :])[None, None, None] & same_doc

  state0 = (jnp.zeros((batch, heads, key_dim, value_dim), f32) if initial_state is None
            else initial_state.astype(f32))

  b = lx._prefix_sum(g, axis=-2)                                 # (chunk start, t]
  q32, k32 = q.astype(f32), k.astype(f32)
  scores = lx._vector_gate_scores(q32, k32, g, allowed)          # s <= t
  lower = beta[..., :, None] * lx._vector_gate_scores(k32, k32, g, below)  # A, s < t
  rhs = jnp.concatenate(
      [beta[..., None] * v.astype(f32), (beta[..., None] * first[..., None]) * k32
       * jnp.exp(b)], axis=-1)
  solved = lax.platform_dependent(lower, rhs, cpu=lx._unit_lower_solve_by_products,
                                  default=lx._unit_lower_solve_by_substitution)
  values, state_gain = solved[..., :value_dim], solved[..., value_dim:]   # T beta V, W

  k_out = k32 * jnp.exp(lx._suffix_sum(g, axis=-2)) * last[..., None]    # (t, C]
  decay = jnp.where(keep[..., None], jnp.exp(b[..., -1, :]), 0.0)         # [B, H, N, K]
  offsets = lx._matmul("...sk,...sv->...kv", k_out, values, io)
  transitions = (decay[..., :, None] * jnp.eye(key_dim, dtype=f32)[None, None, None]
                 - jnp.einsum("...sk,...sj->...kj", k_out, state_gain))
  states = lx._chunk_states("matrix", transitions, offsets, state0)
  entering = jnp.concatenate([state0[:, :, None], states[:, :, :-1]], axis=2)

  values = values - jnp.einsum("...tk,...kv->...tv", state_gain, entering)
  q_in = q32 * jnp.exp(b) * first[..., None]
  out = (lx._matmul("...ts,...sv->...tv", scores, values, io)
         + jnp.einsum("...tk,...kv->...tv", q_in, entering))
  out = scale * jnp.moveaxis(out, 1, 3).reshape(batch, num * chunk, heads, value_dim)
  return out[:, :length], states[:, :, -1]


registry.describe("kimi_delta_attention", registry.MechanismInfo(
    paper="Kimi Team 2025, Kimi Linear: An Expressive, Efficient Attention Architecture "
          "(Kimi Delta Attention)",
    family="gated linear", causal=True, non_causal=False, state="K x V",
    cost="O(T C (K + V) + T K^2) chunked, C = chunk size", step="kimi_delta_attention_step",
    xla_path="chunked WY / UT transform with per-channel decay (its own)"))
registry.register("kimi_delta_attention", registry.Implementation(
    "reference", linear_recurrence_reference, priority=0, automatic=False))
# One program per shape when called eagerly (the per-channel scores are many small ops);
# inlined under an outer jit.
registry.register("kimi_delta_attention", registry.Implementation(
    "xla", jax.jit(kda_chunked, static_argnames=("scale", "chunk_size")), priority=10))


def kimi_delta_attention(q, k, v, g, beta, *, use_qk_l2norm=False, scale=None,
                         initial_state=None, output_final_state=False, segment_ids=None,
                         chunk_size=64, implementation=None):
  """Kimi Delta Attention: ``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t
  k_t v_t^T``, ``o_t = scale q_t^T S_t``.

  ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` (log decay per key
  channel), ``beta [B, T, H]``. ``use_qk_l2norm`` normalizes q and k over K inside the op
  (the Kimi Linear layer does). ``scale`` (default ``K ** -0.5``), ``initial_state [B, H,
  K, V]``, ``output_final_state``, ``segment_ids [B, T]`` (packed documents: the state
  restarts where the id changes), ``chunk_size`` (of the ``xla`` tier), ``implementation``
  (None, ``"reference"`` or ``"xla"``). Returns ``(o [B, T, H, V] in v's dtype,
  final_state [B, H, K, V] float32 or None)``.
  """
  q, k, v = la._check_qkv(q, k, v)
  g = la._check_gate("g", g, q.shape)
  beta = la._check_gate("beta", beta, q.shape[:3])
  if use_qk_l2norm:
    q, k = la._l2norm(q), la._l2norm(k)
  o, final = la._run("kimi_delta_attention", implementation, q, k, v, g, beta, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state,
                     segment_ids=segment_ids, chunk_size=chunk_size)
  return o.astype(v.dtype), final


def kimi_delta_attention_step(q_t, k_t, v_t, g_t, beta_t, state, *, use_qk_l2norm=False,
                              scale=None):
  """One decode step of :func:`kimi_delta_attention`: ``q_t, k_t [B, H, K]``, ``v_t [B,
  H, V]``, ``g_t [B, H, K]``, ``beta_t [B, H]``, ``state [B, H, K, V]`` -> ``(o_t [B, H,
  V], state)``."""
  q_t, k_t, v_t, state, scale = la._check_step(q_t, k_t, v_t, state, scale)
  g_t = la._check_gate("g_t", g_t, q_t.shape)
  beta_t = la._check_gate("beta_t", beta_t, q_t.shape[:2])
  if use_qk_l2norm:
    q_t, k_t = la._l2norm(q_t), la._l2norm(k_t)
  o_t, state = recurrent_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
  return o_t.astype(v_t.dtype), state
