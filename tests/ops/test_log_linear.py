"""Log-linear attention (``attnlab.ops.log_linear_attention``) against the float64 oracle.

The oracle is the paper's masked matrix form ``O = scale (Q K^T ⊙ M^S ⊙ M^H) V``; the
reference tier is the Fenwick-state recurrence and the xla tier one chunked simple GLA
per level, so each is checked against a form it does not share. Output, final state
(``[B, H, L, K, V]``) and every gradient (q, k, v, g, level_weights) are compared as
``||x - ref|| / ||ref||``, with packed documents, right padding (``lengths``), more
levels than a length needs, and per-token gates of -20.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import registry
from tests import oracle_kda_log_linear as oracle

OP = "log_linear_attention"
# Relative error bounds (measured: ~2e-7 in float32, ~4e-3 in bfloat16, which is compared
# with the oracle on the bf16-rounded inputs).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref) -> float:
  """``||x - ref|| / ||ref||`` (the absolute error where ``ref`` is exactly 0)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  ref_norm, diff = np.linalg.norm(ref), np.linalg.norm(x - ref)
  return float(diff if ref_norm == 0 else diff / ref_norm)


def to_f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def packed_ids(rng, batch, length):
  """Document starts at random, one on a chunk edge (16) and a one-token document."""
  starts = rng.random((batch, length)) < 0.1
  starts[0, 16] = True
  starts[-1, 5:7] = True
  starts[:, 0] = False
  return jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Case:
  """``strength`` s: log gates ``-s * uniform(0.5, 1)`` (``exact``: all -s)."""

  name: str
  length: int
  chunk_size: int
  levels: int
  strength: float = 0.3
  exact: bool = False
  docs: bool = False
  lengths: tuple | None = None
  scale: float | None = None
  final: bool = True
  batch: int = 2
  heads: int = 2
  key_dim: int = 8
  value_dim: int = 12

  def __str__(self):
    return self.name

  def problem(self, rng, dtype=jnp.float32):
    b, t, h, kd, vd = self.batch, self.length, self.heads, self.key_dim, self.value_dim
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    g = -self.strength * (np.ones((b, t, h)) if self.exact
                          else rng.uniform(0.5, 1.0, (b, t, h)))
    diff = {"q": normal(b, t, h, kd), "k": normal(b, t, h, kd), "v": normal(b, t, h, vd),
            "g": jnp.asarray(g, dtype),
            "level_weights": jnp.asarray(rng.uniform(0.2, 1.5, (b, t, h, self.levels)),
                                         dtype)}
    data = {}
    if self.docs:
      data["segment_ids"] = packed_ids(rng, b, t)
    if self.lengths:
      data["lengths"] = jnp.asarray(self.lengths, jnp.int32)
    static = {"scale": self.scale, "output_final_state": self.final}
    dout = normal(b, t, h, vd)
    dfinal = (jnp.asarray(rng.standard_normal((b, h, self.levels, kd, vd)), jnp.float32)
              if self.final else None)
    return diff, data, static, dout, dfinal


def expected(diff, data, static, dout, dfinal):
  res = oracle.log_linear(**{n: to_f64(x) for n, x in diff.items()}, scale=static["scale"],
                          **{n: np.asarray(x) for n, x in data.items()}, dout=to_f64(dout),
                          dfinal=None if dfinal is None else to_f64(dfinal))
  want = {"out": res.out, **{n: res.grads[n] for n in diff}}
  if static["output_final_state"]:
    want["final_state"] = res.final_state
  return want


def run(implementation, chunk_size, diff, data, static, dout, dfinal):
  @jax.jit
  def forward_backward(diff, data):
    (out, final), vjp = jax.vjp(
        lambda d: ops.log_linear_attention(**d, **data, **static, chunk_size=chunk_size,
                                           implementation=implementation), diff)
    return out, final, vjp((dout, dfinal))[0]
  return forward_backward(diff, data)


def check(case, rng, implementation, dtype=jnp.float32):
  diff, data, static, dout, dfinal = case.problem(rng, dtype)
  out, final, grads = run(implementation, case.chunk_size, diff, data, static, dout, dfinal)
  assert out.dtype == dtype and out.shape == dout.shape
  assert (final is None) == (dfinal is None)
  got = dict(grads, out=out) | ({"final_state": final} if final is not None else {})
  for name, g in grads.items():
    assert g.shape == diff[name].shape and g.dtype == diff[name].dtype, name
  want = expected(diff, data, static, dout, dfinal)
  assert set(got) == set(want)
  assert all(np.isfinite(np.asarray(jnp.asarray(x, jnp.float32))).all()
             for x in jax.tree.leaves(got))
  errors = {n: rel_err(jnp.asarray(got[n]).astype(jnp.float32), want[n]) for n in want}
  assert all(e <= TOLERANCE[dtype] for e in errors.values()), errors
  if "lengths" in data:   # dropped tokens: output 0 and no gradient
    dropped = np.arange(case.length)[None] >= np.asarray(data["lengths"])[:, None]
    for x in (out, grads["q"], grads["k"], grads["v"], grads["level_weights"]):
      assert not np.asarray(x, np.float32)[dropped].any()


