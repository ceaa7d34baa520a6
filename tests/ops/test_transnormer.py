"""TransNormer's NormAttention and DiagAttention against the float64 oracle.

Same harness as ``test_learned_feature_maps.py``: one tier, float32 or bfloat16, an odd
length with packed documents and right padding (and an initial state for the causal
NormAttention); output, final state and every gradient as relative errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_learned_maps as oracle
from tests.ops.test_learned_feature_maps import (DTYPES, TIERS, assert_within, compare,
                                                 packed_ids, qkv, rel_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
@pytest.mark.parametrize("tier", TIERS)
def test_norm_attention_matches_oracle(tier, causal, dtype, rng):
  """O = RMSNorm(phi(Q) (phi(K)^T V)), phi = elu + 1, no denominator."""
  diff = qkv(rng, dtype, length=13, key_dim=4, value_dim=6)
  data = {"causal": causal, "segment_ids": packed_ids(2, 13), "lengths": jnp.array([11, 13])}
  if causal:
    diff["initial_state"] = jnp.asarray(rng.standard_normal((2, 2, 4, 6)), jnp.float32)
  lib = lambda **a: ops.transnormer_norm_attention(**a, output_final_state=causal,
                                                   chunk_size=4, implementation=tier)
  errors = compare(lib, oracle.norm_attention, diff, data, rng, dtype=dtype,
                   with_state=causal)
  assert_within(errors, dtype)


@pytest.mark.parametrize("feature_map, norm", [("identity", "layernorm"), ("relu", "rmsnorm")])
def test_norm_attention_kernels_and_norms(feature_map, norm, rng):
  diff = qkv(rng, jnp.float32, length=9)
  data = {"causal": False, "feature_map": feature_map, "norm": norm}
  errors = compare(lambda **a: ops.transnormer_norm_attention(**a), oracle.norm_attention,
                   diff, data, rng, dtype=jnp.float32, with_state=False)
  assert_within(errors, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
@pytest.mark.parametrize("tier", TIERS)
def test_diag_attention_matches_oracle(tier, causal, dtype, rng):
  """Softmax inside blocks of 4 tokens counted from each document's start."""
  diff = qkv(rng, dtype, length=21, key_dim=4, value_dim=4)
  data = {"causal": causal, "segment_ids": packed_ids(2, 21), "lengths": jnp.array([19, 21]),
          "block_size": 4}
  lib = lambda **a: (ops.transnormer_diag_attention(**a, implementation=tier), None)
  orc = lambda **a: (oracle.diag_attention(**a), None)
  errors = compare(lib, orc, diff, data, rng, dtype=dtype, with_state=False)
  assert_within(errors, dtype)


def test_norm_attention_decode_steps_equal_the_causal_forward(rng):
  x = qkv(rng, jnp.float32, 2, 11, 2, 4, 5)
  full, final = jax.jit(lambda x: ops.transnormer_norm_attention(
      **x, output_final_state=True, chunk_size=4))(x)
  step = jax.jit(ops.transnormer_norm_attention_step)
  state = jnp.zeros((2, 2, 4, 5), jnp.float32)
  for t in range(11):
    o_t, state = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state)
    assert rel_err(o_t, full[:, t]) < 1e-5, t
  assert rel_err(state, final) < 1e-5


def test_diag_attention_decode_steps_equal_the_causal_forward(rng):
  x = qkv(rng, jnp.float32, 2, 11, 2, 4, 4)
  full = jax.jit(lambda x: ops.transnormer_diag_attention(**x, block_size=3))(x)
  cache = ops.transnormer_diag_attention_cache(2, 2, 4, 3)
  step = jax.jit(ops.transnormer_diag_attention_step)
  for t in range(11):
    o_t, cache = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], cache, jnp.array([t, t]))
    assert rel_err(o_t, full[:, t]) < 1e-5, t


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
def test_diag_packed_documents_equal_documents_alone(causal, rng):
  """Blocks restart at each document start (NormAttention shares the chunked core that
  test_learned_feature_maps.py checks)."""
  x = qkv(rng, jnp.float32, 1, 21, 2, 4, 4)
  fn = jax.jit(lambda x, ids=None: ops.transnormer_diag_attention(
      **x, segment_ids=ids, causal=causal, block_size=4))
  sizes = (6, 1, 14)
  packed = fn(x, jnp.asarray(np.repeat(np.arange(3), sizes)[None], jnp.int32))
  start = 0
  for n in sizes:
    alone = fn({name: a[:, start:start + n] for name, a in x.items()})
    assert rel_err(packed[:, start:start + n], alone) < 1e-5
    start += n


def test_bad_inputs_raise_naming_the_argument(rng):
  x = qkv(rng, jnp.float32, 1, 5, 2, 4, 4)
  cases = [
      (lambda: ops.transnormer_norm_attention(**x, feature_map="softmax"), "feature_map"),
      (lambda: ops.transnormer_norm_attention(**x, norm="batchnorm"), "norm must be"),
      (lambda: ops.transnormer_norm_attention(**x, eps=0.0), "eps must be"),
      (lambda: ops.transnormer_norm_attention(**x, causal=False, initial_state=jnp.zeros(
          (1, 2, 4, 4))), "need causal=True"),
      (lambda: ops.transnormer_norm_attention(**x, segment_ids=jnp.zeros((1, 4), jnp.int32)),
       "segment_ids must be"),
      (lambda: ops.transnormer_diag_attention(**x, block_size=0), "block_size"),
      (lambda: ops.transnormer_diag_attention(x["q"], x["k"], x["v"][..., :3], block_size=2),
       "v must have"),
      (lambda: ops.transnormer_diag_attention(**x, block_size=2, lengths=jnp.array([2, 3])),
       "lengths must be"),
      (lambda: ops.transnormer_diag_attention_step(
          x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], {"k": jnp.zeros((1, 3, 2, 4))},
          jnp.array([0])), "cache must be"),
      (lambda: ops.transnormer_diag_attention_step(
          x["q"][:, 0], x["k"][:, 0], x["v"][:, 0],
          ops.transnormer_diag_attention_cache(1, 2, 4, 3), jnp.array([0.0])), "positions"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()
