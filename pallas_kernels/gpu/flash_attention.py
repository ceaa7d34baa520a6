"""Flash attention for Hopper GPUs in Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``).

Forward and backward of softmax attention in attnlab's layout ``q [B, T, N, H]``,
``k, v [B, S, K, H]`` (GQA/MQA: query head ``n`` reads key/value head ``n // (N // K)``,
never a repeated copy), with a static mask given by its element predicate and its block
summary, packed documents (segment ids), a soft cap and learned sinks.

Each kernel runs three warpgroups per CTA: two compute warpgroups own ``block_q`` query
rows each (``block_k`` keys each in the dk/dv pass) and a producer warpgroup streams the
other operand's blocks through a ring of shared-memory slots with TMA copies, waiting for
the compute warpgroups to release a slot before refilling it. Both sides walk the same
per-tile block list: the non-empty blocks of the mask's summary, the PARTIAL ones first
(scores masked element by element) and the FULL ones after (no predicate), so empty
blocks are never loaded and full ones pay no mask arithmetic. Matrix products are
``wgmma`` with float32 accumulators in registers; the softmax runs in base 2 with the
row maximum kept in the scaled domain.

The backward is two kernels: dq (per query tile, over its key blocks) and dk/dv (per key
tile, over the query blocks of every query head of its group, so GQA gradients are summed
in registers). ``delta = rowsum(dO * O)`` and the sink gradient are computed outside, in
XLA, from the saved base-2 log-sum-exp.

Runs on an H100/H200 (sm_90a; measured with jax 0.11.2) and, slowly, on CPU through the
Mosaic GPU interpreter of jax 0.10.2 (``interpret=True``; see ``pallas_kernels/gpu/_interpret.py``). Under a
``jit`` over several devices each launch is split over the batch and head shards of its
operands (``pallas_kernels/partition.py``), since XLA cannot partition a Mosaic call.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import partition
from pallas_kernels.gpu import _interpret
from pallas_kernels.gpu import tiles

LOG2E = math.log2(math.e)
EMPTY, PARTIAL, FULL = 0, 1, 2
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile shapes. Forward: ``block_q`` rows per compute warpgroup (two per CTA),
  ``block_k`` keys per streamed block, ``stages`` shared-memory slots in the K/V ring.
  Backward: ``block_q_bwd`` query rows per warpgroup in the dq pass and per streamed block
  in the dk/dv pass, ``block_k_bwd`` keys per warpgroup in the dk/dv pass, ``block_k_dq``
  keys per streamed block in the dq pass, ``stages_bwd`` ring slots of both.

  The register file bounds them: a compute warpgroup holds its float32 accumulators
  (``block x H``) and one or two float32 score tiles; at H = 128, 64-row tiles leave room
  for 128-key score tiles in the forward and the dq pass, and the dk/dv pass, which holds
  two accumulators, takes 64 x 64 score tiles. Shared memory (227 KB) bounds the ring:
  two 128-key K/V slots plus the query tiles at H = 128."""

  block_q: int = 64
  block_k: int = 128
  stages: int = 2
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  block_k_dq: int = 64
  stages_bwd: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_k_dq"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % 64:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of 64, got {value!r}")
    # The forward's two compute warpgroups take turns on the tensor cores; with one ring
    # slot the turn-taking and the slot's release wait on each other (deadlock).
    for name, least in (("stages", 2), ("stages_bwd", 1)):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
        raise ValueError(f"BlockSizes.{name} must be an int >= {least}, got "
                         f"{getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  soft_cap: float | None
  mask: object            # static predicate(q_idx, kv_idx) or None
  kv_len: int             # real key length; keys at or past it are padding
  groups: int             # query heads per key/value head
  has_sinks: bool
  has_segments: bool
  sizes: BlockSizes
  interpret: bool
  bias_dims: tuple[bool, bool] | None = None  # a dense bias: (per batch, per head)
  has_alibi: bool = False
  emit_ds: bool = False   # the dq kernel writes dS tiles (the bias gradient), not dq

  @property
  def low_output(self):
    """Whether the forward also writes the output's rounding error: the sink, slope and
    (broadcast) bias gradients sum dS = P (dP - delta) over many rows with cancellation,
    and delta = rowsum(dO * O) from the rounded output alone leaves them ~1e-2 off in
    bfloat16."""
    return self.has_sinks or self.has_alibi or self.bias_dims is not None


# ----------------------------------------------------------------------- block lists


def _summary(mask, q_len, kv_len, rows, cols):
  """``[nq, nk]`` codes for tiles of ``rows`` x ``cols``; keys past ``kv_len`` are empty."""
  if mask is None:
    summary = np.full((-(-q_len // rows), -(-kv_len // cols)), FULL, np.int8)
  else:
    summary = np.array(mask.block_summary(q_len, kv_len, rows, cols), np.int8)
  if kv_len % cols:
    # The kernels' last key block reaches into the padding: never skip the bound check.
    summary[:, -1] = np.minimum(summary[:, -1], PARTIAL)
  return summary


def _lists(summary, n):
  """Per row of ``summary``: its non-empty columns, PARTIAL first; their count; and how
  many are PARTIAL. Returns int32 ``[n, m]``, ``[n, 2]`` (count, partial); rows past the
  summary's (tiles of padding only) visit nothing."""
  m = summary.shape[1]
  order = np.zeros((n, m), np.int32)
  meta = np.zeros((n, 2), np.int32)
  for i in range(summary.shape[0]):
    partial = np.flatnonzero(summary[i] == PARTIAL)
    full = np.flatnonzero(summary[i] == FULL)
    row = np.concatenate([partial, full])
    order[i, :row.size] = row
    meta[i] = row.size, partial.size
  return order, meta


# ------------------------------------------------------------------------- in-kernel


_swizzled = tiles.swizzled
_cast = tiles.cast
_load = tiles.load
_zeros = tiles.zeros
_full_rows = tiles.full_rows
_matmul = tiles.matmul
_matmul_add = tiles.matmul_add
_matmul_pair = tiles.matmul_pair


def _positions(static, q_base, kv_base, shape, transposed):
  """Query and key positions of a tile's elements, in the WGMMA register layout."""
  q_dim, k_dim = (1, 0) if transposed else (0, 1)
  iota = lambda dim: _cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA,
                           static.interpret)
  return iota(q_dim) + q_base, iota(k_dim) + kv_base


def _bias_index(static, batch, head):
  """The dense bias's (batch, head) index for this program (0 on a broadcast axis)."""
  per_batch, per_head = static.bias_dims
  return (batch if per_batch else 0, head if per_head else 0)


def _needs_positions(static, partial):
  return partial or static.has_alibi


def _add_terms(static, x, bias, slope, pos):
  """Base-2 logits plus the dense bias tile and ALiBi's ``-slope * |i - j|``."""
  if bias is not None:
    x = x + bias * LOG2E
  if static.has_alibi:
    q_idx, kv_idx = pos
    x = x - (slope * LOG2E) * jnp.abs(q_idx - kv_idx).astype(jnp.float32)
  return x


def _allowed(static, pos, shape, transposed, partial, q_seg=None, kv_seg=None):
  """Which ``(query, key)`` pairs of a tile may attend, in the WGMMA register layout.

  ``shape`` is ``[queries, keys]`` (``[keys, queries]`` when ``transposed``); ``pos`` the
  tile's positions (:func:`_positions`, needed when ``partial``). None when nothing needs
  masking (a FULL block without documents)."""
  q_dim, k_dim = (1, 0) if transposed else (0, 1)
  ok = None
  if partial:
    q_idx, kv_idx = pos
    ok = kv_idx < static.kv_len
    if static.mask is not None:
      ok = ok & static.mask.predicate(q_idx, kv_idx)
  if static.has_segments:
    same = (lax.broadcast_in_dim(q_seg, shape, [q_dim])
            == lax.broadcast_in_dim(kv_seg, shape, [k_dim]))
    ok = same if ok is None else ok & same
  return ok


def _logits(static, s):
  """Scores in base 2 (``log2(e) * logit``) and ``tanh`` of the soft cap (or None)."""
  if static.soft_cap is None:
    return s * (static.scale * LOG2E), None
  t = jnp.tanh(s * (static.scale / static.soft_cap))
  return t * (static.soft_cap * LOG2E), t


# --------------------------------------------------------------------------- forward


def _forward_kernel(static, refs, scratch):
  q_ref, k_ref, v_ref, order_ref, meta_ref = (refs[n] for n in ("q", "k", "v", "order", "meta"))
  sinks_ref, qseg_ref, kvseg_ref = refs.get("sinks"), refs.get("qseg"), refs.get("kvseg")
  o_ref, lse_ref = refs["o"], refs["lse"]
  (q_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem,
   q_bar, k_bar, v_bar, seg_bar, k_free, v_free, turn, bias_smem) = scratch
  sizes = static.sizes
  bq, bk, stages = sizes.block_q, sizes.block_k, sizes.stages
  tile, head, batch = _grid_position(order_ref)
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(static.groups))
  count, n_partial = meta_ref[tile, 0], meta_ref[tile, 1]

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    if not static.interpret:
      plgpu.set_max_registers(232, action="increase")
    q_base = tile * (_COMPUTE_WGS * bq) + wg * bq
    q_tile, lse_tile = q_smem.at[wg], lse_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, bq), head], q_tile, q_bar.at[wg])
    q_seg = None
    if static.has_segments:
      plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(q_base, bq)], qseg_smem.at[wg],
                              seg_bar.at[wg])
      plgpu.barrier_wait(seg_bar.at[wg])
      q_seg = _load(qseg_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), static.interpret)
    plgpu.barrier_wait(q_bar.at[wg])
    slope = refs["slopes"][head] if static.has_alibi else None
    if static.has_sinks:
      m0 = _full_rows(bq, 0.0, static.interpret) + sinks_ref[head] * LOG2E
      l0 = _full_rows(bq, 1.0, static.interpret)
    else:
      m0 = _full_rows(bq, -jnp.inf, static.interpret)
      l0 = _full_rows(bq, 0.0, static.interpret)

    # Ping-pong (FlashAttention-3, Shah et al. 2024, §3.1): the two compute warpgroups
    # meet at `turn` twice per step, offset by one meeting, so that one computes its
    # softmax while the other's products run on the tensor cores.
    def handoff():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    def step(s, carry, partial):
      acc, m, l = carry
      slot = lax.rem(s, jnp.int32(stages))
      kv_base = order_ref[tile, s] * bk
      plgpu.barrier_wait(k_bar.at[slot])
      scores = _matmul(q_tile, k_smem.at[slot], (bq, bk), static.interpret, transpose_b=True,
                       after_issue=handoff)
      kv_seg = None
      if static.has_segments:
        kv_seg = _load(kvseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0), static.interpret)
      bias = None
      if static.bias_dims is not None:
        bias = _load(bias_smem.at[slot, pl.ds(wg * bq, bq)], plgpu.Layout.WGMMA,
                     static.interpret, optimized=False)
      plgpu.barrier_arrive(k_free.at[slot])
      pos = None
      if _needs_positions(static, partial):
        pos = _positions(static, q_base, kv_base, (bq, bk), False)
      x, _ = _logits(static, scores)
      x = _add_terms(static, x, bias, slope, pos)
      ok = _allowed(static, pos, (bq, bk), False, partial, q_seg, kv_seg)
      if ok is not None:
        x = jnp.where(ok, x, -jnp.inf)
      m_new = jnp.maximum(m, x.max(axis=1))
      # A row with nothing allowed yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp2(x - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
      alpha = jnp.exp2(m - m_use)
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      plgpu.barrier_arrive(turn)  # softmax done
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(turn)  # the other warpgroup has issued its scores product
      acc = _matmul_add(acc, p.astype(v_smem.dtype), v_smem.at[slot], static.interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    head_dim = q_tile.shape[-1]
    carry = (_zeros((bq, head_dim), static.interpret), m0, l0)
    pl.when(wg == 1)(handoff)
    carry = lax.fori_loop(0, n_partial, functools.partial(step, partial=True), carry)
    acc, m, l = lax.fori_loop(n_partial, count, functools.partial(step, partial=False), carry)
    pl.when(wg == 0)(handoff)
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    m_use = jnp.where(m == -jnp.inf, 0.0, m)
    lse_tile[...] = jnp.where(seen, m_use + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
    out = acc.astype(q_tile.dtype)
    q_tile[...] = out
    plgpu.commit_smem()
    rows = (batch, pl.ds(q_base, bq), head)
    plgpu.copy_smem_to_gmem(q_tile, o_ref.at[rows])
    plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[batch, head, pl.ds(q_base, bq)])
    if static.low_output:
      # The rounding error of the output, for the backward's delta (see _Static). The
      # staging tile is reused once TMA has read it.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      q_tile[...] = (acc - out.astype(acc.dtype)).astype(q_tile.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, refs["o_low"].at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _produce():
    if not static.interpret:
      plgpu.set_max_registers(40, action="decrease")

    def load(s):
      slot = lax.rem(s, jnp.int32(stages))
      kv_base = order_ref[tile, s] * bk
      rows = (batch, pl.ds(kv_base, bk), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
      if static.has_segments:
        # The segment ids ride on the key barrier (two arrivals): one wait covers both.
        plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, pl.ds(kv_base, bk)],
                                kvseg_smem.at[slot], k_bar.at[slot])
      if static.bias_dims is not None:
        # Both compute warpgroups' bias tiles in one copy, on the key barrier too.
        plgpu.copy_gmem_to_smem(
            refs["bias"].at[_bias_index(static, batch, head)
                            + (pl.ds(tile * (_COMPUTE_WGS * bq), _COMPUTE_WGS * bq),
                               pl.ds(kv_base, bk))],
            bias_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

    tiles.produce_ring(load, count, stages, (k_free, v_free))


def _forward(static, q, k, v, sinks, q_seg, kv_seg, order, meta, bias=None, slopes=None):
  batch, q_pad, num_heads, head_dim = q.shape
  sizes = static.sizes
  bq, bk, stages = sizes.block_q, sizes.block_k, sizes.stages
  dtype, w, seg = q.dtype, _COMPUTE_WGS, static.has_segments
  has_bias = static.bias_dims is not None
  scratch = (
      _swizzled((w, bq, head_dim), dtype),
      _swizzled((stages, bk, head_dim), dtype),
      _swizzled((stages, bk, head_dim), dtype),
      plgpu.SMEM((w, bq), jnp.float32),
      plgpu.SMEM((w, bq), jnp.int32) if seg else None,
      plgpu.SMEM((stages, bk), jnp.int32) if seg else None,
      plgpu.Barrier(num_barriers=w),
      plgpu.Barrier(num_arrivals=1 + seg + has_bias, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=w),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.Barrier(num_arrivals=w),
      plgpu.SMEM((stages, w * bq, bk), jnp.float32) if has_bias else None,
  )
  return _launch(
      static, _forward_kernel,
      dict(q=q, k=k, v=v, order=order, meta=meta, sinks=sinks, qseg=q_seg, kvseg=kv_seg,
           bias=bias, slopes=slopes),
      dict(o=jax.ShapeDtypeStruct(q.shape, dtype),
           lse=jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32),
           **(dict(o_low=jax.ShapeDtypeStruct(q.shape, dtype)) if static.low_output else {})),
      (q_pad // (w * bq), num_heads, batch), scratch)


# -------------------------------------------------------------------------- backward


def _grid_position(order_ref):
  """(tile, head, batch) of this CTA. Tiles run in reverse: under causal masks the last
  query tiles have the most key blocks, and starting them first evens out the tail."""
  tile = order_ref.shape[0] - 1 - lax.axis_index("tile")
  return tile, lax.axis_index("head"), lax.axis_index("batch")


def _launch(static, kernel, inputs, out_type, grid, scratch):
  """Run ``kernel(static, refs, scratch_refs)`` on ``grid`` = (tile, head, batch) with two
  compute warpgroups and a producer; ``inputs`` is an ordered dict (None entries dropped)
  and the outputs join ``refs`` under ``out_type``'s names."""
  inputs = {n: x for n, x in inputs.items() if x is not None}
  names = list(inputs) + list(out_type)

  def entry(*refs):
    refs = dict(zip(names, refs))
    pl.run_scoped(lambda *smem: kernel(static, refs, smem), *scratch, collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=tuple(out_type.values()), grid=grid,
      grid_names=("tile", "head", "batch"), num_threads=_COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret.params() if static.interpret else None,
  )(*inputs.values())


def _dq_kernel(static, refs, scratch):
  (q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem, kvseg_smem,
   row_bar, k_bar, v_bar, k_free, v_free, bias_smem) = scratch
  sizes = static.sizes
  bq, bk, stages = sizes.block_q_bwd, sizes.block_k_dq, sizes.stages_bwd
  order_ref, meta_ref = refs["order"], refs["meta"]
  tile, head, batch = _grid_position(order_ref)
  wg = lax.axis_index("wg")
  count, n_partial = meta_ref[tile, 0], meta_ref[tile, 1]
  interpret = static.interpret

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    q_base = tile * (_COMPUTE_WGS * bq) + wg * bq
    rows = (batch, pl.ds(q_base, bq), head)
    vec = (batch, head, pl.ds(q_base, bq))
    plgpu.copy_gmem_to_smem(refs["q"].at[rows], q_smem.at[wg], row_bar.at[wg])
    plgpu.copy_gmem_to_smem(refs["do"].at[rows], do_smem.at[wg], row_bar.at[wg])
    plgpu.copy_gmem_to_smem(refs["lse"].at[vec], lse_smem.at[wg], row_bar.at[wg])
    plgpu.copy_gmem_to_smem(refs["delta"].at[vec], delta_smem.at[wg], row_bar.at[wg])
    if static.has_segments:
      plgpu.copy_gmem_to_smem(refs["qseg"].at[batch, pl.ds(q_base, bq)], qseg_smem.at[wg],
                              row_bar.at[wg])
    plgpu.barrier_wait(row_bar.at[wg])
    row = plgpu.Layout.WGMMA.reduce(1)
    lse = _load(lse_smem.at[wg], row, interpret)
    delta = _load(delta_smem.at[wg], row, interpret)
    q_seg = _load(qseg_smem.at[wg], row, interpret) if static.has_segments else None
    q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
    slope = refs["slopes"][head] if static.has_alibi else None

    def step(s, carry, partial):
      dq, dslope = carry
      slot = lax.rem(s, jnp.int32(stages))
      kv_base = order_ref[tile, s] * bk
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      scores, dp = _matmul_pair((((bq, bk)), q_tile, k_smem.at[slot], True),
                                (((bq, bk)), do_tile, v_smem.at[slot], True), interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      kv_seg = None
      if static.has_segments:
        kv_seg = _load(kvseg_smem.at[slot], plgpu.Layout.WGMMA.reduce(0), interpret)
      bias_tile = bias = None
      if static.bias_dims is not None:
        bias_tile = bias_smem.at[slot, pl.ds(wg * bq, bq)]
        bias = _load(bias_tile, plgpu.Layout.WGMMA, interpret, optimized=False)
      pos = None
      if _needs_positions(static, partial):
        pos = _positions(static, q_base, kv_base, (bq, bk), False)
      x, t = _logits(static, scores)
      x = _add_terms(static, x, bias, slope, pos)
      ok = _allowed(static, pos, (bq, bk), False, partial, q_seg, kv_seg)
      if ok is not None:
        x = jnp.where(ok, x, -jnp.inf)
      p = jnp.exp2(x - lax.broadcast_in_dim(lse, (bq, bk), [0]))
      ds = p * (dp - lax.broadcast_in_dim(delta, (bq, bk), [0]))  # d loss / d logits
      if static.emit_ds:
        # The bias gradient: this tile of dS goes out through the bias slot it came in.
        bias_tile[...] = ds
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            bias_tile, refs["dbias"].at[batch, head, pl.ds(q_base, bq), pl.ds(kv_base, bk)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq, dslope
      if static.has_alibi:
        dslope = dslope + (ds * jnp.abs(pos[0] - pos[1]).astype(jnp.float32)).sum(axis=1)
      if t is not None:
        ds = ds * (1.0 - t * t)
      dq = _matmul_add(dq, ds.astype(k_smem.dtype), k_smem.at[slot], interpret)
      plgpu.barrier_arrive(k_free.at[slot])
      return dq, dslope

    carry = (_zeros((bq, q_tile.shape[-1]), interpret),
             _full_rows(bq, 0.0, interpret) if static.has_alibi else None)
    carry = lax.fori_loop(0, n_partial, functools.partial(step, partial=True), carry)
    dq, dslope = lax.fori_loop(n_partial, count, functools.partial(step, partial=False), carry)
    if static.emit_ds:
      plgpu.wait_smem_to_gmem(0)
      return
    q_tile[...] = (dq * static.scale).astype(q_tile.dtype)
    if static.has_alibi:
      # Row sums of dS * |i - j|: minus the slope gradient, summed over rows outside.
      lse_smem.at[wg][...] = dslope
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, refs["dq"].at[rows])
    if static.has_alibi:
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], refs["dslope_rows"].at[vec])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _produce():
    if not interpret:
      plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.int32(static.groups))

    def load(s):
      slot = lax.rem(s, jnp.int32(stages))
      kv_base = order_ref[tile, s] * bk
      rows = (batch, pl.ds(kv_base, bk), kv_head)
      plgpu.copy_gmem_to_smem(refs["k"].at[rows], k_smem.at[slot], k_bar.at[slot])
      if static.has_segments:
        plgpu.copy_gmem_to_smem(refs["kvseg"].at[batch, pl.ds(kv_base, bk)],
                                kvseg_smem.at[slot], k_bar.at[slot])
      if static.bias_dims is not None:
        plgpu.copy_gmem_to_smem(
            refs["bias"].at[_bias_index(static, batch, head)
                            + (pl.ds(tile * (_COMPUTE_WGS * bq), _COMPUTE_WGS * bq),
                               pl.ds(kv_base, bk))],
            bias_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(refs["v"].at[rows], v_smem.at[slot], v_bar.at[slot])

    tiles.produce_ring(load, count, stages, (k_free, v_free))


def _dkv_kernel(static, refs, scratch):
  (k_smem, v_smem, kvseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem,
   col_bar, q_bar, do_bar, q_free, do_free, bias_smem) = scratch
  sizes = static.sizes
  bq, bk, stages = sizes.block_q_bwd, sizes.block_k_bwd, sizes.stages_bwd
  tile, kv_head, batch = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  order_ref, meta_ref = refs["order"], refs["meta"]
  count, n_partial = meta_ref[tile, 0], meta_ref[tile, 1]
  groups = static.groups
  interpret = static.interpret

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")
    kv_base = tile * (_COMPUTE_WGS * bk) + wg * bk
    cols = (batch, pl.ds(kv_base, bk), kv_head)
    plgpu.copy_gmem_to_smem(refs["k"].at[cols], k_smem.at[wg], col_bar.at[wg])
    plgpu.copy_gmem_to_smem(refs["v"].at[cols], v_smem.at[wg], col_bar.at[wg])
    if static.has_segments:
      plgpu.copy_gmem_to_smem(refs["kvseg"].at[batch, pl.ds(kv_base, bk)], kvseg_smem.at[wg],
                              col_bar.at[wg])
    plgpu.barrier_wait(col_bar.at[wg])
    k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
    kv_seg = None
    if static.has_segments:
      kv_seg = _load(kvseg_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret)
    col = plgpu.Layout.WGMMA.reduce(0)

    def step(i, carry, g, partial):
      dk, dv = carry
      s = g * count + i
      slot = lax.rem(s, jnp.int32(stages))
      q_base = order_ref[tile, i] * bq
      plgpu.barrier_wait(q_bar.at[slot])
      scores_t = _matmul(k_tile, q_smem.at[slot], (bk, bq), interpret, transpose_b=True)
      lse = _load(lse_smem.at[slot], col, interpret)
      q_seg = _load(qseg_smem.at[slot], col, interpret) if static.has_segments else None
      bias_t = None
      if static.bias_dims is not None:
        bias_t = _load(bias_smem.at[slot, pl.ds(wg * bk, bk)], plgpu.Layout.WGMMA, interpret,
                       optimized=False)
      slope = refs["slopes"][kv_head * groups + g] if static.has_alibi else None
      pos = None
      if _needs_positions(static, partial):
        pos = _positions(static, q_base, kv_base, (bk, bq), True)
      x, t = _logits(static, scores_t)
      x = _add_terms(static, x, bias_t, slope, pos)
      ok = _allowed(static, pos, (bk, bq), True, partial, q_seg, kv_seg)
      if ok is not None:
        x = jnp.where(ok, x, -jnp.inf)
      p_t = jnp.exp2(x - lax.broadcast_in_dim(lse, (bk, bq), [1]))
      plgpu.barrier_wait(do_bar.at[slot])
      dv, dp_t = _matmul_pair((dv, p_t.astype(do_smem.dtype), do_smem.at[slot], False),
                              ((bk, bq), v_tile, do_smem.at[slot], True), interpret)
      delta = _load(delta_smem.at[slot], col, interpret)
      plgpu.barrier_arrive(do_free.at[slot])
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))
      if t is not None:
        ds_t = ds_t * (1.0 - t * t)
      dk = _matmul_add(dk, ds_t.astype(q_smem.dtype), q_smem.at[slot], interpret)
      plgpu.barrier_arrive(q_free.at[slot])
      return dk, dv

    def group(g, carry):
      carry = lax.fori_loop(0, n_partial, functools.partial(step, g=g, partial=True), carry)
      return lax.fori_loop(n_partial, count, functools.partial(step, g=g, partial=False), carry)

    head_dim = k_tile.shape[-1]
    zeros = _zeros((bk, head_dim), interpret)
    dk, dv = lax.fori_loop(0, groups, group, (zeros, zeros))
    k_tile[...] = (dk * static.scale).astype(k_tile.dtype)
    v_tile[...] = dv.astype(v_tile.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, refs["dk"].at[cols])
    plgpu.copy_smem_to_gmem(v_tile, refs["dv"].at[cols])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _produce():
    if not interpret:
      plgpu.set_max_registers(40, action="decrease")

    def load(s):
      slot = lax.rem(s, jnp.int32(stages))
      g, i = lax.div(s, count), lax.rem(s, count)
      q_base = order_ref[tile, i] * bq
      head = kv_head * groups + g
      rows = (batch, pl.ds(q_base, bq), head)
      vec = (batch, head, pl.ds(q_base, bq))
      plgpu.copy_gmem_to_smem(refs["q"].at[rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(refs["lse"].at[vec], lse_smem.at[slot], q_bar.at[slot])
      if static.has_segments:
        plgpu.copy_gmem_to_smem(refs["qseg"].at[batch, pl.ds(q_base, bq)],
                                qseg_smem.at[slot], q_bar.at[slot])
      if static.bias_dims is not None:
        # The transposed bias [.., S, T]: both compute warpgroups' key rows in one copy.
        plgpu.copy_gmem_to_smem(
            refs["bias_t"].at[_bias_index(static, batch, head)
                              + (pl.ds(tile * (_COMPUTE_WGS * bk), _COMPUTE_WGS * bk),
                                 pl.ds(q_base, bq))],
            bias_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(refs["do"].at[rows], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(refs["delta"].at[vec], delta_smem.at[slot], do_bar.at[slot])

    tiles.produce_ring(load, groups * count, stages, (q_free, do_free))


def _backward(static, q, k, v, sinks, q_seg, kv_seg, lse, delta, do, lists, bias=None,
              bias_t=None, slopes=None):
  (dq_order, dq_meta), (dkv_order, dkv_meta) = lists
  has_bias = static.bias_dims is not None
  batch, q_pad, num_heads, head_dim = q.shape
  kv_pad, num_kv = k.shape[1], k.shape[2]
  sizes = static.sizes
  bq, bk, stages = sizes.block_q_bwd, sizes.block_k_bwd, sizes.stages_bwd
  dtype = q.dtype
  seg = static.has_segments
  w = _COMPUTE_WGS
  del sinks  # the sink gradient is computed outside the kernels

  def opt(shape, dtype_):
    return plgpu.SMEM(shape, dtype_) if seg else None

  bk_dq = sizes.block_k_dq
  dq_scratch = (
      _swizzled((w, bq, head_dim), dtype), _swizzled((w, bq, head_dim), dtype),
      plgpu.SMEM((w, bq), jnp.float32), plgpu.SMEM((w, bq), jnp.float32),
      opt((w, bq), jnp.int32),
      _swizzled((stages, bk_dq, head_dim), dtype), _swizzled((stages, bk_dq, head_dim), dtype),
      opt((stages, bk_dq), jnp.int32),
      plgpu.Barrier(num_arrivals=5 if seg else 4, num_barriers=w),
      plgpu.Barrier(num_arrivals=1 + seg + has_bias, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.SMEM((stages, w * bq, bk_dq), jnp.float32) if has_bias else None,
  )
  dq_inputs = dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, order=dq_order, meta=dq_meta,
                   qseg=q_seg, kvseg=kv_seg, bias=bias, slopes=slopes)
  dq_grid = (q_pad // (w * bq), num_heads, batch)
  dq_out = dict(dq=jax.ShapeDtypeStruct(q.shape, dtype))
  if static.has_alibi:
    dq_out["dslope_rows"] = jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)
  dq, *dslope_rows = _launch(static, _dq_kernel, dq_inputs, dq_out, dq_grid, dq_scratch)
  dbias = None
  if has_bias:
    # A launch of its own, so that XLA drops it when the bias needs no gradient.
    dbias, = _launch(
        dataclasses.replace(static, emit_ds=True), _dq_kernel, dq_inputs,
        dict(dbias=jax.ShapeDtypeStruct((batch, num_heads, q_pad, kv_pad), jnp.float32)),
        dq_grid, dq_scratch)

  dkv_scratch = (
      _swizzled((w, bk, head_dim), dtype), _swizzled((w, bk, head_dim), dtype),
      opt((w, bk), jnp.int32),
      _swizzled((stages, bq, head_dim), dtype), _swizzled((stages, bq, head_dim), dtype),
      plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
      opt((stages, bq), jnp.int32),
      plgpu.Barrier(num_arrivals=3 if seg else 2, num_barriers=w),
      plgpu.Barrier(num_arrivals=2 + seg + has_bias, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.Barrier(num_arrivals=w, num_barriers=stages),
      plgpu.SMEM((stages, w * bk, bq), jnp.float32) if has_bias else None,
  )
  dk, dv = _launch(
      static, _dkv_kernel,
      dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, order=dkv_order, meta=dkv_meta,
           qseg=q_seg, kvseg=kv_seg, bias_t=bias_t, slopes=slopes),
      dict(dk=jax.ShapeDtypeStruct(k.shape, dtype), dv=jax.ShapeDtypeStruct(v.shape, dtype)),
      (kv_pad // (w * bk), num_kv, batch), dkv_scratch)
  return dq, dk, dv, dbias, (dslope_rows[0] if dslope_rows else None)


# --------------------------------------------------------------------------- wrapper


def _round_up(x, m):
  return -(-x // m) * m


def _pad_to(x, length, axis, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value) if length != x.shape[axis] else x


def check_inputs(q, k, v, block_sizes=None):
  """Raise ValueError naming the argument if the kernels cannot run this call."""
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be pallas_kernels.gpu.flash_attention.BlockSizes, "
                     f"got {block_sizes!r}")
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"need q [B, T, N, H] and k, v [B, S, K, H], got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}")
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"the GPU kernels take bfloat16 or float16 q, k, v (wgmma operands), "
                     f"got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.shape[-1] not in (64, 128, 256):
    raise ValueError(f"head dim must be 64, 128 or 256, got {q.shape[-1]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} must be a multiple of key heads {k.shape[2]}")


def _pad_multiples(sizes):
  q_mult = math.lcm(_COMPUTE_WGS * sizes.block_q, _COMPUTE_WGS * sizes.block_q_bwd)
  kv_mult = math.lcm(sizes.block_k, sizes.block_k_dq, _COMPUTE_WGS * sizes.block_k_bwd)
  return q_mult, kv_mult


def _tilings(sizes):
  """(rows, cols, transposed) of the forward's, the dq pass's and the dk/dv pass's block
  summaries: query rows by keys, the dk/dv pass's read transposed."""
  w = _COMPUTE_WGS
  return ((w * sizes.block_q, sizes.block_k, False),
          (w * sizes.block_q_bwd, sizes.block_k_dq, False),
          (sizes.block_q_bwd, w * sizes.block_k_bwd, True))


def _num_tiles(static, q_pad, kv_pad):
  sizes, w = static.sizes, _COMPUTE_WGS
  return (q_pad // (w * sizes.block_q), q_pad // (w * sizes.block_q_bwd),
          kv_pad // (w * sizes.block_k_bwd))


@functools.lru_cache(maxsize=64)
def _block_lists(static, q_len, kv_len, q_pad, kv_pad):
  """The forward's, the dq pass's and the dk/dv pass's block lists (NumPy, per shape)."""
  return tuple(
      _lists(_summary(static.mask, q_len, kv_len, rows, cols).T if t else
             _summary(static.mask, q_len, kv_len, rows, cols), n)
      for (rows, cols, t), n in zip(_tilings(static.sizes), _num_tiles(static, q_pad, kv_pad)))


def _dynamic_summaries(static, block_mask, q_len, kv_len):
  """The static summaries of the three tilings AND-ed (elementwise min of the codes) with
  a dynamic mask's (jnp), or None without one."""
  if block_mask is None:
    return None
  return tuple(
      jnp.minimum(jnp.asarray(_summary(static.mask, q_len, kv_len, rows, cols), jnp.int8),
                  jnp.asarray(block_mask.block_summary(q_len, kv_len, rows, cols), jnp.int8))
      for rows, cols, _ in _tilings(static.sizes))


def _lists_on_device(summary, n):
  """:func:`_lists` in jnp, for a summary known only at run time."""
  rank = jnp.where(summary == PARTIAL, 0, jnp.where(summary == FULL, 1, 2))
  order = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)
  meta = jnp.stack([(summary != EMPTY).sum(1), (summary == PARTIAL).sum(1)], 1)
  extra = ((0, n - summary.shape[0]), (0, 0))
  return jnp.pad(order, extra), jnp.pad(meta.astype(jnp.int32), extra)


def _device_lists(static, q_len, kv_len, q_pad, kv_pad, summaries):
  """The three passes' block lists as device arrays (from the dynamic summaries if any)."""
  if summaries is None:
    return _as_device(_block_lists(static, q_len, kv_len, q_pad, kv_pad))
  return tuple(_lists_on_device(x.T if t else x, n) for x, (_, _, t), n in
               zip(summaries, _tilings(static.sizes), _num_tiles(static, q_pad, kv_pad)))


def _pad_inputs(static, q, k, v, q_seg, kv_seg):
  q_mult, kv_mult = _pad_multiples(static.sizes)
  q_pad, kv_pad = _round_up(q.shape[1], q_mult), _round_up(k.shape[1], kv_mult)
  q, k, v = _pad_to(q, q_pad, 1), _pad_to(k, kv_pad, 1), _pad_to(v, kv_pad, 1)
  if q_seg is not None:
    # Padding rows and keys get ids no real token has (and not each other's).
    q_seg = _pad_to(q_seg.astype(jnp.int32), q_pad, 1, value=np.iinfo(np.int32).min)
    kv_seg = _pad_to(kv_seg.astype(jnp.int32), kv_pad, 1, value=np.iinfo(np.int32).max)
  return q, k, v, q_seg, kv_seg


def _as_device(lists):
  return tuple(tuple(jnp.asarray(x) for x in pair) for pair in lists)


def _pad_bias(static, bias, q_pad, kv_pad):
  """The dense bias in float32, padded to the kernels' lengths, and its transpose (the
  dk/dv pass walks key rows); (None, None) without one."""
  if bias is None:
    return None, None
  bias = _pad_to(_pad_to(bias.astype(jnp.float32), q_pad, 2), kv_pad, 3)
  return bias, jnp.swapaxes(bias, 2, 3)


def _fwd_impl(static, q_len, kv_len, q, k, v, sinks, bias, slopes, q_seg, kv_seg, summaries):
  qp, kp, vp, qs, ks = _pad_inputs(static, q, k, v, q_seg, kv_seg)
  lists = _device_lists(static, q_len, kv_len, qp.shape[1], kp.shape[1], summaries)
  sinks32 = None if sinks is None else sinks.astype(jnp.float32)
  slopes32 = None if slopes is None else slopes.astype(jnp.float32)
  bias_p, _ = _pad_bias(static, bias, qp.shape[1], kp.shape[1])
  outs = _sharded(
      lambda q, k, v, sinks, qs, ks, order, meta, bias, slopes: _forward(
          static, q, k, v, sinks, qs, ks, order, meta, bias, slopes),
      static, dict(q=qp, k=kp, v=vp, sinks=sinks32, qs=qs, ks=ks, order=lists[0][0],
                   meta=lists[0][1], bias=bias_p, slopes=slopes32),
      ((0, 2), (0, 1)) + (((0, 2),) if static.low_output else ()))
  o, lse = outs[:2]
  # The residual output to ~16 bits (high + low part) where _Static.low_output says why.
  o_res = o.astype(jnp.float32) + outs[2].astype(jnp.float32) if static.low_output else o
  return o[:, :q_len], (qp, kp, vp, sinks, bias, slopes, qs, ks, o_res, lse, summaries)


# (batch dim, head dim) of each kernel operand; None: replicated (block tables).
_DIMS = dict(q=(0, 2), k=(0, 2), v=(0, 2), do=(0, 2), sinks=(None, 0), slopes=(None, 0),
             qs=(0, None), ks=(0, None), lse=(0, 1), delta=(0, 1))


def _sharded(fn, static, operands, out_dims):
  """``fn(**operands)``, split per device over batch and heads when the program spans
  several devices (``pallas_kernels.partition``); None operands stay None."""
  names = [n for n, x in operands.items() if x is not None]
  dims = dict(_DIMS)
  if static.bias_dims is not None:
    per_batch, per_head = static.bias_dims
    dims["bias"] = dims["bias_t"] = (0 if per_batch else None, 1 if per_head else None)

  # A Mosaic GPU kernel has no batching rule: under vmap the launches run one after
  # another over the mapped axis.
  @jax.custom_batching.sequential_vmap
  def run(*arrays):
    given = dict(zip(names, arrays))
    return fn(*(given.get(n) for n in operands))

  if static.interpret or jax.device_count() == 1:
    return run(*(operands[n] for n in names))
  partitioned = partition.batch_head_partitioned(
      run, [dims.get(n) for n in names], out_dims)
  return partitioned(*(operands[n] for n in names))


def _attention_plain(static, q_len, kv_len, q, k, v, sinks, bias, slopes, q_seg, kv_seg,
                     summaries):
  return _fwd_impl(static, q_len, kv_len, q, k, v, sinks, bias, slopes, q_seg, kv_seg,
                   summaries)[0]


def _attention_fwd(static, q_len, kv_len, q, k, v, sinks, bias, slopes, q_seg, kv_seg,
                   summaries):
  return _fwd_impl(static, q_len, kv_len, q, k, v, sinks, bias, slopes, q_seg, kv_seg,
                   summaries)


def _int_cotangent(x):
  return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


def _visited(summary, rows, cols, q_pad, kv_pad):
  """``[q_pad, kv_pad]`` bool: the elements of the blocks a kernel's block list visits
  (NumPy or jnp, as ``summary``)."""
  xp = np if isinstance(summary, np.ndarray) else jnp
  live = summary != EMPTY
  grid = xp.pad(live, ((0, q_pad // rows - live.shape[0]), (0, kv_pad // cols - live.shape[1])))
  return xp.repeat(xp.repeat(grid, rows, 0), cols, 1)


def _attention_bwd(static, q_len, kv_len, res, do):
  qp, kp, vp, sinks, bias, slopes, qs, ks, o, lse, summaries = res
  do = _pad_to(do, qp.shape[1], 1)
  # D_i = sum_h dO_ih O_ih, the row term of the softmax backward, [B, N, T].
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))
  lists = _device_lists(static, q_len, kv_len, qp.shape[1], kp.shape[1], summaries)
  bias_p, bias_t = _pad_bias(static, bias, qp.shape[1], kp.shape[1])
  slopes32 = None if slopes is None else slopes.astype(jnp.float32)
  dq, dk, dv, dbias, dslope_rows = _sharded(
      lambda q, k, v, qs, ks, lse, delta, do, dq_order, dq_meta, dkv_order, dkv_meta, bias,
      bias_t, slopes: _backward(static, q, k, v, None, qs, ks, lse, delta, do,
                                ((dq_order, dq_meta), (dkv_order, dkv_meta)), bias, bias_t,
                                slopes),
      static, dict(q=qp, k=kp, v=vp, qs=qs, ks=ks, lse=lse, delta=delta, do=do,
                   dq_order=lists[1][0], dq_meta=lists[1][1], dkv_order=lists[2][0],
                   dkv_meta=lists[2][1], bias=bias_p, bias_t=bias_t, slopes=slopes32),
      ((0, 2), (0, 2), (0, 2)) + (((0, 1),) if bias is not None else ())
      + (((0, 1),) if slopes is not None else ()))
  dsinks = None
  if sinks is not None:
    # d lse / d sink = p_sink and d out / d lse = -out: dsink_n = -sum_t p_sink * D_t.
    lse_nat = lse * math.log(2.0)
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_nat)
    dsinks = -(p_sink * delta).sum((0, 2)).astype(sinks.dtype)
  dbias_out = None
  if bias is not None:
    # Blocks the dq pass skips are never written: their dS is zero (nothing attends).
    sizes = static.sizes
    summary = (_summary(static.mask, q_len, kv_len, _COMPUTE_WGS * sizes.block_q_bwd,
                        sizes.block_k_dq) if summaries is None else summaries[1])
    visited = _visited(summary, _COMPUTE_WGS * sizes.block_q_bwd, sizes.block_k_dq,
                       qp.shape[1], kp.shape[1])
    dbias = jnp.where(visited, dbias, 0.0)[:, :, :q_len, :kv_len]
    axes = tuple(i for i in (0, 1) if bias.shape[i] == 1)
    dbias_out = (dbias.sum(axes, keepdims=True) if axes else dbias).astype(bias.dtype)
  dslopes = None
  if slopes is not None:
    # d logit_ij / d slope_n = -|i - j|; the kernel summed dS * |i - j| over each row.
    dslopes = -dslope_rows[:, :, :q_len].sum((0, 2)).astype(slopes.dtype)
  return (dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len], dsinks, dbias_out, dslopes,
          _int_cotangent(qs if qs is None else qs[:, :q_len]),
          _int_cotangent(ks if ks is None else ks[:, :kv_len]),
          None if summaries is None else tuple(_int_cotangent(x) for x in summaries))


_attention = jax.custom_vjp(_attention_plain, nondiff_argnums=(0, 1, 2))
_attention.defvjp(_attention_fwd, _attention_bwd)


_SMEM_BYTES = 227 * 1024  # the per-block shared memory limit of sm_90


def _smem_needs(sizes, head_dim, itemsize, has_bias):
  """Approximate shared memory of (forward, dq, dk/dv) kernels, bytes (the tiles only)."""
  w, f32 = _COMPUTE_WGS, 4
  bias = lambda rows, cols, stages: stages * w * rows * cols * f32 if has_bias else 0
  fwd = (w * sizes.block_q + 2 * sizes.stages * sizes.block_k) * head_dim * itemsize \
      + bias(sizes.block_q, sizes.block_k, sizes.stages)
  dq = (2 * w * sizes.block_q_bwd + 2 * sizes.stages_bwd * sizes.block_k_dq) * head_dim \
      * itemsize + bias(sizes.block_q_bwd, sizes.block_k_dq, sizes.stages_bwd)
  dkv = (2 * w * sizes.block_k_bwd + 2 * sizes.stages_bwd * sizes.block_q_bwd) * head_dim \
      * itemsize + bias(sizes.block_k_bwd, sizes.block_q_bwd, sizes.stages_bwd)
  return dict(forward=fwd, dq=dq, dkv=dkv)


def flash_attention(q, k, v, *, scale, soft_cap=None, sinks=None, mask=None,
                    q_segment_ids=None, kv_segment_ids=None, bias=None, alibi_slopes=None,
                    block_mask=None, block_sizes=None, interpret=False):
  """Softmax attention on a Hopper GPU, differentiable in q, k, v, sinks, bias and slopes.

  Args:
    q: ``[B, T, N, H]`` bfloat16 or float16; k, v: ``[B, S, K, H]``, ``N % K == 0``,
      ``H`` in (64, 128, 256).
    scale: logits scale (a Python float).
    soft_cap: ``c``: logits become ``c * tanh(logits / c)``.
    sinks: ``[N]`` sink logits joining each row's softmax denominator.
    mask: None or a static mask with ``predicate(q_idx, kv_idx)`` (jnp, elementwise on
      int32 index grids) and ``block_summary(T, S, rows, cols)`` (NumPy EMPTY / PARTIAL /
      FULL codes), such as those of ``attnlab.ops.masks``.
    q_segment_ids, kv_segment_ids: ``[B, T]``, ``[B, S]`` ints (both or neither): a query
      sees the keys of its own segment.
    bias: ``[B or 1, N or 1, T, S]`` float, added to the (soft-capped) logits; ``-inf``
      entries mask pairs out. Streamed tile by tile next to the keys (float32), so it costs
      memory traffic: the default block sizes then take 64-key blocks. Its gradient (dS)
      comes from a launch of its own that XLA drops when it is not needed.
    alibi_slopes: ``[N]`` float: ALiBi's ``-slopes[n] * |i - j|`` added to the logits,
      computed in registers.
    block_mask: None or a dynamic mask (arrays known at run time) with a jnp
      ``block_summary(T, S, rows, cols)``: its EMPTY blocks are skipped (the lists are
      built on the device). It only skips blocks: its elements must also reach the kernel,
      as ``-inf`` entries of ``bias``.
    block_sizes: :class:`BlockSizes`.
    interpret: run on CPU through the Mosaic GPU interpreter (tests).

  Returns ``[B, T, N, H]`` in q's dtype; rows that see no key (and no sink) are zeros.
  """
  check_inputs(q, k, v, block_sizes)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids or neither, got "
                     f"{q_segment_ids is None=}, {kv_segment_ids is None=}")
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  if sinks is not None and (np.shape(sinks) != (num_heads,)
                            or not jnp.issubdtype(sinks.dtype, jnp.floating)):
    raise ValueError(f"sinks must be float [N] = [{num_heads}], got {np.shape(sinks)} "
                     f"{getattr(sinks, 'dtype', None)}")
  for name, ids, length in (("q_segment_ids", q_segment_ids, q_len),
                            ("kv_segment_ids", kv_segment_ids, kv_len)):
    if ids is not None and (np.shape(ids) != (batch, length)
                            or not jnp.issubdtype(ids.dtype, jnp.integer)):
      raise ValueError(f"{name} must be int [B, {'T' if name[0] == 'q' else 'S'}] = "
                       f"[{batch}, {length}], got {np.shape(ids)} {getattr(ids, 'dtype', None)}")
  bias_dims = None
  if bias is not None:
    shape = tuple(np.shape(bias))
    if (len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads)
        or shape[2:] != (q_len, kv_len)):
      raise ValueError(f"bias must be [B or 1, N or 1, T, S] = [{batch} or 1, {num_heads} or "
                       f"1, {q_len}, {kv_len}], got {shape}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got {bias.dtype}")
    # (per batch, per head); an axis of size 1 is read at index 0 either way.
    bias_dims = (shape[0] == batch and batch > 1, shape[1] == num_heads and num_heads > 1)
  if alibi_slopes is not None and (np.shape(alibi_slopes) != (num_heads,) or
                                   not jnp.issubdtype(alibi_slopes.dtype, jnp.floating)):
    raise ValueError(f"alibi_slopes must be float [N] = [{num_heads}], got "
                     f"{np.shape(alibi_slopes)} {getattr(alibi_slopes, 'dtype', None)}")
  if block_sizes is None:
    block_sizes = BlockSizes(block_k=64) if bias is not None else BlockSizes()
  needs = _smem_needs(block_sizes, head_dim, q.dtype.itemsize, bias is not None)
  for kernel, need in needs.items():
    if need > _SMEM_BYTES:
      raise ValueError(f"block_sizes={block_sizes} need ~{need // 1024} KB of shared memory "
                       f"in the {kernel} kernel at head dim {head_dim}"
                       f"{' with a bias' if bias is not None else ''}; sm_90 has 227 KB")
  static = _Static(float(scale), None if soft_cap is None else float(soft_cap), mask,
                   kv_len, num_heads // k.shape[2], sinks is not None,
                   q_segment_ids is not None, block_sizes, bool(interpret),
                   bias_dims=bias_dims, has_alibi=alibi_slopes is not None)
  summaries = _dynamic_summaries(static, block_mask, q_len, kv_len)
  return _attention(static, q_len, kv_len, q, k, v, sinks, bias, alibi_slopes,
                    q_segment_ids, kv_segment_ids, summaries)
