"""GLA's within-chunk scores for Hopper GPUs in Mosaic GPU: forward and backward, one CTA
per (chunk, head, batch row).

GLA (Yang et al. 2023) decays every key channel on its own, so inside a chunk of
``C = 64`` tokens, with ``b [C, K]`` the log gates summed from the chunk's (or the
document's) start, the scores are::

    A_ts = sum_d q_td k_sd e^{b_td - b_sd}       (s <= t, same document; else 0)

a ``[C, C, K]`` computation that is a matrix product only once the decay is split into a
query factor and a key factor around a reference token ``r``: ``e^{b_t - b_r} e^{b_r -
b_s}``. Both factors are at most 1 when ``s <= r <= t`` (gates are <= 0), and otherwise
one of them may overflow, so:

* pairs in different 16-token blocks: for each key block ``j`` the reference is its last
  token; ``(q * e^{min(b - b_r, 0)}) (k_j * e^{min(b_r - b_j, 0)})^T`` on the tensor cores
  gives the pairs with ``t`` in a later block exactly (the ``min`` only clips pairs that
  are masked out: earlier rows and other documents);
* pairs in the same 16-token block: column by column, the four blocks at once: step ``j``
  takes key ``s = 16 * block(t) + j`` for every row ``t`` and sums ``q_t * k_s *
  e^{b_t - b_s}`` over the channels (one exponential per pair and channel, so gates of
  -20 per token lose nothing).

The key channels are taken 64 at a time. Backward, from ``dA`` and ``dA^T`` (the GLA
gradient launch computes both): the same two parts give ``dq`` and ``dk``, and the
gradient of ``b`` is ``q * dq' - k * dk'`` with ``dq'``, ``dk'`` leaving out the diagonal
pairs (whose exponent is 0), so no term cancels another of its own pair.

Inputs bfloat16 or float16 (q, k) and float32 (b, the document index); ``K`` 64 or 128.
Runs on an H100/H200 and, slowly, on CPU in the Mosaic GPU interpreter of jax 0.10.2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import chunked_linear as base
from pallas_kernels.gpu import chunked_ut as ut
from pallas_kernels.gpu import tiles

# pylint: disable=protected-access
CHUNK = base.CHUNK
SUB = ut.SUB      # 16-token blocks
LANES = 64        # key channels per pass
_F32 = jnp.float32
_TILE, _ROW, _COL = base._TILE, base._ROW, base._COL
_SQUARE = (CHUNK, CHUNK)


def _halves(static):
  return range(static.key_dim // LANES)


def _copy_inputs(refs, scratch, names, static):
  """TMA copies of the chunk's document index (row and column copies) and, per 64 key
  channels, of each named ``[B, T, H, K]`` input."""
  c, head, batch = base._chunk_position()
  rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
  pairs = [(refs["doc"].at[batch, head, c], scratch["doc"]),
           (refs["doc"].at[batch, head, c], scratch["doct"])]
  for h in _halves(static):
    lanes = pl.ds(h * LANES, LANES)
    pairs += [(refs[n].at[rows + (lanes,)], scratch[n].at[h]) for n in names]
  base._copy_in(pairs, scratch["bar"])
  plgpu.barrier_wait(scratch["bar"])
  return rows


def _gather(static, row_s, j, br):
  """``[C, LANES]``: row ``16 * block(t) + j`` of ``row_s`` for every row ``t``."""
  out = None
  for blk in range(CHUNK // SUB):
    x = tiles.cols(tiles.load(row_s.at[SUB * blk + j], _COL, static.interpret), _SQUARE)
    out = x if out is None else jnp.where(br == blk, x, out)
  return out


def _exp_le0(x):
  """``e^{min(x, 0)}``: never overflows; exact wherever the pair is kept."""
  return jnp.exp(jnp.minimum(x, 0.0))


def _to_rows_buffers(static, scratch, h, names):
  """The half's tiles as float32 registers, also stored untiled for row reads."""
  interp = static.interpret
  out = {}
  plgpu.commit_smem()   # the previous half's row reads are done before the overwrite
  for n in names:
    x = tiles.load(scratch[n].at[h], _TILE, interp).astype(_F32)
    scratch[n + "_rows"][...] = x
    out[n] = x
  plgpu.commit_smem()
  return out


def _masks(static, scratch):
  interp = static.interpret
  r, col, br, bc = ut._blocks(interp)
  d_row = tiles.load(scratch["doc"], _ROW, interp)
  d_col = tiles.load(scratch["doct"], _COL, interp)
  same = tiles.rows(d_row, _SQUARE) == tiles.cols(d_col, _SQUARE)
  return r, col, br, bc, same


