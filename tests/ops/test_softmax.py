"""Softmax attention against the float64 NumPy oracle, one shared suite per tier.

``SoftmaxSuite`` holds every check; ``TestReference`` and ``TestXla`` run it for their tier
(a new tier subclasses it and inherits them all). Each check compares the forward output
and every gradient (query, key, value, bias or score-mod parameters, sinks) with
``tests/oracle_softmax.py`` as the relative error ``||x - ref|| / ||ref||`` against a
per-dtype tolerance. The xla tier runs with small blocks so that lengths like 63, 65 and
257 span many blocks with ragged last blocks, and skipping of empty blocks is exercised.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import masks
from tests import oracle_softmax as oracle

# Relative error bounds. bfloat16 is compared with the oracle run on the bf16-rounded
# inputs, so only the computation's own error counts.
TOLERANCE = {
    jnp.float32: {"out": 1e-5, "grad": 1e-4},
    jnp.bfloat16: {"out": 1e-2, "grad": 1e-2},
}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  ref_norm = np.linalg.norm(ref)
  diff = np.linalg.norm(x - ref)
  return float(diff if ref_norm == 0 else diff / ref_norm)


def to_f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# ------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
  """One call: attnlab's arguments and the oracle's matching inputs.

  ``diff`` holds the differentiated arguments (query, key, value, bias, sinks), ``data``
  the other arrays and pytrees (jit inputs), ``static`` the Python arguments.
  """

  rng: np.random.Generator
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv: int
  head_dim: int
  dtype: Any
  diff: dict = dataclasses.field(default_factory=dict)
  data: dict = dataclasses.field(default_factory=dict)
  static: dict = dataclasses.field(default_factory=dict)
  mask_objects: list = dataclasses.field(default_factory=list)
  allowed: np.ndarray | None = None
  oracle_bias: np.ndarray | None = None
  bias_grad: Callable | None = None  # oracle dlogits -> expected gradient of the bias leaf
  bias_leaf: Callable = lambda g: g  # gradient pytree -> its array
  dout: Any = None

  def allow(self, matrix):
    matrix = np.broadcast_to(np.asarray(matrix, bool),
                             (self.batch, self.num_heads, self.q_len, self.kv_len))
    self.allowed = matrix if self.allowed is None else self.allowed & matrix

  def normal(self, shape, dtype=None, scale=1.0):
    return jnp.asarray(scale * self.rng.standard_normal(shape), dtype or self.dtype)

  def shape(self, pattern):
    sizes = {"B": self.batch, "N": self.num_heads, "T": self.q_len, "S": self.kv_len}
    return tuple(sizes.get(c, 1) for c in pattern)

  def call_kwargs(self):
    data = dict(self.data)
    if self.mask_objects:
      data["mask"] = functools.reduce(operator.and_, self.mask_objects)
    return data

  def expected(self):
    """The oracle's output and gradients, keyed like the results of ``run``."""
    sinks = self.diff.get("sinks")
    res = oracle.attention(
        to_f64(self.diff["query"]), to_f64(self.diff["key"]), to_f64(self.diff["value"]),
        allowed=self.allowed, bias=self.oracle_bias, scale=self.static.get("scale"),
        logits_soft_cap=self.static.get("logits_soft_cap"),
        sinks=None if sinks is None else to_f64(sinks), dout=to_f64(self.dout))
    out = {"out": res.out, "query": res.dq, "key": res.dk, "value": res.dv}
    if sinks is not None:
      out["sinks"] = res.dsinks
    if self.bias_grad is not None:
      out["bias"] = self.bias_grad(res.dlogits)
    return out, res


# Features: each adds one option to a problem, to attnlab's call and to the oracle alike.


def is_causal(p):
  p.static["is_causal"] = True
  p.allow(oracle.causal(p.q_len, p.kv_len))


def window(size):
  def add(p):
    p.static["local_window_size"] = size
    left, right = (size, size) if isinstance(size, int) else size
    p.allow(oracle.local_window(p.q_len, p.kv_len, left, right))
  return add


def mask(obj, formula):
  """A static mask object and its oracle formula ``(T, S) -> [T, S]``."""
  def add(p):
    p.mask_objects.append(obj)
    p.allow(formula(p.q_len, p.kv_len))
  return add


def dynamic_mask(build):
  """``build(p) -> (mask object, allowed matrix)`` for masks that hold random arrays."""
  def add(p):
    obj, allowed = build(p)
    p.mask_objects.append(obj)
    p.allow(allowed)
  return add


def packed_ids(rng, batch, length, doc_rate=0.08):
  """Non-decreasing segment ids: packed documents of random lengths."""
  return np.cumsum(rng.random((batch, length)) < doc_rate, axis=1).astype(np.int32)


