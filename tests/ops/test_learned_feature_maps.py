"""Hedgehog and Based against the float64 oracle (``tests/oracle_learned_maps.py``).

Each comparison runs one tier (``reference`` or ``xla``) in float32 or bfloat16 at an odd
length with packed documents, right padding and (causal) an initial state, and compares
the output, the final state and the gradient of ``<o, dout> + <final_state, dfinal>``
with respect to every differentiable input (q, k, v, the Hedgehog map's w and b, the
initial state) as the relative error ``||x - ref|| / ||ref||``. The oracle's gradients
are ``jax.grad`` of its float64 dense definition. bfloat16 is compared with the oracle on
the bf16-rounded inputs, so only the computation's own rounding counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_learned_maps as oracle

# float32: measured <= 1.5e-7 (outputs, states) and <= 3.5e-7 (gradients), both tiers.
# bfloat16: inputs, features and outputs are rounded to 8 mantissa bits (2^-9 relative
# each); measured <= 3.4e-3 (outputs) and <= 1.0e-2 (gradients, the xla tier's q).
TOLERANCE = {jnp.float32: {"out": 2e-6, "grad": 1e-5},
             jnp.bfloat16: {"out": 1e-2, "grad": 3e-2}}
TIERS = ("reference", "xla")
DTYPES = (jnp.float32, jnp.bfloat16)


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def packed_ids(batch, length):
  """Row 0: documents of 5, 1 and the rest; row 1 one document."""
  ids = np.zeros((batch, length), np.int32)
  ids[0, 5:] = 3
  ids[0, 6:] = 1
  return jnp.asarray(ids)


def compare(lib, orc, diff, data, rng, *, dtype, with_state):
  """Errors of ``lib(**diff, **data) -> (o, final)`` against ``orc`` (float64) for the
  output, the final state and the gradient of every entry of ``diff``."""
  shapes = jax.eval_shape(lambda d: lib(**d, **data), diff)
  dout = rng.standard_normal(shapes[0].shape)
  dfinal = rng.standard_normal(shapes[1].shape) if with_state else None

  def loss(d, fn, cast):
    o, final = fn(**d, **data)
    value = jnp.sum(o.astype(cast) * dout.astype(cast))
    if with_state:
      value = value + jnp.sum(final.astype(cast) * dfinal.astype(cast))
    return value, (o, final)

  grads, (o, final) = jax.jit(jax.grad(lambda d: loss(d, lib, jnp.float32),
                                       has_aux=True))(diff)
  with jax.enable_x64():
    d64 = {n: jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64))
           for n, x in diff.items()}
    grads_ref, (o_ref, final_ref) = jax.jit(jax.grad(
        lambda d: loss(d, orc, jnp.float64), has_aux=True))(d64)
    o_ref, final_ref = np.asarray(o_ref), None if final_ref is None else np.asarray(final_ref)
    grads_ref = {n: np.asarray(g) for n, g in grads_ref.items()}
  errors = {"out": rel_err(o.astype(jnp.float32), o_ref)}
  if with_state:
    errors["final_state"] = rel_err(final, final_ref)
  errors.update({"d" + n: rel_err(grads[n].astype(jnp.float32), grads_ref[n]) for n in diff})
  return errors


def assert_within(errors, dtype):
  tol = TOLERANCE[dtype]
  for name, err in errors.items():
    bound = tol["out"] if name in ("out", "final_state") else tol["grad"]
    assert err <= bound, (name, err, bound, errors)


def qkv(rng, dtype, batch=2, length=13, heads=2, key_dim=4, value_dim=6):
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return {"q": normal(batch, length, heads, key_dim), "k": normal(batch, length, heads, key_dim),
          "v": normal(batch, length, heads, value_dim)}


def common_data(causal, batch, length, value_dim, rng, feature_dim):
  """Packed documents and padding; a causal call also starts from an initial state (a
  positive normalizer column, as a real state has) and returns its final state."""
  data = {"causal": causal, "segment_ids": packed_ids(batch, length),
          "lengths": jnp.array([length - 2, length])}
  extra = {}
  if causal:
    s0 = rng.standard_normal((batch, 2, feature_dim, value_dim + 1))
    s0[..., -1] = np.abs(s0[..., -1]) + 1.0
    extra["initial_state"] = jnp.asarray(s0, jnp.float32)
  return data, extra


# --------------------------------------------------------------------------- Hedgehog


def hedgehog_params(rng, heads=2, key_dim=4, features=3):
  return {"w": jnp.asarray(rng.standard_normal((heads, key_dim, features)) / 2, jnp.float32),
          "b": jnp.asarray(rng.standard_normal((heads, features)) / 2, jnp.float32)}


@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
@pytest.mark.parametrize("tier", TIERS)
def test_hedgehog_matches_oracle(tier, causal, dtype, rng):
  """Normalized linear attention with phi = [softmax(xW + b), softmax(-(xW + b))]."""
  diff = {**qkv(rng, dtype, length=13), **hedgehog_params(rng)}
  data, extra = common_data(causal, 2, 13, 6, rng, feature_dim=6)
  diff.update(extra)
  lib = lambda **a: ops.hedgehog(**a, output_final_state=causal, chunk_size=4,
                                 implementation=tier)
  errors = compare(lib, oracle.hedgehog, diff, data, rng, dtype=dtype, with_state=causal)
  assert_within(errors, dtype)


# ------------------------------------------------------------------------------ Based


@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "bf16"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
@pytest.mark.parametrize("tier", TIERS)
def test_based_matches_taylor_polynomial_oracle(tier, causal, dtype, rng):
  """phi(q)^T phi(k) = 1 + s q^T k + (s q^T k)^2 / 2 (oracle from the polynomial)."""
  diff = qkv(rng, dtype, length=21, key_dim=4)
  data, extra = common_data(causal, 2, 21, 6, rng, feature_dim=1 + 4 + 16)
  diff.update(extra)
  lib = lambda **a: ops.based(**a, output_final_state=causal, chunk_size=8,
                              implementation=tier)
  errors = compare(lib, oracle.based, diff, data, rng, dtype=dtype, with_state=causal)
  assert_within(errors, dtype)


def test_based_kernel_is_the_taylor_expansion_of_exp(rng):
  """For small ``s q^T k`` the kernel tracks ``exp(s q^T k)`` to third order."""
  x = jnp.asarray(rng.standard_normal((50, 1, 16)) * 0.3, jnp.float32)
  y = jnp.asarray(rng.standard_normal((50, 1, 16)) * 0.3, jnp.float32)
  phi = lambda a: ops.based_feature_map(a, 16 ** -0.5)
  kernel = np.asarray(jnp.sum(phi(x) * phi(y), -1), np.float64)
  dot = np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64), -1) / 4
  # The remainder of the Taylor polynomial is dot^3 / 6 (1 + O(dot)); float32 adds 1e-6.
  assert np.all(np.abs(kernel - np.exp(dot)) <= 1.2 * np.abs(dot) ** 3 / 6 + 1e-6)


# ------------------------------------------------------------------------------ steps


@pytest.mark.parametrize("op", ("hedgehog", "based"))
def test_decode_steps_equal_the_causal_forward(op, rng):
  batch, length, heads, key_dim, value_dim = 2, 11, 2, 4, 5
  x = qkv(rng, jnp.float32, batch, length, heads, key_dim, value_dim)
  if op == "hedgehog":
    params = hedgehog_params(rng, heads, key_dim)
    full, final = jax.jit(lambda x: ops.hedgehog(**x, **params, output_final_state=True,
                                                 chunk_size=4))(x)
    step = jax.jit(lambda q, k, v, s: ops.hedgehog_step(q, k, v, s, **params))
    feature_dim = 6
  else:
    full, final = jax.jit(lambda x: ops.based(**x, output_final_state=True, chunk_size=4))(x)
    step = jax.jit(ops.based_step)
    feature_dim = 1 + key_dim + key_dim ** 2
  state = jnp.zeros((batch, heads, feature_dim, value_dim + 1), jnp.float32)
  for t in range(length):
    o_t, state = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state)
    assert rel_err(o_t, full[:, t]) < 1e-5, t
  assert rel_err(state, final) < 1e-5


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
def test_packed_documents_equal_documents_alone(causal, rng):
  """Hedgehog (Based and NormAttention share its chunked core; the oracle tests cover
  their packed rows)."""
  x = qkv(rng, jnp.float32, 1, 21, 2, 4, 5)
  params = hedgehog_params(rng)
  sizes = (6, 1, 14)
  ids = jnp.asarray(np.repeat(np.arange(3), sizes)[None], jnp.int32)
  packed = jax.jit(lambda x: ops.hedgehog(**x, **params, segment_ids=ids, causal=causal,
                                          chunk_size=8)[0])(x)
  # Each document alone: moved to the start of a row of the same length and right-padded
  # (one compiled shape for all three), its outputs the first n positions.
  alone_fn = jax.jit(lambda x, n: ops.hedgehog(**x, **params, lengths=n, causal=causal,
                                               chunk_size=8)[0])
  start = 0
  for n in sizes:
    moved = {name: jnp.roll(a, -start, axis=1) for name, a in x.items()}
    alone = alone_fn(moved, jnp.array([n]))[:, :n]
    assert rel_err(packed[:, start:start + n], alone) < 1e-5
    start += n


# ------------------------------------------------------------------ distillation loss


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "non_causal"))
def test_distillation_loss_matches_oracle(causal, rng):
  """Cross-entropy between softmax and Hedgehog weights: value and every gradient."""
  x = qkv(rng, jnp.float32, 2, 13)
  diff = {"q": x["q"], "k": x["k"], **hedgehog_params(rng)}
  lengths = jnp.array([10, 13])
  lib = lambda **d: ops.hedgehog_distillation_loss(**d, causal=causal, lengths=lengths)
  value, grads = jax.jit(jax.value_and_grad(lambda d: lib(**d)))(diff)
  with jax.enable_x64():
    d64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in diff.items()}
    orc = lambda d: oracle.hedgehog_distillation_loss(**d, causal=causal, lengths=lengths)
    ref, grads_ref = jax.jit(jax.value_and_grad(orc))(d64)
    ref, grads_ref = float(ref), {n: np.asarray(g) for n, g in grads_ref.items()}
  assert abs(float(value) - ref) / abs(ref) < 1e-5
  for name in diff:
    assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


def test_distillation_loss_is_the_softmax_entropy_at_its_minimum(rng):
  """CE(a, a^) >= H(a), with equality iff a^ = a: the loss is at least the teacher's
  entropy, and a few gradient steps on w, b lower it."""
  x = qkv(rng, jnp.float32, 2, 13, key_dim=4)
  params = hedgehog_params(rng, features=8)
  loss = jax.jit(lambda p: ops.hedgehog_distillation_loss(x["q"], x["k"], **p))
  logits = jnp.einsum("bihd,bjhd->bhij", x["q"], x["k"]) / 2
  mask = jnp.tril(jnp.ones((13, 13), bool))
  p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1)
  entropy = -jnp.sum(jnp.where(mask, p * jnp.log(jnp.where(mask, p, 1.0)), 0.0), -1).mean()
  grad = jax.jit(jax.grad(lambda p: ops.hedgehog_distillation_loss(x["q"], x["k"], **p)))
  start = float(loss(params))
  assert start > float(entropy)
  for _ in range(20):
    params = jax.tree.map(lambda a, g: a - 0.5 * g, params, grad(params))
  end = float(loss(params))
  assert end < start - 0.05 * (start - float(entropy)), (start, end, float(entropy))
  assert end >= float(entropy) - 1e-5


# ------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_naming_the_argument(rng):
  x = qkv(rng, jnp.float32, 1, 5)
  params = hedgehog_params(rng)
  cases = [
      (lambda: ops.hedgehog(**x, w=params["w"][0], b=params["b"]), "w must be"),
      (lambda: ops.hedgehog(**x, w=params["w"], b=params["b"][:, :2]), "b must be"),
      (lambda: ops.hedgehog(**x, **params, causal=False, output_final_state=True),
       "need causal=True"),
      (lambda: ops.hedgehog(**x, **params, causal=1), "causal must be a bool"),
      (lambda: ops.hedgehog(**x, **params, lengths=jnp.array([1.0])), "lengths must be"),
      (lambda: ops.hedgehog(**x, **params, lengths=jnp.array([1, 2])), "lengths must be"),
      (lambda: ops.based(**x, scale=-1.0), "scale must be"),
      (lambda: ops.based(x["q"], x["k"][..., :3], x["v"]), "q and k"),
      (lambda: ops.based(**x, initial_state=jnp.zeros((1, 2, 3, 7))), "initial_state"),
      (lambda: ops.based(**x, implementation="pallas"), "implementation='pallas'"),
      (lambda: ops.based_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0],
                              jnp.zeros((1, 2, 21, 6))), "state must be"),
      (lambda: ops.hedgehog_distillation_loss(x["q"], x["k"][:, :3], **params),
       "k must have"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()
