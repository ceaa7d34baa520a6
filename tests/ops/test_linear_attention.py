"""Linear attention against the float64 NumPy oracle, one shared suite per tier.

``LinearAttentionSuite`` holds every check; ``TestReference`` and ``TestXla`` run it for
their tier (a new tier subclasses it and inherits them all). Each check compares the
output, the final state and every gradient (q, k, v, each gate, the initial state) with
``tests/oracle_linear.py`` as the relative error ``||x - ref|| / ||ref||`` against a
per-dtype tolerance. The loss is ``<o, dout> + <final_state, dfinal>``, so gradients flow
through the final state too. The xla tier cycles chunk sizes 16, 32 and 64 over the
cases, so lengths 1, 63, 64, 65, 257 and 1000 cover a single padded chunk, exact
multiples and ragged last chunks; packed documents put boundaries inside chunks, on
chunk edges and make documents of one token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import linear_pallas, pallas_target
from pallas_kernels.gpu import _interpret as gpu_interpreter
from tests import oracle_linear as oracle

# Relative error bounds. bfloat16 is compared with the oracle run on the bf16-rounded
# inputs, so only the computation's own error counts.
TOLERANCE = {
    jnp.float32: {"out": 1e-4, "final_state": 1e-4, "grad": 1e-3},
    jnp.bfloat16: {"out": 2e-2, "final_state": 2e-2, "grad": 2e-2},
}

MECHANISMS = ("linear_attn", "retention", "simple_gla", "gla", "delta_rule",
              "gated_delta_rule")
DELTA_OPS = ("delta_rule", "gated_delta_rule")
# One op per code path of the chunked tier (no gate, scalar gate, per-channel gate, delta
# rule); retention and delta_rule share theirs and meet packed rows in CASES.
PACKED_OPS = ("linear_attn", "simple_gla", "gla", "gated_delta_rule")


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  ref_norm = np.linalg.norm(ref)
  diff = np.linalg.norm(x - ref)
  return float(diff if ref_norm == 0 else diff / ref_norm)


def to_f64(x) -> np.ndarray | None:
  return None if x is None else np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
  """One call: attnlab's arguments and the oracle's matching ones.

  ``diff`` holds the differentiated arguments (q, k, v, gates, initial_state), ``data``
  the other arrays (segment_ids), ``static`` the Python options of attnlab's call and
  ``oracle_static`` the oracle's (which differ only for a callable feature map).
  """

  op: str
  rng: np.random.Generator
  batch: int
  length: int
  heads: int
  key_dim: int
  value_dim: int
  dtype: Any
  diff: dict = dataclasses.field(default_factory=dict)
  data: dict = dataclasses.field(default_factory=dict)
  static: dict = dataclasses.field(default_factory=dict)
  oracle_static: dict = dataclasses.field(default_factory=dict)
  dout: Any = None
  dfinal: Any = None

  @property
  def state_shape(self):
    extra = 1 if self.static.get("normalize") else 0
    return (self.batch, self.heads, self.key_dim, self.value_dim + extra)

  @property
  def with_final_state(self):
    return self.static.get("output_final_state", False)

  def normal(self, shape, dtype=None):
    return jnp.asarray(self.rng.standard_normal(shape), dtype or self.dtype)

  def expected(self) -> dict:
    """The oracle's output, final state and gradients, keyed like ``run``'s results."""
    static = {n: x for n, x in self.static.items() if n != "output_final_state"}
    static.update(self.oracle_static)
    res = oracle.OPS[self.op](
        **{n: to_f64(x) for n, x in self.diff.items()}, **static,
        segment_ids=None if "segment_ids" not in self.data else np.asarray(
            self.data["segment_ids"]),
        dout=to_f64(self.dout), dfinal=to_f64(self.dfinal))
    expected = {"out": res.out}
    if self.with_final_state:
      expected["final_state"] = res.final_state
    expected.update({name: res.grads[name] for name in self.diff})
    return expected


def gate_shape(op, batch, length, heads, key_dim):
  return (batch, length, heads, key_dim) if op == "gla" else (batch, length, heads)


@dataclasses.dataclass(frozen=True)
class Case:
  """``strength`` s draws log gates ``g = -s * uniform(0.5, 1)`` per token (per head for
  retention's ``g_gamma``); ``features`` add options to the problem."""

  name: str
  op: str
  length: int
  strength: float = 1.0
  features: tuple = ()
  batch: int = 2
  heads: int = 2
  key_dim: int = 16
  value_dim: int = 32

  def __str__(self):
    return self.name

  def problem(self, rng, dtype=jnp.float32) -> Problem:
    b, t, h, kd, vd = self.batch, self.length, self.heads, self.key_dim, self.value_dim
    p = Problem(self.op, rng, b, t, h, kd, vd, dtype)
    p.static["output_final_state"] = True
    p.diff["q"] = p.normal((b, t, h, kd))
    k = rng.standard_normal((b, t, h, kd))
    if self.op in DELTA_OPS:
      # Without use_qk_l2norm the delta rule is stable only for beta |k|^2 < 2: the
      # inputs then carry unit-norm keys (the op still gets gradients w.r.t. them).
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    p.diff["k"] = jnp.asarray(k, dtype)
    p.diff["v"] = p.normal((b, t, h, vd))
    if self.op in ("simple_gla", "gla", "gated_delta_rule"):
      p.diff["g"] = jnp.asarray(
          -self.strength * rng.uniform(0.5, 1.0, gate_shape(self.op, b, t, h, kd)), dtype)
    if self.op == "retention":
      p.diff["g_gamma"] = jnp.asarray(-self.strength * rng.uniform(0.5, 1.0, h), dtype)
    if self.op in DELTA_OPS:
      p.diff["beta"] = jnp.asarray(sigmoid(rng.standard_normal((b, t, h))), dtype)
    for add in self.features:
      add(p)
    p.dout = p.normal((b, t, h, vd))
    if p.with_final_state:
      p.dfinal = p.normal(p.state_shape, jnp.float32)
    return p


# Features: each adds one option to a problem, to attnlab's call and to the oracle alike.


def initial_state(p):
  """Call after ``normalize`` (the state shape depends on it)."""
  p.diff["initial_state"] = p.normal(p.state_shape, jnp.float32)


def packed_ids(rng, batch, length, doc_rate=0.08):
  """Packed documents: ids change where a document starts and need not increase (the
  contract is "the state restarts where the id changes"). Row 0 gets starts on the
  16-token grid, row 1 a one-token document near the start."""
  starts = rng.random((batch, length)) < doc_rate
  starts[0, 16::16] = True
  if batch > 1 and length > 7:
    starts[1, 5:7] = True
  starts[:, 0] = False
  return (np.cumsum(starts, axis=1) % 3 + 2).astype(np.int32)


def segment_ids(p):
  p.data["segment_ids"] = jnp.asarray(packed_ids(p.rng, p.batch, p.length))


def scale(value):
  def add(p):
    p.static["scale"] = value
  return add


def feature_map(name):
  def add(p):
    p.static["feature_map"] = name
  return add


def softplus_feature_map(p):
  """A callable feature map (attnlab's side) and its float64 twin (the oracle's)."""
  p.static["feature_map"] = jax.nn.softplus
  p.oracle_static["feature_map"] = oracle.softplus


def normalize(p):
  p.static["normalize"] = True


def l2norm(p):
  p.static["use_qk_l2norm"] = True


def default_gamma(p):
  del p.diff["g_gamma"]


def no_final_state(p):
  p.static["output_final_state"] = False


def strong(strength):
  """Gates of exactly ``-strength`` per token (the case's draw is replaced)."""
  def add(p):
    name = "g" if "g" in p.diff else "g_gamma"
    p.diff[name] = jnp.full(p.diff[name].shape, -strength, p.diff[name].dtype)
  return add


# The float32 cases: lengths 1, 63, 64, 65, 257 and 1000 over the ops (1000 twice, gla's
# costly chunked form once per length class), gate strengths 0.01 to 10.
CASES = [
    Case("linear_T1_init", "linear_attn", 1, features=(initial_state,)),
    Case("linear_T63_plain_no_final", "linear_attn", 63, features=(no_final_state,)),
    Case("linear_T63_elu_normalize_init", "linear_attn", 63,
         features=(feature_map("elu_plus_one"), normalize, initial_state)),
    Case("linear_T64_relu_docs", "linear_attn", 64,
         features=(feature_map("relu"), segment_ids)),
    Case("linear_T65_softplus_scale_docs_init", "linear_attn", 65,
         features=(softplus_feature_map, scale(0.3), segment_ids, initial_state)),
    Case("linear_T257_elu_normalize_docs_init", "linear_attn", 257,
         features=(feature_map("elu_plus_one"), normalize, segment_ids, initial_state)),
    Case("retention_T1_init", "retention", 1, 0.1, features=(initial_state,)),
    Case("retention_T63_default_gamma_init", "retention", 63,
         features=(default_gamma, initial_state)),
    Case("retention_T64_s0.01_docs", "retention", 64, 0.01, features=(segment_ids,)),
    Case("retention_T65_s1_docs_init_scale", "retention", 65, 1.0,
         features=(segment_ids, initial_state, scale(0.5))),
    Case("retention_T257_default_gamma_docs", "retention", 257,
         features=(default_gamma, segment_ids)),
    Case("simple_gla_T1_init", "simple_gla", 1, 1.0, features=(initial_state,)),
    Case("simple_gla_T63_s0.01", "simple_gla", 63, 0.01),
    Case("simple_gla_T64_s10_docs_init", "simple_gla", 64, 10.0,
         features=(segment_ids, initial_state)),
    Case("simple_gla_T65_s1_docs", "simple_gla", 65, 1.0, features=(segment_ids,)),
    Case("simple_gla_T257_s0.1_docs_init", "simple_gla", 257, 0.1,
         features=(segment_ids, initial_state)),
    Case("gla_T65_s10_docs_init", "gla", 65, 10.0, features=(segment_ids, initial_state)),
    Case("gla_T64_s1_init", "gla", 64, 1.0, features=(initial_state,)),
    Case("gla_T63_s0.01_docs", "gla", 63, 0.01, features=(segment_ids,)),
    Case("gla_T1000_s1_docs_init_scale", "gla", 1000, 1.0,
         features=(segment_ids, initial_state, scale(0.4))),
    Case("delta_T1_init", "delta_rule", 1, features=(initial_state,)),
    Case("delta_T63_l2norm", "delta_rule", 63, features=(l2norm,)),
    Case("delta_T64_docs_init", "delta_rule", 64, features=(segment_ids, initial_state)),
    Case("delta_T65_l2norm_docs_init_scale", "delta_rule", 65,
         features=(l2norm, segment_ids, initial_state, scale(0.5))),
    Case("delta_T257_docs_init", "delta_rule", 257, features=(segment_ids, initial_state)),
    Case("gated_delta_T1_l2norm_init", "gated_delta_rule", 1, 1.0,
         features=(l2norm, initial_state)),
    Case("gated_delta_T63_s0.01_init", "gated_delta_rule", 63, 0.01,
         features=(initial_state,)),
    Case("gated_delta_T64_s10_l2norm_docs", "gated_delta_rule", 64, 10.0,
         features=(l2norm, segment_ids)),
    Case("gated_delta_T65_s1_l2norm_docs_init", "gated_delta_rule", 65, 1.0,
         features=(l2norm, segment_ids, initial_state)),
    Case("gated_delta_T257_s0.1_docs_init", "gated_delta_rule", 257, 0.1,
         features=(segment_ids, initial_state)),
    Case("gated_delta_T1000_s0.1_l2norm_docs_init", "gated_delta_rule", 1000, 0.1,
         features=(l2norm, segment_ids, initial_state)),
]
CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)
CASES_OF_OP = {op: [c for c in CASES if c.op == op] for op in MECHANISMS}


