"""GLA's chunk-local work for Hopper GPUs in Mosaic GPU: the gate factors and the
within-chunk scores, forward and backward, one CTA per (chunk, head, batch row).

GLA (Yang et al. 2023) decays every key channel on its own. Inside a chunk of ``C = 64``
tokens, with ``b [C, K]`` the log gates summed from the chunk's start and ``a`` those
after each token (both exact range sums: the gates, split into three bfloat16 parts that
hold float32's mantissa, times 0/1 matrices on the tensor cores), the kernels write
``q~ = q e^b`` and ``k~ = k e^a`` (masked at document starts) and the scores::

    A_ts = sum_d q_td k_sd e^{b_td - b_sd}       (s <= t, same document; else 0)

a ``[C, C, K]`` computation that is a matrix product only once the decay is split into a
query factor and a key factor around a reference token ``r``: ``e^{b_t - b_r} e^{b_r -
b_s}``. Both factors are at most 1 when ``s <= r <= t`` (gates are <= 0); otherwise one
of them grows with the gates between ``r`` and the token. So each launch runs one of
three modes, chosen from the gates' magnitudes (``mode``):

* WHOLE (every chunk's gates sum to at most ``RANGE`` in magnitude): one reference per
  chunk, one product;
* BLOCKS (every 16-token block's do): pairs in different 16-token blocks take, for each
  key block ``j``, its last token as the reference (``(q * e^{min(b - b_r, 0)}) (k_j *
  e^{min(b_r - b_j, 0)})^T`` gives the pairs with ``t`` in a later block exactly; the
  ``min`` only clips pairs that are masked out), and pairs inside a block the block's
  first token;
* PAIRS (any gates): the pairs across blocks as in BLOCKS, those inside a block column by
  column, the four blocks at once: step ``j`` takes key ``s = 16 * block(t) + j`` for
  every row ``t`` and sums ``q_t * k_s * e^{b_t - b_s}`` over the channels (one
  exponential per pair and channel, so gates of -20 per token lose nothing).

Split operands enter the products as high and low 16-bit parts. The key channels are
taken 64 at a time. Backward, from ``dA`` (and, in PAIRS, ``dA^T``, which the GLA
gradient launch computes too) and the gradients of ``q~`` and ``k~``: the same parts give
``dq`` and ``dk``; the gradient of ``b`` is ``q * dq' - k * dk'`` with ``dq'``, ``dk'``
leaving out the diagonal pairs (whose exponent is 0), plus ``q~``'s part; the gates'
gradient is the transposed 0/1 products of the gradients of ``b`` and ``a``.

Inputs bfloat16 or float16 (q, k) and float32 (the gates, the masks); ``K`` 64 or 128.
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


def _copy_vec(refs, scratch):
  """The chunk's masks and document index (``vec [4, C]``), in row and column copies."""
  c, head, batch = base._chunk_position()
  base._copy_in([(refs["vec"].at[batch, head, c], scratch["vec"]),
                 (refs["vec"].at[batch, head, c], scratch["vect"])], scratch["bar_vec"])
  plgpu.barrier_wait(scratch["bar_vec"])
  return (batch, pl.ds(c * CHUNK, CHUNK), head)


def _copy_half(refs, scratch, names, rows, h):
  """TMA copies of 64 key channels of each named ``[B, T, H, K]`` input."""
  lanes = pl.ds(h * LANES, LANES)
  plgpu.commit_smem()   # the previous half's reads are done before the overwrite
  base._copy_in([(refs[n].at[rows + (lanes,)], scratch[n]) for n in names], scratch["bar"])
  plgpu.barrier_wait(scratch["bar"])
  return rows + (lanes,)


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


def _high(static, x):
  """``x`` (float32) cut to a bfloat16 value, as float32 (``chunked_ut._split``'s high
  part)."""
  return ut._split(static, x, jnp.bfloat16)[0].astype(_F32)


