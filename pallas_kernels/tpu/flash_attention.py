"""Flash attention as Mosaic TPU kernels: forward, dq pass, dk/dv pass (and dbias pass).

FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023, Alg. 1 and 2) on a TPU grid.
For query head ``n`` (key head ``n // G``, ``G = N // K``)::

    s  = scale * q k^T,   z = c tanh(s / c) (soft cap, optional),
    l  = z + bias[b, n, i, j] - slope_n |i - j|      (bias and ALiBi optional)
    p  = allowed * exp(l - lse),   lse = log(sum_allowed exp(l) + exp(sink_n)),   o = p v

The forward visits key blocks with a running max ``m`` and sum ``l`` per query row (the
sink starts the running state: ``m = sink``, ``l = 1``) and writes ``o`` and ``lse``. The
backward recomputes ``p`` from ``lse`` in two kernels (FlashAttention-2 §3.2):

* dq pass, grid ``(B, N, q blocks, key blocks)``: ``dp = dO v^T``, ``dl = p (dp - D)``
  with ``D = rowsum(dO * o)``, ``dq = scale ds k``; also ``sum dl |i - j|`` for ALiBi.
* dk/dv pass, grid ``(B, K, key blocks, G x query blocks)``: the scores are built
  transposed, ``s^T = k q^T [bk, bq]``, so ``lse`` and ``D`` broadcast as lane rows and
  every matmul is plain or rhs-transposed; ``dv = p^T dO``, ``dk = scale ds^T q``. The G
  query heads of a key head accumulate into one dk/dv block, so GQA writes no per-head
  copies. Two passes cost 7 block matmuls against 5 for a fused one, but a fused pass
  would have to accumulate dq across key blocks in HBM, which a TPU (no atomics, a
  sequential pipeline per core) can only do with read-modify-write of revisited blocks.

``dsinks = -sum_rows exp(sink - lse) D`` and the ALiBi slope gradient need no ``[T, S]``
array: the first is computed from ``lse`` and ``D`` outside the kernels, the second from
one ``(8, 128)`` partial sum per (batch, head, query block) written by the dq pass.

An additive ``bias [Bb, Nb, T, S]`` (Bb in {1, B}, Nb in {1, N}; -inf entries exclude
pairs) is read by every pass as ``[bq, bk]`` tiles (transposed in VMEM by the dk/dv pass).
Its cotangent ``dl`` (no ``1 - tanh^2`` factor: the bias is added after the cap) comes from
a fourth kernel, the dq grid writing each live ``dl`` tile to ``[B, N, T, S]`` float32;
blocks it never computes are zeroed and broadcast axes summed in XLA. Being its own call,
XLA drops it when the bias gradient is unused.

Block skipping. The static mask's ``block_summary`` (NumPy, at trace time) marks key
blocks EMPTY / PARTIAL / FULL. Sequence lengths and segment ids add per-batch dynamic
skipping (a block is dead past a length, or when the id ranges of its rows and keys do
not overlap). For every grid row the live blocks are listed first, ascending, and the
list is padded with the block of the last live step, so a skipped grid step maps to the
block the pipeline already holds and issues no DMA; ``pl.when`` skips its compute. FULL
blocks skip the mask predicate and the length tests unless a length cuts through them;
segment ids always apply.

Layout. Callers keep ``[B, T, N, H]``. With ``H % 128 == 0`` the kernels read a free view
``[B, T, N * H]`` whose ``(block, H)`` tiles are lane-aligned, so nothing is copied. Other
head dims (64, and the tiny ones of the tests) are transposed here to ``[B, N, T, H]``,
where ``H`` is the whole last dim as Mosaic requires; that costs one copy of q, k, v and o
(and dO, dq, dk, dv). Lengths that are not multiples of the block are zero-padded here
and the padding masked.

Hardware constraints (checked): blocks are multiples of 8 (16 is the bf16 sublane tile);
outside interpret mode a block shorter than its padded axis must be a multiple of 128,
since ``lse`` rows are ``(1, block_q)`` lane tiles. Nothing here has run on a TPU: the
kernels are tested in TPU interpret mode on CPU and lowered to Mosaic on CPU.

Under a ``jit`` over several devices each launch runs per device on its batch and head
shard (``pallas_kernels/partition.py``: XLA cannot partition a Mosaic call), and the
per-batch block lists are split with the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import partition

# Block-summary codes of the mask vocabulary (attnlab.ops.masks uses the same values).
EMPTY, PARTIAL, FULL = 0, 1, 2
_LANES = 128
_SUBLANES = 8
# Sublane tile of bfloat16: padded lengths and clamped blocks are multiples of it.
_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query / key block lengths of the three kernels (each capped at the padded length).

  Defaults (docs/tpu_kernels.md): a forward step loads a ``[block_k, H]`` K and V block
  for ``4 block_q block_k H`` FLOPs, so its intensity is ``block_q`` FLOP/byte in bf16:
  512 clears v5e's ridge (~240) and is near v6e's (~560). The dq pass streams K and V for
  6 matmul FLOPs (intensity ``1.5 block_q_dq``), the dk/dv pass streams q and dO for 8
  (``2 block_k_dkv``). At 512 x 512 every pass fits v5e's 16 MiB scoped VMEM with H=128.
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, (int, np.integer)) or value <= 0 or value % _SUBLANES:
        raise ValueError(
            f"BlockSizes.{field.name} must be a positive multiple of {_SUBLANES}, got {value!r}")


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: it is a custom_vjp nondiff argument)."""

  scale: float
  soft_cap: float | None
  mask: Any
  q_len: int
  kv_len: int
  q_pad: int
  kv_pad: int
  num_heads: int
  num_kv: int
  head_dim: int
  fwd: tuple[int, int]
  dq: tuple[int, int]
  dkv: tuple[int, int]
  heads_in_lanes: bool
  has_segments: bool
  has_sinks: bool
  has_alibi: bool
  interpret: Any
  # The additive bias ``[Bb, Nb, T, S]``: present, and whether Bb = B / Nb = N (else 1).
  has_bias: bool = False
  bias_per_batch: bool = False
  bias_per_head: bool = False

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv

  def summary(self, bq: int, bk: int) -> np.ndarray:
    """Static ``[q_pad // bq, kv_pad // bk]`` codes; blocks wholly in the padding are EMPTY."""
    nq, nk = self.q_pad // bq, self.kv_pad // bk
    out = np.full((nq, nk), EMPTY, np.int8)
    rq, rk = -(-self.q_len // bq), -(-self.kv_len // bk)
    if self.mask is None:
      out[:rq, :rk] = FULL
    else:
      out[:rq, :rk] = np.asarray(self.mask.block_summary(self.q_len, self.kv_len, bq, bk))
    return out


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _resolve_blocks(length: int, blocks: tuple[int, ...], hardware: bool, names):
  """Cap blocks at the sequence and pick one padded length that all of them divide.

  A block at least as long as the (16-aligned) sequence becomes the sequence rounded up to
  the other blocks' common multiple, so mixed sizes pad no further than the largest.
  """
  whole = _round_up(length, _ALIGN)
  small = [b for b in blocks if b < whole]
  unit = math.lcm(_ALIGN, *small) if small else _ALIGN
  resolved = tuple(b if b < whole else _round_up(length, unit) for b in blocks)
  padded = _round_up(length, math.lcm(*resolved))
  if hardware:
    for name, b in zip(names, resolved):
      if b < padded and b % _LANES:
        raise ValueError(f"BlockSizes.{name} must be a multiple of {_LANES} on TPU when it "
                         f"does not cover the padded length {padded}, got {b}")
  return resolved, padded


# ------------------------------------------------------------------------------ layout


def _view(x, pad_to: int, heads_in_lanes: bool):
  """``[B, L, heads, H]`` -> the kernel array, padded along ``L`` with zeros."""
  if pad_to > x.shape[1]:
    x = jnp.pad(x, ((0, 0), (0, pad_to - x.shape[1]), (0, 0), (0, 0)))
  b, length, heads, h = x.shape
  if heads_in_lanes:
    return x.reshape(b, length, heads * h)
  return x.transpose(0, 2, 1, 3)


def _unview(x, length: int, heads: int, heads_in_lanes: bool):
  """Inverse of ``_view``: the kernel array -> ``[B, length, heads, H]``."""
  if heads_in_lanes:
    b, padded, width = x.shape
    x = x.reshape(b, padded, heads, width // heads)
  else:
    x = x.transpose(0, 2, 1, 3)
  return x[:, :length]


def _seq_spec(cfg: _Config, block: int, index):
  """BlockSpec of one ``[block, H]`` tile; ``index(*grid, *refs) -> (b, block, head)``."""
  h = cfg.head_dim
  if cfg.heads_in_lanes:
    return pl.BlockSpec((None, block, h), index)

  def transposed(*args):
    b, blk, head = index(*args)
    return b, head, blk, 0
  return pl.BlockSpec((None, None, block, h), transposed)


# -------------------------------------------------------------------------- block lists


class _Lists(NamedTuple):
  """Per-batch block schedule of one pass (all int32; see ``_block_lists``). Arrays only,
  all batch-major, so a batch shard of every field is that shard's schedule."""

  blocks: jax.Array  # [B, R, W] partner block of each grid step
  counts: jax.Array  # [B, R] live steps of each row
  codes: jax.Array  # [B, R, W] static code (PARTIAL / FULL) of each listed pair
  rows: jax.Array  # [B, R] row block to load: the row itself, or the last live row
  live: jax.Array  # [B, R, C] bool: the pairs of row and partner blocks that are computed

  @property
  def width(self) -> int:
    """W, the static grid extent of the step axis."""
    return self.blocks.shape[2]

  def prefetch(self, q_lens, kv_lens):
    return self.blocks, self.counts, self.codes, self.rows, q_lens, kv_lens


def _latest(valid):
  """For ``valid [B, L]``: the index of the latest True at or before each position (the
  first True for positions before it; 0 if none)."""
  position = jnp.where(valid, jnp.arange(valid.shape[1])[None, :], -1)
  latest = lax.cummax(position, axis=1)
  return jnp.where(latest < 0, jnp.argmax(valid, axis=1)[:, None], latest)


def _block_lists(cfg: _Config, bq: int, bk: int, q_lens, kv_lens, ids,
                 transpose: bool, extra_live=None) -> _Lists:
  """The live blocks of every grid row of one pass, per batch.

  Row ``r`` (a query block, or a key block when ``transpose``) lists its ``counts[b, r]``
  live partner blocks first, ascending. The rest of the row, and rows with none, repeat
  the block of the latest live step in grid order, and ``rows`` sends a row with none to
  the latest live row, so a skipped step keeps the block indices the pipeline already
  holds and no DMA is issued for it. (A batch row with no live block at all still loads
  one block per head at its first step, and computes nothing.) ``extra_live``: None or a
  ``[q_pad // bq, kv_pad // bk]`` bool of the blocks a dynamic mask leaves non-empty.
  """
  summary = cfg.summary(bq, bk)
  nq, nk = summary.shape
  static_live = summary != EMPTY
  width = max(1, int((static_live.sum(0) if transpose else static_live.sum(1)).max()))
  q_start = jnp.arange(nq, dtype=jnp.int32)[None, :, None] * bq
  kv_start = jnp.arange(nk, dtype=jnp.int32)[None, None, :] * bk
  live = (jnp.asarray(static_live)[None] & (q_start < q_lens[:, None, None])
          & (kv_start < kv_lens[:, None, None]))
  if ids is not None:
    # Equal ids need overlapping id ranges; blocks whose ranges are disjoint are dead.
    q_lo, q_hi = _block_range(ids[0], bq)
    kv_lo, kv_hi = _block_range(ids[1], bk)
    live &= (q_lo[:, :, None] <= kv_hi[:, None, :]) & (kv_lo[:, None, :] <= q_hi[:, :, None])
  if extra_live is not None:
    live &= extra_live[None]
  codes_all = jnp.asarray(summary, jnp.int32)
  if transpose:
    live, codes_all = live.transpose(0, 2, 1), codes_all.T
  batch, num_rows = live.shape[:2]
  order = jnp.argsort(~live, axis=-1, stable=True)[..., :width].astype(jnp.int32)
  counts = live.sum(-1).astype(jnp.int32)
  valid = jnp.arange(width)[None, None, :] < counts[..., None]
  flat = order.reshape(batch, num_rows * width)
  latest = _latest(valid.reshape(batch, num_rows * width))
  blocks = jnp.take_along_axis(flat, latest, axis=1).reshape(batch, num_rows, width)
  codes = jnp.take_along_axis(jnp.broadcast_to(codes_all, live.shape), blocks, axis=2)
  rows = _latest(counts > 0).astype(jnp.int32)
  return _Lists(blocks, counts, codes, rows, live)


def _block_range(ids, block):
  """Min and max id of every block: ``[B, L_pad] -> ([B, nblocks], [B, nblocks])``."""
  blocks = ids.reshape(ids.shape[0], -1, block)
  return blocks.min(-1), blocks.max(-1)


# ------------------------------------------------------------------------- score tile


def _tile(cfg: _Config, s, q_idx, kv_idx, masked, q_len, kv_len, seg_eq, slope, bias):
  """Scaled, capped, biased and masked logits of one tile.

  ``s`` is ``q k^T`` in float32, ``[bq, bk]`` (or ``[bk, bq]`` with ``q_idx [1, bq]`` and
  ``kv_idx [bk, 1]`` in the transposed dk/dv pass: every rule below is element-wise);
  ``bias`` is None or the float32 bias tile in the same orientation (-inf allowed).
  Returns ``(logits with -inf where not allowed, tanh of the cap or None, |i - j| or None)``.
  """
  s = s * cfg.scale
  tanh = None
  if cfg.soft_cap is not None:
    tanh = jnp.tanh(s * (1.0 / cfg.soft_cap))
    s = cfg.soft_cap * tanh
  if bias is not None:
    # After the cap: the bias is not squashed, and tanh above stays that of the scores.
    s = s + bias
  dist = None
  if cfg.has_alibi:
    dist = jnp.abs(q_idx - kv_idx).astype(jnp.float32)
    s = s - slope * dist
  allowed = seg_eq
  if masked:
    in_range = (q_idx < q_len) & (kv_idx < kv_len)
    if cfg.mask is not None:
      in_range = in_range & cfg.mask.predicate(q_idx, kv_idx)
    allowed = in_range if allowed is None else allowed & in_range
  if allowed is not None:
    s = jnp.where(allowed, s, -jnp.inf)
  return s, tanh, dist


def _dot(a, b, contract_b: int):
  """``a @ b`` (``contract_b=0``) or ``a @ b^T`` (``1``), accumulated in float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=precision)


def _rows(n: int):
  return lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def _cols(n: int):
  return lax.broadcasted_iota(jnp.int32, (1, n), 1)


def _run_step(run, needs_mask, step):
  """Trace ``step(masked)`` twice: with the element mask where needed, without elsewhere."""
  @pl.when(run & needs_mask)
  def _():
    step(True)

  @pl.when(run & jnp.logical_not(needs_mask))
  def _():
    step(False)


def _unpack(refs, flags):
  """Split ``refs`` into one entry per flag: a ref (or tuple of two) or None."""
  out, i = [], 0
  for width in flags:
    if width == 0:
      out.append(None)
    elif width == 1:
      out.append(refs[i])
    else:
      out.append(tuple(refs[i:i + width]))
    i += width
  return out, refs[i:]


# ---------------------------------------------------------------------------- forward


def _forward_kernel(cfg: _Config, blocks_ref, counts_ref, codes_ref, rows_ref, q_lens_ref,
                    kv_lens_ref, q_ref, k_ref, v_ref, *refs):
  del rows_ref  # read by the index maps only
  bq, bk = cfg.fwd
  (seg, sinks_ref, slopes_ref, bias_ref), refs = _unpack(
      refs, (2 * cfg.has_segments, int(cfg.has_sinks), int(cfg.has_alibi), int(cfg.has_bias)))
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _():
    if cfg.has_sinks:
      m_ref[...] = jnp.full(m_ref.shape, sinks_ref[n], jnp.float32)
      l_ref[...] = jnp.ones(l_ref.shape, jnp.float32)
    else:
      m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  kv_block = blocks_ref[b, i, j]
  q_len, kv_len = q_lens_ref[b], kv_lens_ref[b]

  def step(masked):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    q_idx, kv_idx = i * bq + _rows(bq), kv_block * bk + _cols(bk)
    seg_eq = None if seg is None else seg[0][...] == seg[1][...]
    slope = None if slopes_ref is None else slopes_ref[n]
    bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32)
    s, _, _ = _tile(cfg, _dot(q, k, 1), q_idx, kv_idx, masked, q_len, kv_len, seg_eq, slope,
                    bias)
    # m and l are kept lane-replicated in (bq, 128) scratch; column 0 is the value.
    m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    # A row that has seen nothing keeps m = -inf; shifting by 0 then gives p = 0, not NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - shift)
    alpha = jnp.exp(m_prev - shift)
    l_ref[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_ref.shape)
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, 0)

  crosses = ((i + 1) * bq > q_len) | ((kv_block + 1) * bk > kv_len)
  _run_step(j < counts_ref[b, i], (codes_ref[b, i, j] == PARTIAL) | crosses, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l, m = l_ref[:, :1], m_ref[:, :1]
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc_ref[...] / safe_l, 0.0).astype(o_ref.dtype)
    # Rows that saw nothing (no key, no sink) get lse = +inf, so exp(s - lse) = 0 later.
    lse = jnp.where(seen, m + jnp.log(safe_l), jnp.inf)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _row_major_specs(cfg: _Config, bq: int, bk: int):
  """BlockSpecs of the forward and dq grids ``(b, n, i, j)``.

  Inputs of query block ``i`` load block ``rows[b, i]`` (``i`` itself when it has live
  steps), key/value inputs the listed block ``blocks[b, i, j]`` of key head ``n // G``;
  outputs go to block ``i``.
  """
  g = cfg.groups
  # Index maps get the grid indices, then the scalar-prefetch refs in _Lists.prefetch order.
  return {
      "q": _seq_spec(cfg, bq, lambda b, n, i, j, blk, cnt, cod, rows, *_: (b, rows[b, i], n)),
      "q_out": _seq_spec(cfg, bq, lambda b, n, i, j, *_: (b, i, n)),
      "kv": _seq_spec(cfg, bk, lambda b, n, i, j, blk, *_: (b, blk[b, i, j], lax.div(n, g))),
      "row": pl.BlockSpec((None, None, 1, bq),
                          lambda b, n, i, j, blk, cnt, cod, rows, *_: (b, n, 0, rows[b, i])),
      "q_ids": pl.BlockSpec((None, bq, 1),
                            lambda b, n, i, j, blk, cnt, cod, rows, *_: (b, rows[b, i], 0)),
      "kv_ids": pl.BlockSpec((None, 1, bk), lambda b, n, i, j, blk, *_: (b, 0, blk[b, i, j])),
      "bias": pl.BlockSpec((None, None, bq, bk),
                           lambda b, n, i, j, blk, cnt, cod, rows, *_:
                           _bias_index(cfg, b, n, rows[b, i], blk[b, i, j])),
  }


def _bias_index(cfg: _Config, b, n, q_block, kv_block):
  """Block index of the ``[Bb, Nb, T, S]`` bias: a broadcast axis (size 1) stays at 0."""
  return (b if cfg.bias_per_batch else 0, n if cfg.bias_per_head else 0, q_block, kv_block)


def _extras(cfg: _Config, specs, ids, sinks, slopes, bias, transposed: bool):
  """The optional inputs (segment ids, sinks, slopes, bias) and their specs, in kernel
  order.

  Query ids are a column ``[B, T, 1]`` and key ids a row ``[B, 1, S]`` (swapped for the
  transposed dk/dv tile), so their comparison broadcasts to the score tile. The bias is
  always read as ``[bq, bk]`` tiles of the padded ``[Bb, Nb, q_pad, kv_pad]`` array.
  """
  specs_out, args = [], []
  if cfg.has_segments:
    q_ids, kv_ids = ids
    if transposed:
      q_ids, kv_ids = q_ids[:, None, :], kv_ids[:, :, None]
    else:
      q_ids, kv_ids = q_ids[:, :, None], kv_ids[:, None, :]
    specs_out += [specs["q_ids"], specs["kv_ids"]]
    args += [q_ids, kv_ids]
  for x in (sinks, slopes):
    if x is not None:
      specs_out.append(pl.BlockSpec(memory_space=pltpu.SMEM))
      args.append(x.astype(jnp.float32))
  if cfg.has_bias:
    specs_out.append(specs["bias"])
    args.append(bias)
  return specs_out, args


def _params(rows_parallel: bool = True):
  return pltpu.CompilerParams(dimension_semantics=(
      "parallel", "parallel", "parallel" if rows_parallel else "arbitrary", "arbitrary"))


def _forward(cfg: _Config, q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, lists):
  """Kernel-layout ``q, k, v`` -> ``o`` (same layout) and ``lse [B, N, q_pad]`` (float32,
  +inf on rows that saw nothing); ``lists``: the ``cfg.fwd`` block lists."""
  bq, bk = cfg.fwd
  batch = q.shape[0]
  specs = _row_major_specs(cfg, bq, bk)
  extra_specs, extra_args = _extras(cfg, specs, ids, sinks, slopes, bias, transposed=False)
  o, lse = pl.pallas_call(
      lambda *refs: _forward_kernel(cfg, *refs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          grid=(batch, cfg.num_heads, cfg.q_pad // bq, lists.width),
          in_specs=[specs["q"], specs["kv"], specs["kv"]] + extra_specs,
          # lse is written lane-replicated: a (bq, 128) tile needs no relayout of the
          # column; one lane is kept below.
          out_specs=[specs["q_out"],
                     pl.BlockSpec((None, None, bq, _LANES),
                                  lambda b, n, i, j, *_: (b, n, i, 0))],
          scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, cfg.head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, cfg.num_heads, cfg.q_pad, _LANES),
                                      jnp.float32)],
      compiler_params=_params(),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(*lists.prefetch(q_lens, kv_lens), q, k, v, *extra_args)
  return o, lse[..., 0]


# ---------------------------------------------------------------------------- dq pass


def _row_major_dl(cfg: _Config, ins, n, i, kv_block, masked, q_len, kv_len):
  """``dl = p (dp - D)`` of one ``[bq, bk]`` tile of the dq / dbias grids, with the tanh of
  the cap and ``|i - j|`` (or None) for the chain rule. ``dl`` is the gradient of the
  logits after the cap, so also that of the bias; it is exactly 0 wherever ``p`` is."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg, slopes_ref, bias_ref = ins
  bq, bk = cfg.dq
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  q_idx, kv_idx = i * bq + _rows(bq), kv_block * bk + _cols(bk)
  seg_eq = None if seg is None else seg[0][...] == seg[1][...]
  slope = None if slopes_ref is None else slopes_ref[n]
  bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32)
  s, tanh, dist = _tile(cfg, _dot(q, k, 1), q_idx, kv_idx, masked, q_len, kv_len,
                        seg_eq, slope, bias)
  # lse and D arrive as (1, bq) lane rows (the dk/dv pass's layout); make them columns.
  # exp(-inf - lse) = 0 for masked pairs, and lse = +inf on rows that saw nothing.
  lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]
  p = jnp.exp(s - lse)
  return p * (_dot(do, v, 1) - delta), tanh, dist