def cases(*names):
  return [CASE_BY_NAME[n] for n in names]


BF16_CASES = cases("linear_T65_softplus_scale_docs_init",
                   "linear_T63_elu_normalize_init", "retention_T63_default_gamma_init",
                   "simple_gla_T257_s0.1_docs_init", "gla_T65_s10_docs_init",
                   "delta_T65_l2norm_docs_init_scale", "gated_delta_T65_s1_l2norm_docs_init")
SWEEP_CASES = cases("simple_gla_T65_s1_docs")
STRONG_CASES = [
    Case(f"{op}_T130_g{-s}_docs_init", op, 130, s, (strong(s), segment_ids, initial_state)
         + ((l2norm,) if op in DELTA_OPS else ()))
    for op, s in (("simple_gla", 10.0), ("gated_delta_rule", 10.0), ("retention", 20.0),
                  ("gla", 20.0), ("gated_delta_rule", 20.0))
]


# ---------------------------------------------------------------------------- runner


def run(problem: Problem, implementation, chunk_size=64, *, jit=True):
  """attnlab's output, final state and the gradients of
  ``<o, dout> + <final_state, dfinal>`` w.r.t. ``problem.diff``."""
  fn = getattr(ops, problem.op)
  static = dict(problem.static, implementation=implementation, chunk_size=chunk_size)

  def forward_backward(diff, data, cotangents):
    (out, final), vjp = jax.vjp(lambda d: fn(**d, **data, **static), diff)
    return out, final, vjp(cotangents)[0]

  if jit:
    forward_backward = jax.jit(forward_backward)
  return forward_backward(problem.diff, problem.data, (problem.dout, problem.dfinal))