def _zero_one_products(static, terms):
  """``sum_i M_i @ x_i`` (``M_i^T`` where asked) for 0/1 matrices ``M_i`` given as
  ``(t, s) -> bool`` and float32 tiles ``x_i [C, LANES]``, exactly: each ``x`` goes in as
  three bfloat16 parts (24 bits, float32's mantissa), so every entry is a float32 sum of
  exactly the terms its row of ``M`` selects (the gradient of such a sum is one too)."""
  interp = static.interpret
  bf16 = jnp.bfloat16

  def body(m_s, *parts_s):
    r, col = tiles.iota(_SQUARE, 0, interp), tiles.iota(_SQUARE, 1, interp)
    acc = tiles.zeros((CHUNK, LANES), interp)
    for select, x, transpose in terms:
      plgpu.commit_smem()   # the last products have read the tiles
      m_s[...] = jnp.where(select(r, col), 1.0, 0.0).astype(bf16)
      hi = _high(static, x)
      rest = x - hi
      mid = _high(static, rest)
      for part, p_s in zip((hi, mid, rest - mid), parts_s):
        p_s[...] = part.astype(bf16)
      plgpu.commit_smem()
      for p_s in parts_s:
        acc = tiles.matmul_add(acc, m_s, p_s, interp, transpose_a=transpose)
    return acc

  tile = tiles.swizzled((CHUNK, LANES), bf16)
  return pl.run_scoped(body, tiles.swizzled(_SQUARE, bf16), tile, tile, tile)


_INCLUSIVE = lambda t, s: t >= s    # b_t: the gates up to t
_AFTER = lambda t, s: s > t         # a_t: the gates after t


def _store_rows(scratch, tiles_):
  """Untiled float32 copies of ``tiles_`` (name -> registers) for row reads, where the
  launch has a buffer for them."""
  plgpu.commit_smem()   # the previous half's row reads are done before the overwrite
  for n, x in tiles_.items():
    if n + "_rows" in scratch:
      scratch[n + "_rows"][...] = x
  plgpu.commit_smem()


def _masks(static, scratch):
  interp = static.interpret
  r, col, br, bc = ut._blocks(interp)
  d_row = tiles.load(scratch["vec"].at[0], _ROW, interp)
  d_col = tiles.load(scratch["vect"].at[0], _COL, interp)
  same = tiles.rows(d_row, _SQUARE) == tiles.cols(d_col, _SQUARE)
  into = tiles.rows(tiles.load(scratch["vec"].at[1], _ROW, interp), (CHUNK, LANES))
  out_of = tiles.rows(tiles.load(scratch["vec"].at[2], _ROW, interp), (CHUNK, LANES))
  return r, col, br, bc, same, into, out_of


# ----------------------------------------------------------------------------- modes

# How a launch splits the pair decays, chosen per launch from the gates (``mode``):
WHOLE = 0     # one reference for the chunk: one product (every chunk's b within a range)
BLOCKS = 1    # references per 16-token block: four products (every block within range)
PAIRS = 2     # the diagonal blocks pair by pair (any gates)
MODES = (WHOLE, BLOCKS, PAIRS)
# The range: a factor e^{b - ref} or e^{ref - b} is at most e^{range}; it and the products
# it enters stay far inside the operand dtype (bfloat16 has float32's exponent, float16
# tops out at 65504 ~ e^11).
RANGE = {jnp.dtype(jnp.bfloat16): 40.0, jnp.dtype(jnp.float16): 4.0}


