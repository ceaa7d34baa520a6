"""The mask vocabulary against the oracle's index formulas.

For every mask: ``dense`` equals the formula, ``predicate`` equals the formula on a block,
and ``block_summary`` equals a brute-force summary of the dense mask (exactly for static
masks; for masks that hold arrays, every EMPTY and FULL claim must be true). ``&`` and
``|`` compose all three views.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import masks
from tests import oracle_softmax as O

LENGTHS = ((1, 1), (7, 7), (63, 65), (65, 63), (33, 257), (257, 257))
BLOCKS = ((16, 32), (32, 16), (7, 13), (64, 64), (1, 1), (512, 512))

STATIC_MASKS = [
    ("full", masks.Full(), O.full),
    ("causal", masks.Causal(), O.causal),
    ("window_0_0", masks.LocalWindow(0, 0), lambda t, s: O.local_window(t, s, 0, 0)),
    ("window_3_5", masks.LocalWindow(3, 5), lambda t, s: O.local_window(t, s, 3, 5)),
    ("window_0_7", masks.LocalWindow(0, 7), lambda t, s: O.local_window(t, s, 0, 7)),
    ("window_100_0", masks.LocalWindow(100, 0), lambda t, s: O.local_window(t, s, 100, 0)),
    ("chunked_1", masks.ChunkedCausal(1), lambda t, s: O.chunked_causal(t, s, 1)),
    ("chunked_10", masks.ChunkedCausal(10), lambda t, s: O.chunked_causal(t, s, 10)),
    ("chunked_16", masks.ChunkedCausal(16), lambda t, s: O.chunked_causal(t, s, 16)),
    ("prefix_0", masks.PrefixLM(0), lambda t, s: O.prefix_lm(t, s, 0)),
    ("prefix_10", masks.PrefixLM(10), lambda t, s: O.prefix_lm(t, s, 10)),
    ("prefix_1000", masks.PrefixLM(1000), lambda t, s: O.prefix_lm(t, s, 1000)),
    ("strided_1", masks.StridedSparse(1), lambda t, s: O.strided_sparse(t, s, 1)),
    ("strided_3", masks.StridedSparse(3), lambda t, s: O.strided_sparse(t, s, 3)),
    ("strided_8", masks.StridedSparse(8), lambda t, s: O.strided_sparse(t, s, 8)),
    ("fixed_8_1", masks.FixedSparse(8), lambda t, s: O.fixed_sparse(t, s, 8, 1)),
    ("fixed_8_2", masks.FixedSparse(8, 2), lambda t, s: O.fixed_sparse(t, s, 8, 2)),
    ("fixed_5_5", masks.FixedSparse(5, 5), lambda t, s: O.fixed_sparse(t, s, 5, 5)),
    ("global_local_0_4", masks.GlobalLocal(0, 4), lambda t, s: O.global_local(t, s, 0, 4)),
    ("global_local_3_4", masks.GlobalLocal(3, 4), lambda t, s: O.global_local(t, s, 3, 4)),
    ("global_local_2_0", masks.GlobalLocal(2, 0), lambda t, s: O.global_local(t, s, 2, 0)),
    ("power_of_two_1", masks.PowerOfTwo(), lambda t, s: O.power_of_two(t, s, 1)),
    ("power_of_two_3", masks.PowerOfTwo(3), lambda t, s: O.power_of_two(t, s, 3)),
    ("power_of_two_4", masks.PowerOfTwo(4), lambda t, s: O.power_of_two(t, s, 4)),
    # compositions of static masks stay static, with exact summaries
    ("causal_and_window", masks.Causal() & masks.LocalWindow(8, 8),
     lambda t, s: O.causal(t, s) & O.local_window(t, s, 8, 8)),
    ("prefix_and_window", masks.PrefixLM(8) & masks.LocalWindow(20, 20),
     lambda t, s: O.prefix_lm(t, s, 8) & O.local_window(t, s, 20, 20)),
    ("window_or_fixed", masks.LocalWindow(3, 0) | masks.FixedSparse(16),
     lambda t, s: O.local_window(t, s, 3, 0) | O.fixed_sparse(t, s, 16)),
    ("chunked_or_strided", masks.ChunkedCausal(16) | masks.StridedSparse(16),
     lambda t, s: O.chunked_causal(t, s, 16) | O.strided_sparse(t, s, 16)),
    ("causal_and_window_or_global",
     masks.Causal() & (masks.LocalWindow(8, 0) | masks.GlobalLocal(2, 0)),
     lambda t, s: O.causal(t, s) & (O.local_window(t, s, 8, 0) | O.global_local(t, s, 2, 0))),
    ("window_and_chunked", masks.LocalWindow(0, 4) & masks.ChunkedCausal(8),
     lambda t, s: O.local_window(t, s, 0, 4) & O.chunked_causal(t, s, 8)),
    ("chunked_and_prefix_or_power",
     (masks.ChunkedCausal(12) & masks.PrefixLM(30)) | masks.PowerOfTwo(2),
     lambda t, s: (O.chunked_causal(t, s, 12) & O.prefix_lm(t, s, 30)) | O.power_of_two(t, s, 2)),
]


def brute_summary(allowed, block_q, block_k):
  """EMPTY / PARTIAL / FULL of every block of ``allowed [..., T, S]``, all leading rows
  together (a block is FULL only if full for every batch row and head)."""
  t, s = allowed.shape[-2:]
  allowed = allowed.reshape(-1, t, s).astype(np.int64)
  rows, cols = np.arange(0, t, block_q), np.arange(0, s, block_k)
  counts = np.add.reduceat(np.add.reduceat(allowed.sum(0), rows, axis=0), cols, axis=1)
  sizes = (np.minimum(rows + block_q, t) - rows)[:, None] * (
      np.minimum(cols + block_k, s) - cols)[None, :] * allowed.shape[0]
  return np.where(counts == sizes, masks.FULL,
                  np.where(counts > 0, masks.PARTIAL, masks.EMPTY)).astype(np.int8)


def test_summary_codes():
  assert (masks.EMPTY, masks.PARTIAL, masks.FULL) == (0, 1, 2)


@pytest.mark.parametrize("name,mask,formula", STATIC_MASKS, ids=[m[0] for m in STATIC_MASKS])
def test_static_dense_matches_formula(name, mask, formula):
  for t, s in LENGTHS:
    dense = mask.dense(t, s)
    assert isinstance(dense, np.ndarray) and dense.dtype == bool, (t, s, type(dense))
    np.testing.assert_array_equal(dense, formula(t, s), err_msg=f"{name} T={t} S={s}")


@pytest.mark.parametrize("name,mask,formula", STATIC_MASKS, ids=[m[0] for m in STATIC_MASKS])
def test_static_predicate_on_blocks(name, mask, formula):
  """The element rule on ``[bq, 1] x [1, bk]`` index grids, NumPy and JAX alike."""
  reference = formula(70, 90)
  for q0, k0, bq, bk in ((0, 0, 16, 32), (32, 16, 16, 32), (48, 0, 7, 13), (5, 70, 9, 20)):
    rows, cols = np.arange(q0, q0 + bq), np.arange(k0, k0 + bk)
    expected = reference[np.ix_(rows, cols)]
    got = np.broadcast_to(mask.predicate(rows[:, None], cols[None, :]), expected.shape)
    np.testing.assert_array_equal(got, expected, err_msg=f"{name} numpy at {q0},{k0}")
    got = jax.jit(lambda q, k: jnp.broadcast_to(mask.predicate(q, k), (bq, bk)))(
        jnp.asarray(rows[:, None], jnp.int32), jnp.asarray(cols[None, :], jnp.int32))
    np.testing.assert_array_equal(got, expected, err_msg=f"{name} jax at {q0},{k0}")


@pytest.mark.parametrize("name,mask,formula", STATIC_MASKS, ids=[m[0] for m in STATIC_MASKS])
def test_static_block_summary_is_exact(name, mask, formula):
  for t, s in LENGTHS:
    dense = formula(t, s)
    for bq, bk in BLOCKS:
      if bq * bk == 1 and t * s > 65 * 65:
        continue  # a summary per element; the small lengths cover it
      got = mask.block_summary(t, s, bq, bk)
      where = f"{name} T={t} S={s} blocks=({bq}, {bk})"
      assert isinstance(got, np.ndarray), where
      assert got.dtype == np.int8 and got.shape == (-(-t // bq), -(-s // bk)), where
      np.testing.assert_array_equal(got, brute_summary(dense, bq, bk), err_msg=where)


# --------------------------------------------------------------------- data masks


def _ids(rng, batch, length, num_ids=4):
  return np.sort(rng.integers(0, num_ids, (batch, length)), axis=1).astype(np.int32)


def _lengths(rng, batch, length):
  out = rng.integers(0, length + 1, batch).astype(np.int32)
  out[0] = length
  return out


def documents(rng, b, t, s):
  q_ids = _ids(rng, b, t)
  kv_ids = q_ids if t == s else _ids(rng, b, s)
  return (masks.Documents(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
          O.documents(q_ids, kv_ids))


def documents_one_per_row(rng, b, t, s):
  """A single document per batch row: blocks are either all in or all out."""
  q_ids = np.repeat(np.arange(b, dtype=np.int32)[:, None], t, axis=1)
  kv_ids = np.repeat(np.arange(b, dtype=np.int32)[:, None], s, axis=1)
  kv_ids[0] = 9
  return (masks.Documents(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
          O.documents(q_ids, kv_ids))


def padding_both(rng, b, t, s):
  ql, kl = _lengths(rng, b, t), _lengths(rng, b, s)
  return masks.Padding(jnp.asarray(ql), jnp.asarray(kl)), O.padding(t, s, ql, kl)


def padding_kv(rng, b, t, s):
  kl = _lengths(rng, b, s)
  return masks.Padding(None, jnp.asarray(kl)), O.padding(t, s, None, kl)


def padding_q(rng, b, t, s):
  ql = _lengths(rng, b, t)
  return masks.Padding(jnp.asarray(ql), None), O.padding(t, s, ql, None)


def array_mask(shape_of):
  def build(rng, b, t, s):
    m = rng.random(shape_of(b, t, s)) < 0.5
    return masks.ArrayMask(jnp.asarray(m)), m
  return build


def array_mask_structured(rng, b, t, s):
  """Mostly-empty array with a full band, so EMPTY and FULL blocks both occur."""
  m = np.zeros((b, 1, t, s), bool)
  m[..., : t // 2, : s // 3] = True
  return masks.ArrayMask(jnp.asarray(m)), m


def combine(build_a, build_b, op):
  def build(rng, b, t, s):
    ma, da = build_a(rng, b, t, s)
    mb, db = build_b(rng, b, t, s)
    return op(ma, mb), op(da, db)
  return build


def static(mask, formula):
  return lambda rng, b, t, s: (mask, formula(t, s))


DYNAMIC_MASKS = [
    ("documents", documents),
    ("documents_one_per_row", documents_one_per_row),
    ("padding_both", padding_both),
    ("padding_kv", padding_kv),
    ("padding_q", padding_q),
    ("array_BNTS", array_mask(lambda b, t, s: (b, 3, t, s))),
    ("array_11TS", array_mask(lambda b, t, s: (1, 1, t, s))),
    ("array_B11S", array_mask(lambda b, t, s: (b, 1, 1, s))),
    ("array_structured", array_mask_structured),
    ("documents_and_causal", combine(documents, static(masks.Causal(), O.causal),
                                     lambda a, b: a & b)),
    ("causal_and_documents", combine(static(masks.Causal(), O.causal), documents,
                                     lambda a, b: a & b)),
    ("padding_or_window", combine(padding_both, static(
        masks.LocalWindow(2, 2), lambda t, s: O.local_window(t, s, 2, 2)), lambda a, b: a | b)),
    ("array_or_causal", combine(array_mask(lambda b, t, s: (b, 1, t, s)),
                                static(masks.Causal(), O.causal), lambda a, b: a | b)),
    ("documents_and_padding", combine(documents, padding_kv, lambda a, b: a & b)),
    ("structured_and_prefix", combine(array_mask_structured, static(
        masks.PrefixLM(5), lambda t, s: O.prefix_lm(t, s, 5)), lambda a, b: a & b)),
]
DYNAMIC_LENGTHS = ((1, 1), (63, 65), (65, 63), (33, 257))


@pytest.mark.parametrize("name,build", DYNAMIC_MASKS, ids=[m[0] for m in DYNAMIC_MASKS])
def test_dynamic_mask(name, build, rng):
  """``dense`` and ``predicate`` equal the formula; in ``block_summary`` (computed under
  jit), EMPTY means no allowed pair in any batch row and FULL means every pair allowed."""
  built = [build(rng, 2, t, s) for t, s in DYNAMIC_LENGTHS]
  windows = [(np.arange(min(5, t - 1), min(21, t)), np.arange(min(3, s - 1), min(40, s)))
             for t, s in DYNAMIC_LENGTHS]

  @jax.jit
  def views(mask_list):  # one compilation for every length
    out = []
    for m, (t, s), (rows, cols) in zip(mask_list, DYNAMIC_LENGTHS, windows):
      block = m.predicate(jnp.asarray(rows[:, None], jnp.int32),
                          jnp.asarray(cols[None, :], jnp.int32))
      out.append((m.dense(t, s), block,
                  [m.block_summary(t, s, bq, bk) for bq, bk in BLOCKS]))
    return out

  results = jax.tree.map(np.asarray, views([m for m, _ in built]))
  for (t, s), (_, expected), (rows, cols), (dense, block, summaries) in zip(
      DYNAMIC_LENGTHS, built, windows, results):
    assert dense.dtype == bool and dense.ndim == 4, (name, dense.shape)
    full_shape = np.broadcast_shapes(dense.shape, expected.shape, (2, 3, t, s))
    expected = np.broadcast_to(expected, full_shape)
    np.testing.assert_array_equal(np.broadcast_to(dense, full_shape), expected,
                                  err_msg=f"dense T={t} S={s}")
    want = expected[..., rows[:, None], cols[None, :]]
    np.testing.assert_array_equal(np.broadcast_to(block, want.shape), want,
                                  err_msg=f"predicate T={t} S={s}")
    for (bq, bk), got in zip(BLOCKS, summaries):
      where = f"{name} T={t} S={s} blocks=({bq}, {bk})"
      assert got.dtype == np.int8 and got.shape == (-(-t // bq), -(-s // bk)), where
      assert np.all(np.isin(got, (masks.EMPTY, masks.PARTIAL, masks.FULL))), where
      truth = brute_summary(expected, bq, bk)
      wrong_empty = (got == masks.EMPTY) & (truth != masks.EMPTY)
      wrong_full = (got == masks.FULL) & (truth != masks.FULL)
      assert not wrong_empty.any(), f"{where}: EMPTY claimed at {np.argwhere(wrong_empty)}"
      assert not wrong_full.any(), f"{where}: FULL claimed at {np.argwhere(wrong_full)}"


def test_composition_is_elementwise_and_or():
  """``&`` / ``|`` of every pair of a few static masks: dense and summary."""
  pool = [m for m in STATIC_MASKS if m[0] in (
      "causal", "window_3_5", "chunked_10", "prefix_10", "strided_3", "global_local_3_4",
      "power_of_two_4", "fixed_8_2")]
  t, s = 65, 63
  for _, ma, fa in pool:
    for _, mb, fb in pool:
      for op in (lambda a, b: a & b, lambda a, b: a | b):
        expected = op(fa(t, s), fb(t, s))
        np.testing.assert_array_equal(op(ma, mb).dense(t, s), expected)
        np.testing.assert_array_equal(op(ma, mb).block_summary(t, s, 16, 8),
                                      brute_summary(expected, 16, 8))


def test_data_masks_pass_through_jit(rng):
  build = combine(documents, padding_kv, lambda a, b: a & b)
  mask, expected = build(rng, 2, 33, 65)
  dense = jax.jit(lambda m: m.dense(33, 65))(mask)
  np.testing.assert_array_equal(dense, np.broadcast_to(expected, dense.shape))


# --------------------------------------------------------------------- score mods


@pytest.mark.parametrize("t,s", ((1, 1), (7, 65), (65, 63)))
def test_alibi_dense(t, s, rng):
  slopes = jnp.asarray(rng.random(4), jnp.float32)
  got = np.asarray(masks.Alibi(slopes).dense(t, s))
  expected = O.alibi_bias(np.asarray(slopes, np.float64), t, s)
  np.testing.assert_allclose(np.broadcast_to(got, expected.shape[1:])[None], expected,
                             rtol=1e-6)


@pytest.mark.parametrize("t,s,max_distance", ((1, 1, 0), (7, 65, 3), (65, 63, 8)))
def test_relative_position_bias_dense(t, s, max_distance, rng):
  table = jnp.asarray(rng.standard_normal((3, 2 * max_distance + 1)), jnp.float32)
  got = np.asarray(masks.RelativePositionBias(table).dense(t, s))
  expected = O.relative_position_bias(np.asarray(table, np.float64), t, s)
  np.testing.assert_allclose(np.broadcast_to(got, expected.shape[1:])[None], expected,
                             rtol=1e-6)


def _press_slopes(n):
  """Press et al.'s reference recipe (github.com/ofirpress/attention_with_linear_biases):
  geometric for powers of two, else the closest power's slopes plus every other slope
  of twice that power."""
  if math.log2(n).is_integer():
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]
  closest = 2 ** math.floor(math.log2(n))
  return _press_slopes(closest) + _press_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", (1, 2, 4, 8, 16, 6, 12))
def test_alibi_slopes_are_standard(num_heads):
  np.testing.assert_allclose(masks.alibi_slopes(num_heads), _press_slopes(num_heads),
                             rtol=1e-12)