CASES = [
    Case("T21_c8_docs_lengths_L6", 21, 8, 6, docs=True, lengths=(16, 21, 0), batch=3),
    Case("T13_c16_scale_L7_no_final", 13, 16, 7, 0.05, scale=0.5, final=False),
    Case("T1_c8_L2", 1, 8, 2),
    # Gates of -20 per token: the decays underflow, nothing overflows or turns NaN.
    Case("T37_c16_g-20_docs_L7", 37, 16, 7, 20.0, exact=True, docs=True),
]


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_oracle(case, implementation, rng):
  check(case, rng, implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_bfloat16_matches_oracle_on_rounded_inputs(implementation, rng):
  check(CASES[0], rng, implementation, jnp.bfloat16)


def test_prefill_then_decode_equals_full_forward(rng):
  """Right-padded prompts (9 and 13 tokens, documents inside) through the xla op, then
  ``log_linear_attention_step`` one token per row with its document position (a new
  document starts during decoding) == the full forward, and the oracle's final state."""
  case = Case("decode", 23, 8, 6, docs=True)
  diff, data, _, _, _ = case.problem(rng)
  ids = np.asarray(data["segment_ids"]).copy()
  ids[:, 17:] = 7                                              # a document starts at 17
  position = oracle.document_positions(ids, 2, 23)
  op = jax.jit(lambda d, ids, lengths: ops.log_linear_attention(
      **d, segment_ids=ids, lengths=lengths, output_final_state=True, chunk_size=8,
      implementation="xla"))
  full, _ = op(diff, ids, None)
  lengths = np.array([9, 13])
  _, state = op({n: x[:, :13] for n, x in diff.items()}, ids[:, :13], lengths)
  step = jax.jit(ops.log_linear_attention_step)
  rows = np.arange(2)
  errors = []
  for i in range(10):
    t = lengths + i
    x = [diff[n][rows, t] for n in ("q", "k", "v", "g", "level_weights")]
    o_t, state = step(*x, state, jnp.asarray(position[rows, t], jnp.int32))
    errors.append(rel_err(o_t, full[rows, t]))
  want = oracle.log_linear(**{n: to_f64(x) for n, x in diff.items()}, segment_ids=ids,
                           lengths=lengths + 10).final_state
  errors.append(rel_err(state, want))
  assert max(errors) <= TOLERANCE[jnp.float32], errors


def test_unit_level_weights_give_simple_gla(rng):
  """With every lambda = 1 the buckets add up to the whole prefix: simple GLA."""
  b, t, h, kd, vd = 2, 29, 2, 8, 4
  q, k = rng.standard_normal((2, b, t, h, kd))
  v = rng.standard_normal((b, t, h, vd))
  g = -rng.uniform(0.1, 1.0, (b, t, h))
  ids = np.asarray(packed_ids(rng, b, t))
  ones = np.ones((b, t, h, 6))
  log_linear = jax.jit(lambda *a: ops.log_linear_attention(
      *a, segment_ids=ids, chunk_size=8, implementation="xla")[0])(q, k, v, g, ones)
  gla = jax.jit(lambda *a: ops.simple_gla(*a, segment_ids=ids, chunk_size=8)[0])(q, k, v, g)
  assert rel_err(log_linear, gla) <= 1e-5


def _forward_backward_temp_bytes(length, levels=15, heads=1, dim=32):
  spec = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
  gate = jax.ShapeDtypeStruct((1, length, heads), jnp.float32)
  lam = jax.ShapeDtypeStruct((1, length, heads, levels), jnp.float32)

  def forward_backward(q, k, v, g, lam, do):
    o, vjp = jax.vjp(lambda *a: ops.log_linear_attention(*a, implementation="xla")[0],
                     q, k, v, g, lam)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(spec, spec, spec, gate, lam, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_temp_memory_is_linear_in_length():
  """Compiled forward+backward temporaries at 15 levels: 4x the length (13 -> 15 levels in
  use) needs at most ~4.5x, the backward recomputing one level at a time (a [T, T] buffer
  would need 16x), and far less than one [T, T] float32 matrix."""
  small = _forward_backward_temp_bytes(4096)
  large = _forward_backward_temp_bytes(16384)
  assert large <= 4.5 * small, (small, large)
  assert large < 16384 ** 2 * 4 / 10, large


# --------------------------------------------------------------------- bad input


B, T, H, K, V = 2, 5, 2, 4, 3


def _valid(**override):
  rng = np.random.default_rng(0)
  args = dict(q=rng.standard_normal((B, T, H, K)), k=rng.standard_normal((B, T, H, K)),
              v=rng.standard_normal((B, T, H, V)), g=-rng.uniform(0, 1, (B, T, H)),
              level_weights=rng.uniform(0, 1, (B, T, H, 4)))
  args.update(override)
  return args


@pytest.mark.parametrize("override, message", [
    ({"level_weights": np.ones((B, T, 4))},
     r"level_weights must be \[B, T, H, L\] .* got level_weights.shape=\(2, 5, 4\)"),
    ({"level_weights": np.ones((B, T, H, 1))}, "level_weights needs at least 2 levels"),
    ({"level_weights": np.ones((B, T, H, 3))}, r"L=3 levels.*T=5 needs L >= 4"),
    ({"level_weights": np.ones((B, T, H, 4), np.int32)}, "level_weights must be floating"),
    ({"g": np.zeros((B, T, H, K))}, r"g must have shape \(2, 5, 2\)"),
    ({"lengths": np.array([3.0, 5.0])}, r"lengths must be \[B\]"),
    ({"lengths": np.array([3])}, r"lengths must be \[B\]=\(2,\)"),
    ({"segment_ids": np.zeros((B, T + 1), np.int32)}, r"segment_ids must be \[B, T\]"),
    ({"scale": float("nan")}, "scale must be a finite"),
])
def test_bad_arguments_raise_value_error(override, message):
  with pytest.raises(ValueError, match=message):
    ops.log_linear_attention(**_valid(**override))


def test_bad_step_arguments_raise_value_error():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, B, H, K))
  v = rng.standard_normal((B, H, V))
  g, lam = np.zeros((B, H)), np.ones((B, H, 4))
  state = np.zeros((B, H, 4, K, V))
  with pytest.raises(ValueError, match=r"positions must be \[B\]"):
    ops.log_linear_attention_step(q, k, v, g, lam, state, np.zeros(B))
  with pytest.raises(ValueError, match=r"state must be \[B, H, L, K, V\]"):
    ops.log_linear_attention_step(q, k, v, g, lam, state[:, :, :3], np.zeros(B, np.int32))
  with pytest.raises(ValueError, match=r"level_weights_t must be \[B, H, L\]"):
    ops.log_linear_attention_step(q, k, v, g, lam[0], state, np.zeros(B, np.int32))