def mode(g, dtype):
  """The launch's mode (an int32 scalar) from the log gates ``g [B, T, H, K]`` (``T`` a
  multiple of the chunk): WHOLE when on every channel the gates' magnitudes sum to at most
  ``RANGE[dtype]`` over every chunk (which bounds how far apart any two of its ``b`` are),
  else BLOCKS when they do over every 16-token block, else PAIRS."""
  bsz, length, heads, kd = g.shape
  blocks = jnp.abs(g.astype(_F32)).reshape(bsz, length // SUB, SUB, heads, kd).sum(axis=2)
  chunks = blocks.reshape(bsz, length // CHUNK, CHUNK // SUB, heads, kd).sum(axis=2)
  limit = RANGE[jnp.dtype(dtype)]
  return jnp.where(chunks.max() <= limit, WHOLE,
                   jnp.where(blocks.max() <= limit, BLOCKS, PAIRS)).astype(jnp.int32)


def _ref_rows(static, scratch, br, row):
  """``[C, LANES]``: ``b`` at row ``row`` of the chunk (an int) or of each row's block."""
  if row == "block":
    return _gather(static, scratch["b_rows"], 0, br)
  return tiles.cols(tiles.load(scratch["b_rows"].at[row], _COL, static.interpret), _SQUARE)


def _split_factors(bf, ref, clip):
  """The query and key factors ``e^{b - ref}``, ``e^{ref - b}`` (``clip``: at most 1)."""
  ex = _exp_le0 if clip else jnp.exp
  return ex(bf - ref), ex(ref - bf)


def _stage_split(static, scratch, qt, kt, keep):
  """The split operands ``q~``, ``k~`` (key rows outside ``keep`` zeroed) as high and low
  16-bit parts: the products then carry about 16 significant bits of the factors, as the
  pair-by-pair path does (one rounding of ``q~`` alone costs the gate gradient ~2x)."""
  kt = kt if keep is None else jnp.where(keep, kt, 0.0)
  for x, hi, lo in ((qt, "qt", "qt_lo"), (kt, "kt", "kt_lo")):
    ut._store_split(static, x, scratch[hi], scratch[lo])
  plgpu.commit_smem()


def _parts(static, mode_, br):
  """``(reference, clip, key rows kept)`` of each split product: the three key blocks
  against later rows, or the chunk's one reference, plus the blocks' own references."""
  if mode_ == WHOLE:
    return [(0, False, None)]
  parts = [(SUB * j + SUB - 1, True, br == j) for j in range(CHUNK // SUB - 1)]
  if mode_ == BLOCKS:
    parts.append(("block", False, None))
  return parts


# --------------------------------------------------------------------------- forward


def _scores(static, mode_, scratch, qf, kf, bf, parts, br, col, acc):
  """Adds this half's channels to ``acc = (a_off, a_diag)``."""
  interp = static.interpret
  a_off, a_diag = acc
  for row, clip, keep in parts:
    qfac, kfac = _split_factors(bf, _ref_rows(static, scratch, br, row), clip)
    _stage_split(static, scratch, qf * qfac, kf * kfac, keep)
    mm = functools.partial(tiles.matmul_add, interpret=interp, transpose_b=True)
    x = a_diag if row == "block" else a_off
    x = mm(mm(mm(x, scratch["qt"], scratch["kt"]), scratch["qt"], scratch["kt_lo"]),
           scratch["qt_lo"], scratch["kt"])
    if row == "block":
      a_diag = x
    else:
      a_off = x
    plgpu.commit_smem()

  if mode_ == PAIRS:
    def column(j, a):
      kc = _gather(static, scratch["k_rows"], j, br)
      bcol = _gather(static, scratch["b_rows"], j, br)
      val = (qf * kc * _exp_le0(bf - bcol)).sum(axis=1)
      return a + jnp.where(col == SUB * br + j, tiles.rows(val, _SQUARE), 0.0)

    a_diag = lax.fori_loop(0, SUB, column, a_diag)
  return a_off, a_diag


def _load_half(static, scratch):
  interp = static.interpret
  return tuple(tiles.load(scratch[n], _TILE, interp).astype(_F32) for n in ("q", "k", "g"))


def _forward_kernel(static, mode_, refs, scratch):
  interp, dtype = static.interpret, scratch["q"].dtype
  c, head, batch = base._chunk_position()
  rows = _copy_vec(refs, scratch)
  r, col, br, bc, same, into, out_of = _masks(static, scratch)
  parts = _parts(static, mode_, br)
  acc = (tiles.zeros(_SQUARE, interp),) * 2
  for h in _halves(static):
    lanes = _copy_half(refs, scratch, ("q", "k", "g"), rows, h)
    qf, kf, gf = _load_half(static, scratch)
    bf = _zero_one_products(static, [(_INCLUSIVE, gf, False)])
    af = _zero_one_products(static, [(_AFTER, gf, False)])
    base._stage_out(static, qf * into * jnp.exp(bf), refs["qt"].at[lanes], dtype)
    base._stage_out(static, kf * out_of * jnp.exp(af), refs["kt"].at[lanes], dtype)
    _store_rows(scratch, dict(k=kf, b=bf))
    acc = _scores(static, mode_, scratch, qf, kf, bf, parts, br, col, acc)
  a_off, a_diag = acc
  a = a_off if mode_ == WHOLE else jnp.where(br > bc, a_off,
                                              jnp.where(br == bc, a_diag, 0.0))
  scratch["a"][...] = jnp.where(same & (r >= col), a, 0.0).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(scratch["a"], refs["a"].at[batch, head, c])
  plgpu.wait_smem_to_gmem(0)


def _launch(static, kernel, mode_, inputs, out_type, specs):
  """A chunk-parallel launch whose kernel gets its scratch as a dict named like ``specs``."""
  names = tuple(specs)
  return base._parallel(
      static, lambda st, refs, scr: kernel(st, mode_, refs, dict(zip(names, scr))), inputs,
      out_type, tuple(specs.values()), inputs["q"].shape[0], inputs["q"].shape[2])


def _specs(static, dtype, rows, extra):
  """Shared memory: 64 key channels of q, k, g; the masks (row and column copies);
  untiled float32 copies of the ``rows`` tiles; the split operands; ``extra``; barriers."""
  specs = dict(q=tiles.swizzled((CHUNK, LANES), dtype), k=tiles.swizzled((CHUNK, LANES), dtype),
               g=tiles.swizzled((CHUNK, LANES), _F32), vec=plgpu.SMEM((4, CHUNK), _F32),
               vect=plgpu.SMEM((4, CHUNK), _F32))
  specs.update({n + "_rows": plgpu.SMEM((CHUNK, LANES), _F32) for n in rows})
  specs.update({n: tiles.swizzled((CHUNK, LANES), dtype)
                for n in ("qt", "qt_lo", "kt", "kt_lo")})
  specs.update(extra)
  specs.update(bar=plgpu.Barrier(num_arrivals=3), bar_vec=plgpu.Barrier(num_arrivals=2),
               one=plgpu.Barrier())
  return specs


def forward_call(static, mode_, q, k, g, vec):
  """``(A [B, H, T / C, C, C], q~, k~ [B, T, H, K])`` in q's dtype (``A`` unscaled) from
  ``q``, ``k``, the log gates ``g [B, T, H, K]`` float32 and ``vec [B, H, T / C, 4, C]``
  float32 (rows: the document index, the masks of ``e^b`` and ``e^a``), in ``mode_`` (a
  Python int; see ``mode``)."""
  bsz, tp, heads, kd = q.shape
  dtype, nc = q.dtype, static.num_chunks
  rows = ("k", "b") if mode_ == PAIRS else ("b",)
  tile = jax.ShapeDtypeStruct(q.shape, dtype)
  return _launch(static, _forward_kernel, mode_, dict(q=q, k=k, g=g, vec=vec),
                 dict(a=jax.ShapeDtypeStruct((bsz, heads, nc, CHUNK, CHUNK), dtype),
                      qt=tile, kt=tile),
                 _specs(static, dtype, rows, dict(a=tiles.swizzled(_SQUARE, dtype))))


# -------------------------------------------------------------------------- backward


def _column_grad(static, scratch, bf, br, col, grad, other, keys_on_rows):
  """Step ``j`` of the diagonal blocks' gradient, pair by pair: with ``grad`` dA (queries
  on rows) it adds ``dA[t, s] k_s e^{b_t - b_s}`` to dq's row ``t``; with dA^T (keys on
  rows) ``dA[t, s] q_t e^{b_t - b_s}`` to dk's row ``s``; the other token is ``16 *
  block + j``."""
  def step(j, acc):
    w = jnp.where(col == SUB * br + j, tiles.load(scratch[grad], _TILE, static.interpret),
                  0.0).sum(axis=1)
    x = _gather(static, scratch[other], j, br)
    bcol = _gather(static, scratch["b_rows"], j, br)
    return acc + tiles.rows(w, _SQUARE) * x * _exp_le0(bcol - bf if keys_on_rows
                                                      else bf - bcol)
  return step


def _backward_kernel(static, mode_, refs, scratch):
  interp, dtype = static.interpret, scratch["q"].dtype
  c, head, batch = base._chunk_position()
  rows = _copy_vec(refs, scratch)
  r, col, br, bc, same, into, out_of = _masks(static, scratch)

  # dA (and for PAIRS dA^T) on the strictly lower (upper) same-document pairs, and dA's
  # diagonal.
  def load_grads(*bufs):
    names_ = ("da", "dat")[:len(bufs)]
    for name, dst in zip(names_, bufs):
      plgpu.copy_gmem_to_smem(refs[name].at[batch, head, c], dst, scratch["one"])
      plgpu.barrier_wait(scratch["one"])
    da = tiles.load(bufs[0], _TILE, interp).astype(_F32)
    out = (jnp.where(same & (r > col), da, 0.0), jnp.where(r == col, da, 0.0).sum(axis=1))
    if len(bufs) == 2:
      dat = tiles.load(bufs[1], _TILE, interp).astype(_F32)
      out += (jnp.where(same & (col > r), dat, 0.0),)
    return out

  sq = tiles.swizzled(_SQUARE, dtype)
  if mode_ == PAIRS:
    da, da_diag, dat = pl.run_scoped(load_grads, sq, sq)
    scratch["dat"][...] = dat
  else:
    da, da_diag = pl.run_scoped(load_grads, sq)
  scratch["da"][...] = da
  diag = tiles.rows(da_diag, (CHUNK, LANES))
  parts = _parts(static, mode_, br)

  for h in _halves(static):
    lanes = _copy_half(refs, scratch, ("q", "k", "g"), rows, h)
    qf, kf, gf = _load_half(static, scratch)
    bf = _zero_one_products(static, [(_INCLUSIVE, gf, False)])
    _store_rows(scratch, dict(q=qf, k=kf, b=bf))
    dq = dk = tiles.zeros((CHUNK, LANES), interp)
    for row, clip, keep in parts:
      qfac, kfac = _split_factors(bf, _ref_rows(static, scratch, br, row), clip)
      _stage_split(static, scratch, qf * qfac, kf * kfac, keep)
      dam = tiles.load(scratch["da"], _TILE, interp)
      if row == "block":
        dam = jnp.where(br == bc, dam, 0.0)
      elif row != 0:    # key block j = row // SUB against the later blocks
        j = row // SUB
        dam = jnp.where((br > j) & (bc == j), dam, 0.0)
      scratch["da_in"][...] = dam.astype(dtype)
      plgpu.commit_smem()
      mm = functools.partial(tiles.matmul_add, interpret=interp)
      zero = tiles.zeros((CHUNK, LANES), interp)
      dq = dq + qfac * mm(mm(zero, scratch["da_in"], scratch["kt"]), scratch["da_in"],
                          scratch["kt_lo"])
      mm = functools.partial(mm, transpose_a=True)
      dk = dk + kfac * mm(mm(zero, scratch["da_in"], scratch["qt"]), scratch["da_in"],
                          scratch["qt_lo"])
      plgpu.commit_smem()   # every product has read qt / kt before the next overwrite

    if mode_ == PAIRS:
      dq = lax.fori_loop(0, SUB, _column_grad(static, scratch, bf, br, col, "da", "k_rows",
                                              keys_on_rows=False), dq)
      dk = lax.fori_loop(0, SUB, _column_grad(static, scratch, bf, br, col, "dat", "q_rows",
                                              keys_on_rows=True), dk)

    # Through q~ = q e^b and k~ = k e^a (masked), then to the gates by exact range sums.
    qin = into * jnp.exp(bf)
    dqt = base._load_f32(static, refs["dqt"].at[lanes], (CHUNK, LANES), scratch["one"])
    db = qf * dq - kf * dk + dqt * qf * qin
    base._stage_out(static, dq + diag * kf + dqt * qin, refs["dq"].at[lanes], dtype)
    kout = out_of * jnp.exp(_zero_one_products(static, [(_AFTER, gf, False)]))
    dkt = base._load_f32(static, refs["dkt"].at[lanes], (CHUNK, LANES), scratch["one"])
    base._stage_out(static, dk + diag * qf + dkt * kout, refs["dk"].at[lanes], dtype)
    dg = _zero_one_products(static, [(_INCLUSIVE, db, True),
                                     (_AFTER, dkt * kf * kout, True)])
    base._stage_out(static, dg, refs["dg"].at[lanes], _F32)
  plgpu.wait_smem_to_gmem(0)


def backward_call(static, mode_, q, k, g, vec, dqt, dkt, da, dat=None):
  """``dq``, ``dk`` (q's dtype) and ``dg [B, T, H, K]`` float32 (everything but the chunk
  totals' part) from ``dA [B, H, T / C, C, C]`` (input dtype; and, in the PAIRS mode,
  ``dA^T``), the gradients of ``q~`` and ``k~`` (float32) and the forward's inputs."""
  dtype = q.dtype
  inputs = dict(q=q, k=k, g=g, vec=vec, dqt=dqt, dkt=dkt, da=da)
  extra = dict(da_in=tiles.swizzled(_SQUARE, dtype), da=tiles.swizzled(_SQUARE, _F32))
  rows = ("b",)
  if mode_ == PAIRS:
    inputs["dat"] = dat
    extra["dat"] = tiles.swizzled(_SQUARE, _F32)
    rows = ("q", "k", "b")
  grad = jax.ShapeDtypeStruct(q.shape, dtype)
  return _launch(static, _backward_kernel, mode_, inputs,
                 dict(dq=grad, dk=grad, dg=jax.ShapeDtypeStruct(q.shape, _F32)),
                 _specs(static, dtype, rows, extra))