def check_structure(problem: Problem, out, final, grads):
  assert out.shape == (problem.batch, problem.length, problem.heads, problem.value_dim), (
      out.shape)
  assert out.dtype == problem.diff["v"].dtype, out.dtype
  if problem.with_final_state:
    assert final.shape == problem.state_shape, final.shape
    assert final.dtype == jnp.float32, final.dtype
  else:
    assert final is None, "final_state must be None unless output_final_state=True"
  assert set(grads) == set(problem.diff), (set(grads), set(problem.diff))
  for name, g in grads.items():
    assert g.shape == problem.diff[name].shape, (name, g.shape)
    assert g.dtype == problem.diff[name].dtype, (name, g.dtype)


def assert_matches(problem: Problem, out, final, grads, expected, tolerance=None):
  """Every output against the oracle; reports all relative errors on failure."""
  tolerance = tolerance or TOLERANCE[problem.dtype]
  check_structure(problem, out, final, grads)
  got = dict(grads, out=out)
  if problem.with_final_state:
    got["final_state"] = final
  assert set(got) == set(expected), (set(got), set(expected))
  errors, failed = {}, []
  for name, ref in expected.items():
    x = np.asarray(jnp.asarray(got[name]).astype(jnp.float32))
    if not np.all(np.isfinite(x)):
      failed.append(f"{name}: non-finite values")
      continue
    errors[name] = rel_err(x, ref)
    bound = tolerance.get(name, tolerance["grad"])
    if not errors[name] <= bound:
      failed.append(f"{name}: rel err {errors[name]:.3g} > {bound:g}")
  assert not failed, f"{failed}; all relative errors: {errors}"
  return errors


def time_major(x):
  return jnp.moveaxis(x, 1, 0)