def _dq_kernel(cfg: _Config, blocks_ref, counts_ref, codes_ref, rows_ref, q_lens_ref,
               kv_lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  del rows_ref  # read by the index maps only
  bq, bk = cfg.dq
  (seg, slopes_ref, bias_ref), refs = _unpack(
      refs, (2 * cfg.has_segments, int(cfg.has_alibi), int(cfg.has_bias)))
  if cfg.has_alibi:
    dq_ref, dslope_ref, acc_ref, dslope_acc_ref = refs
  else:
    (dq_ref, acc_ref), dslope_ref, dslope_acc_ref = refs, None, None
  ins = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg, slopes_ref, bias_ref)
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if cfg.has_alibi:
      dslope_acc_ref[...] = jnp.zeros(dslope_acc_ref.shape, jnp.float32)

  kv_block = blocks_ref[b, i, j]
  q_len, kv_len = q_lens_ref[b], kv_lens_ref[b]

  def step(masked):
    dl, tanh, dist = _row_major_dl(cfg, ins, n, i, kv_block, masked, q_len, kv_len)
    if cfg.has_alibi:
      # d slope_n = sum dl * d(bias)/d(slope) = -sum dl |i - j|, one (1, 1) total per step.
      dslope_acc_ref[...] += jnp.broadcast_to(-(dl * dist).sum(keepdims=True),
                                              dslope_acc_ref.shape)
    ds = dl if tanh is None else dl * (1.0 - tanh * tanh)
    k = k_ref[...]
    acc_ref[...] += _dot(ds.astype(k.dtype), k, 0)

  crosses = ((i + 1) * bq > q_len) | ((kv_block + 1) * bk > kv_len)
  _run_step(j < counts_ref[b, i], (codes_ref[b, i, j] == PARTIAL) | crosses, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)
    if cfg.has_alibi:
      dslope_ref[...] = dslope_acc_ref[...]


