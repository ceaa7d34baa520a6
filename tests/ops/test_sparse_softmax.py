"""Sparsemax and 1.5-entmax attention against the float64 oracle
(``tests/oracle_sparse_softmax.py``).

Both ops, both tiers, both forms: the output and the q, k, v gradients at odd lengths
(T = 13 causal, 21 non-causal, blocks of 8 keys so the last is ragged) with packed
documents, in float32 and bfloat16, as the relative error ``||x - ref|| / ||ref||``.
Then: the weights are exactly zero where the oracle's are, decoding token by token ==
the causal forward, right padding == the unpadded rows, a row with no key gives zeros,
the xla tier's compiled memory grows linearly in T, and every ValueError names its
argument.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_feature_maps as common
from tests import oracle_sparse_softmax as oracle

B, H, K, V = 2, 2, 8, 8
BLOCK = 8
SCALE = 0.7
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Spec:
  op: Callable
  oracle: Callable
  step: Callable
  alpha: float

  def __str__(self):
    return self.op.__name__


SPECS = [Spec(ops.sparsemax_attention, oracle.sparsemax_attention,
              ops.sparsemax_attention_step, 2.0),
         Spec(ops.entmax15_attention, oracle.entmax15_attention,
              ops.entmax15_attention_step, 1.5)]


def _packed_ids(length):
  """Row 0: documents of 5, 1 and the rest; row 1: one document."""
  ids = np.zeros((B, length), np.int32)
  ids[0, 5:6], ids[0, 6:] = 1, 2
  return ids


def _inputs(rng, length, dtype, value_dim=V):
  shapes = {"q": (B, length, H, K), "k": (B, length, H, K), "v": (B, length, H, value_dim)}
  return {n: jnp.asarray(2.0 * rng.standard_normal(s), dtype) for n, s in shapes.items()}


DTYPE_TIER = [(jnp.float32, "reference"), (jnp.float32, "xla"), (jnp.bfloat16, "xla")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("dtype, tier", DTYPE_TIER,
                         ids=[f"{jnp.dtype(d).name}-{t}" for d, t in DTYPE_TIER])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_matches_oracle_forward_and_gradients(spec, dtype, tier, causal, rng):
  length = 13 if causal else 21
  x = _inputs(rng, length, dtype)
  dout = jnp.asarray(rng.standard_normal((B, length, H, V)), jnp.float32)
  ids = _packed_ids(length)

  @jax.jit
  def run(x, dout):
    out, vjp = jax.vjp(lambda x: spec.op(**x, causal=causal, scale=SCALE, segment_ids=ids,
                                         block_size=BLOCK, implementation=tier), x)
    return out, vjp(dout.astype(out.dtype))[0]

  out, got = run(x, dout)
  want_out, want = common.grads(
      spec.oracle, {n: np.asarray(a.astype(jnp.float32)) for n, a in x.items()},
      np.asarray(dout), m=common.mask(length, causal, ids, B), scale=SCALE)
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want_out)}
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in x})
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
  assert not bad, (bad, errors)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_weights_are_exactly_zero_below_the_threshold(spec, rng):
  """With one-hot values (v_s = e_s) the output rows are the weights: the xla tier's are
  exactly 0 where the oracle's are, and such zeros exist in every causal row past the
  first few."""
  length = 13
  x = _inputs(rng, length, jnp.float32)
  eye = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (B, length, H, length))
  w = spec.op(x["q"], x["k"], eye, scale=SCALE, block_size=BLOCK, implementation="xla")
  with common.float64():
    want = np.asarray(oracle.weights(
        jnp.asarray(np.asarray(x["q"]), jnp.float64),
        jnp.asarray(np.asarray(x["k"]), jnp.float64),
        m=jnp.asarray(common.mask(length, True, batch=B)), scale=SCALE, alpha=spec.alpha))
  got = np.moveaxis(np.asarray(w), 2, 1)  # [B, H, T, S]
  assert np.array_equal(got == 0, want == 0)
  upper = np.triu(np.ones((length, length), bool), 1)
  zeros_in_past = np.sum((want == 0) & ~upper, axis=-1)
  assert np.all(zeros_in_past[..., 8:] > 0), zeros_in_past
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_decode_steps_equal_causal_forward(spec, rng):
  length = 13
  x = _inputs(rng, length, jnp.float32)
  full = spec.op(**x, scale=SCALE, block_size=BLOCK)
  cache = ops.sparse_attention_cache(B, length, H, K, V)
  step = jax.jit(lambda q, k, v, c, p: spec.step(q, k, v, c, p, scale=SCALE))
  for t in range(length):
    o_t, cache = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], cache,
                      jnp.full((B,), t, jnp.int32))
    assert rel_err(o_t, full[:, t]) < 1e-5, t


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_right_padding_is_ignored(spec, rng):
  """Non-causal (where every query could see the padding): the valid rows of a padded
  batch equal the unpadded run; padded keys hold large values that would show."""
  length, valid = 13, 9
  x = _inputs(rng, length, jnp.float32)
  x = {n: a.at[0, valid:].multiply(5.0) for n, a in x.items()}
  kw = dict(causal=False, scale=SCALE, block_size=BLOCK)
  padded = spec.op(**x, lengths=jnp.array([valid, length]), **kw)
  alone = spec.op(**{n: a[:1, :valid] for n, a in x.items()}, **kw)
  assert rel_err(padded[0, :valid], alone[0]) < 1e-5


@pytest.mark.parametrize("tier", ["reference", "xla"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_row_without_keys_gives_zeros_and_finite_gradients(spec, tier, rng):
  length = 9
  x = _inputs(rng, length, jnp.float32)
  lengths = jnp.array([0, length])

  def loss(x):
    o = spec.op(**x, causal=False, lengths=lengths, block_size=BLOCK, implementation=tier)
    return jnp.sum(o ** 2), o

  (_, o), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  assert np.all(np.asarray(o[0]) == 0.0)
  assert np.all(np.abs(np.asarray(o[1])).sum(-1) > 0)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in g.values())


def _forward_backward_temp_bytes(spec, length):
  q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

  def forward_backward(q, k, v, do):
    o, vjp = jax.vjp(lambda q, k, v: spec.op(q, k, v, block_size=64, implementation="xla"),
                     q, k, v)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(q, q, q, q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_temp_memory_grows_linearly():
  """4x the length: a [T, T] buffer would grow 16x; key blocks and row statistics 4x.
  At T = 4096 the temporaries stay below one [T, T] float32 score matrix of one head.
  (Both maps run the same passes; 1.5-entmax stands for the two.)"""
  spec = SPECS[1]
  small = _forward_backward_temp_bytes(spec, 1024)
  large = _forward_backward_temp_bytes(spec, 4096)
  assert large <= 4.5 * small, (small, large)
  assert large < 4096 * 4096 * 4, large


def _good(rng):
  x = _inputs(rng, 5, jnp.float32)
  return x["q"], x["k"], x["v"]


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: dict(q=q[0]), r"q must be \[B, T, H, D\]"),
    (lambda q, k, v: dict(v=v.astype(jnp.bfloat16)), "share a dtype"),
    (lambda q, k, v: dict(k=k[:, :4]), "q and k must have the same shape"),
    (lambda q, k, v: dict(causal=1), "causal must be a bool"),
    (lambda q, k, v: dict(scale=-1.0), "scale must be a positive"),
    (lambda q, k, v: dict(segment_ids=jnp.zeros((B, 4), jnp.int32)), "segment_ids must be"),
    (lambda q, k, v: dict(lengths=jnp.zeros((B,), jnp.float32)), "lengths must be integers"),
    (lambda q, k, v: dict(block_size=0), "block_size must be a positive int"),
    (lambda q, k, v: dict(implementation="pallas"), "implementation='pallas'"),
])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bad_input_raises(spec, change, message, rng):
  q, k, v = _good(rng)
  kw = dict(q=q, k=k, v=v)
  kw.update(change(q, k, v))
  with pytest.raises(ValueError, match=message):
    spec.op(**kw)


@pytest.mark.parametrize("change, message", [
    (lambda c, p: (dict(c, k=c["k"][:, :, :1]), p), r"cache\['k'\] must be"),
    (lambda c, p: ({"k": c["k"]}, p), "cache must be a dict with keys"),
    (lambda c, p: (c, p[:1]), r"positions must be \[B\]"),
])
def test_bad_step_input_raises(change, message, rng):
  q, k, v = _good(rng)
  cache, positions = change(ops.sparse_attention_cache(B, 5, H, K, V),
                            jnp.zeros((B,), jnp.int32))
  with pytest.raises(ValueError, match=message):
    ops.sparsemax_attention_step(q[:, 0], k[:, 0], v[:, 0], cache, positions)
