"""Feature-map linear attentions against the float64 oracle (``tests/oracle_feature_maps.py``).

Every op, both tiers, both forms: the output and every gradient (q, k, v and the op's own
differentiable inputs: Performer's projection, Cottention's length exponent, LLN's alpha
and beta) at odd lengths (T = 13 causal, 21 non-causal) with packed documents, in float32
and bfloat16, as the relative error ``||x - ref|| / ||ref||``. Then: decoding token by
token == the causal forward, a split run through ``initial_state`` == one run, right
padding (``lengths``) == the unpadded rows, Performer's estimate converging to softmax
attention as the features grow, and every ValueError naming its argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_feature_maps as oracle

B, H, K, V = 2, 2, 8, 8
FEATURES = 16  # Performer's M in these tests
MAX_LEN = 48   # cosFormer's M

# bfloat16 inputs are compared with the oracle on the bf16-rounded inputs; the ops compute
# in float32 and round the output (and the input gradients) to bf16: 2^-9 relative each.
TOLERANCE = {jnp.float32: {"out": 1e-5, "grad": 1e-5},
             jnp.bfloat16: {"out": 1e-2, "grad": 1e-2}}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Spec:
  """One op: its attnlab function and oracle, how to draw its extra differentiable inputs,
  its static options for each side, and its decode step."""

  op: Callable
  oracle: Callable
  params: Callable[[np.random.Generator], dict]
  static: dict
  oracle_static: dict
  step: Callable
  state_rows: int
  state_extra: int
  step_static: Callable[[dict], dict]

  def __str__(self):
    return self.op.__name__


def _no_params(rng):
  del rng
  return {}


SPECS = [
    Spec(ops.efficient_attention, oracle.efficient_attention, _no_params, {}, {},
         ops.efficient_attention_step, K, 2, lambda p: {}),
    Spec(ops.performer, oracle.performer,
         lambda rng: {"projection": rng.standard_normal((FEATURES, K))},
         {"scale": 0.3}, {"scale": 0.3}, ops.performer_step, FEATURES, 2,
         lambda p: {"projection": p["projection"], "scale": 0.3}),
    Spec(ops.cosformer, oracle.cosformer, _no_params, {"max_len": MAX_LEN},
         {"max_len": MAX_LEN}, ops.cosformer_step, 2 * K, 1, lambda p: {"max_len": MAX_LEN}),
    Spec(ops.cottention, oracle.cottention,
         lambda rng: {"length_exponent": rng.uniform(0.2, 0.8, H)}, {}, {},
         ops.cottention_step, K, 1, lambda p: {"length_exponent": p["length_exponent"]}),
    Spec(ops.lln_attention, oracle.lln_attention,
         lambda rng: {"alpha": rng.uniform(0.5, 1.0, H), "beta": rng.uniform(0.5, 1.0, H)},
         {}, {}, ops.lln_attention_step, K, 2,
         lambda p: {"alpha": p["alpha"], "beta": p["beta"]}),
    Spec(ops.focused_linear_attention, oracle.focused_linear_attention, _no_params,
         {"power": 3.0}, {"power": 3.0}, ops.focused_linear_attention_step, K, 1,
         lambda p: {"power": 3.0}),
    Spec(ops.slab_attention, oracle.slab_attention, _no_params, {}, {},
         ops.slab_attention_step, K, 1, lambda p: {}),
]


def _packed_ids(length):
  """Row 0: documents of 5, 1 and the rest; row 1: one document."""
  ids = np.zeros((B, length), np.int32)
  ids[0, 5:6], ids[0, 6:] = 1, 2
  return ids


def _inputs(rng, length, dtype):
  shapes = {"q": (B, length, H, K), "k": (B, length, H, K), "v": (B, length, H, V)}
  return {n: jnp.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}


def _run(spec, diff, dout, *, causal, tier, segment_ids):
  def forward(d):
    return spec.op(**d, causal=causal, segment_ids=segment_ids, chunk_size=8,
                   implementation=tier, **spec.static)[0]
  @jax.jit  # op-by-op dispatch of the chunked path costs more than its compile
  def run(diff, dout):
    out, vjp = jax.vjp(forward, diff)
    return out, vjp(dout.astype(out.dtype))[0]
  return run(diff, dout)


# bfloat16 runs the xla tier only: the reference computes in float32 from the first line,
# so its bf16 case would repeat the f32 one after one rounding.
DTYPE_TIER = [(jnp.float32, "reference"), (jnp.float32, "xla"), (jnp.bfloat16, "xla")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("dtype, tier", DTYPE_TIER,
                         ids=[f"{jnp.dtype(d).name}-{t}" for d, t in DTYPE_TIER])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_matches_oracle_forward_and_gradients(spec, dtype, tier, causal, rng):
  length = 13 if causal else 21
  diff = _inputs(rng, length, dtype)
  diff.update({n: jnp.asarray(x, jnp.float32) for n, x in spec.params(rng).items()})
  dout = jnp.asarray(rng.standard_normal((B, length, H, V)), jnp.float32)
  ids = _packed_ids(length)
  out, got = _run(spec, diff, dout, causal=causal, tier=tier, segment_ids=jnp.asarray(ids))
  want_out, want = oracle.grads(
      spec.oracle, {n: np.asarray(x.astype(jnp.float32)) for n, x in diff.items()},
      np.asarray(dout), m=oracle.mask(length, causal, ids, B), **spec.oracle_static)
  tol = TOLERANCE[dtype]
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want_out)}
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in diff})
  bad = {n: e for n, e in errors.items() if not e <= tol["out" if n == "out" else "grad"]}
  assert not bad, (bad, errors)


def _state(spec, rng):
  del rng
  return jnp.zeros((B, H, spec.state_rows, V + spec.state_extra), jnp.float32)


def _jitted(op):
  """``op`` under ``jit`` (CI time): array arguments traced, the others closed over."""
  def call(**kwargs):
    arrays = {n: a for n, a in kwargs.items() if isinstance(a, jax.Array)}
    others = {n: a for n, a in kwargs.items() if n not in arrays}
    return jax.jit(lambda arrays: op(**arrays, **others))(arrays)
  return call


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_decode_steps_equal_causal_forward(spec, rng):
  """Token-by-token decoding from an empty state reproduces the causal forward; and the
  forward split in two through ``initial_state`` reproduces one run (both tiers)."""
  length, split = 13, 6  # the oracle test's shapes, so the eager op caches are reused
  x = _inputs(rng, length, jnp.float32)
  params = {n: jnp.asarray(a, jnp.float32) for n, a in spec.params(rng).items()}
  op = _jitted(spec.op)
  full, _ = op(**x, **params, causal=True, chunk_size=8, **spec.static)
  state = _state(spec, rng)
  step_kw = spec.step_static(params)
  # Jitted (CI time): arrays are traced, the other options closed over.
  others = {n: a for n, a in step_kw.items() if not isinstance(a, jax.Array)}
  step = jax.jit(lambda args, state, arrays: spec.step(*args, state, **arrays, **others))
  for t in range(length):
    args = [x[n][:, t] for n in ("q", "k", "v")]
    if spec.op is ops.cosformer:
      step_kw["position"] = jnp.full((B,), t, jnp.int32)
    o_t, state = step(args, state, {n: a for n, a in step_kw.items() if n not in others})
    assert rel_err(o_t, full[:, t]) < 1e-5, t
  for tier in ("reference", "xla"):
    first = {n: a[:, :split] for n, a in x.items()}
    rest = {n: a[:, split:] for n, a in x.items()}
    extra = dict(spec.static)
    if spec.op is ops.cosformer:
      extra["positions"] = jnp.broadcast_to(jnp.arange(split, length), (B, length - split))
    _, mid = op(**first, **params, causal=True, output_final_state=True,
                implementation=tier, chunk_size=8, **spec.static)
    second, _ = op(**rest, **params, causal=True, initial_state=mid,
                   implementation=tier, chunk_size=8, **extra)
    assert rel_err(second, full[:, split:]) < 1e-5, tier


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_right_padding_is_ignored(spec, causal, rng):
  """With ``lengths`` the valid rows (and the causal final state) equal the run on the
  unpadded sequence; the padded keys hold large values that would show."""
  length, valid = 13, 9
  x = _inputs(rng, length, jnp.float32)
  x = {n: a.at[0, valid:].multiply(5.0) for n, a in x.items()}
  params = {n: jnp.asarray(a, jnp.float32) for n, a in spec.params(rng).items()}
  kw = dict(causal=causal, output_final_state=causal, chunk_size=8, **spec.static)
  run = jax.jit(lambda x, **arrays: spec.op(**x, **arrays, **params, **kw))  # CI time
  padded, padded_state = run(x, lengths=jnp.array([valid, length]))
  alone, alone_state = run({n: a[:1, :valid] for n, a in x.items()})
  assert rel_err(padded[0, :valid], alone[0]) < 1e-5
  if causal:
    if spec.op is ops.cosformer:
      return  # the state holds absolute positions: equal only up to the padded row's angles
    assert rel_err(padded_state[0], alone_state[0]) < 1e-5


def test_performer_converges_to_softmax_attention(rng):
  """FAVOR+ is an unbiased estimator of the softmax kernel (Lemma 1): with orthogonal
  features the output error against exact softmax attention, averaged over 4 draws, falls
  markedly from 16 to 1024 features (about 1/sqrt(M), i.e. ~8x; asserted > 3x)."""
  length, dim = 16, 8
  x = {n: jnp.asarray(0.5 * rng.standard_normal((1, length, 1, dim)), jnp.float32)
       for n in ("q", "k", "v")}
  exact, _ = oracle.grads(oracle.softmax_attention, {n: np.asarray(a) for n, a in x.items()},
                          np.ones((1, length, 1, dim)), m=oracle.mask(length, False),
                          scale=dim ** -0.5)
  errors = {}
  for m in (16, 1024):
    errs = []
    for seed in range(4):
      w = ops.performer_features(jax.random.key(seed), m, dim)
      o, _ = ops.performer(**x, projection=w, causal=False)
      errs.append(rel_err(o, exact))
    errors[m] = float(np.mean(errs))
  assert errors[1024] < errors[16] / 3, errors


def test_performer_features_are_orthogonal_blocks():
  w = np.asarray(ops.performer_features(jax.random.key(0), 12, 8))
  assert w.shape == (12, 8)
  gram = w[:8] @ w[:8].T
  assert np.allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  assert not np.allclose(w, np.asarray(ops.performer_features(jax.random.key(1), 12, 8)))


# ------------------------------------------------------------------------ bad input

_Q = jnp.ones((1, 5, 2, 4))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.slab_attention(_Q[0], _Q, _Q), "q must be"),
    (lambda: ops.slab_attention(_Q, _Q[..., :3], _Q), r"q and k must have the same shape"),
    (lambda: ops.slab_attention(_Q, _Q, _Q[:, :4]), "v must be"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, causal=1), "causal must be a bool"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, causal=False, output_final_state=True),
     "output_final_state need causal=True"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, initial_state=jnp.zeros((1, 2, 4, 4))),
     r"initial_state must have shape \(1, 2, 4, 5\)"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, segment_ids=jnp.zeros((1, 4), jnp.int32)),
     "segment_ids must have shape"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, segment_ids=jnp.zeros((1, 5))),
     "segment_ids must be integer"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, lengths=jnp.array([5, 5])),
     "lengths must have shape"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, chunk_size=0), "chunk_size must be"),
    (lambda: ops.slab_attention(_Q, _Q, _Q, implementation="pallas"),
     "implementation='pallas' is not a tier"),
    (lambda: ops.performer(_Q, _Q, _Q, jnp.ones((8, 3))), r"projection must be \[M, K=4\]"),
    (lambda: ops.performer(_Q, _Q, _Q, jnp.ones((8, 4)), scale=-1.0), "scale must be"),
    (lambda: ops.cosformer(_Q, _Q, _Q, max_len=3), "max_len must be >= the sequence"),
    (lambda: ops.cosformer(_Q, _Q, _Q, max_len=0), "max_len must be a positive int"),
    (lambda: ops.cosformer(_Q, _Q, _Q, positions=jnp.zeros((1, 5))),
     "positions must be integer"),
    (lambda: ops.cottention(_Q, _Q, _Q, jnp.ones(3)), r"length_exponent must have shape"),
    (lambda: ops.lln_attention(_Q, _Q, _Q), "causal lln_attention needs alpha and beta"),
    (lambda: ops.lln_attention(_Q, _Q, _Q, alpha=1.0), "give both alpha and beta"),
    (lambda: ops.lln_attention(_Q, _Q, _Q, 1.0, float("nan")), "beta must be finite"),
    (lambda: ops.focused_linear_attention(_Q, _Q, _Q, power=0), "power must be"),
    (lambda: ops.performer_features(jax.random.key(0), 0, 4), "num_features must be"),
    (lambda: ops.slab_attention_step(_Q[:, 0], _Q[:, 0], _Q[:, 0], jnp.zeros((1, 2, 4, 4))),
     r"state must be \(1, 2, 4, 5\)"),
    (lambda: ops.cosformer_step(_Q[:, 0], _Q[:, 0], _Q[:, 0], jnp.zeros((1, 2, 8, 5)),
                                jnp.zeros((2,), jnp.int32), max_len=8),
     "position must have shape"),
    (lambda: ops.efficient_attention_step(_Q[:, 0, 0], _Q[:, 0], _Q[:, 0],
                                          jnp.zeros((1, 2, 4, 6))), "q_t must be"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_non_causal_lln_moment_matches_by_default(rng):
  """Without alpha, beta the non-causal form uses lln_moment_matching of the inputs'
  per-head standard deviations."""
  x = _inputs(rng, 9, jnp.float32)
  sd = lambda a: jnp.std(a, axis=(0, 1, 3))
  alpha, beta = ops.lln_moment_matching(sd(x["q"]), sd(x["k"]))
  want, _ = ops.lln_attention(**x, alpha=alpha, beta=beta, causal=False)
  got, _ = ops.lln_attention(**x, causal=False)
  assert rel_err(got, want) < 1e-6
  # Nahshan et al. 2024, §4.1: alpha sigma_q = beta sigma_k = sigma~ and the fitted LLN
  # variance 2 a sigma~^2 + b equals softmax's sigma_q^2 sigma_k^2 (a, b of the authors'
  # code, github.com/ynahshan/linear-lognormal-attention).
  a, b = 0.14855178144710912, -0.35487039130661086
  tilde = alpha * sd(x["q"])
  assert np.allclose(tilde, beta * sd(x["k"]), rtol=1e-5)
  assert np.allclose(2 * a * tilde ** 2 + b, (sd(x["q"]) * sd(x["k"])) ** 2, rtol=1e-5)
  # Unit-variance q, k (the lln_attention mixer): sigma~^2 = (1 - b) / (2 a) ~ 4.56.
  assert np.isclose(ops.lln_moment_matching(1.0, 1.0)[0] ** 2, (1 - b) / (2 * a))