def decode(problem: Problem, state, start):
  """Tokens ``start:`` through ``<op>_step`` from ``state``: ``(o [B, T', H, V], state)``."""
  step = getattr(ops, f"{problem.op}_step")
  options = {n: x for n, x in problem.static.items()
             if n in ("scale", "normalize", "feature_map", "use_qk_l2norm")}
  gates = [n for n in ("g", "beta") if n in problem.diff]
  if "g_gamma" in problem.diff:
    options["g_gamma"] = problem.diff["g_gamma"]
  xs = [time_major(problem.diff[n][:, start:]) for n in ("q", "k", "v", *gates)]

  @jax.jit
  def scan(state, xs):
    def body(state, x):
      o_t, state = step(*x, state=state, **options)
      return state, o_t
    final, o = jax.lax.scan(body, state, xs)
    return time_major(o), final

  return scan(state, xs)


# ----------------------------------------------------------------------------- suite


class LinearAttentionSuite:
  """Every check of one tier. Subclasses set ``implementation`` and the chunk sizes."""

  implementation: str
  chunk_sizes: tuple = (64,)       # cycled over the cases
  sweep_chunk_sizes: tuple = ()    # swept on a few cases; empty for tiers without chunks
  property_dtype = jnp.float32     # the dtype and head dims of the property tests' problems
  property_dims: dict = {}

  def require(self, case: Case):
    """Skip (with the reason) a case this tier refuses; every case runs by default."""

  def property_problem(self, case: Case, rng) -> Problem:
    case = dataclasses.replace(case, **self.property_dims)
    self.require(case)
    return case.problem(rng, self.property_dtype)

  def chunk_size(self, case: Case):
    """Cycled over each op's cases, so every op meets every chunk size."""
    index = CASES_OF_OP[case.op].index(case) if case in CASES else 0
    return self.chunk_sizes[index % len(self.chunk_sizes)]

  def check(self, case: Case, rng, dtype=jnp.float32, chunk_size=None):
    problem = case.problem(rng, dtype)
    out, final, grads = run(problem, self.implementation,
                            chunk_size or self.chunk_size(case))
    return problem, assert_matches(problem, out, final, grads, problem.expected())

  @pytest.mark.parametrize("case", CASES, ids=str)
  def test_float32_matches_oracle(self, case, rng):
    self.check(case, rng)

  @pytest.mark.parametrize("case", BF16_CASES, ids=str)
  def test_bfloat16_matches_oracle(self, case, rng):
    self.check(case, rng, jnp.bfloat16)

  @pytest.mark.parametrize("case", SWEEP_CASES, ids=str)
  def test_chunk_sizes(self, case, rng):
    if not self.sweep_chunk_sizes:
      pytest.skip(f"the {self.implementation} tier has no chunks")
    for chunk_size in self.sweep_chunk_sizes:
      self.check(case, rng, chunk_size=chunk_size)

  @pytest.mark.parametrize("case", STRONG_CASES, ids=str)
  def test_strong_gates(self, case, rng):
    """Per-token log gates of -10 and -20: everything finite and equal to the oracle,
    the decay gradient included. ``exp`` of a chunk's summed gates underflows and must
    never overflow; the decay gradient is tiny (``~e^g``), so a form that gets it as a
    difference of O(1) terms (``exp(b_t - b_s)`` with ``b`` a cumulative sum) loses it."""
    self.check(case, rng)

  @pytest.mark.parametrize("op", PACKED_OPS)
  def test_packed_documents_equal_documents_one_by_one(self, op, rng):
    """One row of packed documents (boundaries inside chunks, on a chunk edge, a
    one-token document) == a batch of the documents, each in its own row, right-padded
    with random tokens whose outputs get no cotangent. ``initial_state`` reaches the
    first document only; the final state is the last document's."""
    lengths = (20, 1, 11, 16, 42)   # starts at 20, 21, 32 (a chunk edge), 48
    longest = max(lengths)
    assert lengths[-1] == longest   # the last document is unpadded: its final state counts
    features = ((feature_map("elu_plus_one"), normalize) if op == "linear_attn" else
                (l2norm,) if op == "gated_delta_rule" else ())
    docs = self.property_problem(Case("docs", op, longest, 1.0,
                                      features=features + (initial_state,),
                                      batch=len(lengths)), rng)
    live = np.arange(longest)[None, :] < np.asarray(lengths)[:, None]       # [D, L]
    # Only the first document starts from the initial state.
    docs.diff["initial_state"] = docs.diff["initial_state"] * jnp.asarray(
        (np.arange(len(lengths)) == 0)[:, None, None, None], jnp.float32)
    docs.dout = docs.dout * jnp.asarray(live[:, :, None, None], docs.dout.dtype)
    docs.dfinal = docs.dfinal * jnp.asarray(
        (np.arange(len(lengths)) == len(lengths) - 1)[:, None, None, None], jnp.float32)

    def pack(x):
      return jnp.concatenate([x[d, :n] for d, n in enumerate(lengths)])[None]

    packed = dataclasses.replace(
        docs, batch=1, length=sum(lengths),
        diff={n: (x[:1] if n == "initial_state" else x if n == "g_gamma" else pack(x))
              for n, x in docs.diff.items()},
        data={"segment_ids": jnp.asarray(
            np.repeat(np.arange(len(lengths)) % 2, lengths)[None], jnp.int32)},
        dout=pack(docs.dout), dfinal=docs.dfinal[-1:])
    chunk_size = self.chunk_sizes[0]
    out, final, grads = run(packed, self.implementation, chunk_size)
    out_docs, final_docs, grads_docs = run(docs, self.implementation, chunk_size)
    tol = TOLERANCE[self.property_dtype]
    errors = {"out": rel_err(out, pack(out_docs)),
              "final_state": rel_err(final, final_docs[-1:])}
    for name, g in grads.items():
      want = (grads_docs[name][:1] if name == "initial_state" else
              grads_docs[name] if name == "g_gamma" else pack(grads_docs[name]))
      errors[name] = rel_err(g, want)
    bounds = {n: tol.get(n, tol["grad"]) for n in errors}
    assert all(errors[n] <= bounds[n] for n in errors), errors
    assert_matches(packed, out, final, grads, packed.expected())

  @pytest.mark.parametrize("op", MECHANISMS)
  def test_prefill_then_decode(self, op, rng):
    """The op on the first 23 tokens (with its final state), then ``<op>_step`` token by
    token, == the full forward, and the oracle."""
    features = ((feature_map("elu_plus_one"), normalize) if op == "linear_attn" else
                (default_gamma,) if op == "retention" else
                (l2norm,) if op in DELTA_OPS else ())
    problem = self.property_problem(Case("prefill", op, 40, 1.0, features + (initial_state,)),
                                    rng)
    prefill = 23
    chunk_size = self.chunk_sizes[-1]
    call = dict(problem.static, implementation=self.implementation, chunk_size=chunk_size)
    fn = getattr(ops, op)
    full_out, full_final = fn(**problem.diff, **call)
    head = {n: (x if n in ("initial_state", "g_gamma") else x[:, :prefill])
            for n, x in problem.diff.items()}
    out_head, state = fn(**head, **call)
    out_tail, final = decode(problem, state, prefill)
    out = jnp.concatenate([out_head, out_tail], axis=1)
    assert out.dtype == problem.diff["v"].dtype and final.dtype == jnp.float32
    expected = problem.expected()
    tol = TOLERANCE[self.property_dtype]
    errors = {"out_vs_full": rel_err(out, full_out),
              "final_vs_full": rel_err(final, full_final),
              "out_vs_oracle": rel_err(out, expected["out"]),
              "final_vs_oracle": rel_err(final, expected["final_state"])}
    assert all(e <= tol["out"] for e in errors.values()), errors

  @pytest.mark.parametrize("case", [
      Case("gated_delta_eager", "gated_delta_rule", 33, 1.0,
           (l2norm, segment_ids, initial_state)),
  ], ids=str)
  def test_jit_matches_eager(self, case, rng):
    problem = self.property_problem(case, rng)
    chunk_size = self.chunk_sizes[0]
    eager = run(problem, self.implementation, chunk_size, jit=False)
    jitted = run(problem, self.implementation, chunk_size, jit=True)
    # float32 agrees to rounding; a bfloat16 result may differ in single elements by one
    # ulp (2^-8) where XLA sums float32 terms in another order before the cast.
    bound = 1e-6 if problem.dtype == jnp.float32 else 1e-4
    for name, x, y in zip(("out", "final_state", "grads"), eager, jitted):
      for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert rel_err(a, b) <= bound, name

  @pytest.mark.parametrize("case", [
      Case("gla_causal", "gla", 65, 1.0, (segment_ids,)),
      Case("gated_delta_causal", "gated_delta_rule", 65, 1.0, (l2norm, segment_ids)),
  ], ids=str)
  def test_gradients_are_causal_and_stay_in_the_document(self, case, rng):
    """For a few rows t, the gradient of ``o_t`` w.r.t. every per-token input is exactly
    zero at positions after t; w.r.t. q it is zero off t; w.r.t. k, v and beta it is
    exactly zero in earlier documents, and w.r.t. v nonzero in t's document up to t."""
    problem = self.property_problem(case, rng)
    problem.static["output_final_state"] = False
    t_len = problem.length
    rows = [0, 1, 15, 16, 17, 31, 32, 40, t_len - 1]
    onehot = np.zeros((len(rows), 1, t_len, 1, 1), np.float32)
    onehot[np.arange(len(rows)), 0, rows] = 1.0
    cotangents = problem.dout[None] * jnp.asarray(onehot, problem.dout.dtype)
    fn = getattr(ops, problem.op)
    static = dict(problem.static, implementation=self.implementation,
                  chunk_size=self.chunk_sizes[0])

    @jax.jit
    def row_grads(diff, data, cots):
      _, vjp = jax.vjp(lambda d: fn(**d, **data, **static)[0], diff)
      return jax.vmap(lambda c: vjp(c)[0])(cots)

    grads = jax.tree.map(np.asarray, row_grads(problem.diff, problem.data, cotangents))
    ids = np.asarray(problem.data["segment_ids"])
    doc = np.cumsum(np.concatenate([np.zeros((problem.batch, 1), bool),
                                    ids[:, 1:] != ids[:, :-1]], 1), 1)        # [B, T]
    for r, t in enumerate(rows):
      for name, g in grads.items():
        support = np.abs(g[r]).reshape(problem.batch, t_len, -1).max(-1) > 0  # [B, T]
        assert not support[:, t + 1:].any(), f"row {t}: d o_t / d {name} after t"
        if name == "q":
          assert not np.delete(support, t, axis=1).any(), f"row {t}: dq off t"
        earlier = doc < doc[:, t:t + 1]
        if name in ("k", "v", "beta"):
          assert not (support & earlier).any(), f"row {t}: d{name} in an earlier document"
        if name == "v":
          same = (doc == doc[:, t:t + 1]) & (np.arange(t_len)[None] <= t)
          assert np.array_equal(support, same), f"row {t}: dv support"


