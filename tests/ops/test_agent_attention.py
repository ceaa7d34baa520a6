"""Agent attention against the float64 oracle of ``tests/oracle_low_rank.py``.

Han et al. 2024, eq. 3 (``softmax(Q A^T s) softmax(A K^T s) V``) with eq. 5's agent
biases, agents pooled from q by segment means (the default) or given. Both tiers, float32
on every case and bfloat16 on the padded one, at odd lengths; the output and the
gradient of every differentiable input (q, k, v, given agents, both biases) are compared
as relative errors with the oracle's (float64 central differences). The oracle cuts each
row to its valid length, so the padded cases also check that padding never leaks in.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_low_rank as oracle
from tests.ops.test_low_rank import check_errors, combo_ids, combos, compare

# (T, agents, pooled from q, biases, lengths)
CASES = [
    (13, 4, True, False, None),
    (21, 5, False, True, None),           # given agents, both biases
    (21, 4, True, True, (3, 19)),         # a row shorter than the agent count, padding
]


@pytest.mark.parametrize("case, tier, dtype", combos(CASES),
                         ids=combo_ids(lambda c: f"T{c[0]}-A{c[1]}-{c[4]}"))
def test_agent_attention_eq3_eq5_matches_oracle(case, tier, dtype, rng):
  length, agents, pooled, biases, lengths = case
  heads, dim = 2, 4
  shape = (2, length, heads, dim)
  arrays = {n: rng.standard_normal(shape) for n in ("q", "k", "v")}
  names = ["q", "k", "v"]
  static = {"lengths": None if lengths is None else np.asarray(lengths)}
  if pooled:
    static["num_agents"] = agents
  else:
    arrays["agents"] = rng.standard_normal((2, agents, heads, dim))
    names.append("agents")
  if biases:
    arrays["agent_bias"] = rng.standard_normal((heads, agents, length))
    arrays["query_bias"] = rng.standard_normal((heads, length, agents))
    names += ["agent_bias", "query_bias"]
  fn = functools.partial(ops.agent_attn, implementation=tier)
  errors = compare(fn, oracle.agent_attention, arrays, static, names, dtype, rng)
  print("agent_attention", case, tier, jnp.dtype(dtype).name, errors)
  check_errors(errors, dtype)


def _qkv(shape=(1, 6, 2, 4)):
  return tuple(jnp.ones(shape) for _ in range(3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "num_agents must be given"),
    (dict(num_agents=0), "num_agents must be a positive int"),
    (dict(agents=jnp.ones((1, 3, 2, 4)), num_agents=3), "give agents or num_agents"),
    (dict(agents=jnp.ones((1, 3, 2, 5))), r"agents must be \[B, A, H, D\]"),
    (dict(agents=jnp.ones((1, 3, 2, 4), jnp.int32)), "agents must be floating point"),
    (dict(num_agents=3, agent_bias=jnp.ones((2, 3, 5))), r"agent_bias must have shape"),
    (dict(num_agents=3, query_bias=jnp.ones((2, 3, 6))), r"query_bias must have shape"),
    (dict(num_agents=3, lengths=jnp.ones((2,), jnp.int32)), r"lengths must be \[B\]"),
    (dict(num_agents=3, scale=float("nan")), "scale must be a finite"),
    (dict(num_agents=3, implementation="cudnn"), "is not a tier"),
])
def test_bad_input_names_the_argument(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ops.agent_attn(*_qkv(), **kwargs)


def test_bad_value_shape_is_named():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="v must have k's shape"):
    ops.agent_attn(q, k, v[..., :3], num_agents=2)


def test_mixer_errors_packed_documents_and_sequences_over_max_len(rng):
  """The low-rank mixers raise for segment_ids and for sequences longer than the max_len
  their parameters cover (Linformer's E, F; the agent biases)."""
  from flax import nnx

  from attnlab import layers
  from attnlab.layers.low_rank_mixers import AgentAttention, Linformer

  config = layers.MixerConfig(width=16, num_heads=2, causal=False, state_size=4)
  x = jnp.asarray(rng.standard_normal((1, 11, 16)), jnp.float32)
  mixer = AgentAttention(config, rngs=nnx.Rngs(0), agent_bias=True, max_len=8)
  with pytest.raises(ValueError, match="segment_ids"):
    mixer(x, segment_ids=jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match="max_len=8 tokens, got a sequence of T=11"):
    mixer(x)
  with pytest.raises(ValueError, match="max_len=8 tokens, got a sequence of T=11"):
    Linformer(config, rngs=nnx.Rngs(0), max_len=8)(x)