def sorted_ids(rng, batch, length, num_ids):
  return np.sort(rng.integers(0, num_ids, (batch, length)), axis=1).astype(np.int32)


def segment_ids(kind="single"):
  """``single``: one ``[B, T]`` array; ``pair``: ``(q_ids, kv_ids)``; ``unmatched``: a
  pair where some query ids occur in no key, leaving those rows fully masked."""
  def add(p):
    if kind == "single":
      ids = packed_ids(p.rng, p.batch, p.q_len)
      p.data["segment_ids"] = jnp.asarray(ids)
      p.allow(oracle.documents(ids, ids))
      return
    q_ids = sorted_ids(p.rng, p.batch, p.q_len, 4)
    kv_ids = sorted_ids(p.rng, p.batch, p.kv_len, 4)
    if kind == "unmatched":
      q_ids[:, -max(1, p.q_len // 4):] = 7
      q_ids[0, : p.q_len // 3] = 5
    p.data["segment_ids"] = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    p.allow(oracle.documents(q_ids, kv_ids))
  return add


def documents_mask(p):
  q_ids = packed_ids(p.rng, p.batch, p.q_len)
  kv_ids = q_ids if p.q_len == p.kv_len else sorted_ids(p.rng, p.batch, p.kv_len, 3)
  p.mask_objects.append(masks.Documents(jnp.asarray(q_ids), jnp.asarray(kv_ids)))
  p.allow(oracle.documents(q_ids, kv_ids))


def random_lengths(rng, batch, length, zero_at=None):
  lengths = rng.integers(1, length + 1, batch).astype(np.int32)
  lengths[-1] = length  # one unpadded row, so full blocks occur
  if zero_at is not None:
    lengths[zero_at] = 0
  return lengths


def seq_lengths(query=True, kv=True, zero=False):
  """The ``jax.nn`` length arguments; ``zero`` pads away every key of batch 0 and
  every query of batch 1 (give such a case a third batch row to keep some output)."""
  def add(p):
    ql = random_lengths(p.rng, p.batch, p.q_len, 1 if zero else None) if query else None
    kl = random_lengths(p.rng, p.batch, p.kv_len, 0 if zero else None) if kv else None
    if ql is not None:
      p.data["query_seq_lengths"] = jnp.asarray(ql)
    if kl is not None:
      p.data["key_value_seq_lengths"] = jnp.asarray(kl)
    p.allow(oracle.padding(p.q_len, p.kv_len, ql, kl))
  return add


def padding_mask(query=False, kv=True):
  def add(p):
    ql = random_lengths(p.rng, p.batch, p.q_len) if query else None
    kl = random_lengths(p.rng, p.batch, p.kv_len) if kv else None
    p.mask_objects.append(masks.Padding(None if ql is None else jnp.asarray(ql),
                                        None if kl is None else jnp.asarray(kl)))
    p.allow(oracle.padding(p.q_len, p.kv_len, ql, kl))
  return add


def random_bool(p, pattern, rate=0.7):
  return p.rng.random(p.shape(pattern)) < rate


def bool_mask(pattern):
  """A boolean ``mask=`` array of a broadcast shape such as ``"B11S"``."""
  def add(p):
    m = random_bool(p, pattern)
    p.data["mask"] = jnp.asarray(m)
    p.allow(m)
  return add


def bool_mask_with_empty_rows(p):
  m = random_bool(p, "BNTS") & random_bool(p, "B1T1", rate=0.8)
  p.data["mask"] = jnp.asarray(m)
  p.allow(m)


def bias_array(pattern):
  def add(p):
    b = p.normal(p.shape(pattern))
    p.diff["bias"] = b
    p.oracle_bias = to_f64(b)
    p.bias_grad = lambda dlogits: oracle.reduce_to_shape(dlogits, b.shape)
  return add


def alibi(p):
  slopes = masks.alibi_slopes(p.num_heads) * np.exp(0.2 * p.rng.standard_normal(p.num_heads))
  slopes = jnp.asarray(slopes, jnp.float32)
  p.diff["bias"] = masks.Alibi(slopes)
  p.oracle_bias = oracle.alibi_bias(to_f64(slopes), p.q_len, p.kv_len)
  p.bias_grad = oracle.alibi_slopes_grad

  def leaf(g):
    assert isinstance(g, masks.Alibi), type(g)
    return g.slopes
  p.bias_leaf = leaf


def relative_bias(max_distance):
  def add(p):
    table = p.normal((p.num_heads, 2 * max_distance + 1), jnp.float32, scale=0.5)
    p.diff["bias"] = masks.RelativePositionBias(table)
    p.oracle_bias = oracle.relative_position_bias(to_f64(table), p.q_len, p.kv_len)
    p.bias_grad = lambda d: oracle.relative_position_table_grad(d, table.shape[1])

    def leaf(g):
      assert isinstance(g, masks.RelativePositionBias), type(g)
      return g.table
    p.bias_leaf = leaf
  return add


def soft_cap(cap):
  def add(p):
    p.static["logits_soft_cap"] = cap
  return add


def sinks(p):
  p.diff["sinks"] = p.normal((p.num_heads,), jnp.float32)


def scale(value):
  def add(p):
    p.static["scale"] = value
  return add


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  q_len: int
  kv_len: int
  features: tuple = ()
  batch: int = 2
  num_heads: int = 4
  num_kv: int = 2
  head_dim: int = 16

  def __str__(self):
    return self.name

  def problem(self, rng, dtype=jnp.float32) -> Problem:
    p = Problem(rng, self.batch, self.q_len, self.kv_len, self.num_heads, self.num_kv,
                self.head_dim, dtype)
    p.diff["query"] = p.normal((self.batch, self.q_len, self.num_heads, self.head_dim))
    p.diff["key"] = p.normal((self.batch, self.kv_len, self.num_kv, self.head_dim))
    p.diff["value"] = p.normal((self.batch, self.kv_len, self.num_kv, self.head_dim))
    p.allow(oracle.full(self.q_len, self.kv_len))
    for add in self.features:
      add(p)
    p.dout = p.normal((self.batch, self.q_len, self.num_heads, self.head_dim))
    return p


def _docs_or_causal(p):
  ids = packed_ids(p.rng, p.batch, p.q_len)
  obj = masks.Documents(jnp.asarray(ids), jnp.asarray(ids)) | masks.Causal()
  return obj, oracle.documents(ids, ids) | oracle.causal(p.q_len, p.kv_len)


def _array_or_causal(p):
  m = random_bool(p, "B1TS", rate=0.2)
  return masks.ArrayMask(jnp.asarray(m)) | masks.Causal(), m | oracle.causal(p.q_len,
                                                                               p.kv_len)


def _array_and_causal(p):
  m = random_bool(p, "1NTS")
  return masks.ArrayMask(jnp.asarray(m)) & masks.Causal(), m & oracle.causal(p.q_len,
                                                                               p.kv_len)


O = oracle  # short, for the formulas in the table
CASES = [
    # no mask; odd lengths; S != T; MHA / GQA / MQA
    Case("plain_T63_mha", 63, 63, num_heads=2, num_kv=2),
    Case("plain_T1", 1, 1),
    Case("plain_T7_S65", 7, 65, num_kv=1),
    Case("plain_T257_mqa_H32", 257, 257, batch=1, num_kv=1, head_dim=32),
    # causal, top-left aligned when S != T
    Case("causal_T65", 65, 65, (is_causal,)),
    Case("causal_T33_S65", 33, 65, (is_causal,), num_kv=1),
    Case("causal_T65_S7", 65, 7, (is_causal,)),
    Case("causal_obj_T257", 257, 257, (mask(masks.Causal(), O.causal),), batch=1),
    Case("decode_T1_S65", 1, 65, (seq_lengths(query=False), sinks)),
    # local windows
    Case("window_5_T65", 65, 65, (window(5),)),
    Case("window_9_3_T63_S65", 63, 65, (window((9, 3)),), num_kv=1),
    Case("sliding_window_T257", 257, 257, (is_causal, window((16, 0))), batch=1,
         num_heads=2, num_kv=1),
    Case("window_obj_0_7_T63", 63, 63,
         (mask(masks.LocalWindow(0, 7), lambda t, s: O.local_window(t, s, 0, 7)),)),
    # the mask vocabulary
    Case("chunked_causal_16_T65", 65, 65,
         (mask(masks.ChunkedCausal(16), lambda t, s: O.chunked_causal(t, s, 16)),)),
    Case("chunked_causal_10_T63", 63, 63,
         (mask(masks.ChunkedCausal(10), lambda t, s: O.chunked_causal(t, s, 10)),)),
    Case("prefix_lm_10_T65", 65, 65,
         (mask(masks.PrefixLM(10), lambda t, s: O.prefix_lm(t, s, 10)),)),
    Case("prefix_lm_40_T33_S65", 33, 65,
         (mask(masks.PrefixLM(40), lambda t, s: O.prefix_lm(t, s, 40)),)),
    Case("strided_sparse_8_T65", 65, 65,
         (mask(masks.StridedSparse(8), lambda t, s: O.strided_sparse(t, s, 8)),)),
    Case("fixed_sparse_8_2_T63", 63, 63,
         (mask(masks.FixedSparse(8, 2), lambda t, s: O.fixed_sparse(t, s, 8, 2)),)),
    Case("fixed_sparse_16_1_T257", 257, 257,
         (mask(masks.FixedSparse(16), lambda t, s: O.fixed_sparse(t, s, 16, 1)),),
         batch=1, num_heads=2, num_kv=1),
    Case("global_local_3_4_T65", 65, 65,
         (mask(masks.GlobalLocal(3, 4), lambda t, s: O.global_local(t, s, 3, 4)),)),
    Case("power_of_two_1_T63", 63, 63,
         (mask(masks.PowerOfTwo(), lambda t, s: O.power_of_two(t, s, 1)),)),
    Case("power_of_two_4_T257", 257, 257,
         (mask(masks.PowerOfTwo(4), lambda t, s: O.power_of_two(t, s, 4)),), batch=1,
         num_heads=2, num_kv=1),
    # data masks
    Case("segment_ids_T65", 65, 65, (segment_ids(),)),
    Case("segment_ids_pair_T33_S65", 33, 65, (segment_ids("pair"),)),
    Case("segment_ids_causal_T257", 257, 257, (is_causal, segment_ids()), batch=2,
         num_heads=2, num_kv=1),
    Case("documents_obj_T63", 63, 63, (documents_mask,)),
    Case("seq_lengths_T65", 65, 65, (seq_lengths(),)),
    Case("seq_lengths_zero_T63_S65", 63, 65, (seq_lengths(zero=True),), batch=3),
    Case("padding_obj_kv_T63_S65", 63, 65, (padding_mask(),)),
    Case("padding_obj_both_T65", 65, 65, (padding_mask(query=True), is_causal)),
    Case("bool_mask_BNTS_T63", 63, 63, (bool_mask("BNTS"),)),
    Case("bool_mask_B11S_T65_S33", 65, 33, (bool_mask("B11S"),)),
    # additive terms
    Case("bias_BNTS_T63", 63, 63, (bias_array("BNTS"),)),
    Case("bias_1N1S_T65_S33", 65, 33, (bias_array("1N1S"),)),
    Case("bias_B1TS_causal_T65", 65, 65, (bias_array("B1TS"), is_causal)),
    Case("alibi_causal_T65", 65, 65, (alibi, is_causal)),
    Case("alibi_T33_S65", 33, 65, (alibi,), num_kv=1),
    Case("relative_bias_8_T63_S65", 63, 65, (relative_bias(8),)),
    Case("soft_cap_T65", 65, 65, (soft_cap(5.0), scale(1.0))),
    Case("sinks_causal_T63", 63, 63, (sinks, is_causal)),
    Case("scale_0.3_T65", 65, 65, (scale(0.3),)),
    Case("large_logits_causal_T65", 65, 65, (scale(8.0), is_causal)),
    # compositions
    Case("and_prefix_window_T65", 65, 65,
         (mask(masks.PrefixLM(8) & masks.LocalWindow(20, 20),
               lambda t, s: O.prefix_lm(t, s, 8) & O.local_window(t, s, 20, 20)),)),
    Case("or_window_fixed_T63", 63, 63,
         (mask(masks.LocalWindow(3, 0) | masks.FixedSparse(16),
               lambda t, s: O.local_window(t, s, 3, 0) | O.fixed_sparse(t, s, 16)),)),
    Case("and_or_nested_T65", 65, 65,
         (mask(masks.Causal() & (masks.LocalWindow(8, 0) | masks.GlobalLocal(2, 0)),
               lambda t, s: O.causal(t, s) & (O.local_window(t, s, 8, 0)
                                              | O.global_local(t, s, 2, 0))),)),
    Case("or_docs_causal_T65", 65, 65, (dynamic_mask(_docs_or_causal),)),
    Case("or_array_causal_T63", 63, 63, (dynamic_mask(_array_or_causal),)),
    Case("and_array_causal_T65", 65, 65, (dynamic_mask(_array_and_causal),)),
    Case("and_obj_with_kwargs_T65", 65, 65,
         (mask(masks.ChunkedCausal(32), lambda t, s: O.chunked_causal(t, s, 32)),
          window((5, 0)), seq_lengths(query=False))),
    # everything at once
    Case("everything_T65", 65, 65,
         (is_causal, window((24, 0)), segment_ids(), soft_cap(4.0), sinks,
          bias_array("1N1S"), seq_lengths(query=False))),
    Case("everything_mqa_T63_S65", 63, 65,
         (mask(masks.ChunkedCausal(16) | masks.GlobalLocal(2, 3),
               lambda t, s: O.chunked_causal(t, s, 16) | O.global_local(t, s, 2, 3)),
          segment_ids("pair"), alibi, soft_cap(3.0), sinks), num_kv=1),
    Case("everything_relative_T65", 65, 65,
         (mask(masks.StridedSparse(8), lambda t, s: O.strided_sparse(t, s, 8)),
          documents_mask, relative_bias(6), sinks, soft_cap(6.0), scale(0.5))),
]
CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)


def cases(*names):
  return [CASE_BY_NAME[n] for n in names]


BF16_CASES = cases("plain_T257_mqa_H32", "sliding_window_T257", "seq_lengths_zero_T63_S65",
                   "bias_1N1S_T65_S33", "alibi_causal_T65", "everything_T65",
                   "everything_mqa_T63_S65")
SWEEP_CASES = cases("sliding_window_T257", "everything_T65", "or_docs_causal_T65")
# Cases whose masks the gradient-support check walks (T <= 65 keeps it cheap).
SUPPORT_CASES = cases("causal_T33_S65", "window_9_3_T63_S65", "chunked_causal_10_T63",
                      "strided_sparse_8_T65", "power_of_two_1_T63", "segment_ids_pair_T33_S65",
                      "seq_lengths_zero_T63_S65", "and_or_nested_T65", "everything_T65")

# Cases with fully masked rows, each from a different source.
EMPTY_ROW_CASES = [
    Case("empty_kv_length_0", 63, 65, (seq_lengths(zero=True),), batch=3),
    Case("empty_unmatched_segments", 65, 33, (segment_ids("unmatched"),)),
    Case("empty_unmatched_segments_sinks_cap_bias", 65, 33,
         (segment_ids("unmatched"), sinks, soft_cap(2.0), bias_array("BNTS"))),
    Case("empty_window_past_keys", 65, 33, (window((0, 0)),)),
    Case("empty_bool_rows", 63, 63, (bool_mask_with_empty_rows,)),
    Case("empty_padding_obj", 63, 63, (padding_mask(query=False, kv=True),
                                        mask(masks.LocalWindow(0, 0),
                                             lambda t, s: O.local_window(t, s, 0, 0)))),
]


# ---------------------------------------------------------------------------- runner


def run(problem: Problem, implementation, block_sizes=None, *, jit=True):
  """attnlab's output and the gradients of ``<out, dout>`` w.r.t. ``problem.diff``."""
  static = dict(problem.static, implementation=implementation, block_sizes=block_sizes)

  def forward_backward(diff, data, cotangent):
    out, vjp = jax.vjp(lambda d: ops.dot_product_attention(**d, **data, **static), diff)
    return out, vjp(cotangent)[0]

  if jit:
    forward_backward = jax.jit(forward_backward)
  return forward_backward(problem.diff, problem.call_kwargs(), problem.dout)


def assert_matches(problem: Problem, out, grads, expected, tolerance=None):
  """Every output against the oracle; reports all relative errors on failure."""
  tolerance = tolerance or TOLERANCE[problem.dtype]
  assert out.shape == problem.diff["query"].shape, out.shape
  assert out.dtype == problem.dtype, out.dtype
  got = {"out": out}
  for name, g in grads.items():
    leaf = problem.bias_leaf(g) if name == "bias" else g
    expected_dtype = jax.tree.leaves(problem.diff[name])[0].dtype
    assert leaf.shape == np.shape(expected[name]), (name, leaf.shape)
    assert leaf.dtype == expected_dtype, (name, leaf.dtype, expected_dtype)
    got[name] = leaf
  assert set(got) == set(expected), (set(got), set(expected))
  assert np.any(expected["out"] != 0), "degenerate case: every row is masked"
  errors, failed = {}, []
  for name, ref in expected.items():
    x = np.asarray(got[name].astype(jnp.float32))
    if not np.all(np.isfinite(x)):
      failed.append(f"{name}: non-finite values")
      continue
    errors[name] = rel_err(x, ref)
    bound = tolerance["out" if name == "out" else "grad"]
    if not errors[name] <= bound:
      failed.append(f"{name}: rel err {errors[name]:.3g} > {bound:g}")
  assert not failed, f"{failed}; all relative errors: {errors}"
  return errors


# ----------------------------------------------------------------------------- suite


class SoftmaxSuite:
  """Every check of one tier. Subclasses set ``implementation`` and the block sizes."""

  implementation: str
  block_sizes: tuple = (None,)  # cycled over the cases
  sweep_block_sizes: tuple = ()  # swept on a few hard cases; empty for tiers without blocks

  def blocks(self, case: Case):
    return self.block_sizes[CASES.index(case) % len(self.block_sizes)] if (
        case in CASES) else self.block_sizes[0]

  def refusal(self, problem: Problem) -> str | None:
    """Why this tier refuses the problem's call, or None when it runs it. Only kernel tiers
    refuse options (tests/ops/test_softmax_pallas.py checks each refusal's ValueError);
    a refused case is skipped with the tier's own reason, never run on another tier."""
    del problem
    return None

  # The dtype of the suite's "float32" checks and a head dim replacing the cases' own;
  # kernel tiers that take neither float32 nor tiny heads override them.
  dtype: Any = jnp.float32
  head_dim: int | None = None

  def problem(self, case: Case, rng, dtype=None) -> Problem:
    if self.head_dim is not None:
      case = dataclasses.replace(case, head_dim=self.head_dim)
    problem = case.problem(rng, dtype or self.dtype)
    reason = self.refusal(problem)
    if reason is not None:
      pytest.skip(f"the {self.implementation} tier refuses this call: {reason}")
    return problem

  def check(self, case: Case, rng, dtype=None, block_sizes="cycle"):
    problem = self.problem(case, rng, dtype)
    blocks = self.blocks(case) if block_sizes == "cycle" else block_sizes
    out, grads = run(problem, self.implementation, blocks)
    expected, res = problem.expected()
    assert_matches(problem, out, grads, expected)
    return problem, out, grads, res

  @pytest.mark.parametrize("case", CASES, ids=str)
  def test_float32_matches_oracle(self, case, rng):
    self.check(case, rng)

  @pytest.mark.parametrize("case", BF16_CASES, ids=str)
  def test_bfloat16_matches_oracle(self, case, rng):
    self.check(case, rng, jnp.bfloat16)

  @pytest.mark.parametrize("case", SWEEP_CASES, ids=str)
  def test_block_sizes(self, case, rng):
    if not self.sweep_block_sizes:
      pytest.skip(f"the {self.implementation} tier has no blocks")
    for blocks in self.sweep_block_sizes:
      self.check(case, rng, block_sizes=blocks)

  @pytest.mark.parametrize("case", EMPTY_ROW_CASES, ids=str)
  def test_fully_masked_rows_are_exact_zeros(self, case, rng):
    problem, out, grads, _ = self.check(case, rng)
    empty = ~problem.allowed.any(-1)  # [B, N, T]
    assert empty.any(), "the case has no fully masked row"
    rows = np.moveaxis(empty, 1, 2)  # [B, T, N], the layout of out and dq
    assert np.all(np.asarray(out)[rows] == 0)
    assert np.all(np.asarray(grads["query"])[rows] == 0)
    if "bias" in grads and grads["bias"].shape == problem.allowed.shape:
      assert np.all(np.asarray(grads["bias"])[empty] == 0)

  @pytest.mark.parametrize("case", SUPPORT_CASES, ids=str)
  def test_gradients_vanish_outside_the_mask(self, case, rng):
    """d out[i] / d k[j] == d out[i] / d v[j] == 0 wherever (i, j) is masked (causality
    through gradients), d out[i] / d q[i'] == 0 for i' != i, and d out[i] / d v[j] != 0
    wherever (i, j) is allowed."""
    problem = self.problem(case, rng)
    t = problem.q_len
    rows = sorted({r for r in (0, 1, 15, 16, 17, 31, 32, t // 2, t - 2, t - 1) if 0 <= r < t})
    onehot = np.zeros((len(rows), 1, t, 1, 1), np.float32)
    onehot[np.arange(len(rows)), 0, rows] = 1.0
    cotangents = (problem.dout[None] * jnp.asarray(onehot)).astype(problem.dout.dtype)
    static = dict(problem.static, implementation=self.implementation,
                  block_sizes=self.blocks(case))

    @jax.jit
    def row_grads(diff, data, cots):
      _, vjp = jax.vjp(lambda d: ops.dot_product_attention(**d, **data, **static), diff)
      return jax.vmap(lambda c: vjp(c)[0])(cots)

    grads = jax.tree.map(np.asarray, row_grads(problem.diff, problem.call_kwargs(),
                                               cotangents))
    groups = problem.num_heads // problem.num_kv
    allowed = problem.allowed
    allowed_kv = allowed.reshape(problem.batch, problem.num_kv, groups, t,
                                 problem.kv_len).any(2)  # [B, K, T, S]
    for r, i in enumerate(rows):
      dq = grads["query"][r]
      assert np.all(np.delete(dq, i, axis=1) == 0), f"row {i} leaks into other queries"
      dk_support = np.abs(grads["key"][r]).max(-1) > 0  # [B, S, K]
      dv_support = np.abs(grads["value"][r]).max(-1) > 0
      expected = np.moveaxis(allowed_kv[:, :, i, :], 1, 2)  # [B, S, K]
      assert not np.any(dk_support & ~expected), f"row {i}: key gradient outside the mask"
      assert not np.any(dv_support & ~expected), f"row {i}: value gradient outside the mask"
      assert np.array_equal(dv_support, expected), f"row {i}: value gradient missing"
      if "bias" in grads and grads["bias"].shape == allowed.shape:
        db = grads["bias"][r]
        assert np.all(np.delete(db, i, axis=2) == 0)
        assert np.all(db[:, :, i][~allowed[:, :, i]] == 0)

  def test_jit_matches_eager(self, rng):
    case = Case("eager", 33, 33, (is_causal, segment_ids(), sinks, soft_cap(4.0),
                                  bias_array("1N1S")))
    problem = self.problem(case, rng)
    blocks = self.block_sizes[0]
    out, grads = run(problem, self.implementation, blocks, jit=False)
    out_jit, grads_jit = run(problem, self.implementation, blocks, jit=True)
    assert rel_err(out, out_jit) <= 1e-6
    for name in grads:
      assert rel_err(jax.tree.leaves(grads[name])[0],
                     jax.tree.leaves(grads_jit[name])[0]) <= 1e-6, name

  def test_unbatched(self, rng):
    """Rank-3 inputs (with a rank-3 bias and mask, ``[T]`` segment ids) equal the batched
    call on a batch of one, and the oracle."""
    case = Case("unbatched", 33, 65, (is_causal, bias_array("1NTS"), bool_mask("11TS"),
                                      segment_ids("pair"), sinks), batch=1)
    problem = self.problem(case, rng)
    expected, _ = problem.expected()
    blocks = self.block_sizes[0]
    out_b, grads_b = run(problem, self.implementation, blocks)
    unbatched = dataclasses.replace(
        problem,
        diff={n: (x[0] if n != "sinks" else x) for n, x in problem.diff.items()},
        data={"mask": problem.data["mask"][0],
              "segment_ids": tuple(x[0] for x in problem.data["segment_ids"])},
        dout=problem.dout[0])
    out, grads = run(unbatched, self.implementation, blocks)
    assert out.shape == problem.diff["query"].shape[1:]
    np.testing.assert_array_equal(out, out_b[0])
    for name in ("query", "key", "value", "bias"):
      np.testing.assert_array_equal(grads[name], grads_b[name][0], err_msg=name)
    np.testing.assert_array_equal(grads["sinks"], grads_b["sinks"])
    assert_matches(problem, out_b, grads_b, expected)

  @pytest.mark.parametrize("case", [
      Case("jax_nn_plain", 63, 65),
      Case("jax_nn_causal", 65, 65, (is_causal,), num_heads=2, num_kv=2),
      Case("jax_nn_bias_mask", 33, 65, (bias_array("BNTS"), bool_mask("B1TS"))),
      Case("jax_nn_window", 65, 63, (window((4, 2)),), num_kv=1),
      Case("jax_nn_kv_lengths", 63, 65, (seq_lengths(query=False),)),
      Case("jax_nn_all", 65, 65, (is_causal, window(8), bias_array("1N1S"),
                                  bool_mask("BNTS"), seq_lengths(query=False),
                                  scale(0.5))),
  ], ids=str)
  def test_matches_jax_nn(self, case, rng):
    """With only ``jax.nn``'s arguments, the result is ``jax.nn``'s (forward and grads)."""
    problem = self.problem(case, rng)
    # jax.nn gives rows with no allowed key a uniform average over the masked keys; compare
    # the rows where both are defined, and send no cotangent through the others.
    live = np.moveaxis(problem.allowed.any(-1), 1, 2)[..., None]  # [B, T, N, 1]
    problem.dout = problem.dout * jnp.asarray(live, problem.dtype)
    out, grads = run(problem, self.implementation, self.block_sizes[0])
    out = jnp.where(live, out, 0.0)
    kwargs = problem.call_kwargs()

    @jax.jit
    def jax_nn(diff, data, cotangent):
      out, vjp = jax.vjp(lambda d: jax.nn.dot_product_attention(
          **d, **data, **problem.static, implementation="xla"), diff)
      return out, vjp(cotangent)[0]

    # jax.nn runs in float32 on the same (possibly bf16-rounded) inputs: it is the
    # reference here, so its own rounding must not count against the tier.
    upcast = lambda tree: jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    out_nn, grads_nn = jax_nn(upcast(problem.diff), upcast(kwargs), upcast(problem.dout))
    out_nn = jnp.where(live, out_nn, 0.0)
    tol = TOLERANCE[self.dtype]
    assert rel_err(out, out_nn) <= tol["out"]
    for name in grads:
      assert rel_err(grads[name], grads_nn[name]) <= tol["grad"], name

  def test_packed_documents_equal_documents_one_by_one(self, rng):
    lengths = (20, 1, 42)
    case = Case("packed", sum(lengths), sum(lengths), (is_causal, sinks, soft_cap(5.0)),
                batch=1)
    problem = self.problem(case, rng)
    ids = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
    problem.data["segment_ids"] = jnp.asarray(ids)
    blocks = self.block_sizes[0]
    out, grads = run(problem, self.implementation, blocks)
    tol = TOLERANCE[self.dtype]
    dsinks = 0.0
    for start, stop in zip(np.cumsum((0,) + lengths[:-1]), np.cumsum(lengths)):
      doc = dataclasses.replace(
          problem, data={},
          diff=dict(problem.diff, **{n: problem.diff[n][:, start:stop]
                                     for n in ("query", "key", "value")}),
          dout=problem.dout[:, start:stop])
      out_doc, grads_doc = run(doc, self.implementation, blocks)
      assert rel_err(out[:, start:stop], out_doc) <= tol["out"]
      for name in ("query", "key", "value"):
        assert rel_err(grads[name][:, start:stop], grads_doc[name]) <= tol["grad"], name
      dsinks = dsinks + np.asarray(grads_doc["sinks"], np.float64)
    assert rel_err(grads["sinks"], dsinks) <= tol["grad"]


class TestReference(SoftmaxSuite):
  implementation = "reference"


class TestXla(SoftmaxSuite):
  implementation = "xla"
  # Small blocks, none dividing 63, 65 or 257: many blocks, ragged last blocks.
  block_sizes = (ops.BlockSizes(block_q=16, block_k=32), ops.BlockSizes(block_q=32, block_k=16),
                 ops.BlockSizes(block_q=24, block_k=40))
  # On top of the cycled sizes: tiny, odd, larger than the sequence, and the default.
  sweep_block_sizes = (
      ops.BlockSizes(block_q=8, block_k=8), ops.BlockSizes(block_q=7, block_k=13),
      ops.BlockSizes(block_q=64, block_k=128), ops.BlockSizes(block_q=1, block_k=1),
      ops.BlockSizes())


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
  """The oracle's analytic gradients against central finite differences (float64)."""

  def test_gradients(self, rng):
    b, t, s, n, k, h = 2, 5, 6, 4, 2, 3
    q, key, v = (rng.standard_normal(shape) for shape in
                 ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    bias = rng.standard_normal((b, n, t, s))
    sink = rng.standard_normal(n)
    dout = rng.standard_normal((b, t, n, h))
    allowed = rng.random((b, n, t, s)) < 0.6
    allowed[0, 1, 2] = False  # one fully masked row
    kwargs = dict(allowed=allowed, scale=0.7, logits_soft_cap=2.0)

    def loss():
      res = oracle.attention(q, key, v, bias=bias, sinks=sink, **kwargs)
      return float((res.out * dout).sum())

    res = oracle.attention(q, key, v, bias=bias, sinks=sink, dout=dout, **kwargs)
    assert np.all(res.out[0, 2, 1] == 0)
    for name, x, analytic in (("q", q, res.dq), ("k", key, res.dk), ("v", v, res.dv),
                              ("bias", bias, res.dlogits), ("sinks", sink, res.dsinks)):
      assert rel_err(analytic, _central_difference(loss, x)) < 1e-7, name

  def test_score_mod_and_broadcast_gradients(self, rng):
    b, t, s, n, h, m = 2, 6, 5, 3, 4, 2
    q, key, v = (rng.standard_normal(shape) for shape in
                 ((b, t, n, h), (b, s, n, h), (b, s, n, h)))
    slopes = rng.random(n)
    table = rng.standard_normal((n, 2 * m + 1))
    bias = rng.standard_normal((1, n, 1, s))
    dout = rng.standard_normal((b, t, n, h))
    allowed = oracle.causal(t, s)

    def total_bias():
      return (oracle.alibi_bias(slopes, t, s) + oracle.relative_position_bias(table, t, s)
              + bias)

    def loss():
      res = oracle.attention(q, key, v, allowed=allowed, bias=total_bias())
      return float((res.out * dout).sum())

    res = oracle.attention(q, key, v, allowed=allowed, bias=total_bias(), dout=dout)
    for name, x, analytic in (
        ("slopes", slopes, oracle.alibi_slopes_grad(res.dlogits)),
        ("table", table, oracle.relative_position_table_grad(res.dlogits, 2 * m + 1)),
        ("bias", bias, oracle.reduce_to_shape(res.dlogits, bias.shape))):
      assert rel_err(analytic, _central_difference(loss, x)) < 1e-7, name