class TestReference(LinearAttentionSuite):
  implementation = "reference"


class TestXla(LinearAttentionSuite):
  implementation = "xla"
  chunk_sizes = (16, 32, 64)
  sweep_chunk_sizes = (16, 32, 64, 24)  # 24: GLA sub-chunks of 12


class TestPallasTpuInterpret(LinearAttentionSuite):
  """The pallas tier: the Mosaic TPU chunked kernels in TPU interpret mode on CPU (no TPU
  is reachable here). Chunk sizes are multiples of 16 (the kernels' sub-chunk); blocks
  of several chunks per grid step are the kernels' own tests'."""

  implementation = "pallas"
  chunk_sizes = (16, 32)
  sweep_chunk_sizes = (16, 48)

  @pytest.fixture(autouse=True)
  def _tpu_interpreter(self):
    with pallas_target.interpret_kernels("tpu"):
      yield


class TestPallasGpu(LinearAttentionSuite):
  """The pallas tier on an H100: the Mosaic GPU kernels (simple GLA family, GLA and the
  delta rules), compiled, on the suite's cases as bfloat16 with key and value head dims of
  64 and chunks of 64 (the kernels' operands). float32 is refused with a reason
  (checked in ``test_pallas_tier_says_why_it_cannot_run``). On CPU the kernels run
  interpreted in ``tests/pallas_kernels/gpu/``."""

  implementation = "pallas"
  chunk_sizes = (64,)

  @pytest.fixture(autouse=True)
  def _gpu(self):
    if jax.default_backend() != "gpu":
      pytest.skip("compiled Mosaic GPU kernels need an H100")

  sweep_chunk_sizes = (64,)

  # The property tests (packed == one by one, prefill then decode, jit == eager, causal
  # gradients) run on the kernel's operands: bfloat16, head dims 64.
  property_dtype = jnp.bfloat16
  property_dims = dict(key_dim=64, value_dim=64)

  def require(self, case):
    if case.op not in GPU_OPS:
      pytest.skip(f"no Mosaic GPU kernel for {case.op} yet (refused with a reason)")
    if case.length < linear_pallas.MIN_GPU_LENGTH:
      pytest.skip("refused on a GPU (XLA's emitter fails on the padding of very short "
                  "sequences); dispatch runs xla")
    if normalize in case.features:
      pytest.skip("normalize adds a value column (V = 65, zero-padded to 128 on a GPU) and "
                  "these cases' identity features let the normalizer cancel, beyond "
                  "bfloat16; the padded path: test_gpu_kernels_run_on_zero_padded_head_dims")

  def check(self, case, rng, dtype=jnp.bfloat16, chunk_size=None):
    case = dataclasses.replace(case, key_dim=64, value_dim=64)
    self.require(case)
    return super().check(case, rng, jnp.bfloat16, chunk_size)


