"""Mosaic TPU flash attention (``pallas_kernels/tpu``) in TPU interpret mode on CPU.

Each case runs the forward and the backward under ``jit`` with small blocks, so odd
lengths span several blocks with ragged last blocks, and compares ``o``, ``dq``, ``dk``,
``dv``, ``dsinks``, ``dslopes`` and ``dbias`` with the float64 oracle
``tests/oracle_softmax.py`` as the relative error ``||x - ref|| / ||ref||`` (bfloat16
against the oracle run on the bf16-rounded inputs). Bias arrays carry -inf columns, a
fully -inf row and scattered -inf entries: nothing may be NaN, and every excluded pair
gets exactly zero output and gradients, including in blocks the schedule skips.
Interpret mode costs seconds per case, so each case combines several features. Block
skipping is checked twice: NaN-poisoned blocks that only a skipped step could read, and
the schedule the index maps read (a skipped step must keep the previous step's block, so
it issues no DMA). The kernels are also lowered to Mosaic for TPU on CPU, which checks the
block shapes and primitives against Mosaic's rules. Split over batch and heads on 8
simulated devices (``partition_check_tpu.py``, a subprocess), each launch must run on its
device's shard, match one device and add no collective.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops import masks
from pallas_kernels.tpu import flash_attention as fa
from tests import oracle_softmax as oracle

TOLERANCE = {
    jnp.float32: {"out": 1e-5, "grad": 1e-4},
    jnp.bfloat16: {"out": 1e-2, "grad": 1e-2},
}
INTERPRET = pltpu.InterpretParams()


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def to_f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@dataclasses.dataclass(frozen=True)
class Case:
  """One call. ``mask`` is ``(mask object, oracle formula (T, S) -> [T, S])`` or None.

  ``segments``: None, ``"packed"`` (the same packed documents on both sides) or
  ``"unmatched"`` (sorted ids where some query ids occur in no key: fully masked rows).
  ``lengths``: batch 0 without keys, batch 1 with random lengths (needs ``batch == 2``).
  ``bias``: None or the bias layout, ``"BNTS"``, ``"B1TS"`` or ``"1N1S"`` (broadcast along
  the queries, then materialised to ``[1, N, T, S]`` as the ops layer passes it); in the
  case's dtype, with -inf entries (see ``_bias``).
  ``poison``: NaN in every q / k / v (and bias) block that no computed step may read.
  """

  name: str
  dtype: Any
  q_len: int
  kv_len: int
  num_heads: int
  num_kv: int
  head_dim: int
  batch: int = 2
  mask: tuple[Any, Callable] | None = None
  soft_cap: float | None = None
  sinks: bool = False
  alibi: bool = False
  segments: str | None = None
  lengths: bool = False
  bias: str | None = None
  poison: bool = False
  blocks: fa.BlockSizes = fa.BlockSizes(16, 16, 16, 16, 16, 16)

  def __str__(self):
    return self.name


def _sorted_ids(rng, batch, length, num_ids):
  return np.sort(rng.integers(0, num_ids, (batch, length)), axis=1).astype(np.int32)


def _bias(case: Case, rng) -> np.ndarray:
  """A ``[Bb, Nb, T, S]`` bias with -inf on one key column (of every batch and head), on one
  whole query row of batch 0 and on ~5% of the entries."""
  b, t, s, n = case.batch, case.q_len, case.kv_len, case.num_heads
  shape = {"BNTS": (b, n, t, s), "B1TS": (b, 1, t, s), "1N1S": (1, n, 1, s)}[case.bias]
  bias = rng.standard_normal(shape)
  if case.bias == "1N1S":
    bias = np.broadcast_to(bias, (1, n, t, s)).copy()
  bias[..., rng.integers(s)] = -np.inf
  bias[0, :, rng.integers(t)] = -np.inf
  bias[rng.random(bias.shape) < 0.05] = -np.inf
  return bias


def _inputs(case: Case, rng):
  """Kernel arguments, the oracle's allowed matrix ``[B, N, T, S]`` and its inputs."""
  b, t, s, n, kh, h = (case.batch, case.q_len, case.kv_len, case.num_heads, case.num_kv,
                       case.head_dim)

  def normal(shape, dtype=case.dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  diff = {"q": normal((b, t, n, h)), "k": normal((b, s, kh, h)), "v": normal((b, s, kh, h))}
  if case.sinks:
    diff["sinks"] = normal((n,), jnp.float32)
  if case.alibi:
    diff["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
  if case.bias:
    diff["bias"] = jnp.asarray(_bias(case, rng), case.dtype)
  allowed = np.ones((b, n, t, s), bool)
  data = {}
  if case.mask is not None:
    data["mask"] = case.mask[0]
    allowed &= case.mask[1](t, s)
  if case.segments == "packed":
    ids = np.cumsum(rng.random((b, t)) < 0.1, axis=1).astype(np.int32)
    q_ids = kv_ids = ids
  elif case.segments == "unmatched":
    q_ids, kv_ids = _sorted_ids(rng, b, t, 3), _sorted_ids(rng, b, s, 3)
    q_ids[:, -t // 4:] = 7
  if case.segments:
    data["q_segment_ids"], data["kv_segment_ids"] = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    allowed &= oracle.documents(q_ids, kv_ids)
  if case.lengths:
    # Batch 0 has no keys; batch 1 keeps at most half its queries (whole dead blocks).
    q_lens = np.asarray([t, rng.integers(1, t // 2 + 1)], np.int32)
    kv_lens = np.asarray([0, rng.integers(s // 3, s + 1)], np.int32)
    data["q_lengths"], data["kv_lengths"] = jnp.asarray(q_lens), jnp.asarray(kv_lens)
    allowed &= oracle.padding(t, s, q_lens, kv_lens)
  bias = np.zeros((1, 1, 1, 1))
  if case.alibi:
    bias = bias + oracle.alibi_bias(to_f64(diff["alibi_slopes"]), t, s)
  if case.bias:
    bias = bias + to_f64(diff["bias"])
  oracle_in = {
      "query": to_f64(diff["q"]), "key": to_f64(diff["k"]), "value": to_f64(diff["v"]),
      "allowed": allowed, "logits_soft_cap": case.soft_cap,
      "sinks": to_f64(diff["sinks"]) if case.sinks else None, "bias": bias,
  }
  # Pairs the oracle weighs by exp(-inf) = 0 are excluded too.
  allowed = allowed & np.isfinite(np.broadcast_to(bias, allowed.shape))
  return diff, data, allowed, oracle_in, normal((b, t, n, h))


def _poison(case: Case, diff, data):
  """NaN into the q rows and k/v rows of blocks that no computed step may touch: query
  blocks past ``q_lengths`` and key blocks past ``kv_lengths`` or EMPTY for every query
  (the case uses one block size in all three kernels); with a per-batch bias, NaN into its
  tiles of EMPTY blocks and past the lengths."""
  bq, bk = case.blocks.block_q, case.blocks.block_k
  summary = case.mask[0].block_summary(case.q_len, case.kv_len, bq, bk)
  q, k, v = (np.array(diff[name].astype(jnp.float32)) for name in ("q", "k", "v"))
  poisoned_keys = 0
  for j in range(summary.shape[1]):
    if (summary[:, j] == masks.EMPTY).all():
      k[:, j * bk:(j + 1) * bk] = v[:, j * bk:(j + 1) * bk] = np.nan
      poisoned_keys += 1
  for b in range(case.batch):
    kv_start = fa._round_up(int(data["kv_lengths"][b]), bk)
    k[b, kv_start:] = v[b, kv_start:] = np.nan
    q[b, fa._round_up(int(data["q_lengths"][b]), bq):] = np.nan
  assert poisoned_keys and np.isnan(q).any()
  poisoned = {"q": q, "k": k, "v": v}
  if case.bias:
    assert case.bias in ("BNTS", "B1TS")
    bias = np.array(diff["bias"].astype(jnp.float32))
    dead = np.kron(summary == masks.EMPTY, np.ones((bq, bk), bool))[:case.q_len, :case.kv_len]
    bias[:, :, dead] = np.nan
    for b in range(case.batch):
      bias[b, :, fa._round_up(int(data["q_lengths"][b]), bq):] = np.nan
      bias[b, :, :, fa._round_up(int(data["kv_lengths"][b]), bk):] = np.nan
    assert np.isnan(bias[:, :, dead]).all() and dead.any()
    poisoned["bias"] = bias
  return {**diff, **{name: jnp.asarray(x, case.dtype) for name, x in poisoned.items()}}


def _run(case: Case, diff, data, dout):
  scale = case.head_dim ** -0.5

  def forward_backward(diff, data, dout):
    def attend(diff):
      return fa.flash_attention(
          diff["q"], diff["k"], diff["v"], scale=scale, soft_cap=case.soft_cap,
          sinks=diff.get("sinks"), alibi_slopes=diff.get("alibi_slopes"),
          bias=diff.get("bias"), block_sizes=case.blocks, interpret=INTERPRET, **data)
    o, vjp = jax.vjp(attend, diff)
    return o, vjp(dout)[0]

  static = {"mask": data.pop("mask")} if "mask" in data else {}
  fn = jax.jit(lambda diff, data, dout: forward_backward(diff, {**data, **static}, dout))
  return fn(diff, data, dout)


O = oracle
CASES = [
    # f32, GQA, causal with S < T, soft cap, sinks, ALiBi; the passes use different blocks.
    Case("f32_gqa_causal_cap_sinks_alibi", jnp.float32, 65, 63, 4, 2, 8, batch=1,
         mask=(masks.Causal(), O.causal), soft_cap=3.0, sinks=True, alibi=True,
         blocks=fa.BlockSizes(32, 32, 32, 16, 16, 32)),
    # bf16, MQA, two-sided window, segment ids with unmatched rows, lengths.
    Case("bf16_mqa_window_segments_lengths", jnp.bfloat16, 65, 63, 4, 1, 16,
         mask=(masks.LocalWindow(9, 4), lambda t, s: O.local_window(t, s, 9, 4)),
         segments="unmatched", lengths=True, blocks=fa.BlockSizes(*[32] * 6)),
    # f32, H = 128 (the lane layout, no transpose), MQA, block-sparse chunked mask, a
    # per-batch bias shared by the heads, poison.
    Case("f32_h128_chunked_sparse_bias_B1TS_poisoned", jnp.float32, 48, 80, 2, 1, 128,
         mask=(masks.ChunkedCausal(16), lambda t, s: O.chunked_causal(t, s, 16)),
         lengths=True, bias="B1TS", poison=True),
    # bf16, GQA, no mask, packed documents, soft cap, sinks, ALiBi.
    Case("bf16_gqa_documents_cap_sinks_alibi", jnp.bfloat16, 47, 47, 4, 2, 8,
         segments="packed", soft_cap=5.0, sinks=True, alibi=True,
         blocks=fa.BlockSizes(*[32] * 6)),
    # f32, full bias, GQA, causal with S > T (keys no query sees), soft cap, sinks, segment
    # ids with unmatched rows; blocks that divide neither length.
    Case("f32_bias_BNTS_gqa_causal_cap_sinks_segments", jnp.float32, 37, 45, 4, 2, 8,
         mask=(masks.Causal(), O.causal), soft_cap=3.0, sinks=True, segments="unmatched",
         bias="BNTS", blocks=fa.BlockSizes(16, 24, 24, 16, 16, 24)),
    # bf16 bias broadcast over batch and queries, GQA, window, sinks, ALiBi, lengths (a
    # batch with no key at all: its dbias blocks are never computed).
    Case("bf16_bias_1N1S_gqa_window_sinks_alibi_lengths", jnp.bfloat16, 45, 37, 4, 2, 16,
         mask=(masks.LocalWindow(12, 3), lambda t, s: O.local_window(t, s, 12, 3)),
         sinks=True, alibi=True, lengths=True, bias="1N1S",
         blocks=fa.BlockSizes(24, 16, 16, 24, 24, 16)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle(case, rng):
  diff, data, allowed, oracle_in, dout = _inputs(case, rng)
  kernel_diff = _poison(case, diff, data) if case.poison else diff
  out, grads = _run(case, kernel_diff, dict(data), dout)
  ref = oracle.attention(scale=case.head_dim ** -0.5, dout=to_f64(dout), **oracle_in)
  tol = TOLERANCE[case.dtype]
  expected = {"q": ref.dq, "k": ref.dk, "v": ref.dv}
  if case.sinks:
    expected["sinks"] = ref.dsinks
  if case.alibi:
    expected["alibi_slopes"] = oracle.alibi_slopes_grad(ref.dlogits)
  if case.bias:
    expected["bias"] = oracle.reduce_to_shape(ref.dlogits, diff["bias"].shape)
  for name, x in {"out": out, **grads}.items():
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  errors = {"out": rel_err(out, ref.out)}
  errors.update({f"d{name}": rel_err(grads[name], want) for name, want in expected.items()})
  bounds = {name: tol["out" if name == "out" else "grad"] for name in errors}
  assert all(errors[name] <= bounds[name] for name in errors), (errors, bounds)

  # A row that sees no key is exactly zero, and so is its query gradient; a key that no
  # query sees gets exactly zero dk and dv.
  dead_rows = ~allowed.any(-1).transpose(0, 2, 1)  # [B, T, N]
  groups = case.num_heads // case.num_kv
  seen_keys = allowed.reshape(case.batch, case.num_kv, groups, case.q_len, case.kv_len)
  dead_keys = ~seen_keys.any((2, 3)).transpose(0, 2, 1)  # [B, S, K]
  if case.lengths:  # a zero length leaves whole batch rows dead
    assert dead_rows.any() and dead_keys.any()
  assert not np.asarray(out)[dead_rows].any()
  assert not np.asarray(grads["q"])[dead_rows].any()
  for name in ("k", "v"):
    assert not np.asarray(grads[name])[dead_keys].any()
  if case.bias:
    # A bias entry all of whose pairs are excluded (mask, ids, lengths, -inf, or a block
    # the schedule skips) gets exactly zero gradient.
    shape = diff["bias"].shape
    summed = tuple(a for a in (0, 1) if shape[a] == 1)
    excluded = (~allowed).all(summed, keepdims=True)
    assert excluded.any() and not excluded.all()
    assert not np.asarray(grads["bias"])[excluded].any()


# --------------------------------------------------------------------- block schedule


def _config(mask, q_len, kv_len, block_q, block_k):
  (bq,), q_pad = fa._resolve_blocks(q_len, (block_q,), False, ("block_q",))
  (bk,), kv_pad = fa._resolve_blocks(kv_len, (block_k,), False, ("block_k",))
  return fa._Config(
      scale=1.0, soft_cap=None, mask=mask, q_len=q_len, kv_len=kv_len, q_pad=q_pad,
      kv_pad=kv_pad, num_heads=2, num_kv=1, head_dim=8, fwd=(bq, bk), dq=(bq, bk),
      dkv=(bq, bk), heads_in_lanes=False, has_segments=True, has_sinks=False,
      has_alibi=False, interpret=INTERPRET)


@pytest.mark.parametrize("transpose", [False, True])
def test_schedule_computes_live_blocks_and_reloads_nothing(transpose, rng):
  """Walk the grid the way the index maps read the schedule.

  A computing step reads a live block (statically non-empty, within the lengths), every
  block that holds an allowed pair is computed, and a skipped step keeps the block (and
  row block) of the step before it, so the pipeline issues no DMA for it.
  """
  q_len, kv_len, bq, bk, batch = 150, 133, 16, 16, 3
  mask = masks.LocalWindow(20, 3) | masks.Causal() & masks.StridedSparse(32)
  cfg = _config(mask, q_len, kv_len, bq, bk)
  q_lens = jnp.asarray([q_len, 70, 0], jnp.int32)
  kv_lens = jnp.asarray([50, kv_len, kv_len], jnp.int32)
  q_ids = _sorted_ids(rng, batch, cfg.q_pad, 4)
  kv_ids = _sorted_ids(rng, batch, cfg.kv_pad, 4)
  lists = fa._block_lists(cfg, bq, bk, q_lens, kv_lens,
                          (jnp.asarray(q_ids), jnp.asarray(kv_ids)), transpose=transpose)
  blocks, counts, rows = (np.asarray(x) for x in (lists.blocks, lists.counts, lists.rows))

  summary = cfg.summary(bq, bk)
  allowed = (mask.dense(cfg.q_pad, cfg.kv_pad)[None]
             & oracle.padding(cfg.q_pad, cfg.kv_pad, np.asarray(q_lens),
                              np.asarray(kv_lens))[:, 0]
             & oracle.documents(q_ids, kv_ids)[:, 0])
  nq, nk = summary.shape
  has_pair = allowed.reshape(batch, nq, bq, nk, bk).any((2, 4))
  if transpose:
    summary, has_pair = summary.T, has_pair.transpose(0, 2, 1)
  row_len, col_len = (kv_lens, q_lens) if transpose else (q_lens, kv_lens)
  row_block, col_block = (bk, bq) if transpose else (bq, bk)
  repeats = cfg.groups if transpose else 1  # the dk/dv grid walks the list once per head
  computed = np.zeros_like(has_pair)
  for b in range(batch):
    previous = None
    for r in range(summary.shape[0]):
      for _ in range(repeats):
        for t in range(lists.width):
          block = blocks[b, r, t]
          if t < counts[b, r]:
            assert rows[b, r] == r
            assert summary[r, block] != masks.EMPTY
            assert r * row_block < row_len[b] and block * col_block < col_len[b]
            computed[b, r, block] = True
          elif previous is not None:
            assert (rows[b, r], block) == previous, (b, r, t)
          previous = (rows[b, r], block)
  assert (computed | ~has_pair).all()
  assert computed.sum() < summary.size * batch / 2  # the schedule does skip


# ------------------------------------------------------------------ Mosaic lowering


@pytest.mark.parametrize("head_dim, bias_shape, bias_dtype", [
    (64, (2, 1, 300, 260), jnp.float32), (128, (1, 4, 300, 260), jnp.bfloat16)])
def test_lowers_to_mosaic_tpu(head_dim, bias_shape, bias_dtype):
  """Forward and backward with every option lower to Mosaic TPU custom calls (the
  [B, T, N*H] lane view at H = 128, the internal transpose at H = 64): three, and a
  fourth for the bias gradient."""
  b, t, s, n, k = 2, 300, 260, 4, 2
  spec = jax.ShapeDtypeStruct
  args = (spec((b, t, n, head_dim), jnp.bfloat16), spec((b, s, k, head_dim), jnp.bfloat16),
          spec((b, s, k, head_dim), jnp.bfloat16), spec((n,), jnp.float32),
          spec((n,), jnp.float32), spec(bias_shape, bias_dtype), spec((b, t), jnp.int32),
          spec((b, s), jnp.int32), spec((b,), jnp.int32), spec((b,), jnp.int32))

  def forward_backward(q, k, v, sinks, slopes, bias, q_ids, kv_ids, q_lens, kv_lens,
                       with_bias):
    def attend(q, k, v, sinks, slopes, bias):
      return fa.flash_attention(
          q, k, v, scale=0.1, soft_cap=20.0, sinks=sinks, alibi_slopes=slopes,
          bias=bias if with_bias else None,
          mask=masks.Causal() & masks.LocalWindow(200, 0), q_segment_ids=q_ids,
          kv_segment_ids=kv_ids, q_lengths=q_lens, kv_lengths=kv_lens,
          block_sizes=fa.BlockSizes(128, 128, 128, 128, 128, 256))
    o, vjp = jax.vjp(attend, q, k, v, sinks, slopes, bias)
    return vjp(o)

  for with_bias, calls in ((False, 3), (True, 4)):
    lowered = jax.jit(functools.partial(forward_backward, with_bias=with_bias)).trace(
        *args).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == calls


# ------------------------------------------------------------------------ bad input


def _qkv(t=20, s=20, n=4, k=2, h=8, dtype=jnp.float32):
  return (jnp.ones((2, t, n, h), dtype), jnp.ones((2, s, k, h), dtype),
          jnp.ones((2, s, k, h), dtype))


@pytest.mark.parametrize("change, message", [
    (lambda a: {"qkv": _qkv(n=3)}, "multiple of k/v heads"),
    (lambda a: {"qkv": (a[0], a[1].astype(jnp.bfloat16), a[2])}, "share dtype"),
    (lambda a: {"sinks": jnp.zeros(3)}, "sinks must have shape"),
    (lambda a: {"alibi_slopes": jnp.zeros(4, jnp.int32)}, "alibi_slopes must be float"),
    (lambda a: {"q_segment_ids": jnp.zeros((2, 20), jnp.int32)}, "given together"),
    (lambda a: {"kv_lengths": jnp.zeros((3,), jnp.int32)}, "kv_lengths must have shape"),
    (lambda a: {"bias": jnp.zeros((2, 2, 20, 20))}, r"bias must be \[Bb, Nb, T, S\].*"
     r"got shape \(2, 2, 20, 20\)"),
    (lambda a: {"bias": jnp.zeros((1, 4, 20))}, r"bias must be .*got shape \(1, 4, 20\)"),
    (lambda a: {"bias": jnp.zeros((1, 1, 20, 20), jnp.float16)},
     "bias must be float32 or bfloat16, got dtype float16"),
    (lambda a: {"mask": masks.Documents(jnp.zeros((2, 20), jnp.int32),
                                        jnp.zeros((2, 20), jnp.int32))}, "must be static"),
    (lambda a: {"qkv": _qkv(t=300), "interpret": False,
                "block_sizes": fa.BlockSizes(block_q=64)}, "block_q must be a multiple of 128"),
])
def test_bad_input_raises(change, message):
  kwargs = change(_qkv())
  qkv = kwargs.pop("qkv", _qkv())
  kwargs.setdefault("interpret", INTERPRET)
  with pytest.raises(ValueError, match=message):
    fa.flash_attention(*qkv, scale=0.5, **kwargs)


def test_block_sizes_must_be_multiples_of_eight():
  with pytest.raises(ValueError, match="block_k_dq must be a positive multiple of 8"):
    fa.BlockSizes(block_k_dq=12)


# ------------------------------------------------------------ batch and head shards

PARTITION_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "partition_check_tpu.py")


@pytest.fixture(scope="module")
def partitioned():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, PARTITION_CHECK], capture_output=True, text=True,
                        env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout, q_shard, k_shard", [
    # [B, N, T_pad, H] at H = 8; [B, T_pad, N * H] at H = 128. Batch 2 / 2, query heads
    # 8 / 4, key heads 4 / 4, both lengths padded to 32.
    ("split", [1, 2, 32, 8], [1, 1, 32, 8]), ("lanes", [1, 32, 256], [1, 32, 128])])
def test_batch_head_shards_match_one_device_without_collectives(partitioned, layout, q_shard,
                                                                k_shard):
  """Forward, dq, dk/dv and dbias each run on one device's batch and head shard (a shard's
  own head counts and block lists), equal the single-device run in every output and
  gradient, and the forward and q, k, v, bias gradients need no collective."""
  r = partitioned[layout]
  assert all(err < 1e-5 for err in r["errors"].values()), r["errors"]
  assert len(r["errors"]) == (7 if layout == "split" else 5), r["errors"]
  assert r["o_spec"].startswith("P('data', None, 'model'"), r["o_spec"]
  assert set(r["traced"]) == {"_forward", "_dq_pass", "_dkv_pass", "_dbias_pass"}
  for name, shapes in r["traced"].items():
    assert [q_shard, k_shard, [1], 2, 1] in shapes, (name, shapes)
  assert not any(r["collectives"].values()), r["collectives"]


def test_several_tpus_partition_every_launch(partitioned):
  """On hardware (interpret=False, nothing forced) with 8 devices the four launches are
  custom-partitioning calls; no Mosaic call is left for XLA to partition."""
  assert partitioned["hardware"] == {"partitioned": 4, "mosaic": 0}
