"""Chunked simple GLA for Hopper GPUs in Mosaic GPU: forward and backward.

Per head, with a float32 state ``S [K, V]`` and a scalar log gate per token (Yang et al.
2023, GLA §4 with one decay for every key channel; retention and plain linear attention
are the constant and the zero gate)::

    S_t = e^{g_t} S_{t-1} + k_t v_t^T        o_t = scale q_t^T S_t

``S_0`` is ``initial_state``; with ``segment_ids`` the state restarts from zeros where the
id changes (packed documents). Same contract as ``pallas_kernels/tpu/chunked_linear.py``
and attnlab's ``simple_gla`` (this module does not import attnlab).

Chunks of ``C = 64`` tokens. Inside a chunk, with ``b_t`` the gates summed from the chunk's
(or the document's) start up to ``t``::

    o   = scale ((q k^T) * D) v + scale diag(e^{b}) q S          D_ts = e^{b_t - b_s}, s <= t
    S' = e^{G} S + (diag(e^{a}) k)^T v                         a_s = gates after s

where ``D`` is zero across documents and above the diagonal. The per-token factors
``e^{b}`` ("into", zero for tokens whose document starts inside the chunk), ``e^{a}``
("out of", zero before the chunk's last document start) and ``e^{G}`` (zero when a
document starts in the chunk) are computed here in XLA as sums of gates over their exact
ranges (segmented scans), so their gradients come from JAX's autodiff without
cancellation; the kernels take them as inputs and return their gradients. Only the pair
decay ``e^{b_t - b_s}`` is formed in the kernel, and its gradient with respect to ``b``
is ``rowsum(P) - colsum(P)`` with ``P = dA * A`` over the strictly lower pairs (the
diagonal's exponent is 0): every term carries the decay of its own pair, so strong gates
(-20 per token) lose nothing to cancellation.

Kernels. One warpgroup per CTA, grid ``(V / 64, H, B)``: a CTA owns a 64-column block of
the value dimension and walks the chunks in order (forward) or in reverse (backward),
keeping its ``[K, 64]`` slice of the state (or of its gradient) in float32 registers, and
prefetching the next chunk's tiles with TMA into the other of two shared-memory slots.
Products are ``wgmma`` with float32 accumulators; the transposed products of the
backward (``k q^T``, ``v dO^T``) are computed directly rather than transposing register
tiles. The forward saves the state entering every chunk (``[B, H, T / C, K, V]`` in the
input dtype) for the backward. The backward's dq and dk and the gate factors' gradients
are partial sums over the value blocks (float32), added in XLA.

Inputs bfloat16 or float16; ``K`` 64 or 128 and ``V`` a multiple of 64. Runs on an
H100/H200 and, slowly, on CPU in the Mosaic GPU interpreter of jax 0.10.2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import partition
from pallas_kernels.gpu import _interpret
from pallas_kernels.gpu import tiles

CHUNK = 64
BLOCK_V = 64
KEY_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
_F32 = jnp.float32
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)
_TILE = plgpu.Layout.WGMMA


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  num_chunks: int
  key_dim: int
  value_dim: int
  interpret: bool


def _vblock(vb):
  return pl.ds(vb * BLOCK_V, BLOCK_V)


def _launch(static, kernel, inputs, out_type, scratch, batch, heads):
  def entry(*refs):
    refs = dict(zip(list(inputs) + list(out_type), refs))
    pl.run_scoped(lambda *smem: kernel(static, refs, smem), *scratch)

  return plgpu.kernel(
      entry, out_type=tuple(out_type.values()),
      grid=(static.value_dim // BLOCK_V, heads, batch), grid_names=("vb", "head", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret.params() if static.interpret else None,
  )(*inputs.values())


def _pair_decay(static, b_row, b_col, d_row, d_col, transposed):
  """``D`` (``D^T`` when ``transposed``: keys on rows) and the strictly lower mask."""
  shape = (CHUNK, CHUNK)
  r, c = tiles.iota(shape, 0, static.interpret), tiles.iota(shape, 1, static.interpret)
  t, s = (c, r) if transposed else (r, c)
  same = tiles.rows(d_row, shape) == tiles.cols(d_col, shape)
  ok = (t >= s) & same
  if transposed:
    exponent = tiles.cols(b_col, shape) - tiles.rows(b_row, shape)
  else:
    exponent = tiles.rows(b_row, shape) - tiles.cols(b_col, shape)
  decay = jnp.where(ok, jnp.exp(jnp.where(ok, exponent, 0.0)), 0.0)
  return decay, t > s


def _vectors(static, vec, vec_t, tot):
  """The chunk's factor vectors in the row (and column) layouts. The column layout reads
  its own copy (``vec_t``): Mosaic GPU's layout inference finds no solution when one
  shared-memory buffer is loaded in both layouts."""
  ld = functools.partial(tiles.load, interpret=static.interpret)
  return dict(b_row=ld(vec.at[0], _ROW), b_col=ld(vec_t.at[0], _COL),
              into=ld(vec.at[1], _ROW), out_of=ld(vec.at[2], _ROW),
              d_row=ld(vec.at[3], _ROW), d_col=ld(vec_t.at[3], _COL), tot=ld(tot, _ROW))


# --------------------------------------------------------------------------- forward


def _forward_kernel(static, refs, scratch):
  q_s, k_s, v_s, vec_s, vect_s, tot_s, h_s, kout_s, o_s, hf_s, bar, one = scratch
  interp = static.interpret
  vb, head, batch = (lax.axis_index(n) for n in ("vb", "head", "batch"))
  cols, nc, dtype = _vblock(vb), static.num_chunks, q_s.dtype
  kd = static.key_dim

  def issue(c, slot):
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    plgpu.copy_gmem_to_smem(refs["q"].at[rows], q_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["k"].at[rows], k_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["v"].at[rows + (cols,)], v_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["vec"].at[batch, head, c], vec_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["vec"].at[batch, head, c], vect_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["tot"].at[batch, head, c], tot_s.at[slot], bar.at[slot])

  issue(0, 0)
  plgpu.copy_gmem_to_smem(refs["h0"].at[batch, head, :, cols], hf_s, one)
  plgpu.barrier_wait(one)
  h = tiles.load(hf_s, _TILE, interp)

  def step(c, h):
    slot = lax.rem(c, 2)

    @pl.when(c + 1 < nc)
    def _prefetch():
      issue(c + 1, 1 - slot)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # h_s and o_s read by TMA
    h_s[...] = h.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, refs["states"].at[batch, head, c, :, cols])
    plgpu.barrier_wait(bar.at[slot])
    x = _vectors(static, vec_s.at[slot], vect_s.at[slot], tot_s.at[slot])
    scores = tiles.matmul(q_s.at[slot], k_s.at[slot], (CHUNK, CHUNK), interp, transpose_b=True)
    decay, _ = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"], False)
    a = (scores * decay * static.scale).astype(dtype)
    o = tiles.matmul(q_s.at[slot], h_s, (CHUNK, BLOCK_V), interp)
    o = o * tiles.rows(x["into"] * static.scale, o.shape)
    o = tiles.matmul_add(o, a, v_s.at[slot], interp)
    o_s[...] = o.astype(dtype)
    kk = tiles.load(k_s.at[slot], _TILE, interp).astype(_F32)
    kout_s[...] = (kk * tiles.rows(x["out_of"], kk.shape)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, refs["o"].at[batch, pl.ds(c * CHUNK, CHUNK), head, cols])
    h = h * tiles.rows(x["tot"], h.shape)
    return tiles.matmul_add(h, kout_s, v_s.at[slot], interp, transpose_a=True)

  h = lax.fori_loop(0, nc, step, h)
  plgpu.wait_smem_to_gmem(0)
  hf_s[...] = h
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(hf_s, refs["final"].at[batch, head, :, cols])
  plgpu.wait_smem_to_gmem(0)
  del kd


def _forward(static, q, k, v, vec, tot, h0):
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  inputs = dict(q=q, k=k, v=v, vec=vec, tot=tot, h0=h0)
  out_type = dict(o=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype),
                  states=jax.ShapeDtypeStruct((b, heads, nc, kd, vd), dtype),
                  final=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32))
  scratch = (tiles.swizzled((2, CHUNK, kd), dtype), tiles.swizzled((2, CHUNK, kd), dtype),
             tiles.swizzled((2, CHUNK, BLOCK_V), dtype), plgpu.SMEM((2, 4, CHUNK), _F32),
             plgpu.SMEM((2, 4, CHUNK), _F32), plgpu.SMEM((2, kd), _F32), tiles.swizzled((kd, BLOCK_V), dtype),
             tiles.swizzled((CHUNK, kd), dtype), tiles.swizzled((CHUNK, BLOCK_V), dtype),
             tiles.swizzled((kd, BLOCK_V), _F32), plgpu.Barrier(num_arrivals=6, num_barriers=2),
             plgpu.Barrier())
  fn = functools.partial(_launch, static, _forward_kernel, out_type=out_type,
                         scratch=scratch, batch=b, heads=heads)
  out = fn(inputs)
  return out


# -------------------------------------------------------------------------- backward


def _backward_kernel(static, refs, scratch):
  (q_s, k_s, v_s, do_s, hc_s, vec_s, vect_s, tot_s, dh_s, kq_s, dv_s, dvec_s, dtot_s,
   bar, one) = scratch
  interp = static.interpret
  vb, head, batch = (lax.axis_index(n) for n in ("vb", "head", "batch"))
  cols, nc, dtype = _vblock(vb), static.num_chunks, q_s.dtype
  scale = static.scale
  tile_c = (CHUNK, static.key_dim)

  def issue(c, slot):
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    plgpu.copy_gmem_to_smem(refs["q"].at[rows], q_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["k"].at[rows], k_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["v"].at[rows + (cols,)], v_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["do"].at[rows + (cols,)], do_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["states"].at[batch, head, c, :, cols], hc_s.at[slot],
                            bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["vec"].at[batch, head, c], vec_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["vec"].at[batch, head, c], vect_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(refs["tot"].at[batch, head, c], tot_s.at[slot], bar.at[slot])

  def load_f32(src):
    def body(buf):
      plgpu.copy_gmem_to_smem(src, buf, one)
      plgpu.barrier_wait(one)
      return tiles.load(buf, _TILE, interp)
    return pl.run_scoped(body, tiles.swizzled((static.key_dim, BLOCK_V), _F32))

  def stage_f32(x, dst):
    """A float32 tile to HBM through its own shared-memory scope (freed on return)."""
    def body(buf):
      buf[...] = x
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf, dst)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    pl.run_scoped(body, tiles.swizzled(x.shape, _F32))

  issue(nc - 1, 0)
  dh = load_f32(refs["dfinal"].at[batch, head, :, cols])

  def step(i, dh):
    c = nc - 1 - i
    slot = lax.rem(i, 2)

    @pl.when(c > 0)
    def _prefetch():
      issue(c - 1, 1 - slot)

    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    dh_s[...] = dh.astype(dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(bar.at[slot])
    q, k, v, d_o, hc = (r.at[slot] for r in (q_s, k_s, v_s, do_s, hc_s))
    x = _vectors(static, vec_s.at[slot], vect_s.at[slot], tot_s.at[slot])

    # dq: (dA * D) k scale + diag(e^b) dO S^T scale, and the row half of db.
    scores = tiles.matmul(q, k, (CHUNK, CHUNK), interp, transpose_b=True)
    d_a = tiles.matmul(d_o, v, (CHUNK, CHUNK), interp, transpose_b=True)
    decay, strict = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"], False)
    a = scores * decay * scale
    db = jnp.where(strict, d_a * a, 0.0).sum(axis=1)
    dq = tiles.matmul((d_a * decay * scale).astype(dtype), k, tile_c, interp)
    doh = tiles.matmul(d_o, hc, tile_c, interp, transpose_b=True)
    qq = tiles.load(q, _TILE, interp).astype(_F32)
    d_into = (qq * doh).sum(axis=1) * scale
    dq = dq + doh * tiles.rows(x["into"] * scale, doh.shape)
    stage_f32(dq, refs["dq"].at[(vb,) + rows])

    # dk, dv from the transposed tiles (keys on rows), and the column half of db.
    scores_t = tiles.matmul(k, q, (CHUNK, CHUNK), interp, transpose_b=True)
    d_a_t = tiles.matmul(v, d_o, (CHUNK, CHUNK), interp, transpose_b=True)
    decay_t, strict_t = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"],
                                    True)
    a_t = scores_t * decay_t * scale
    db = db - jnp.where(strict_t, d_a_t * a_t, 0.0).sum(axis=1)
    dk = tiles.matmul((d_a_t * decay_t * scale).astype(dtype), q, tile_c, interp)
    vdh = tiles.matmul(v, dh_s, tile_c, interp, transpose_b=True)
    kk = tiles.load(k, _TILE, interp).astype(_F32)
    d_out = (kk * vdh).sum(axis=1)
    dk = dk + vdh * tiles.rows(x["out_of"], vdh.shape)
    kq_s[...] = (kk * tiles.rows(x["out_of"], kk.shape)).astype(dtype)
    plgpu.commit_smem()
    dv = tiles.matmul(a_t.astype(dtype), d_o, (CHUNK, BLOCK_V), interp)
    dv = tiles.matmul_add(dv, kq_s, dh_s, interp)
    stage_f32(dk, refs["dk"].at[(vb,) + rows])
    dv_s[...] = dv.astype(dtype)
    dvec_s.at[0][...] = db
    dvec_s.at[1][...] = d_into
    dvec_s.at[2][...] = d_out
    hh = tiles.load(hc, _TILE, interp).astype(_F32)
    dtot_s[...] = (hh * dh).sum(axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, refs["dv"].at[rows + (cols,)])
    plgpu.copy_smem_to_gmem(dvec_s, refs["dvec"].at[vb, batch, head, c])
    plgpu.copy_smem_to_gmem(dtot_s, refs["dtot"].at[vb, batch, head, c])

    # The state's gradient entering the chunk: e^G dS + (diag(e^b) q scale)^T dO.
    kq_s[...] = (qq * tiles.rows(x["into"] * scale, qq.shape)).astype(dtype)
    plgpu.commit_smem()
    dh = dh * tiles.rows(x["tot"], dh.shape)
    dh = tiles.matmul_add(dh, kq_s, d_o, interp, transpose_a=True)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # dv_s, dvec_s, dtot_s reusable
    return dh

  dh = lax.fori_loop(0, nc, step, dh)
  stage_f32(dh, refs["dh0"].at[batch, head, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _backward_call(static, q, k, v, d_o, states, vec, tot, dfinal):
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  nv = vd // BLOCK_V
  inputs = dict(q=q, k=k, v=v, do=d_o, states=states, vec=vec, tot=tot, dfinal=dfinal)
  out_type = dict(dq=jax.ShapeDtypeStruct((nv, b, tp, heads, kd), _F32),
                  dk=jax.ShapeDtypeStruct((nv, b, tp, heads, kd), _F32),
                  dv=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype),
                  dvec=jax.ShapeDtypeStruct((nv, b, heads, nc, 3, CHUNK), _F32),
                  dtot=jax.ShapeDtypeStruct((nv, b, heads, nc, kd), _F32),
                  dh0=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32))
  two = lambda shape, dt=dtype: tiles.swizzled((2,) + shape, dt)
  scratch = (two((CHUNK, kd)), two((CHUNK, kd)), two((CHUNK, BLOCK_V)), two((CHUNK, BLOCK_V)),
             two((kd, BLOCK_V)), plgpu.SMEM((2, 4, CHUNK), _F32), plgpu.SMEM((2, 4, CHUNK), _F32),
             plgpu.SMEM((2, kd), _F32),
             tiles.swizzled((kd, BLOCK_V), dtype), tiles.swizzled((CHUNK, kd), dtype),
             tiles.swizzled((CHUNK, BLOCK_V), dtype), plgpu.SMEM((3, CHUNK), _F32),
             plgpu.SMEM((kd,), _F32), plgpu.Barrier(num_arrivals=8, num_barriers=2),
             plgpu.Barrier())
  return _launch(static, _backward_kernel, inputs, out_type, scratch, b, heads)


# -------------------------------------------------------------------------- wrappers


def _shielded(static, fn, arrays, in_dims, out_dims):
  """Run one launch: sequentially under vmap (Mosaic calls have no batching rule) and,
  under a multi-device jit, per batch/head shard (XLA cannot partition a Mosaic call)."""
  run = jax.custom_batching.sequential_vmap(fn)
  if static.interpret or jax.device_count() == 1:
    return run(*arrays)
  return partition.batch_head_partitioned(run, in_dims, out_dims)(*arrays)


def _tot_lanes(static, tot):
  return jnp.broadcast_to(tot[..., None], tot.shape + (static.key_dim,))


def _fwd_impl(static, q, k, v, vec, tot, h0):
  bthd, bh = (0, 2), (0, 1)
  return _shielded(static, functools.partial(_forward, static),
                   (q, k, v, vec, _tot_lanes(static, tot), h0),
                   (bthd, bthd, bthd, bh, bh, bh), (bthd, bh, bh))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(static, q, k, v, vec, tot, h0):
  o, _, final = _fwd_impl(static, q, k, v, vec, tot, h0)
  return o, final


def _chunked_fwd(static, q, k, v, vec, tot, h0):
  o, states, final = _fwd_impl(static, q, k, v, vec, tot, h0)
  return (o, final), (q, k, v, vec, tot, states)


def _chunked_bwd(static, res, cotangents):
  q, k, v, vec, tot, states = res
  d_o, dfinal = cotangents
  bthd, bh, vbthd, vbh = (0, 2), (0, 1), (1, 3), (1, 2)
  dq, dk, dv, dvec, dtot, dh0 = _shielded(
      static, functools.partial(_backward_call, static),
      (q, k, v, d_o.astype(q.dtype), states, vec, _tot_lanes(static, tot),
       dfinal.astype(_F32)),
      (bthd, bthd, bthd, bthd, bh, bh, bh, bh), (vbthd, vbthd, bthd, vbh, vbh, bh))
  dvec = dvec.sum(0)
  dvec = jnp.concatenate([dvec, jnp.zeros_like(dvec[..., :1, :])], axis=-2)  # document ids
  return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dvec,
          dtot.sum((0, -1)), dh0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _segmented_prefix(flags, values, axis):
  """Inclusive sums along ``axis`` that restart where ``flags`` is set: every output is
  the sum of exactly the terms of its range."""
  def combine(x, y):
    return x[0] | y[0], jnp.where(y[0], y[1], x[1] + y[1])
  return lax.associative_scan(combine, (flags, values), axis=axis)[1]


def _suffix(x, axis, exclusive):
  """Sums from each position (``exclusive``: from the next one) to the end of ``axis``."""
  out = jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)
  if exclusive:
    out = jnp.concatenate([lax.slice_in_dim(out, 1, None, axis=axis),
                           jnp.zeros_like(lax.slice_in_dim(out, 0, 1, axis=axis))], axis=axis)
  return out


def _exp_where(ok, x):
  """``e^x`` where ``ok``, else 0 (and no gradient through the unused exponents)."""
  return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def gate_factors(g, starts):
  """The kernels' gate inputs from log gates ``g [B, T, H]`` (``T`` a multiple of the chunk)
  and document starts ``[B, T]`` (None: no packed documents): ``vec [B, H, T / C, 4, C]`` (rows: ``b``, ``e^b`` into
  the chunk, ``e^a`` out of it, the document index) and ``tot [B, H, T / C]``."""
  batch, length, heads = g.shape
  nc = length // CHUNK
  gc = g.astype(_F32).reshape(batch, nc, CHUNK, heads)
  if starts is None:   # one document per row: plain range sums, no segment bookkeeping
    tot = jnp.exp(_suffix(gc, 2, exclusive=False)[:, :, 0])
    vec = jnp.stack([jnp.cumsum(gc, axis=2), jnp.exp(jnp.cumsum(gc, axis=2)),
                     jnp.exp(_suffix(gc, 2, exclusive=True)), jnp.zeros_like(gc)], axis=-1)
    return vec.transpose(0, 3, 1, 4, 2), tot.transpose(0, 2, 1)
  st = jnp.broadcast_to(starts.reshape(batch, nc, CHUNK, 1), gc.shape)
  st_count = st.astype(jnp.int32)
  b = _segmented_prefix(st, jnp.where(st, 0.0, gc), 2)   # a start's own gate is unused
  into = _exp_where(jnp.cumsum(st_count, axis=2) == 0, b)
  after = _suffix(gc, 2, exclusive=True)
  out_of = _exp_where(_suffix(st_count, 2, exclusive=True) == 0, after)
  whole = _suffix(gc, 2, exclusive=False)[:, :, 0]
  tot = _exp_where(st_count.sum(axis=2) == 0, whole)     # [B, NC, H]
  doc = jnp.cumsum(starts.astype(jnp.int32), axis=1).astype(_F32)
  doc = jnp.broadcast_to(doc.reshape(batch, nc, CHUNK, 1), gc.shape)
  vec = jnp.stack([b, into, out_of, lax.stop_gradient(doc)], axis=-1)
  return vec.transpose(0, 3, 1, 4, 2), tot.transpose(0, 2, 1)


def _check(q, k, v, g, scale, initial_state, segment_ids, chunk_size):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V] with the same B, T, H; "
                     f"got {q.shape=}, {k.shape=}, {v.shape=}")
  if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must all be bfloat16 or all float16 (the GPU kernel's wgmma "
                     f"operands), got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.shape[-1] not in KEY_DIMS:
    raise ValueError(f"the key head dim must be one of {KEY_DIMS}, got {q.shape[-1]}")
  if v.shape[-1] % BLOCK_V:
    raise ValueError(f"the value head dim must be a multiple of {BLOCK_V}, got {v.shape[-1]}")
  if g.shape != q.shape[:3]:
    raise ValueError(f"g must be [B, T, H] = {q.shape[:3]}, got {g.shape=}")
  if not isinstance(scale, (int, float)):
    raise ValueError(f"scale must be a Python number, got {scale!r}")
  if chunk_size != CHUNK:
    raise ValueError(f"chunk_size must be {CHUNK} for the GPU kernel, got {chunk_size}")
  b, _, h, kd = q.shape
  if initial_state is not None and initial_state.shape != (b, h, kd, v.shape[-1]):
    raise ValueError(f"initial_state must be [B, H, K, V] = {(b, h, kd, v.shape[-1])}, "
                     f"got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must be [B, T] = {q.shape[:2]}, got {segment_ids.shape}")


def simple_gla(q, k, v, g, *, scale, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=CHUNK, interpret=False):
  """Simple GLA as Mosaic GPU kernels.

  Args:
    q, k: ``[B, T, H, K]`` (K = 64 or 128); v: ``[B, T, H, V]`` (V a multiple of 64); all
      bfloat16 or all float16.
    g: ``[B, T, H]`` float log gates (``S_t = e^{g_t} S_{t-1} + k_t v_t^T``), <= 0.
    scale: the output scale. initial_state: ``[B, H, K, V]`` or None (zeros).
    segment_ids: ``[B, T]`` int or None; the state restarts where the id changes.
    chunk_size: 64 (the kernels' chunk). interpret: run in the Mosaic GPU interpreter.

  Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None)``.
  """
  _check(q, k, v, g, scale, initial_state, segment_ids, chunk_size)
  batch, length, heads, kd = q.shape
  vd = v.shape[-1]
  padded = -(-length // CHUNK) * CHUNK
  pad = padded - length
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  g = jnp.pad(g.astype(_F32), widths[:3])
  starts = None
  if segment_ids is not None:
    ids = jnp.pad(jnp.asarray(segment_ids), ((0, 0), (0, pad)), mode="edge")
    starts = jnp.zeros((batch, padded), bool).at[:, 1:].set(ids[:, 1:] != ids[:, :-1])
  vec, tot = gate_factors(g, starts)
  h0 = (jnp.zeros((batch, heads, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  static = _Static(float(scale), padded // CHUNK, kd, vd, bool(interpret))
  o, final = _chunked(static, q, k, v, vec, tot, h0)
  return o[:, :length], (final if output_final_state else None)