# --------------------------------------------------------------------------- forward


def _forward_kernel(static, refs, scratch):
  scratch = dict(zip(("q", "k", "b", "doc", "doct", "k_rows", "b_rows", "qt", "kt", "a",
                      "bar"), scratch))
  interp, dtype = static.interpret, scratch["q"].dtype
  c, head, batch = base._chunk_position()
  _copy_inputs(refs, scratch, ("q", "k", "b"), static)
  r, col, br, bc, same = _masks(static, scratch)
  a_off = a_diag = tiles.zeros(_SQUARE, interp)
  for h in _halves(static):
    x = _to_rows_buffers(static, scratch, h, ("k", "b"))
    qf = tiles.load(scratch["q"].at[h], _TILE, interp).astype(_F32)
    kf, bf = x["k"], x["b"]
    for j in range(CHUNK // SUB - 1):       # key block j against the later rows
      ref = tiles.cols(tiles.load(scratch["b_rows"].at[SUB * j + SUB - 1], _COL, interp),
                       _SQUARE)
      scratch["qt"][...] = (qf * _exp_le0(bf - ref)).astype(dtype)
      scratch["kt"][...] = jnp.where(br == j, kf * _exp_le0(ref - bf), 0.0).astype(dtype)
      plgpu.commit_smem()
      a_off = tiles.matmul_add(a_off, scratch["qt"], scratch["kt"], interp, transpose_b=True)

    def column(j, a):
      kc = _gather(static, scratch["k_rows"], j, br)
      bcol = _gather(static, scratch["b_rows"], j, br)
      val = (qf * kc * _exp_le0(bf - bcol)).sum(axis=1)
      return a + jnp.where(col == SUB * br + j, tiles.rows(val, _SQUARE), 0.0)

    a_diag = lax.fori_loop(0, SUB, column, a_diag)
  a = jnp.where(br > bc, a_off, jnp.where(br == bc, a_diag, 0.0))
  scratch["a"][...] = jnp.where(same & (r >= col), a, 0.0).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(scratch["a"], refs["a"].at[batch, head, c])
  plgpu.wait_smem_to_gmem(0)


def _scratch(static, dtype, names, extra):
  nh = static.key_dim // LANES
  tile = {"q": dtype, "k": dtype, "b": _F32}
  return ((*(tiles.swizzled((nh, CHUNK, LANES), tile[n]) for n in names),
           plgpu.SMEM((CHUNK,), _F32), plgpu.SMEM((CHUNK,), _F32))
          + tuple(extra) + (plgpu.Barrier(num_arrivals=2 + len(names) * nh),))


def forward_call(static, q, k, b, doc):
  """``A [B, H, T / C, C, C]`` in q's dtype (unscaled) from ``q``, ``k [B, T, H, K]``, the
  in-chunk gate sums ``b [B, T, H, K]`` float32 and the document index ``doc [B, H, T / C,
  C]`` float32."""
  bsz, tp, heads, kd = q.shape
  dtype, nc = q.dtype, static.num_chunks
  rows_f32 = plgpu.SMEM((CHUNK, LANES), _F32)
  (a,) = base._parallel(
      static, _forward_kernel, dict(q=q, k=k, b=b, doc=doc),
      dict(a=jax.ShapeDtypeStruct((bsz, heads, nc, CHUNK, CHUNK), dtype)),
      _scratch(static, dtype, ("q", "k", "b"),
               (rows_f32, rows_f32, tiles.swizzled((CHUNK, LANES), dtype),
                tiles.swizzled((CHUNK, LANES), dtype), tiles.swizzled(_SQUARE, dtype))),
      bsz, heads)
  return a


# -------------------------------------------------------------------------- backward


def _backward_kernel(static, refs, scratch):
  scratch = dict(zip(("q", "k", "b", "doc", "doct", "q_rows", "k_rows", "b_rows", "qt",
                      "kt", "da_in", "da", "dat", "bar", "one"), scratch))
  interp, dtype = static.interpret, scratch["q"].dtype
  c, head, batch = base._chunk_position()
  rows = _copy_inputs(refs, scratch, ("q", "k", "b"), static)

  # dA and dA^T on the strictly lower (upper) same-document pairs, and dA's diagonal.
  r, col, br, bc, same = _masks(static, scratch)

  def load_grads(da_s, dat_s):
    for src, dst in ((refs["da"], da_s), (refs["dat"], dat_s)):
      plgpu.copy_gmem_to_smem(src.at[batch, head, c], dst, scratch["one"])
      plgpu.barrier_wait(scratch["one"])
    da = tiles.load(da_s, _TILE, interp).astype(_F32)
    dat = tiles.load(dat_s, _TILE, interp).astype(_F32)
    return (jnp.where(same & (r > col), da, 0.0), jnp.where(same & (col > r), dat, 0.0),
            jnp.where(r == col, da, 0.0).sum(axis=1))

  sq = tiles.swizzled(_SQUARE, dtype)
  da, dat, da_diag = pl.run_scoped(load_grads, sq, sq)
  scratch["da"][...] = da
  scratch["dat"][...] = dat

  for h in _halves(static):
    x = _to_rows_buffers(static, scratch, h, ("q", "k", "b"))
    qf, kf, bf = x["q"], x["k"], x["b"]
    dq = dk = tiles.zeros((CHUNK, LANES), interp)
    for j in range(CHUNK // SUB - 1):
      ref = tiles.cols(tiles.load(scratch["b_rows"].at[SUB * j + SUB - 1], _COL, interp),
                       _SQUARE)
      qfac, kfac = _exp_le0(bf - ref), _exp_le0(ref - bf)
      scratch["qt"][...] = (qf * qfac).astype(dtype)
      scratch["kt"][...] = jnp.where(br == j, kf * kfac, 0.0).astype(dtype)
      dam = tiles.load(scratch["da"], _TILE, interp)
      scratch["da_in"][...] = jnp.where((br > j) & (bc == j), dam, 0.0).astype(dtype)
      plgpu.commit_smem()
      dq = dq + qfac * tiles.matmul(scratch["da_in"], scratch["kt"], (CHUNK, LANES), interp)
      dk = dk + kfac * tiles.matmul(scratch["da_in"], scratch["qt"], (CHUNK, LANES), interp,
                                    transpose_a=True)
      plgpu.commit_smem()   # every product has read qt / kt before the next overwrite

    def dq_column(j, dq):
      w = jnp.where(col == SUB * br + j, tiles.load(scratch["da"], _TILE, interp),
                    0.0).sum(axis=1)
      kc = _gather(static, scratch["k_rows"], j, br)
      bcol = _gather(static, scratch["b_rows"], j, br)
      return dq + tiles.rows(w, _SQUARE) * kc * _exp_le0(bf - bcol)

    def dk_column(j, dk):
      w = jnp.where(col == SUB * br + j, tiles.load(scratch["dat"], _TILE, interp),
                    0.0).sum(axis=1)
      qc = _gather(static, scratch["q_rows"], j, br)
      bcol = _gather(static, scratch["b_rows"], j, br)
      return dk + tiles.rows(w, _SQUARE) * qc * _exp_le0(bcol - bf)

    dq = lax.fori_loop(0, SUB, dq_column, dq)
    dk = lax.fori_loop(0, SUB, dk_column, dk)
    lanes = rows + (pl.ds(h * LANES, LANES),)
    diag = tiles.rows(da_diag, _SQUARE)
    base._stage_out(static, qf * dq - kf * dk, refs["db"].at[lanes])
    base._stage_out(static, dq + diag * kf, refs["dq"].at[lanes])
    base._stage_out(static, dk + diag * qf, refs["dk"].at[lanes])
  plgpu.wait_smem_to_gmem(0)


def backward_call(static, q, k, b, doc, da, dat):
  """``dq``, ``dk``, ``db [B, T, H, K]`` float32 from ``dA`` and ``dA^T [B, H, T / C, C,
  C]`` (input dtype) and the forward's inputs."""
  bsz, tp, heads, kd = q.shape
  dtype = q.dtype
  rows_f32 = plgpu.SMEM((CHUNK, LANES), _F32)
  grad = jax.ShapeDtypeStruct((bsz, tp, heads, kd), _F32)
  return base._parallel(
      static, _backward_kernel, dict(q=q, k=k, b=b, doc=doc, da=da, dat=dat),
      dict(dq=grad, dk=grad, db=grad),
      _scratch(static, dtype, ("q", "k", "b"),
               (rows_f32, rows_f32, rows_f32, tiles.swizzled((CHUNK, LANES), dtype),
                tiles.swizzled((CHUNK, LANES), dtype), tiles.swizzled(_SQUARE, dtype),
                tiles.swizzled(_SQUARE, _F32), tiles.swizzled(_SQUARE, _F32)))
      + (plgpu.Barrier(),), bsz, heads)