def test_registered_with_both_tiers_and_described():
  assert set(ops.implementations(OP)) == {"reference", "xla"}
  assert registry.info(OP).step == "log_linear_attention_step"


# -------------------------------------------------------------------- the oracle


def test_oracle_buckets_partition_the_prefix():
  """§3.1's buckets of a query at p: level 0 is p, level l >= 1 holds 2^(l-1) positions
  exactly when bit l-1 of p is set, and together they cover 0..p once; the level is
  floor(log2(p xor s)) + 1."""
  for p in range(70):
    levels = [oracle.bucket_level(p, s) for s in range(p + 1)]
    assert levels[p] == 0
    for level in range(1, 9):
      size = levels.count(level)
      assert size == ((p >> (level - 1)) & 1) << (level - 1), (p, level)
    assert all(lv == (p ^ s).bit_length() for s, lv in enumerate(levels[:p])), p


def _central_difference(loss, x, eps=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    old = x[idx]
    x[idx] = old + eps
    plus = loss()
    x[idx] = old - eps
    minus = loss()
    x[idx] = old
    grad[idx] = (plus - minus) / (2 * eps)
  return grad


def test_oracle_gradients_match_finite_differences(rng):
  b, t, h, kd, vd, levels = 2, 9, 1, 2, 2, 5
  args = {"q": rng.standard_normal((b, t, h, kd)), "k": rng.standard_normal((b, t, h, kd)),
          "v": rng.standard_normal((b, t, h, vd)), "g": -rng.uniform(0.1, 1, (b, t, h)),
          "level_weights": rng.uniform(0.2, 1.5, (b, t, h, levels))}
  extra = {"segment_ids": np.array([[0] * 6 + [1] * 3, [2] * 9]), "lengths": [9, 7]}
  dout = rng.standard_normal((b, t, h, vd))
  dfinal = rng.standard_normal((b, h, levels, kd, vd))

  def loss():
    res = oracle.log_linear(**args, **extra)
    return float((res.out * dout).sum() + (res.final_state * dfinal).sum())

  res = oracle.log_linear(**args, **extra, dout=dout, dfinal=dfinal)
  for name, x in args.items():
    assert rel_err(res.grads[name], _central_difference(loss, x)) < 1e-7, name
