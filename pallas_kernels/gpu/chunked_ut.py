"""The delta rules' per-chunk UT transform for Hopper GPUs in Mosaic GPU: forward and
backward, one CTA per (chunk, head, batch row).

For a chunk of ``C = 64`` tokens with keys ``k``, values ``v``, write strengths ``beta``,
gates summed from the chunk's (or the document's) start ``b`` and ``e^b`` ("into"; see
``chunked_delta.py``)::

    L_ts = beta_t e^{b_t - b_s} k_t . k_s      (s < t, same document; else 0)
    T = (I + L)^{-1}     P = T diag(beta)     U = P v     N = -T diag(beta e^b) k

Forward: ``k k^T`` on the tensor cores, then ``X = T^T`` (the inverse kept transposed)
by blocked forward substitution: the four 16 x 16 diagonal blocks of ``X`` solved at once
in a packed [64, 16] float32 register tile (row ``r`` holds its own block's 16 columns;
15 steps, step ``j`` takes column ``j`` with one masked row sum and subtracts ``L_ts
X[:, s]`` from the later columns, pieces of the rows of ``L^T`` read from shared memory),
spread back to the block diagonal by one product with a 0/1 matrix, then two merges
``X <- X - X L_O^T X`` (``L_O``: the blocks just below the diagonal of each 32-token half,
then the lower-left 32 x 32 block), the same arithmetic as a triangular solve done
block by block. Writes ``P^T`` in the input dtype (``N = -P diag(e^b) k``, so the walks
form ``d = U + N S = P (v - diag(e^b) k S)`` per chunk from ``P`` and the keys they read
anyway, and ``N`` never goes through memory) and saves ``X`` for the backward as two
halves in the input dtype (high, low), the operands its products take.

Backward, from ``dU`` (float32, handed over as two halves in the same way) and the states
``S`` entering the chunks (``d = U + N S`` in ``chunked_delta.py``, so ``dN = dU S^T``)::

    d(diag(beta) v) = T^T dU      d(diag(beta e^b) k) = -T^T dN
    dT = dU (diag(beta) v)^T - dN (diag(beta e^b) k)^T
    dL = -T^T dT T^T     on the strictly lower same-document pairs

and through ``L``: with ``F = dL * D * beta_rows`` (``D`` the pair decay), ``dk += F k +
F^T k``, ``dbeta += rowsum(dL * D * k k^T)``, ``db += rowsum(P) - colsum(P)`` with
``P = dL * L`` (``colsum`` as a product with a tile of ones).

Every product of a float32 operand splits it into a high and a low part in the input
dtype: two tensor-core passes against a 16-bit tile, three (high x high, high x low,
low x high) between two float32 operands. With bfloat16 that keeps about 16 significant
bits; with float16 about 22, but only inside float16's range: tiles above 65504 overflow
and the low part fades below ~6e-5 (the walks take float16 gradients as well).

Inputs bfloat16 or float16; ``K`` and ``V`` 64 or 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import chunked_linear as base
from pallas_kernels.gpu import tiles

# pylint: disable=protected-access
CHUNK = base.CHUNK
_F32 = jnp.float32
_TILE, _ROW, _COL = base._TILE, base._ROW, base._COL
_SQUARE = (CHUNK, CHUNK)
SUB = 16   # the forward substitution's diagonal blocks


def _split(static, x, dtype):
  """``x`` (float32) as ``high + low`` in ``dtype``."""
  return tiles.split(x, dtype, static.interpret)


def _split3(static, x):
  """``x`` (float32) as three bfloat16 parts whose sum is ``x`` to float32 precision."""
  parts = []
  for _ in range(2):
    high, high32 = tiles.high(x, jnp.bfloat16, static.interpret)
    parts.append(high)
    x = x - high32
  return parts + [x.astype(jnp.bfloat16)]


def _store_split(static, x, hi_s, lo_s):
  hi, lo = _split(static, x, hi_s.dtype)
  hi_s[...] = hi
  lo_s[...] = lo


def _dot3(static, a_pair, b_pair, shape, transpose_a=False, transpose_b=False):
  """``a @ b`` of two split float32 tiles: high x high + high x low + low x high."""
  (a_hi, a_lo), (b_hi, b_lo) = a_pair, b_pair
  mm = functools.partial(tiles.matmul_add, interpret=static.interpret,
                         transpose_a=transpose_a, transpose_b=transpose_b)
  out = tiles.matmul(a_hi, b_hi, shape, static.interpret, transpose_b=transpose_b,
                     transpose_a=transpose_a)
  return mm(mm(out, a_hi, b_lo), a_lo, b_hi)


def _dot2(static, a_pair, b, shape, transpose_a=False, transpose_b=False):
  """``a @ b`` of a split float32 tile and a 16-bit tile."""
  a_hi, a_lo = a_pair
  out = tiles.matmul(a_hi, b, shape, static.interpret, transpose_b=transpose_b,
                     transpose_a=transpose_a)
  return tiles.matmul_add(out, a_lo, b, static.interpret, transpose_b=transpose_b,
                          transpose_a=transpose_a)


def _position():
  c, head, batch = base._chunk_position()
  return c, head, batch, (batch, pl.ds(c * CHUNK, CHUNK), head)


def _factors(static, vec_s, vect_s, beta_s, betat_s):
  x = base._vectors(static, vec_s, vect_s)
  ld = functools.partial(tiles.load, interpret=static.interpret)
  x.update(beta_row=ld(beta_s, _ROW), beta_col=ld(betat_s, _COL),
           into_col=ld(vect_s.at[1], _COL))
  return x


# --------------------------------------------------------------------------- forward


def _block(i):
  """16-token block index of a row or column iota."""
  return sum(jnp.where(i >= edge, 1, 0) for edge in range(SUB, CHUNK, SUB))


def _blocks(interp):
  """Row and column iotas and their 16-token block indices."""
  r, col = tiles.iota(_SQUARE, 0, interp), tiles.iota(_SQUARE, 1, interp)
  return r, col, _block(r), _block(col)


# Chunks per CTA of the forward launch (the next chunk's inputs are copied while one is
# solved), when that still leaves this many CTAs; else fewer.
FORWARD_CHUNKS_PER_CTA = 4
MIN_CTAS = 4 * 132


def _chunks_per_cta(static, batch, heads):
  for cpc in (8, 4, 2):
    if (cpc <= FORWARD_CHUNKS_PER_CTA and static.num_chunks % cpc == 0
        and static.num_chunks // cpc * batch * heads >= MIN_CTAS):
      return cpc
  return 1


def _forward_kernel(static, cpc, refs, scratch):
  """``cpc`` chunks in turn, the next one's inputs prefetched into the other slot."""
  ks_, vecs_, vects_, betas_, betats_, bar = scratch
  cb, head, batch = base._chunk_position()

  def issue(c, slot):
    base._copy_in([(refs["k"].at[batch, pl.ds(c * CHUNK, CHUNK), head], ks_.at[slot]),
                   (refs["vec"].at[batch, head, c], vecs_.at[slot]),
                   (refs["vec"].at[batch, head, c], vects_.at[slot]),
                   (refs["beta"].at[batch, head, c], betas_.at[slot]),
                   (refs["beta"].at[batch, head, c], betats_.at[slot])], bar.at[slot])

  def step(c, slot, carry):
    _forward_chunk(static, refs, c, head, batch,
                   tuple(x.at[slot] for x in (ks_, vecs_, vects_, betas_, betats_)))
    return carry

  base._walk(static, issue, lambda i: cb * cpc + i, step, 0, bar, count=cpc)
  plgpu.wait_smem_to_gmem(0)