def _dbias_kernel(cfg: _Config, blocks_ref, counts_ref, codes_ref, rows_ref, q_lens_ref,
                  kv_lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  """The dq grid writing each live tile's ``dl`` instead of accumulating ``dq``.

  A skipped step keeps the output block of the step before it (the index maps repeat
  it) and leaves the tile as computed; blocks no live step computes are zeroed outside.
  """
  del rows_ref  # read by the index maps only
  bq, bk = cfg.dq
  (seg, slopes_ref, bias_ref), (dl_ref,) = _unpack(
      refs, (2 * cfg.has_segments, int(cfg.has_alibi), int(cfg.has_bias)))
  ins = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg, slopes_ref, bias_ref)
  b, n, i, j = (pl.program_id(a) for a in range(4))
  kv_block = blocks_ref[b, i, j]
  q_len, kv_len = q_lens_ref[b], kv_lens_ref[b]

  def step(masked):
    dl_ref[...] = _row_major_dl(cfg, ins, n, i, kv_block, masked, q_len, kv_len)[0]

  crosses = ((i + 1) * bq > q_len) | ((kv_block + 1) * bk > kv_len)
  _run_step(j < counts_ref[b, i], (codes_ref[b, i, j] == PARTIAL) | crosses, step)


def _row_major_backward(cfg: _Config, kernel, name, out_specs, out_shape, scratch, lists,
                        q, k, v, do, lse_rows, delta_rows, slopes, bias, ids, q_lens,
                        kv_lens, rows_parallel=True):
  """One pallas_call of a row-major backward kernel (dq or dbias) on the dq blocks."""
  bq, bk = cfg.dq
  specs = _row_major_specs(cfg, bq, bk)
  extra_specs, extra_args = _extras(cfg, specs, ids, None, slopes, bias, transposed=False)
  q_spec, kv_spec, row_spec = specs["q"], specs["kv"], specs["row"]
  return pl.pallas_call(
      lambda *refs: kernel(cfg, *refs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          grid=(q.shape[0], cfg.num_heads, cfg.q_pad // bq, lists.width),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + extra_specs,
          out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_params(rows_parallel),
      interpret=cfg.interpret,
      name=name,
  )(*lists.prefetch(q_lens, kv_lens), q, k, v, do, lse_rows, delta_rows, *extra_args)


def _dq_pass(cfg: _Config, q, k, v, do, lse_rows, delta_rows, slopes, bias, ids, q_lens,
             kv_lens, lists):
  """Kernel-layout ``(dq,)``, and with ALiBi the slope gradient's partial sums
  ``[B, N, q_pad // block]`` (summed by the caller, outside the per-shard launch);
  ``lists``: the ``cfg.dq`` block lists."""
  bq, bk = cfg.dq
  batch, nq = q.shape[0], cfg.q_pad // bq
  out_specs = [_row_major_specs(cfg, bq, bk)["q_out"]]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  scratch = [pltpu.VMEM((bq, cfg.head_dim), jnp.float32)]
  if cfg.has_alibi:
    # One (8, 128) tile per (batch, head, query block) holding its partial sum.
    tile = (_SUBLANES, _LANES)
    out_specs.append(pl.BlockSpec((None, None, None) + tile,
                                  lambda b, n, i, j, *_: (b, n, i, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, cfg.num_heads, nq) + tile, jnp.float32))
    scratch.append(pltpu.VMEM(tile, jnp.float32))
  outs = _row_major_backward(cfg, _dq_kernel, "flash_attention_dq", out_specs, out_shape,
                             scratch, lists, q, k, v, do, lse_rows, delta_rows, slopes, bias,
                             ids, q_lens, kv_lens)
  return (outs[0], outs[1][..., 0, 0]) if cfg.has_alibi else (outs[0],)


def _dbias_pass(cfg: _Config, q, k, v, do, lse_rows, delta_rows, slopes, bias, ids, q_lens,
                kv_lens, lists):
  """The bias cotangent per (batch, query head): ``(dl [B, N, q_pad, kv_pad] float32,)``.

  Its own pallas_call, so that XLA drops it when the bias gradient is not used. The caller
  sums the bias's broadcast axes (outside the per-shard launch). ``lists``: the ``cfg.dq``
  block lists.
  """
  bq, bk = cfg.dq
  batch, nq, nk = q.shape[0], cfg.q_pad // bq, cfg.kv_pad // bk
  full = (batch, cfg.num_heads, cfg.q_pad, cfg.kv_pad)
  # Same walk as the inputs: a skipped step maps to the output block of the last live step
  # (of an earlier row, for a row with none), so it writes nothing back. That holds only if
  # the rows of one (batch, head) run in order on one core: the row axis is "arbitrary"
  # here (a core that started at a dead row would write its stale buffer over a block of
  # another core's row).
  out_spec = pl.BlockSpec((None, None, bq, bk), lambda b, n, i, j, blk, cnt, cod, rows, *_:
                          (b, n, rows[b, i], blk[b, i, j]))
  dl = _row_major_backward(cfg, _dbias_kernel, "flash_attention_dbias", [out_spec],
                           [jax.ShapeDtypeStruct(full, jnp.float32)], [], lists, q, k, v, do,
                           lse_rows, delta_rows, slopes, bias, ids, q_lens, kv_lens,
                           rows_parallel=False)[0]
  # Blocks that no live step wrote (skipped, or a batch with nothing live) hold whatever
  # the buffer held; every pair in them is excluded, so their gradient is 0.
  dl = dl.reshape(batch, cfg.num_heads, nq, bq, nk, bk)
  return (jnp.where(lists.live[:, None, :, None, :, None], dl, 0.0).reshape(full),)


# ------------------------------------------------------------------------- dk/dv pass


def _dkv_kernel(cfg: _Config, width: int, blocks_ref, counts_ref, codes_ref, rows_ref,
                q_lens_ref, kv_lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  del rows_ref  # read by the index maps only
  bq, bk = cfg.dkv
  (seg, slopes_ref, bias_ref), refs = _unpack(
      refs, (2 * cfg.has_segments, int(cfg.has_alibi), int(cfg.has_bias)))
  dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
  b, kh, j, step_id = (pl.program_id(a) for a in range(4))
  g, t = lax.div(step_id, width), lax.rem(step_id, width)
  n = kh * cfg.groups + g

  @pl.when(step_id == 0)
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  q_block = blocks_ref[b, j, t]
  q_len, kv_len = q_lens_ref[b], kv_lens_ref[b]

  def step(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    # Transposed tile [bk, bq]: rows are keys, columns queries.
    q_idx, kv_idx = q_block * bq + _cols(bq), j * bk + _rows(bk)
    seg_eq = None if seg is None else seg[1][...] == seg[0][...]
    slope = None if slopes_ref is None else slopes_ref[n]
    # The bias tile is read [bq, bk] like the other passes' and transposed here (in VMEM)
    # rather than keeping a transposed copy of the whole bias in HBM.
    bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32).T
    s, tanh, _ = _tile(cfg, _dot(k, q, 1), q_idx, kv_idx, masked, q_len, kv_len,
                       seg_eq, slope, bias)
    p = jnp.exp(s - lse_ref[...])
    dv_acc_ref[...] += _dot(p.astype(do.dtype), do, 0)
    dl = p * (_dot(v, do, 1) - delta_ref[...])
    ds = dl if tanh is None else dl * (1.0 - tanh * tanh)
    dk_acc_ref[...] += _dot(ds.astype(q.dtype), q, 0)

  crosses = ((q_block + 1) * bq > q_len) | ((j + 1) * bk > kv_len)
  _run_step(t < counts_ref[b, j], (codes_ref[b, j, t] == PARTIAL) | crosses, step)

  @pl.when(step_id == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dkv_pass(cfg: _Config, q, k, v, do, lse_rows, delta_rows, slopes, bias, ids, q_lens,
              kv_lens, lists):
  """Kernel-layout ``(dk, dv)``; ``lists``: the transposed ``cfg.dkv`` block lists."""
  bq, bk = cfg.dkv
  batch, g = q.shape[0], cfg.groups
  width = lists.width

  # Step ``step_id`` of key block ``j`` is query head ``kh * G + step_id // W`` and the
  # query block listed at ``step_id % W``. lax.div / lax.rem, because the operands are
  # non-negative and jnp's floor division lowers through sign (which needs a TPU to lower).
  def head(kh, step_id):
    return kh * g + lax.div(step_id, width)

  def listed(b, j, step_id, blk):
    return blk[b, j, lax.rem(step_id, width)]

  specs = {
      "q_ids": pl.BlockSpec((None, 1, bq), lambda b, kh, j, s, blk, *_:
                            (b, 0, listed(b, j, s, blk))),
      "kv_ids": pl.BlockSpec((None, bk, 1), lambda b, kh, j, s, blk, cnt, cod, rows, *_:
                             (b, rows[b, j], 0)),
      "bias": pl.BlockSpec((None, None, bq, bk), lambda b, kh, j, s, blk, cnt, cod, rows, *_:
                           _bias_index(cfg, b, head(kh, s), listed(b, j, s, blk),
                                       rows[b, j])),
  }
  q_spec = _seq_spec(cfg, bq, lambda b, kh, j, s, blk, *_:
                     (b, listed(b, j, s, blk), head(kh, s)))
  kv_spec = _seq_spec(cfg, bk, lambda b, kh, j, s, blk, cnt, cod, rows, *_:
                      (b, rows[b, j], kh))
  kv_out_spec = _seq_spec(cfg, bk, lambda b, kh, j, *_: (b, j, kh))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, kh, j, s, blk, *_:
                          (b, head(kh, s), 0, listed(b, j, s, blk)))
  extra_specs, extra_args = _extras(cfg, specs, ids, None, slopes, bias, transposed=True)
  return tuple(pl.pallas_call(
      lambda *refs: _dkv_kernel(cfg, width, *refs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          grid=(batch, cfg.num_kv, cfg.kv_pad // bk, g * width),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + extra_specs,
          out_specs=[kv_out_spec, kv_out_spec],
          scratch_shapes=[pltpu.VMEM((bk, cfg.head_dim), jnp.float32),
                          pltpu.VMEM((bk, cfg.head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=_params(),
      interpret=cfg.interpret,
      name="flash_attention_dkv",
  )(*lists.prefetch(q_lens, kv_lens), q, k, v, do, lse_rows, delta_rows, *extra_args))


# ------------------------------------------------------------------------ partitioning

# Forces the per-shard split below in interpret mode too, where the kernels are plain HLO
# that XLA would partition by itself (so only forcing it tests the split). Private: set by
# tests/pallas_kernels/tpu/partition_check_tpu.py, with ``interpret=True`` (the ordered
# callbacks of ``pltpu.InterpretParams`` cannot be lowered inside a custom partitioning);
# callers get the split on hardware whenever the program spans several devices.
_FORCE_PARTITION = False
# Dims of a kernel-layout ``[B, N, L, H]`` / ``[B, L, N * H]`` array (q, k, v, dO, o, ...).
_SEQ = "seq"
_PER_BATCH, _PER_HEAD, _BATCH_HEAD = (0, None), (None, 0), (0, 1)


def _bias_dims(cfg: _Config):
  """The bias ``[Bb, Nb, T, S]`` follows the batch / head split only where Bb = B / Nb = N."""
  return (0 if cfg.bias_per_batch else None, 1 if cfg.bias_per_head else None)


class _Crossing(NamedTuple):
  """How one kernel array crosses ``batch_head_partitioned``: as a free reshape whose
  batch and head axes stand alone and whose other axes are merged run by run (fewer
  factors in the partitioner's Shardy rule, each of which needs replication). A ``_SEQ``
  array in the lane layout ``[B, L, N * H]`` is first viewed as ``[B, L, N, H]``, so a
  shard never cuts through a head."""

  lane_heads: int  # H when the array is a lane-layout _SEQ array, else 0
  groups: tuple[tuple[int, ...], ...]  # axes (after the lane view) behind each call axis
  dims: tuple[int | None, int | None] | None  # (batch, head) axes in the call, or None

  @classmethod
  def of(cls, cfg: _Config, ndim: int, dims):
    lane_heads = 0
    if dims == _SEQ:
      lane_heads, ndim = (cfg.head_dim, 4) if cfg.heads_in_lanes else (0, ndim)
      dims = (0, 2) if cfg.heads_in_lanes else (0, 1)
    keep = () if dims is None else tuple(a for a in dims if a is not None)
    groups = []
    for axis in range(ndim):
      if axis in keep or not groups or groups[-1][-1] in keep:
        groups.append((axis,))
      else:
        groups[-1] = groups[-1] + (axis,)
    where = {g[0]: i for i, g in enumerate(groups)}
    call_dims = None if dims is None else tuple(None if a is None else where[a] for a in dims)
    return cls(lane_heads, tuple(groups), call_dims)

  def enter(self, x):
    """Kernel array (whole or a shard) -> the call's operand."""
    if self.lane_heads:
      x = x.reshape(x.shape[:2] + (-1, self.lane_heads))
    return x.reshape(tuple(math.prod(x.shape[a] for a in g) for g in self.groups))

  def leave(self, x, shape):
    """Inverse of ``enter`` for an array of (whole) ``shape``; batch and head sizes come
    from ``x``, which may be a shard."""
    if self.lane_heads:
      shape = shape[:2] + (shape[2] // self.lane_heads, self.lane_heads)
    shape = list(shape)
    for i, group in enumerate(self.groups):
      if len(group) == 1:
        shape[group[0]] = x.shape[i]
    x = x.reshape(shape)
    return x.reshape(x.shape[:2] + (-1,)) if self.lane_heads else x


def _launch(cfg: _Config, fn, args, dims, out_dims):
  """``fn(cfg, *args) -> tuple``, split per device over batch and heads when the program
  spans several TPUs (or ``_FORCE_PARTITION``), via ``partition.batch_head_partitioned``.

  ``dims``: per argument ``(batch_dim, head_dim)``, None (replicated) or ``_SEQ`` (a
  kernel-layout q / k / v-like array); a tuple argument (segment ids, block lists) has one
  entry for all its arrays, and None arguments stay None. ``out_dims`` likewise per
  result. Each shard runs ``fn`` with ``cfg`` holding its own head counts (from
  ``args[0]``, the queries, and ``args[1]``, the keys). The block lists are built outside
  (``custom_partitioning`` rejects the NumPy constants of ``_block_lists``) and, being
  batch-major, are split with the batch: a shard's rows are its schedule.
  """
  hardware = cfg.interpret is False or cfg.interpret is None
  if not (_FORCE_PARTITION or (hardware and jax.device_count() > 1)):
    return fn(cfg, *args)
  is_none = lambda x: x is None  # noqa: E731
  leaves, tree = jax.tree.flatten(args, is_leaf=is_none)
  leaf_dims = [d for x, d in zip(args, dims) for _ in jax.tree.leaves(x, is_leaf=is_none)]
  present = [i for i, x in enumerate(leaves) if x is not None]
  ins = {i: _Crossing.of(cfg, leaves[i].ndim, leaf_dims[i]) for i in present}
  out_shapes = [o.shape for o in jax.eval_shape(functools.partial(fn, cfg), *args)]
  outs = [_Crossing.of(cfg, len(shape), d) for shape, d in zip(out_shapes, out_dims)]

  def shard(*operands):
    given = list(leaves)
    for i, x in zip(present, operands):
      given[i] = ins[i].leave(x, leaves[i].shape)
    heads = [x.shape[ins[i].dims[1]] for i, x in zip(present[:2], operands)]
    local = dataclasses.replace(cfg, num_heads=heads[0], num_kv=heads[1])
    results = fn(local, *jax.tree.unflatten(tree, given))
    return tuple(c.enter(x) for c, x in zip(outs, results))

  run = partition.batch_head_partitioned(shard, [ins[i].dims for i in present],
                                         [c.dims for c in outs])
  results = run(*(ins[i].enter(leaves[i]) for i in present))
  return tuple(c.leave(x, shape) for c, x, shape in zip(outs, results, out_shapes))


# -------------------------------------------------------------------------- custom_vjp


def _row_sums(cfg: _Config, a, b):
  """``sum_h a * b`` of two kernel-layout query arrays -> ``[B, N, q_pad]`` float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if cfg.heads_in_lanes:
    shape = a.shape[:2] + (cfg.num_heads, cfg.head_dim)
    return jnp.einsum("btnh,btnh->bnt", a.reshape(shape), b.reshape(shape))
  return jnp.einsum("bnth,bnth->bnt", a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, live):
  """Attention on kernel-layout, padded arrays (the layout change is differentiated by JAX).
  ``live``: None or the (forward, dq, dk/dv) blocks a dynamic mask leaves non-empty."""
  return _attention_fwd(cfg, q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, live)[0]


def _attention_fwd(cfg, q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, live):
  live_or_none = (None,) * 3 if live is None else live
  lists = _block_lists(cfg, *cfg.fwd, q_lens, kv_lens, ids, transpose=False,
                       extra_live=live_or_none[0])
  o, lse = _launch(cfg, _forward, (q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, lists),
                   (_SEQ,) * 3 + (_PER_HEAD,) * 2 + (_bias_dims(cfg),) + (_PER_BATCH,) * 4,
                   (_SEQ, _BATCH_HEAD))
  return o, (q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, o, lse, live)


def _attention_bwd(cfg, res, do):
  q, k, v, sinks, slopes, bias, ids, q_lens, kv_lens, o, lse, live = res
  live_or_none = (None,) * 3 if live is None else live
  # D = rowsum(dO * o) (FlashAttention-2 Alg. 2); padded and dead rows have o = 0, D = 0.
  delta = _row_sums(cfg, do, o)
  lse_rows, delta_rows = lse[:, :, None, :], delta[:, :, None, :]
  grad_args = (q, k, v, do, lse_rows, delta_rows, slopes, bias, ids, q_lens, kv_lens)
  grad_dims = ((_SEQ,) * 4 + (_BATCH_HEAD,) * 2 + (_PER_HEAD, _bias_dims(cfg))
               + (_PER_BATCH,) * 4)
  dq_lists = _block_lists(cfg, *cfg.dq, q_lens, kv_lens, ids, transpose=False,
                          extra_live=live_or_none[1])
  dkv_lists = _block_lists(cfg, *cfg.dkv, q_lens, kv_lens, ids, transpose=True,
                           extra_live=live_or_none[2])
  dq, *dslope_parts = _launch(cfg, _dq_pass, grad_args + (dq_lists,), grad_dims,
                              (_SEQ,) + (_BATCH_HEAD,) * cfg.has_alibi)
  dk, dv = _launch(cfg, _dkv_pass, grad_args + (dkv_lists,), grad_dims, (_SEQ, _SEQ))
  dbias = None
  if cfg.has_bias:
    # A separate kernel, dead code (and dropped by XLA) when the bias gradient is unused.
    (dbias,) = _launch(cfg, _dbias_pass, grad_args + (dq_lists,), grad_dims, (_BATCH_HEAD,))
    axes = tuple(a for a, keep in ((0, cfg.bias_per_batch), (1, cfg.bias_per_head))
                 if not keep)
    dbias = (dbias.sum(axes, keepdims=True) if axes else dbias).astype(bias.dtype)
  dslopes = dslope_parts[0].sum((0, 2)) if cfg.has_alibi else None
  dsinks = None
  if sinks is not None:
    # d sink_n = -sum_rows p_sink D with p_sink = exp(sink_n - lse) (finite: l >= 1).
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
    dsinks = -(p_sink * delta).sum((0, 2)).astype(sinks.dtype)
  if dslopes is not None:
    dslopes = dslopes.astype(slopes.dtype)
  return dq, dk, dv, dsinks, dslopes, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------- entry


def _check_vector(name, x, length, kind):
  shape = tuple(np.shape(x))
  if shape != (length,):
    raise ValueError(f"{name} must have shape ({length},), got {shape}")
  dtype = jnp.asarray(x).dtype
  want = jnp.floating if kind == "float" else jnp.integer
  if not jnp.issubdtype(dtype, want):
    raise ValueError(f"{name} must be {kind}, got dtype {dtype}")


def _check_mask(mask, q_len, kv_len):
  if mask is None:
    return
  if not callable(getattr(mask, "predicate", None)) or not callable(
      getattr(mask, "block_summary", None)):
    raise ValueError(f"mask must have predicate and block_summary, got {type(mask).__name__}")
  if not getattr(mask, "is_static", True):
    raise ValueError(f"mask must be static (positions only), got {type(mask).__name__}; "
                     "pass segment ids or lengths for data-dependent masks")
  # The dk/dv pass evaluates the predicate on transposed index grids.
  qi, ki = np.arange(min(q_len, 16)), np.arange(min(kv_len, 16))
  direct = np.broadcast_to(mask.predicate(qi[:, None], ki[None, :]), (qi.size, ki.size))
  swapped = np.broadcast_to(mask.predicate(qi[None, :], ki[:, None]), (ki.size, qi.size))
  if not np.array_equal(direct.T, swapped):
    raise ValueError(f"mask {type(mask).__name__}.predicate must be element-wise in "
                     "(q_idx, kv_idx)")


def _check_bias(bias, batch, num_heads, q_len, kv_len):
  shape, dtype = tuple(np.shape(bias)), jnp.asarray(bias).dtype
  if (len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads)
      or shape[2:] != (q_len, kv_len)):
    raise ValueError(f"bias must be [Bb, Nb, T, S] with Bb in (1, {batch}), Nb in "
                     f"(1, {num_heads}), T, S = {q_len}, {kv_len}; got shape {shape}")
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"bias must be float32 or bfloat16, got dtype {dtype}")


def flash_attention(q, k, v, *, scale: float, soft_cap: float | None = None, sinks=None,
                    mask=None, q_segment_ids=None, kv_segment_ids=None, q_lengths=None,
                    kv_lengths=None, alibi_slopes=None, bias=None, block_mask=None,
                    block_sizes: BlockSizes | None = None, interpret=False):
  """Softmax attention as Mosaic TPU kernels, differentiable in q, k, v, sinks, slopes and
  bias.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``N % K == 0`` (GQA / MQA: query head
      ``n`` reads key head ``n // (N // K)``). bfloat16 or float32, all the same dtype.
    scale: multiplies ``q k^T``.
    soft_cap: ``c`` for ``c * tanh(logits / c)``, or None.
    sinks: ``[N]`` float sink logits, in each row's softmax denominator with no value.
    mask: None or a static mask (``attnlab.ops.masks`` vocabulary): ``predicate(q_idx
      [bq, 1], kv_idx [1, bk])`` in jnp and ``block_summary(T, S, bq, bk)`` in NumPy.
    q_segment_ids, kv_segment_ids: ``[B, T]`` and ``[B, S]`` int; equal ids attend. Both
      or neither.
    q_lengths, kv_lengths: ``[B]`` int; query ``i`` / key ``j`` of batch ``b`` are real when
      ``i < q_lengths[b]`` / ``j < kv_lengths[b]``.
    alibi_slopes: ``[N]`` float; adds ``-slopes[n] * |i - j|`` to the logits.
    bias: ``[Bb, Nb, T, S]`` float32 or bfloat16 with ``Bb`` in ``{1, B}`` and ``Nb`` in
      ``{1, N}`` (indexed by the query head, also under GQA), added to the logits after
      the soft cap: ``c tanh(scale q k^T / c) + bias - slope |i - j|``. Entries may be
      -inf (excluded pairs, whole rows included). Read in its dtype, added in float32;
      its gradient (summed over a broadcast axis) comes in its dtype.
    block_mask: None or a dynamic mask with a jnp ``block_summary(T, S, bq, bk)``; its
      EMPTY blocks are skipped like those of ``mask``. It only skips blocks: its elements
      must also reach the kernel (as ``-inf`` entries of ``bias``).
    block_sizes: ``BlockSizes``; defaults to ``BlockSizes()``.
    interpret: False on TPU; ``pltpu.InterpretParams()`` runs the kernels on CPU.

  Returns:
    ``o [B, T, N, H]`` in q's dtype. Rows that see no key (all masked, or all -inf
    bias) are exact zeros, and so are their gradients; excluded pairs get an exact zero
    bias gradient.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must be [B, L, heads, H], got shape {np.shape(x)}")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  batch, q_len, num_heads, head_dim = q.shape
  _, kv_len, num_kv, _ = k.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k and v must be [B, S, K, H] matching q, got {q.shape=} {k.shape=} "
                     f"{v.shape=}")
  if num_heads % num_kv:
    raise ValueError(f"q heads must be a multiple of k/v heads, got {q.shape=} {k.shape=}")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"q, k, v must share dtype bfloat16 or float32, got {q.dtype=} "
                     f"{k.dtype=} {v.dtype=}")
  if min(q_len, kv_len, head_dim) < 1:
    raise ValueError(f"empty attention: {q.shape=} {k.shape=}")
  if not isinstance(scale, (int, float, np.floating)):
    raise ValueError(f"scale must be a static float, got {scale!r}")
  if soft_cap is not None and not (isinstance(soft_cap, (int, float, np.floating))
                                   and soft_cap > 0):
    raise ValueError(f"soft_cap must be a positive float or None, got {soft_cap!r}")
  if sinks is not None:
    _check_vector("sinks", sinks, num_heads, "float")
  if alibi_slopes is not None:
    _check_vector("alibi_slopes", alibi_slopes, num_heads, "float")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together, got "
                     f"{q_segment_ids is None=} {kv_segment_ids is None=}")
  if q_segment_ids is not None:
    for name, ids, length in (("q_segment_ids", q_segment_ids, q_len),
                              ("kv_segment_ids", kv_segment_ids, kv_len)):
      if tuple(np.shape(ids)) != (batch, length) or not jnp.issubdtype(
          jnp.asarray(ids).dtype, jnp.integer):
        raise ValueError(f"{name} must be int [B, L]=({batch}, {length}), got shape "
                         f"{np.shape(ids)} dtype {jnp.asarray(ids).dtype}")
  for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if lengths is not None:
      _check_vector(name, lengths, batch, "int")
  _check_mask(mask, q_len, kv_len)
  if bias is not None:
    _check_bias(bias, batch, num_heads, q_len, kv_len)
  blocks = BlockSizes() if block_sizes is None else block_sizes
  if not isinstance(blocks, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(blocks).__name__}")

  hardware = interpret is False or interpret is None
  (fq, dq_q, dkv_q), q_pad = _resolve_blocks(
      q_len, (blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv), hardware,
      ("block_q", "block_q_dq", "block_q_dkv"))
  (fk, dq_k, dkv_k), kv_pad = _resolve_blocks(
      kv_len, (blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv), hardware,
      ("block_k", "block_k_dq", "block_k_dkv"))
  cfg = _Config(
      scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap), mask=mask,
      q_len=q_len, kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad, num_heads=num_heads,
      num_kv=num_kv, head_dim=head_dim, fwd=(fq, fk), dq=(dq_q, dq_k), dkv=(dkv_q, dkv_k),
      heads_in_lanes=head_dim % _LANES == 0, has_segments=q_segment_ids is not None,
      has_sinks=sinks is not None, has_alibi=alibi_slopes is not None, interpret=interpret,
      has_bias=bias is not None,
      bias_per_batch=bias is not None and np.shape(bias)[0] == batch > 1,
      bias_per_head=bias is not None and np.shape(bias)[1] == num_heads > 1)

  def clip_lengths(lengths, full):
    if lengths is None:
      return jnp.full((batch,), full, jnp.int32)
    return jnp.clip(jnp.asarray(lengths), 0, full).astype(jnp.int32)

  ids = None
  if q_segment_ids is not None:
    # Edge padding keeps each block's id range tight; padded positions are masked anyway.
    ids = (jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, q_pad - q_len)),
                   mode="edge"),
           jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, kv_pad - kv_len)),
                   mode="edge"))
  if bias is not None:
    # Padded pairs are masked by the bounds; the zeros only keep the tiles finite.
    bias = jnp.asarray(bias)
    if (q_pad, kv_pad) != (q_len, kv_len):
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, q_pad - q_len), (0, kv_pad - kv_len)))
  live = None
  if block_mask is not None:
    def non_empty(bq, bk):
      codes = jnp.asarray(block_mask.block_summary(q_len, kv_len, bq, bk))
      return jnp.pad(codes != EMPTY, ((0, q_pad // bq - codes.shape[0]),
                                      (0, kv_pad // bk - codes.shape[1])))
    live = (non_empty(*cfg.fwd), non_empty(*cfg.dq), non_empty(*cfg.dkv))
  lanes = cfg.heads_in_lanes
  o = _attention(cfg, _view(q, q_pad, lanes), _view(k, kv_pad, lanes),
                 _view(v, kv_pad, lanes), None if sinks is None else jnp.asarray(sinks),
                 None if alibi_slopes is None else jnp.asarray(alibi_slopes), bias, ids,
                 clip_lengths(q_lengths, q_len), clip_lengths(kv_lengths, kv_len), live)
  return _unview(o, q_len, num_heads, lanes)
