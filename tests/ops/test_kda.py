"""Kimi Delta Attention (``attnlab.ops.kimi_delta_attention``) against the float64 oracle.

Every tier's output, final state and every gradient (q, k, v, g, beta, initial_state) are
compared with ``tests/oracle_kda_log_linear.py`` as the relative error ``||x - ref|| /
||ref||``; the loss is ``<o, dout> + <final_state, dfinal>``. The xla tier meets a single
padded chunk, ragged last chunks, chunks of one and of two GLA sub-chunks, document
boundaries inside chunks and per-token gates of -20.
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

OP = "kimi_delta_attention"
# Relative error bounds (measured: ~2e-7 in float32, ~4e-3 in bfloat16, which is compared
# with the oracle on the bf16-rounded inputs, so only the computation's own error counts).
TOLERANCE = {
    jnp.float32: {"out": 1e-5, "final_state": 1e-5, "grad": 1e-5},
    jnp.bfloat16: {"out": 1e-2, "final_state": 1e-2, "grad": 1e-2},
}


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
  """``strength`` s: log gates ``-s * uniform(0.5, 1)`` per channel (``exact``: all -s)."""

  name: str
  length: int
  chunk_size: int
  strength: float = 1.0
  exact: bool = False
  docs: bool = False
  init: bool = False
  l2norm: bool = False
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
    k = rng.standard_normal((b, t, h, kd))
    if not self.l2norm:   # unit keys keep the delta rule stable (beta |k|^2 < 2)
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    g = -self.strength * (np.ones((b, t, h, kd)) if self.exact
                          else rng.uniform(0.5, 1.0, (b, t, h, kd)))
    diff = {"q": normal(b, t, h, kd), "k": jnp.asarray(k, dtype), "v": normal(b, t, h, vd),
            "g": jnp.asarray(g, dtype),
            "beta": jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), dtype)}
    if self.init:
      diff["initial_state"] = jnp.asarray(rng.standard_normal((b, h, kd, vd)), jnp.float32)
    static = {"use_qk_l2norm": self.l2norm, "scale": self.scale,
              "output_final_state": self.final}
    data = {"segment_ids": packed_ids(rng, b, t)} if self.docs else {}
    dout = normal(b, t, h, vd)
    dfinal = (jnp.asarray(rng.standard_normal((b, h, kd, vd)), jnp.float32) if self.final
              else None)
    return diff, data, static, dout, dfinal


def expected(diff, data, static, dout, dfinal):
  res = oracle.kda(**{n: to_f64(x) for n, x in diff.items()},
                   use_qk_l2norm=static["use_qk_l2norm"], scale=static["scale"],
                   segment_ids=None if not data else np.asarray(data["segment_ids"]),
                   dout=to_f64(dout), dfinal=None if dfinal is None else to_f64(dfinal))
  want = {"out": res.out, **{n: res.grads[n] for n in diff}}
  if static["output_final_state"]:
    want["final_state"] = res.final_state
  return want


def run(implementation, chunk_size, diff, data, static, dout, dfinal):
  @jax.jit
  def forward_backward(diff, data):
    (out, final), vjp = jax.vjp(
        lambda d: ops.kimi_delta_attention(**d, **data, **static, chunk_size=chunk_size,
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
  tol = TOLERANCE[dtype]
  want = expected(diff, data, static, dout, dfinal)
  assert set(got) == set(want)
  errors = {n: rel_err(jnp.asarray(got[n]).astype(jnp.float32), want[n]) for n in want}
  bounds = {n: tol.get(n, tol["grad"]) for n in want}
  assert all(np.isfinite(np.asarray(jnp.asarray(x, jnp.float32))).all()
             for x in jax.tree.leaves(got))
  assert all(errors[n] <= bounds[n] for n in errors), errors


CASES = [
    Case("T21_c8_docs_init_l2norm", 21, 8, docs=True, init=True, l2norm=True),
    Case("T13_c16_scale_no_final", 13, 16, 0.1, scale=0.3, final=False),
    Case("T1_c8_init", 1, 8, init=True),
    # Per-token gates of -20: decays underflow, nothing overflows, the tiny gradients of
    # g survive (two 16-token sub-chunks per 32-token chunk, documents, initial state).
    Case("T37_c32_g-20_docs_init", 37, 32, 20.0, exact=True, docs=True, init=True,
         l2norm=True),
]


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_oracle(case, implementation, rng):
  check(case, rng, implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_bfloat16_matches_oracle_on_rounded_inputs(implementation, rng):
  check(CASES[0], rng, implementation, jnp.bfloat16)


def test_prefill_then_decode_equals_full_forward(rng):
  """The xla op on the first 13 tokens (with its final state), then
  ``kimi_delta_attention_step`` token by token == the full forward and the oracle."""
  case = Case("prefill", 29, 8, init=True, l2norm=True)
  diff, _, static, dout, dfinal = case.problem(rng)
  op = jax.jit(lambda d: ops.kimi_delta_attention(
      **d, use_qk_l2norm=True, output_final_state=True, chunk_size=8, implementation="xla"))
  full_out, full_final = op(diff)
  out_head, state = op({n: x if n == "initial_state" else x[:, :13] for n, x in diff.items()})

  @jax.jit
  def decode(state, xs):
    def body(state, x):
      o_t, state = ops.kimi_delta_attention_step(*x, state, use_qk_l2norm=True)
      return state, o_t
    final, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), final

  out_tail, final = decode(state, tuple(jnp.moveaxis(diff[n][:, 13:], 1, 0)
                                        for n in ("q", "k", "v", "g", "beta")))
  out = jnp.concatenate([out_head, out_tail], axis=1)
  want = expected(diff, {}, static, dout, dfinal)
  errors = {"out_vs_full": rel_err(out, full_out), "final_vs_full": rel_err(final, full_final),
            "out_vs_oracle": rel_err(out, want["out"]),
            "final_vs_oracle": rel_err(final, want["final_state"])}
  assert all(e <= TOLERANCE[jnp.float32]["out"] for e in errors.values()), errors


def test_a_gate_equal_across_channels_is_the_gated_delta_rule(rng):
  """With ``g_t`` the same in every key channel, KDA is Gated DeltaNet (xla tiers)."""
  b, t, h, kd, vd = 2, 19, 2, 8, 4
  q, k = rng.standard_normal((2, b, t, h, kd))
  v = rng.standard_normal((b, t, h, vd))
  g = -rng.uniform(0.1, 1.0, (b, t, h))
  beta = rng.uniform(0.1, 0.9, (b, t, h))
  common = dict(use_qk_l2norm=True, output_final_state=True, chunk_size=8,
                implementation="xla")
  kda = jax.jit(lambda *a: ops.kimi_delta_attention(*a, **common))(
      q, k, v, np.repeat(g[..., None], kd, -1), beta)
  gdn = jax.jit(lambda *a: ops.gated_delta_rule(*a, **common))(q, k, v, g, beta)
  assert rel_err(kda[0], gdn[0]) <= 1e-5 and rel_err(kda[1], gdn[1]) <= 1e-5


def _forward_backward_temp_bytes(length, heads=1, dim=32):
  spec = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
  beta = jax.ShapeDtypeStruct((1, length, heads), jnp.float32)

  def forward_backward(q, k, v, g, beta, do):
    o, vjp = jax.vjp(lambda *a: ops.kimi_delta_attention(*a, implementation="xla")[0],
                     q, k, v, g, beta)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(spec, spec, spec, spec, beta, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_temp_memory_is_linear_in_length():
  """Compiled forward+backward temporaries: 4x the length needs at most ~4.5x (a [T, T]
  buffer would need 16x), and at T = 65536 far less than one [T, T] float32 matrix."""
  small = _forward_backward_temp_bytes(16384)
  large = _forward_backward_temp_bytes(65536)
  assert large <= 4.5 * small, (small, large)
  assert large < 65536 ** 2 * 4 / 10, large


# --------------------------------------------------------------------- bad input


B, T, H, K, V = 2, 5, 2, 4, 3


def _valid(**override):
  rng = np.random.default_rng(0)
  args = dict(q=rng.standard_normal((B, T, H, K)), k=rng.standard_normal((B, T, H, K)),
              v=rng.standard_normal((B, T, H, V)), g=-rng.uniform(0, 1, (B, T, H, K)),
              beta=rng.uniform(0, 1, (B, T, H)))
  args.update(override)
  return args


@pytest.mark.parametrize("override, message", [
    ({"g": np.zeros((B, T, H))}, r"g must have shape \(2, 5, 2, 4\), got g.shape=\(2, 5, 2\)"),
    ({"g": np.zeros((B, T, H, K), np.int32)}, "g must be floating point"),
    ({"beta": np.zeros((B, T, H, 1))}, r"beta must have shape \(2, 5, 2\)"),
    ({"v": np.zeros((B, T + 1, H, V))}, r"v must be \[B, T, H, V\]"),
    ({"initial_state": np.zeros((B, H, K, K))}, r"initial_state must be \[B, H, K, V\]"),
    ({"segment_ids": np.zeros((B, T), np.float32)}, "segment_ids must be integers"),
    ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ({"implementation": "pallas"}, "implementation='pallas' is not a tier"),
])
def test_bad_arguments_raise_value_error(override, message):
  with pytest.raises(ValueError, match=message):
    ops.kimi_delta_attention(**_valid(**override))


def test_bad_step_arguments_raise_value_error():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, B, H, K))
  v = rng.standard_normal((B, H, V))
  state = np.zeros((B, H, K, V))
  with pytest.raises(ValueError, match=r"g_t must have shape \(2, 2, 4\)"):
    ops.kimi_delta_attention_step(q, k, v, np.zeros((B, H)), np.zeros((B, H)), state)
  with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
    ops.kimi_delta_attention_step(q, k, v, np.zeros((B, H, K)), np.zeros((B, H)),
                                  state[..., :1])


def test_registered_with_both_tiers_and_described():
  assert set(ops.implementations(OP)) == {"reference", "xla"}
  assert registry.info(OP).step == "kimi_delta_attention_step"


# -------------------------------------------------------------------- the oracle


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


@pytest.mark.parametrize("l2norm", [False, True])
def test_oracle_gradients_match_finite_differences(l2norm, rng):
  b, t, h, kd, vd = 2, 6, 1, 3, 2
  args = {"q": rng.standard_normal((b, t, h, kd)), "k": rng.standard_normal((b, t, h, kd)),
          "v": rng.standard_normal((b, t, h, vd)), "g": -rng.uniform(0.1, 1, (b, t, h, kd)),
          "beta": rng.uniform(0.1, 0.9, (b, t, h)),
          "initial_state": rng.standard_normal((b, h, kd, vd))}
  ids = np.array([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 3]])
  dout, dfinal = rng.standard_normal((b, t, h, vd)), rng.standard_normal((b, h, kd, vd))

  def loss():
    res = oracle.kda(**args, use_qk_l2norm=l2norm, segment_ids=ids)
    return float((res.out * dout).sum() + (res.final_state * dfinal).sum())

  res = oracle.kda(**args, use_qk_l2norm=l2norm, segment_ids=ids, dout=dout, dfinal=dfinal)
  for name, x in args.items():
    assert rel_err(res.grads[name], _central_difference(loss, x)) < 1e-7, name


def test_oracle_decays_before_the_delta_correction(rng):
  """One token from a state: ``S_1 = S' + beta k (v - S'^T k)^T`` with ``S' = diag(e^g)
  S_0`` (the paper's order: the delta rule corrects the decayed state)."""
  kd, vd = 3, 2
  q, k, g = rng.standard_normal((3, 1, 1, 1, kd))
  v = rng.standard_normal((1, 1, 1, vd))
  beta = np.full((1, 1, 1), 0.7)
  s0 = rng.standard_normal((1, 1, kd, vd))
  decayed = np.exp(g[0, 0, 0])[:, None] * s0[0, 0]
  want = decayed + 0.7 * np.outer(k[0, 0, 0], v[0, 0, 0] - decayed.T @ k[0, 0, 0])
  res = oracle.kda(q, k, v, g, beta, initial_state=s0)
  assert rel_err(res.final_state[0, 0], want) < 1e-14