def _forward_chunk(static, refs, c, head, batch, scratch):
  k_s, vec_s, vect_s, beta_s, betat_s = scratch
  interp, dtype = static.interpret, k_s.dtype
  rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
  x = _factors(static, vec_s, vect_s, beta_s, betat_s)

  # L^T (keys on rows): L^T[s, t] = beta_t e^{b_t - b_s} k_s . k_t for t > s.
  kk = tiles.matmul(k_s, k_s, _SQUARE, interp, transpose_b=True)
  decay_t, strict_t = base._pair_decay(static, x["b_row"], x["b_col"], x["d_row"],
                                       x["d_col"], True)
  lt = jnp.where(strict_t, kk * decay_t * tiles.cols(x["beta_col"], _SQUARE), 0.0)
  r, col, br, bc = _blocks(interp)
  same = br == bc

  # The four 16 x 16 diagonal blocks of X = T^T, solved packed: Xp [64, 16] holds row r's
  # block, Xp[r, u] = X[r, 16 blk(r) + u], so each step works on a quarter of the full
  # tile. Step j takes column j (one masked row sum; row r's pivot is X[r, s] with
  # s = 16 blk(r) + j) and subtracts pivot * L_ts from the later columns t of the same
  # block, the rows of L^T (keys on rows) read from shared memory in 16-column pieces.
  def diagonal(lt_s, qt_s):
    lt_s[...] = lt
    # Q^T [16, 64] (rows 0..15 of a square tile): Q^T[u, c] = [c mod 16 == u], which
    # spreads Xp over the four column blocks (Xp @ Q^T)[r, c] = Xp[r, c mod 16].
    qt_s[...] = jnp.where(col - SUB * bc == r, 1.0, 0.0).astype(jnp.bfloat16)
    plgpu.commit_smem()
    packed = (CHUNK, SUB)
    rp, up = tiles.iota(packed, 0, interp), tiles.iota(packed, 1, interp)
    bp = _block(rp)

    def substitute(j, xp):
      pivot = jnp.where(up == j, xp, 0.0).sum(axis=1)
      mult = None
      for blk in range(CHUNK // SUB):
        piece = tiles.cols(tiles.load(lt_s.at[j + SUB * blk, pl.ds(SUB * blk, SUB)], _COL,
                                      interp), packed)
        mult = piece if mult is None else jnp.where(bp == blk, piece, mult)
      return xp - tiles.rows(pivot, packed) * mult

    xp = lax.fori_loop(0, SUB - 1, substitute,
                       jnp.where(up == rp - SUB * bp, 1.0, 0.0))
    # X = (Xp @ Q^T) on the diagonal blocks; Xp in three bfloat16 parts (24 bits, float32
    # exactly) against a 0/1 matrix.
    spread = None
    for part in _split3(static, xp):
      spread = (tiles.matmul(part, qt_s.at[pl.ds(0, SUB)], _SQUARE, interp)
                if spread is None else
                tiles.matmul_add(spread, part, qt_s.at[pl.ds(0, SUB)], interp))
    return jnp.where(same, spread, 0.0)

  with jax.named_scope("utf_diagonal"):
    xt = pl.run_scoped(diagonal, plgpu.SMEM(_SQUARE, _F32),
                       tiles.swizzled(_SQUARE, jnp.bfloat16, swizzle=32))

  # Merges (block forward substitution): X <- X - X L_O^T X, with L_O the blocks just
  # below the diagonal of each 32-token half, then the lower-left 32 x 32 block.
  def merge(xhi_s, xlo_s, whi_s, wlo_s):
    xt_ = xt
    for lo_mask in ((bc == br + 1) & ((bc == 1) | (bc == 3)), (br < 2) & (bc >= 2)):
      _store_split(static, xt_, xhi_s, xlo_s)
      plgpu.commit_smem()
      w = _dot3(static, _split(static, jnp.where(lo_mask, lt, 0.0), dtype),
                (xhi_s, xlo_s), _SQUARE)
      _store_split(static, w, whi_s, wlo_s)
      plgpu.commit_smem()
      xt_ = xt_ - _dot3(static, _split(static, xt_, dtype), (whi_s, wlo_s), _SQUARE)
    if "n" not in refs:
      return xt_, None
    # N = -T diag(beta e^b) k: X's rows scaled, transposed operand.
    _store_split(static, xt_ * tiles.rows(-x["beta_row"] * x["into"], _SQUARE), whi_s,
                 wlo_s)
    plgpu.commit_smem()
    return xt_, _dot2(static, (whi_s, wlo_s), k_s, (CHUNK, static.key_dim),
                      transpose_a=True)

  sq = tiles.swizzled(_SQUARE, dtype)
  with jax.named_scope("utf_merges"):
    xt, n = pl.run_scoped(merge, sq, sq, sq, sq)

  if n is not None:
    def out_n(n_s):
      n_s[...] = n.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(n_s, refs["n"].at[rows])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(out_n, tiles.swizzled((CHUNK, static.key_dim), dtype))

  def out_pt(pt_s):
    pt_s[...] = (xt * tiles.rows(x["beta_row"], _SQUARE)).astype(dtype)   # P^T
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(pt_s, refs["pt"].at[batch, head, c])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def out_x(hi_s, lo_s):   # X as its two halves, the backward's product operands
    _store_split(static, xt, hi_s, lo_s)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(hi_s, refs["xt"].at[batch, head, c, 0])
    plgpu.copy_smem_to_gmem(lo_s, refs["xt"].at[batch, head, c, 1])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  with jax.named_scope("utf_out"):
    pl.run_scoped(out_pt, sq)
    pl.run_scoped(out_x, sq, sq)


def forward_call(static, k, beta, vec, with_n=False):
  """``P^T = (T diag(beta))^T [B, H, T / C, C, C]`` in k's dtype and ``X = T^T`` as two
  halves in k's dtype, ``[B, H, T / C, 2, C, C]`` (high, low: their sum is X to about 16
  bits with bfloat16), from ``k``, ``beta [B, H, T / C, C]`` float32 and the gate
  factors ``vec [B, H, T / C, 4, C]``; ``with_n``, also ``N = -T diag(beta e^b) k
  [B, T, H, K]`` in k's dtype."""
  b, tp, heads, kd = k.shape
  nc, dtype = static.num_chunks, k.dtype
  square = jax.ShapeDtypeStruct((b, heads, nc, CHUNK, CHUNK), dtype)
  cpc = _chunks_per_cta(static, b, heads)
  two = lambda shape: plgpu.SMEM((2,) + shape, _F32)
  return base._launch(
      static, lambda st, refs, scratch: _forward_kernel(st, cpc, refs, scratch),
      dict(k=k, vec=vec, beta=beta),
      dict(pt=square, xt=jax.ShapeDtypeStruct((b, heads, nc, 2, CHUNK, CHUNK), dtype),
           **({"n": jax.ShapeDtypeStruct((b, tp, heads, kd), dtype)} if with_n else {})),
      (tiles.swizzled((2, CHUNK, kd), dtype), two((4, CHUNK)), two((4, CHUNK)),
       two((CHUNK,)), two((CHUNK,)), plgpu.Barrier(num_arrivals=5, num_barriers=2)),
      (nc // cpc, heads, b), ("chunk", "head", "batch"))


# -------------------------------------------------------------------------- backward


def _backward_kernel(static, refs, scratch):
  """The input copies (X and dU as the two halves the products take) are issued at once
  and waited for once; the states follow into the room v leaves, and k's gradient so far
  is copied in under the last products."""
  k_s, vec_s, vect_s, beta_s, betat_s, dvec_s, xhi_s, xlo_s, bar, one = scratch
  interp = static.interpret
  c, head, batch, rows = _position()
  kd, vd, dtype = static.key_dim, static.value_dim, k_s.dtype
  xt_pair = (xhi_s, xlo_s)                      # X in two halves, as the UT forward left it

  def phase1(dhi_s, dlo_s):
    du_pair = (dhi_s, dlo_s)

    def with_v(v_s):
      base._copy_in([(refs["k"].at[rows], k_s), (refs["v"].at[rows], v_s),
                     (refs["vec"].at[batch, head, c], vec_s),
                     (refs["vec"].at[batch, head, c], vect_s),
                     (refs["beta"].at[batch, head, c], beta_s),
                     (refs["beta"].at[batch, head, c], betat_s),
                     (refs["xt"].at[batch, head, c, 0], xhi_s),
                     (refs["xt"].at[batch, head, c, 1], xlo_s),
                     (refs["du"].at[rows], dhi_s), (refs["du_lo"].at[rows], dlo_s)], bar)
      plgpu.barrier_wait(bar)
      x = _factors(static, vec_s, vect_s, beta_s, betat_s)
      dbv = _dot3(static, xt_pair, du_pair, (CHUNK, vd))            # T^T dU
      vf = tiles.load(v_s, _TILE, interp).astype(_F32)
      dv = (dbv * tiles.rows(x["beta_row"], dbv.shape)).astype(dtype)
      # dT = dU (beta v)^T - dN (beta e^b k)^T (column scales).
      dt = _dot2(static, du_pair, v_s, _SQUARE, transpose_b=True)
      return x, dv, (dbv * vf).sum(axis=1), dt * tiles.cols(x["beta_col"], _SQUARE)

    x, dv, dbeta, dt = pl.run_scoped(with_v, tiles.swizzled((CHUNK, vd), dtype))

    def with_states(h_s):   # in the room v left
      plgpu.copy_gmem_to_smem(refs["states"].at[batch, head, c], h_s, one)
      plgpu.barrier_wait(one)
      return _dot2(static, du_pair, h_s, (CHUNK, kd), transpose_b=True)    # dN = dU S^T

    dn = pl.run_scoped(with_states, tiles.swizzled((kd, vd), dtype))
    dhi_s[...] = dv
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dhi_s, refs["dv"].at[rows])

    def with_dn(nhi_s, nlo_s):   # in the room the states left
      _store_split(static, -dn, nhi_s, nlo_s)
      plgpu.commit_smem()
      dbk = _dot3(static, xt_pair, (nhi_s, nlo_s), (CHUNK, kd))   # -T^T dN
      dt2 = _dot2(static, (nhi_s, nlo_s), k_s, _SQUARE, transpose_b=True)
      return dbk, dt2

    dbk, dt2 = pl.run_scoped(with_dn, tiles.swizzled((CHUNK, kd), dtype),
                             tiles.swizzled((CHUNK, kd), dtype))
    dt = dt + dt2 * tiles.cols(x["beta_col"] * x["into_col"], _SQUARE)
    kf = tiles.load(k_s, _TILE, interp).astype(_F32)
    kdbk = (dbk * kf).sum(axis=1)
    dbeta = dbeta + kdbk * x["into"]
    d_into = kdbk * x["beta_row"]
    dk = dbk * tiles.rows(x["beta_row"] * x["into"], dbk.shape)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    return x, dk, dt, dbeta, d_into

  x, dk, dt, dbeta, d_into = pl.run_scoped(
      phase1, tiles.swizzled((CHUNK, vd), dtype), tiles.swizzled((CHUNK, vd), dtype))

  # dL = -T^T dT T^T = -(X dT) X on the strictly lower same-document pairs.
  def phase2(ahi_s, alo_s, ones_s, dk_s):
    plgpu.copy_gmem_to_smem(refs["dk_in"].at[rows], dk_s, one)   # waited for at the end
    _store_split(static, dt, ahi_s, alo_s)
    ones_s[...] = (tiles.zeros(_SQUARE, interp) + 1.0).astype(dtype)
    plgpu.commit_smem()
    y = _dot3(static, xt_pair, (ahi_s, alo_s), _SQUARE)
    dl = -_dot3(static, _split(static, y, dtype), xt_pair, _SQUARE)
    decay, strict = base._pair_decay(static, x["b_row"], x["b_col"], x["d_row"],
                                     x["d_col"], False)
    kk = tiles.matmul(k_s, k_s, _SQUARE, interp, transpose_b=True)
    g = jnp.where(strict, dl * decay, 0.0)               # dL * D
    f = g * tiles.rows(x["beta_row"], _SQUARE)           # F = dL * D * beta_t
    p = f * kk                                           # dL * L
    _store_split(static, f, ahi_s, alo_s)
    _store_split(static, p, xhi_s, xlo_s)                # X is no longer needed
    plgpu.commit_smem()
    dk_ = tiles.matmul_add(dk, ahi_s, k_s, interp)       # dk += F k + F^T k
    dk_ = tiles.matmul_add(dk_, alo_s, k_s, interp)
    dk_ = tiles.matmul_add(dk_, ahi_s, k_s, interp, transpose_a=True)
    dk_ = tiles.matmul_add(dk_, alo_s, k_s, interp, transpose_a=True)
    colsum = _dot2(static, (xhi_s, xlo_s), ones_s, _SQUARE, transpose_a=True)
    db = p.sum(axis=1) - colsum.sum(axis=1) * (1.0 / CHUNK)
    dvec_s.at[0][...] = db
    dvec_s.at[1][...] = d_into
    dvec_s.at[2][...] = dbeta + (g * kk).sum(axis=1)
    plgpu.barrier_wait(one)   # k's gradient from the walks, to add to
    dk_s[...] = (tiles.load(dk_s, _TILE, interp).astype(_F32) + dk_).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dvec_s, refs["dvec"].at[batch, head, c])
    plgpu.copy_smem_to_gmem(dk_s, refs["dk"].at[rows])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  sq = tiles.swizzled(_SQUARE, dtype)
  pl.run_scoped(phase2, sq, sq, sq, tiles.swizzled((CHUNK, kd), dtype))
  plgpu.wait_smem_to_gmem(0)


def backward_call(static, k, v, beta, vec, xt, du, states, dk_in):
  """``dk_in + dk [B, T, H, K]`` and ``dv [B, T, H, V]`` in the inputs' dtype and
  ``[B, H, T / C, 3, C]`` float32 (the gradients of ``b``, ``e^b`` and ``beta``) from
  ``dU [B, T, H, V]`` as two halves ``(high, low)`` in the inputs' dtype, the saved ``X``
  halves and states, and k's gradient from the walks ``dk_in``."""
  b, tp, heads, kd = k.shape
  nc, dtype = static.num_chunks, k.dtype
  du_hi, du_lo = du
  sq = tiles.swizzled(_SQUARE, dtype)
  return base._parallel(
      static, _backward_kernel,
      dict(k=k, v=v, states=states, vec=vec, beta=beta, xt=xt, du=du_hi, du_lo=du_lo,
           dk_in=dk_in),
      dict(dk=jax.ShapeDtypeStruct((b, tp, heads, kd), dtype),
           dv=jax.ShapeDtypeStruct((b, tp, heads, static.value_dim), dtype),
           dvec=jax.ShapeDtypeStruct((b, heads, nc, 3, CHUNK), _F32)),
      (tiles.swizzled((CHUNK, kd), dtype), plgpu.SMEM((4, CHUNK), _F32),
       plgpu.SMEM((4, CHUNK), _F32), plgpu.SMEM((CHUNK,), _F32), plgpu.SMEM((CHUNK,), _F32),
       plgpu.SMEM((3, CHUNK), _F32), sq, sq, plgpu.Barrier(num_arrivals=10),
       plgpu.Barrier()), b, heads)
