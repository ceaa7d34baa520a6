"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and
Linear Attention"): two softmax attentions through A agent tokens, non-causal.

With agents ``A [n_a, d]`` (by default the segment means of the queries, the paper's
pooling) and ``s`` the logits scale, eq. 3 of the paper reads::

    V_A = softmax(A K^T s + B_1) V          agent aggregation   [n_a, d_v]
    O   = softmax(Q A^T s + B_2) V_A        agent broadcast     [n, d_v]

``B_1 [n_a, n]`` and ``B_2 [n, n_a]`` are the optional agent biases of eq. 5 (the
module's depthwise convolution on V, ``+ DWC(V)``, belongs to the mixer). Since
``softmax(Q A^T) softmax(A K^T)`` is the product of an ``[n, n_a]`` and an ``[n_a, n]``
map, it is a generalized linear attention with ``phi_q(Q) = softmax(Q A^T)`` and
``phi_k(K) = softmax(A K^T)^T`` (eq. 4), of cost ``O(n n_a d)``.

There is no causal form. With agents pooled from queries, an agent mixes the queries of
its whole segment (future ones included), and its aggregation softmax is normalized over
all keys; a causal variant would need each query to see only agents whose segment and
keys lie in its past, i.e. a different mechanism, so none is offered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops import registry
from attnlab.ops.low_rank import (check_count, check_lengths, check_qkv, check_scale,
                                  segment_means, valid_positions)
from attnlab.ops.softmax import dot_product_attention

__all__ = ["agent_attn"]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AgentCall:
  """The canonical arguments of every agent-attention tier (agents already pooled)."""

  q: Any
  k: Any
  v: Any
  agents: Any         # [B, A, H, D] float32
  agent_valid: Any    # [B, A] bool (False: an empty pooling segment)
  agent_bias: Any     # None or [H, A, T]: B_1
  query_bias: Any     # None or [H, T, A]: B_2
  lengths: Any
  scale: float

  def run(self, fn):
    return fn(self.q, self.k, self.v, self.agents, self.agent_valid,
              agent_bias=self.agent_bias, query_bias=self.query_bias,
              lengths=self.lengths, scale=self.scale)


def _masked_softmax(logits, allowed):
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(p.dtype).tiny)


def _reference(q, k, v, agents, agent_valid, *, agent_bias, query_bias, lengths, scale):
  """Eq. 3 / 5 literally: both ``[n_a, n]`` and ``[n, n_a]`` maps materialized, float32."""
  batch, length = q.shape[:2]
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  agg = scale * jnp.einsum("bahd,bthd->bhat", agents, k32, precision=_HIGHEST)
  if agent_bias is not None:
    agg = agg + agent_bias.astype(jnp.float32)[None]
  keys_ok = valid_positions(lengths, batch, length)[:, None, None, :]
  agent_v = jnp.einsum("bhat,bthd->bhad", _masked_softmax(agg, keys_ok), v32,
                       precision=_HIGHEST)
  bcast = scale * jnp.einsum("bthd,bahd->bhta", q32, agents, precision=_HIGHEST)
  if query_bias is not None:
    bcast = bcast + query_bias.astype(jnp.float32)[None]
  p = _masked_softmax(bcast, agent_valid[:, None, None, :])
  return jnp.einsum("bhta,bhad->bthd", p, agent_v, precision=_HIGHEST).astype(v.dtype)


def _xla(q, k, v, agents, agent_valid, *, agent_bias, query_bias, lengths, scale):
  """The two attentions through the registry's softmax attention (blockwise / cuDNN)."""
  agents = agents.astype(q.dtype)
  agent_v = dot_product_attention(
      agents, k, v, bias=None if agent_bias is None else agent_bias[None], scale=scale,
      key_value_seq_lengths=lengths)
  o = dot_product_attention(
      q, agents, agent_v, bias=None if query_bias is None else query_bias[None],
      mask=agent_valid[:, None, None, :], scale=scale)
  return o.astype(v.dtype)


registry.describe("agent_attention", registry.MechanismInfo(
    paper="Han et al. 2024, Agent Attention: On the Integration of Softmax and Linear "
          "Attention", family="feature map", causal=False, non_causal=True, state="-",
    cost="O(T A D), A = agents",
    xla_path="two dot_product_attention calls"))
registry.register("agent_attention", registry.Implementation(
    "reference", _reference, automatic=False))
registry.register("agent_attention", registry.Implementation("xla", _xla, priority=10))


def _check_bias(name, bias, shape):
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  if bias.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {name}.shape={bias.shape}")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {name}.dtype={bias.dtype}")
  return bias


def agent_attn(q, k, v, agents=None, *, num_agents=None, agent_bias=None,
               query_bias=None, lengths=None, scale=None, implementation=None):
  """Agent attention (Han et al. 2024, eqs. 3 and 5), non-causal.

  ``O = softmax(Q A^T s + B_2) softmax(A K^T s + B_1) V`` per head.

  Args:
    q, k, v: ``[B, T, H, D]`` (one shape for all three).
    agents: ``[B, A, H, D]`` agent tokens, or None to pool ``num_agents`` agents from q
      by segment means (the paper's pooling; segments as
      :func:`attnlab.ops.low_rank.segment_means`, over each row's valid prefix).
    num_agents: A when pooling (required iff ``agents`` is None).
    agent_bias: B_1 ``[H, A, T]``, added to the aggregation logits ``A K^T s``.
    query_bias: B_2 ``[H, T, A]``, added to the broadcast logits ``Q A^T s``.
    lengths: ``[B]`` ints (right padding, each >= 1): padded keys get no weight in the
      aggregation and padded queries enter no pooled agent. An empty pooling segment
      (``lengths[b] < A``) yields an agent that no query sees.
    scale: logits scale of both softmaxes (default ``D ** -0.5``).
    implementation: None, ``"reference"`` or ``"xla"``.

  Returns:
    ``o [B, T, H, D]`` in v's dtype.
  """
  q, k, v = check_qkv(q, k, v, same_value_dim=True)
  batch, length, heads, dim = q.shape
  lengths = check_lengths(lengths, batch)
  if agents is None:
    if num_agents is None:
      raise ValueError("num_agents must be given when agents is None (pooled from q), "
                       "got num_agents=None")
    num_agents = check_count("num_agents", num_agents)
    pooled, agent_valid = segment_means(q, num_agents, lengths)
  else:
    if num_agents is not None:
      raise ValueError(f"give agents or num_agents, not both; got {num_agents=} and "
                       f"agents of shape {jnp.shape(agents)}")
    agents = jnp.asarray(agents)
    if (agents.ndim != 4 or agents.shape[0] != batch or agents.shape[2:] != (heads, dim)
        or agents.shape[1] == 0):
      raise ValueError(f"agents must be [B, A, H, D] with q's B={batch}, H={heads}, "
                       f"D={dim} and A >= 1, got agents.shape={agents.shape}")
    if not jnp.issubdtype(agents.dtype, jnp.floating):
      raise ValueError(f"agents must be floating point, got agents.dtype={agents.dtype}")
    num_agents = agents.shape[1]
    pooled = agents.astype(jnp.float32)
    agent_valid = jnp.ones((batch, num_agents), bool)
  agent_bias = _check_bias("agent_bias", agent_bias, (heads, num_agents, length))
  query_bias = _check_bias("query_bias", query_bias, (heads, length, num_agents))
  call = AgentCall(q, k, v, pooled, agent_valid, agent_bias, query_bias, lengths,
                   check_scale(scale, dim))
  return call.run(registry.select("agent_attention", implementation, call).fn)