GPU_OPS = ("linear_attn", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


# ---------------------------------------------------------------------- decode steps


@pytest.mark.parametrize("case", [
    Case("linear_identity", "linear_attn", 19, features=(initial_state,)),
    Case("linear_relu_normalize", "linear_attn", 19,
         features=(feature_map("relu"), normalize, initial_state, scale(0.5))),
    Case("linear_softplus", "linear_attn", 19, features=(softplus_feature_map,
                                                         initial_state)),
    Case("retention_default", "retention", 19, features=(default_gamma, initial_state)),
    Case("retention_gamma", "retention", 19, 1.0, features=(initial_state,)),
    Case("simple_gla", "simple_gla", 19, 1.0, features=(initial_state,)),
    Case("gla", "gla", 19, 1.0, features=(initial_state, scale(0.3))),
    Case("delta", "delta_rule", 19, features=(initial_state,)),
    Case("delta_l2norm", "delta_rule", 19, features=(l2norm, initial_state)),
    Case("gated_delta_l2norm", "gated_delta_rule", 19, 1.0, features=(l2norm, initial_state)),
], ids=str)
def test_steps_from_initial_state_equal_the_forward(case, rng):
  """Every token through ``<op>_step`` from ``initial_state`` == the oracle's forward,
  and the op's reference tier."""
  problem = case.problem(rng)
  out, final = decode(problem, problem.diff["initial_state"], 0)
  assert out.dtype == problem.diff["v"].dtype and final.dtype == jnp.float32
  assert final.shape == problem.state_shape
  expected = problem.expected()
  full_out, full_final = getattr(ops, problem.op)(**problem.diff, **problem.static,
                                                  implementation="reference")
  tol = TOLERANCE[jnp.float32]["out"]
  errors = {"out": rel_err(out, expected["out"]),
            "final_state": rel_err(final, expected["final_state"]),
            "out_vs_reference": rel_err(out, full_out),
            "final_vs_reference": rel_err(final, full_final)}
  assert all(e <= tol for e in errors.values()), errors


# -------------------------------------------------------------------------- registry


def test_mechanisms_and_tiers_are_registered():
  assert set(MECHANISMS) <= set(ops.mechanisms())
  for name in MECHANISMS:
    assert {"reference", "xla", "pallas"} <= set(ops.implementations(name)), name


def test_pallas_tier_says_why_it_cannot_run(rng):
  """Without a TPU (or its interpreter) the kernels refuse with the reason, and so does a
  GPU for float32 and for head dims above 128, and a
  TPU for an odd chunk size; automatic dispatch never picks the interpret-only kernels."""
  problem = Case("refused", "simple_gla", 33, 1.0).problem(rng)
  call = lambda **kw: ops.simple_gla(**problem.diff, **problem.static, **kw)
  if jax.default_backend() not in ("tpu", "gpu"):
    with pytest.raises(ValueError, match="run on TPU"):
      call(implementation="pallas")
  with pallas_target.interpret_kernels("gpu"):
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
      call(implementation="pallas")
    wide = Case("refused_wide", "simple_gla", 33, 1.0, key_dim=160).problem(rng,
                                                                        jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims up to 128"):
      ops.simple_gla(**wide.diff, **wide.static, implementation="pallas")
  with pallas_target.interpret_kernels("tpu"):
    with pytest.raises(ValueError, match="multiples of 16"):
      call(implementation="pallas", chunk_size=24)
    auto, _ = call()
  xla, _ = call(implementation="xla")
  assert np.array_equal(np.asarray(auto), np.asarray(xla))


@pytest.mark.skipif(not gpu_interpreter.available(),
                    reason="this jax has no Mosaic GPU interpreter")
@pytest.mark.parametrize("case", [
    Case("delta_K16_V32_docs_init", "delta_rule", 70, features=(segment_ids, initial_state)),
    Case("gla_K16_V32_init", "gla", 70, 1.0, features=(initial_state,)),
    # Positive features keep the normalizer away from zero (its bfloat16 rounding then
    # stays a bfloat16-sized error of the output).
    Case("linear_elu_normalize_V33", "linear_attn", 70,
         features=(feature_map("elu_plus_one"), normalize)),
], ids=str)
def test_gpu_kernels_run_on_zero_padded_head_dims(case, rng):
  """Head dims the Mosaic GPU kernels do not take (K = 16, V = 32, and V + 1 = 33 from
  ``normalize``'s extra value column) run zero-padded to 64 and cut back: in the
  interpreter, bfloat16, output, final state and every gradient against the oracle."""
  problem = case.problem(rng, jnp.bfloat16)
  with pallas_target.interpret_kernels("gpu"):
    out, final, grads = run(problem, "pallas", 64, jit=False)
  assert_matches(problem, out, final, grads, problem.expected())


def test_automatic_dispatch_is_not_the_reference(rng):
  """``implementation=None`` runs a fast tier; on CPU that is xla, bit for bit."""
  problem = Case("auto", "gated_delta_rule", 33, 1.0, (segment_ids,)).problem(rng)
  auto = ops.gated_delta_rule(**problem.diff, **problem.data, **problem.static)
  if jax.default_backend() == "cpu":
    xla = ops.gated_delta_rule(**problem.diff, **problem.data, **problem.static,
                               implementation="xla")
    for a, b in zip(auto, xla):
      np.testing.assert_array_equal(a, b)
  assert rel_err(auto[0], problem.expected()["out"]) <= TOLERANCE[jnp.float32]["out"]


# ---------------------------------------------------------------------------- memory


def _forward_backward_temp_bytes(op, length):
  b, h, d = 1, 2, 64
  spec = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
  gates = {"gla": {"g": spec},
           "gated_delta_rule": {"g": jax.ShapeDtypeStruct((b, length, h), jnp.float32),
                                "beta": jax.ShapeDtypeStruct((b, length, h), jnp.float32)}}[op]
  fn = getattr(ops, op)

  def forward_backward(q, k, v, gates, do):
    o, vjp = jax.vjp(lambda q, k, v, gates: fn(q, k, v, **gates, implementation="xla")[0],
                     q, k, v, gates)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(spec, spec, spec, gates, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_xla_temp_memory_is_linear_in_length(op):
  """4x the length needs at most ~4x the temporaries of the compiled forward+backward
  (a [T, T] buffer would need 16x). Returns o and every gradient, so what remains in
  temporaries is what the algorithm itself allocates."""
  small = _forward_backward_temp_bytes(op, 4096)
  large = _forward_backward_temp_bytes(op, 16384)
  assert large <= 4.5 * small, (small, large)


# ------------------------------------------------------------------------ the oracle


def _central_difference(f, x, eps=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    old = x[idx]
    x[idx] = old + eps
    plus = f()
    x[idx] = old - eps
    minus = f()
    x[idx] = old
    grad[idx] = (plus - minus) / (2 * eps)
  return grad


class TestOracle:
  """The oracle against central finite differences (gradients) and against the
  parallel, attention-like form of the decaying recurrences (forward), in float64."""

  @pytest.mark.parametrize("op,options", [
      ("linear_attn", {}),
      ("linear_attn", {"normalize": True, "feature_map": "elu_plus_one"}),
      ("linear_attn", {"feature_map": "relu", "scale": 0.7}),
      ("linear_attn", {"normalize": True, "feature_map": oracle.softplus}),
      ("retention", {}),
      ("retention", {"g_gamma": None}),
      ("simple_gla", {}),
      ("gla", {"scale": 0.3}),
      ("delta_rule", {}),
      ("delta_rule", {"use_qk_l2norm": True}),
      ("gated_delta_rule", {}),
      ("gated_delta_rule", {"use_qk_l2norm": True}),
  ], ids=lambda x: x if isinstance(x, str) else "-".join(
      f"{k}={getattr(v, '__name__', v)}" for k, v in x.items()) or "plain")
  def test_gradients_match_finite_differences(self, op, options, rng):
    b, t, h, kd, vd = 2, 7, 2, 3, 4
    options = dict(options)
    args = {"q": rng.standard_normal((b, t, h, kd)), "k": rng.standard_normal((b, t, h, kd)),
            "v": rng.standard_normal((b, t, h, vd))}
    state_vd = vd + 1 if options.get("normalize") else vd
    args["initial_state"] = rng.standard_normal((b, h, kd, state_vd))
    if op in ("simple_gla", "gated_delta_rule"):
      args["g"] = -rng.uniform(0.1, 1.0, (b, t, h))
    if op == "gla":
      args["g"] = -rng.uniform(0.1, 1.0, (b, t, h, kd))
    if op == "retention" and "g_gamma" not in options:
      args["g_gamma"] = -rng.uniform(0.1, 1.0, h)
    if op in DELTA_OPS:
      args["beta"] = rng.uniform(0.1, 0.9, (b, t, h))
    ids = np.array([[0, 0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3, 5]])
    dout = rng.standard_normal((b, t, h, vd))
    dfinal = rng.standard_normal((b, h, kd, state_vd))
    fn = oracle.OPS[op]

    def loss():
      res = fn(**args, **options, segment_ids=ids)
      return float((res.out * dout).sum() + (res.final_state * dfinal).sum())

    res = fn(**args, **options, segment_ids=ids, dout=dout, dfinal=dfinal)
    assert set(res.grads) == set(args)
    for name, x in args.items():
      assert rel_err(res.grads[name], _central_difference(loss, x)) < 1e-7, name

  def test_forward_matches_the_parallel_form(self, rng):
    """``o_t = scale sum_{s<=t, same doc} (q_t * exp(G_t - G_s) . k_s) v_s`` plus
    ``scale (q_t * exp(G_t)) . S_0`` in the first document, with ``G`` the cumulative
    log gate, for gla (and simple_gla, retention, linear_attn as special cases)."""
    b, t, h, kd, vd = 2, 23, 3, 4, 5
    q, k = rng.standard_normal((2, b, t, h, kd))
    v = rng.standard_normal((b, t, h, vd))
    s0 = rng.standard_normal((b, h, kd, vd))
    ids = np.sort(rng.integers(0, 4, (b, t)), axis=1)
    doc = np.cumsum(oracle.document_starts(ids, b, t), axis=1)
    g_vec = -rng.uniform(0.0, 1.0, (b, t, h, kd))
    g_scalar = -rng.uniform(0.0, 1.0, (b, t, h))
    g_gamma = -rng.uniform(0.0, 1.0, h)

    def parallel(g):
      cum = np.cumsum(g, axis=1)                                          # [B, T, H, K]
      decay = np.exp(cum[:, :, None] - cum[:, None, :])                   # [B, T, S, H, K]
      scores = np.einsum("bthk,bshk,btshk->bhts", q, k, decay)
      allowed = (doc[:, :, None] == doc[:, None, :]) & np.tril(np.ones((t, t), bool))
      scores = np.where(allowed[:, None], scores, 0.0)
      out = np.einsum("bhts,bshv->bthv", scores, v)
      first = (doc == 0)[:, :, None, None]
      out += first * np.einsum("bthk,bhkv->bthv", q * np.exp(cum), s0)
      return kd ** -0.5 * out

    common = dict(initial_state=s0, segment_ids=ids)
    for name, res, g in (
        ("gla", oracle.gla(q, k, v, g_vec, **common), g_vec),
        ("simple_gla", oracle.simple_gla(q, k, v, g_scalar, **common),
         np.repeat(g_scalar[..., None], kd, -1)),
        ("retention", oracle.retention(q, k, v, g_gamma, **common),
         np.broadcast_to(g_gamma[:, None], (b, t, h, kd))),
        ("retention_default", oracle.retention(q, k, v, **common),
         np.broadcast_to(np.log(1 - 2.0 ** (-5 - np.arange(h)))[:, None], (b, t, h, kd))),
        ("linear_attn", oracle.linear_attn(q, k, v, **common), np.zeros((b, t, h, kd)))):
      assert rel_err(res.out, parallel(g)) < 1e-12, name
