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

Kernels (one warpgroup per CTA unless said, ``wgmma`` with float32 accumulators, TMA
copies):

* states, grid ``(K / 64 * V / 64, H, B)``: walks the chunks in order with a ``[64, 64]``
  block of the state in float32 registers (one product per chunk, the next chunk's k / v
  copied into the other of two shared-memory slots meanwhile); saves the state entering
  every chunk (``[B, H, T / C, K, V]`` in the input dtype) and the final state.
* output, grid ``(T / C, H, B)``: every chunk at once, from its saved state.
* state gradients, grid ``(K / 64 * V / 64, H, B)``: walks the chunks in reverse with a
  block of ``dS`` in registers; saves the gradient of the state leaving every chunk and ``<S, dS>`` (the
  gradient of ``e^{G}``); ends with the initial state's gradient.
* gradients, grid ``(T / C, H, B)``: every chunk at once: dq, dk, dv and the gradients
  of ``b``, ``e^{b}`` and ``e^{a}``, two warpgroups per chunk (one forms dq, the other
  dk and dv, from the same tiles). The transposed products (``k q^T``, ``v dO^T``) are
  computed directly rather than transposing register tiles.

Only the two walks are sequential, and each does one matrix product per chunk; the rest
runs with ``T / C x H x B`` CTAs, so long sequences with small batches keep the GPU busy.

Inputs bfloat16 or float16; ``K`` and ``V`` 64 or 128. Runs on an
H100/H200 and, slowly, on CPU in the Mosaic GPU interpreter of jax 0.10.2.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import partition
from pallas_kernels.gpu import _interpret
from pallas_kernels.gpu import tiles

CHUNK = 64
BLOCK_K = 64   # the walks' state slice is [BLOCK_K, BLOCK_V]
BLOCK_V = 64
KEY_DIMS = (64, 128)
VALUE_DIMS = (64, 128)
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


def _kblock(kb):
  return pl.ds(kb * BLOCK_K, BLOCK_K)


def _launch(static, kernel, inputs, out_type, scratch, grid, grid_names, threads=None):
  """One ``plgpu.kernel`` launch; ``threads``: that many warpgroups (named ``"wg"``)
  sharing the scratch, else one."""
  def entry(*refs):
    refs = dict(zip(list(inputs) + list(out_type), refs))
    pl.run_scoped(lambda *smem: kernel(static, refs, smem), *scratch,
                  **(dict(collective_axes="wg") if threads else {}))

  return plgpu.kernel(
      entry, out_type=tuple(out_type.values()), grid=grid, grid_names=grid_names,
      **(dict(num_threads=threads, thread_name="wg") if threads else {}),
      compiler_params=plgpu.CompilerParams(approx_math=True, **_profiling(static)),
      interpret=_interpret.params() if static.interpret else None,
  )(*inputs.values())


def _profiling(static):
  """Mosaic GPU's in-kernel profiler, for ``experiments/profiling/region_times.py``:
  with ``ATTNLAB_MGPU_PROFILE_DIR`` set, every compiled launch records the kernels'
  ``jax.named_scope`` regions per warpgroup (room for ``ATTNLAB_MGPU_PROFILE_SPACE``
  regions, default 256, in shared memory) and writes a trace there per call."""
  where = os.environ.get("ATTNLAB_MGPU_PROFILE_DIR")
  if not where or static.interpret:
    return {}
  return dict(profile_dir=where,
              profile_space=int(os.environ.get("ATTNLAB_MGPU_PROFILE_SPACE", "256")))


def _sequential(static, kernel, inputs, out_type, scratch, batch, heads):
  """A walk along the chunks: one CTA per (state block, head, batch row)."""
  blocks = (static.key_dim // BLOCK_K) * (static.value_dim // BLOCK_V)
  return _launch(static, kernel, inputs, out_type, scratch,
                 (blocks, heads, batch), ("kv", "head", "batch"))


def _walk_position(static):
  """(key rows, value columns, value block, head, batch) of a walk's CTA."""
  nv = static.value_dim // BLOCK_V
  kv = lax.axis_index("kv")
  vb = lax.rem(kv, nv)
  return (_kblock(lax.div(kv, nv)), _vblock(vb), vb, lax.axis_index("head"),
          lax.axis_index("batch"))


def _parallel(static, kernel, inputs, out_type, scratch, batch, heads, threads=None):
  """One CTA per (chunk, head, batch row), over the whole value dimension (``threads``:
  warpgroups per CTA, as in ``_launch``)."""
  return _launch(static, kernel, inputs, out_type, scratch,
                 (static.num_chunks, heads, batch), ("chunk", "head", "batch"), threads)


def _chunk_position():
  return tuple(lax.axis_index(n) for n in ("chunk", "head", "batch"))


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


def _vectors(static, vec, vec_t=None, tot=None):
  """The chunk's factor vectors in the row (and column) layouts. The column layout reads
  its own copy (``vec_t``): Mosaic GPU's layout inference finds no solution when one
  shared-memory buffer is loaded in both layouts."""
  ld = functools.partial(tiles.load, interpret=static.interpret)
  x = dict(b_row=ld(vec.at[0], _ROW), into=ld(vec.at[1], _ROW), out_of=ld(vec.at[2], _ROW),
           d_row=ld(vec.at[3], _ROW))
  if vec_t is not None:
    x.update(b_col=ld(vec_t.at[0], _COL), d_col=ld(vec_t.at[3], _COL))
  if tot is not None:
    x["tot"] = ld(tot, _ROW)
  return x


def _copy_in(pairs, barrier):
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)


def _stage_out(static, x, dst, dtype=_F32):
  """A float32 tile to HBM in ``dtype`` through its own shared-memory scope (freed on
  return)."""
  def body(buf):
    buf[...] = x if dtype == _F32 else x.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buf, dst)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  pl.run_scoped(body, tiles.swizzled(x.shape, dtype))


def _load_f32(static, src, shape, barrier):
  def body(buf):
    plgpu.copy_gmem_to_smem(src, buf, barrier)
    plgpu.barrier_wait(barrier)
    return tiles.load(buf, _TILE, static.interpret)
  return pl.run_scoped(body, tiles.swizzled(shape, _F32))


def _walk(static, issue, first, step, carry, bar, count=None):
  """``carry = step(c, slot, carry)`` over the chunks ``first(i)`` for i = 0..count-1
  (default NC), with the next chunk's tiles copied (``issue(c, slot)``) into the other of
  two slots while the current one is used."""
  nc = static.num_chunks if count is None else count
  issue(first(0), 0)

  def body(i, carry):
    slot = lax.rem(i, 2)

    @pl.when(i + 1 < nc)
    def _prefetch():
      issue(first(i + 1), 1 - slot)

    plgpu.barrier_wait(bar.at[slot])
    return step(first(i), slot, carry)

  return lax.fori_loop(0, nc, body, carry)


# --------------------------------------------------------------------------- forward


def _states_kernel(static, refs, scratch):
  """The state entering every chunk (saved in the input dtype) and the final state."""
  k_s, v_s, vec_s, tot_s, h_s, kout_s, bar, one = scratch
  interp = static.interpret
  krows, cols, _, head, batch = _walk_position(static)
  dtype = k_s.dtype

  def issue(c, slot):
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    _copy_in([(refs["k"].at[rows + (krows,)], k_s.at[slot]),
              (refs["v"].at[rows + (cols,)], v_s.at[slot]),
              (refs["vec"].at[batch, head, c], vec_s.at[slot]),
              (refs["tot"].at[batch, head, c, krows], tot_s.at[slot])], bar.at[slot])

  def step(c, slot, h):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # h_s read by the last copy out
    h_s[...] = h.astype(dtype)
    x = _vectors(static, vec_s.at[slot], tot=tot_s.at[slot])
    kk = tiles.load(k_s.at[slot], _TILE, interp).astype(_F32)
    kout_s[...] = (kk * tiles.rows(x["out_of"], kk.shape)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, refs["states"].at[batch, head, c, krows, cols])
    h = h * tiles.rows(x["tot"], h.shape)
    return tiles.matmul_add(h, kout_s, v_s.at[slot], interp, transpose_a=True)

  h0 = _load_f32(static, refs["h0"].at[batch, head, krows, cols], (BLOCK_K, BLOCK_V), one)
  h = _walk(static, issue, lambda i: i, step, h0, bar)
  plgpu.wait_smem_to_gmem(0)
  _stage_out(static, h, refs["final"].at[batch, head, krows, cols])
  plgpu.wait_smem_to_gmem(0)


def _output_kernel(static, refs, scratch):
  """One chunk's output: ``((q k^T) * D) v scale + diag(e^b) q S scale``."""
  q_s, k_s, v_s, h_s, vec_s, vect_s, o_s, bar = scratch
  interp = static.interpret
  c, head, batch = _chunk_position()
  rows, dtype = (batch, pl.ds(c * CHUNK, CHUNK), head), q_s.dtype
  _copy_in([(refs["q"].at[rows], q_s), (refs["k"].at[rows], k_s), (refs["v"].at[rows], v_s),
            (refs["states"].at[batch, head, c], h_s),
            (refs["vec"].at[batch, head, c], vec_s), (refs["vec"].at[batch, head, c], vect_s)],
           bar)
  plgpu.barrier_wait(bar)
  x = _vectors(static, vec_s, vect_s)
  scores = tiles.matmul(q_s, k_s, (CHUNK, CHUNK), interp, transpose_b=True)
  decay, _ = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"], False)
  a = (scores * decay * static.scale).astype(dtype)
  o = tiles.matmul(q_s, h_s, (CHUNK, static.value_dim), interp)
  o = o * tiles.rows(x["into"] * static.scale, o.shape)
  o = tiles.matmul_add(o, a, v_s, interp)
  o_s[...] = o.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, refs["o"].at[rows])
  plgpu.wait_smem_to_gmem(0)


def _forward(static, q, k, v, vec, tot, h0):
  states, final = states_call(static, k, v, vec, tot, h0)
  return output_call(static, q, k, v, states, vec), states, final


def states_call(static, k, v, vec, tot, h0):
  """The states walk: ``(states [B, H, T / C, K, V]`` in k's dtype, ``final [B, H, K, V]``
  float32) from ``tot [B, H, T / C, K]`` (the chunk's decay per key channel) and the
  factors ``vec`` (the walk reads ``e^a``, row 2). Also GLA's walk (``e^a`` folded into
  k)."""
  b, tp, heads, kd = k.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, k.dtype
  two = lambda shape, dt=dtype: tiles.swizzled((2,) + shape, dt)
  return _sequential(
      static, _states_kernel, dict(k=k, v=v, vec=vec, tot=tot, h0=h0),
      dict(states=jax.ShapeDtypeStruct((b, heads, nc, kd, vd), dtype),
           final=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32)),
      (two((CHUNK, BLOCK_K)), two((CHUNK, BLOCK_V)), plgpu.SMEM((2, 4, CHUNK), _F32),
       plgpu.SMEM((2, BLOCK_K), _F32), tiles.swizzled((BLOCK_K, BLOCK_V), dtype),
       tiles.swizzled((CHUNK, BLOCK_K), dtype), plgpu.Barrier(num_arrivals=4, num_barriers=2),
       plgpu.Barrier()), b, heads)


def output_call(static, q, k, v, states, vec):
  """The chunk-parallel output launch (also the delta rules', with ``v`` the chunks'
  corrected values)."""
  b, tp, heads, kd = q.shape
  vd, dtype = static.value_dim, q.dtype
  (o,) = _parallel(
      static, _output_kernel, dict(q=q, k=k, v=v, states=states, vec=vec),
      dict(o=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype)),
      (tiles.swizzled((CHUNK, kd), dtype), tiles.swizzled((CHUNK, kd), dtype),
       tiles.swizzled((CHUNK, vd), dtype), tiles.swizzled((kd, vd), dtype),
       plgpu.SMEM((4, CHUNK), _F32), plgpu.SMEM((4, CHUNK), _F32),
       tiles.swizzled((CHUNK, vd), dtype), plgpu.Barrier(num_arrivals=6)), b, heads)
  return o


# -------------------------------------------------------------------------- backward


def _dstates_kernel(static, refs, scratch):
  """The gradient of the state leaving every chunk (saved in the input dtype), walking
  the chunks in reverse, and the initial state's gradient."""
  q_s, do_s, h_s, vec_s, tot_s, dh_s, qin_s, dtot_s, bar, one = scratch
  interp = static.interpret
  krows, cols, vb, head, batch = _walk_position(static)
  dtype, nc = q_s.dtype, static.num_chunks

  def issue(c, slot):
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    _copy_in([(refs["q"].at[rows + (krows,)], q_s.at[slot]),
              (refs["do"].at[rows + (cols,)], do_s.at[slot]),
              (refs["states"].at[batch, head, c, krows, cols], h_s.at[slot]),
              (refs["vec"].at[batch, head, c], vec_s.at[slot]),
              (refs["tot"].at[batch, head, c, krows], tot_s.at[slot])], bar.at[slot])

  def step(c, slot, dh):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    dh_s[...] = dh.astype(dtype)
    x = _vectors(static, vec_s.at[slot], tot=tot_s.at[slot])
    qq = tiles.load(q_s.at[slot], _TILE, interp).astype(_F32)
    qin_s[...] = (qq * tiles.rows(x["into"] * static.scale, qq.shape)).astype(dtype)
    # d e^{G}: <S entering, dS leaving> (rows here, summed over value blocks and K outside).
    hh = tiles.load(h_s.at[slot], _TILE, interp).astype(_F32)
    dtot_s[...] = (hh * dh).sum(axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dh_s, refs["dstates"].at[batch, head, c, krows, cols])
    plgpu.copy_smem_to_gmem(dtot_s, refs["dtot"].at[vb, batch, head, c, krows])
    dh = dh * tiles.rows(x["tot"], dh.shape)
    return tiles.matmul_add(dh, qin_s, do_s.at[slot], interp, transpose_a=True)

  dfinal = _load_f32(static, refs["dfinal"].at[batch, head, krows, cols],
                     (BLOCK_K, BLOCK_V), one)
  dh = _walk(static, issue, lambda i: nc - 1 - i, step, dfinal, bar)
  plgpu.wait_smem_to_gmem(0)
  _stage_out(static, dh, refs["dh0"].at[batch, head, krows, cols])
  plgpu.wait_smem_to_gmem(0)


def _grads_kernel(static, refs, scratch):
  """One chunk's gradients: dq, dk, dv and the gate factors' gradients, from the state
  entering the chunk and the gradient of the state leaving it. Two warpgroups share the
  chunk's tiles: the first forms dq (and its halves of the gate gradients), the second
  dk and dv, at the same time (each alone is a chain of dependent products). With a
  ``dtot`` output the first also forms ``<S, dS>`` per key channel (the gradient of the
  chunk's total gate factor ``e^G``, for the delta rules, whose state-gradient walk does
  not read the states). With a ``dv_lo`` output dv leaves as two 16-bit halves, ``dv``
  its rounding and ``dv_lo`` the rest (the delta rules' UT backward multiplies by them
  directly)."""
  (q_s, k_s, v_s, do_s, hc_s, dh_s, vec_s, vect_s, kout_s, kout2_s, dk_s, dv_s, dvec_s,
   dvec2_s, bar, bar_states, *extra) = scratch
  tot_s = extra[:1] if "dtot" in refs else []
  dvlo_s = extra[-1] if "dv_lo" in refs else None
  interp, scale = static.interpret, static.scale
  c, head, batch = _chunk_position()
  wg = lax.axis_index("wg")
  rows, dtype = (batch, pl.ds(c * CHUNK, CHUNK), head), q_s.dtype
  tile_c = (CHUNK, static.key_dim)

  @pl.when(wg == 0)
  def _request():   # the chunk's own tiles first; the products with the states wait apart
    _copy_in([(refs["q"].at[rows], q_s), (refs["k"].at[rows], k_s),
              (refs["v"].at[rows], v_s), (refs["do"].at[rows], do_s),
              (refs["vec"].at[batch, head, c], vec_s),
              (refs["vec"].at[batch, head, c], vect_s)], bar)
    _copy_in([(refs["states"].at[batch, head, c], hc_s),
              (refs["dstates"].at[batch, head, c], dh_s)], bar_states)

  plgpu.barrier_wait(bar)

  @pl.when(wg == 0)
  def _dq():
    # dq: (dA * D) k scale + diag(e^b) dO S^T scale, and the row half of db.
    x = _vectors(static, vec_s, vect_s)
    scores = tiles.matmul(q_s, k_s, (CHUNK, CHUNK), interp, transpose_b=True)
    d_a = tiles.matmul(do_s, v_s, (CHUNK, CHUNK), interp, transpose_b=True)
    decay, strict = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"],
                                False)
    a = scores * decay * scale
    db = jnp.where(strict, d_a * a, 0.0).sum(axis=1)
    dq = tiles.matmul((d_a * decay * scale).astype(dtype), k_s, tile_c, interp)
    plgpu.barrier_wait(bar_states)
    doh = tiles.matmul(do_s, hc_s, tile_c, interp, transpose_b=True)
    qq = tiles.load(q_s, _TILE, interp).astype(_F32)
    dvec_s.at[0][...] = db
    dvec_s.at[1][...] = (qq * doh).sum(axis=1) * scale
    kout_s[...] = (dq + doh * tiles.rows(x["into"] * scale, doh.shape)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(kout_s, refs["dq"].at[rows])
    plgpu.copy_smem_to_gmem(dvec_s, refs["dvec"].at[batch, head, c, pl.ds(0, 2)])
    if tot_s:
      for r in range(static.key_dim // BLOCK_K):
        block = pl.ds(r * BLOCK_K, BLOCK_K)
        hh = tiles.load(hc_s.at[block], _TILE, interp).astype(_F32)
        dh = tiles.load(dh_s.at[block], _TILE, interp).astype(_F32)
        tot_s[0].at[block][...] = (hh * dh).sum(axis=1)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(tot_s[0], refs["dtot"].at[0, batch, head, c])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _dk_dv():
    # dk, dv from the transposed tiles (keys on rows), and the column half of db.
    x = _vectors(static, vec_s, vect_s)
    scores_t = tiles.matmul(k_s, q_s, (CHUNK, CHUNK), interp, transpose_b=True)
    d_a_t = tiles.matmul(v_s, do_s, (CHUNK, CHUNK), interp, transpose_b=True)
    decay_t, strict_t = _pair_decay(static, x["b_row"], x["b_col"], x["d_row"],
                                    x["d_col"], True)
    a_t = scores_t * decay_t * scale
    dvec2_s.at[0][...] = -jnp.where(strict_t, d_a_t * a_t, 0.0).sum(axis=1)
    dk = tiles.matmul((d_a_t * decay_t * scale).astype(dtype), q_s, tile_c, interp)
    plgpu.barrier_wait(bar_states)
    vdh = tiles.matmul(v_s, dh_s, tile_c, interp, transpose_b=True)
    kk = tiles.load(k_s, _TILE, interp).astype(_F32)
    dvec2_s.at[1][...] = (kk * vdh).sum(axis=1)
    dk_s[...] = (dk + vdh * tiles.rows(x["out_of"], vdh.shape)).astype(dtype)
    kout2_s[...] = (kk * tiles.rows(x["out_of"], kk.shape)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_s, refs["dk"].at[rows])
    dv = tiles.matmul(a_t.astype(dtype), do_s, (CHUNK, static.value_dim), interp)
    dv = tiles.matmul_add(dv, kout2_s, dh_s, interp)
    if dvlo_s is None:
      dv_s[...] = dv.astype(dv_s.dtype)
    else:
      dv_s[...], dvlo_s[...] = tiles.split(dv, dtype, interp)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, refs["dv"].at[rows])
    if dvlo_s is not None:
      plgpu.copy_smem_to_gmem(dvlo_s, refs["dv_lo"].at[rows])
    plgpu.copy_smem_to_gmem(dvec2_s, refs["dvec"].at[batch, head, c, pl.ds(2, 2)])
    plgpu.wait_smem_to_gmem(0)


def _backward_call(static, q, k, v, d_o, states, vec, tot, dfinal):
  dstates, dh0, dtot = dstates_call(static, q, d_o, states, vec, tot, dfinal)
  dq, dk, dv, dvec = grads_call(static, q, k, v, d_o, states, dstates, vec)
  return dq, dk, dv, dvec, dtot, dh0


def dstates_call(static, q, d_o, states, vec, tot, dfinal):
  """The state-gradient walk: ``(dstates [B, H, T / C, K, V]`` in q's dtype, ``dh0 [B, H,
  K, V]`` float32, ``dtot [V / 64, B, H, T / C, K]`` float32 ``<S, dS>`` per key channel
  and value block) from the factors ``vec`` (the walk reads ``e^b``, row 1)."""
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  two = lambda shape, dt=dtype: tiles.swizzled((2,) + shape, dt)
  return _sequential(
      static, _dstates_kernel,
      dict(q=q, do=d_o, states=states, vec=vec, tot=tot, dfinal=dfinal),
      dict(dstates=jax.ShapeDtypeStruct((b, heads, nc, kd, vd), dtype),
           dh0=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32),
           dtot=jax.ShapeDtypeStruct((vd // BLOCK_V, b, heads, nc, kd), _F32)),
      (two((CHUNK, BLOCK_K)), two((CHUNK, BLOCK_V)), two((BLOCK_K, BLOCK_V)),
       plgpu.SMEM((2, 4, CHUNK), _F32), plgpu.SMEM((2, BLOCK_K), _F32),
       tiles.swizzled((BLOCK_K, BLOCK_V), dtype), tiles.swizzled((CHUNK, BLOCK_K), dtype),
       plgpu.SMEM((BLOCK_K,), _F32), plgpu.Barrier(num_arrivals=5, num_barriers=2),
       plgpu.Barrier()), b, heads)


def grads_call(static, q, k, v, d_o, states, dstates, vec, dv_split=False, with_dtot=False):
  """The chunk-parallel gradient launch (also the delta rules' kernel, with ``v`` the
  chunks' corrected values). Returns dq, dk, dv (input dtype; ``dv_split``: a pair
  ``(high, low)`` of the input dtype whose sum is the float32 gradient) and
  ``[B, H, T / C, 3, C]`` float32: the gradients of ``b``, ``e^b`` and ``e^a``;
  ``with_dtot``, also ``<S, dS>`` per key channel, ``[1, B, H, T / C, K]`` float32 (the
  layout of ``dstates_call``'s, with one value block)."""
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  one = lambda shape, dt=dtype: tiles.swizzled(shape, dt)
  outs = dict(dq=jax.ShapeDtypeStruct((b, tp, heads, kd), dtype),
              dk=jax.ShapeDtypeStruct((b, tp, heads, kd), dtype),
              dv=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype),
              dvec=jax.ShapeDtypeStruct((b, heads, nc, 4, CHUNK), _F32))
  if with_dtot:
    outs["dtot"] = jax.ShapeDtypeStruct((1, b, heads, nc, kd), _F32)
  if dv_split:
    outs["dv_lo"] = jax.ShapeDtypeStruct((b, tp, heads, vd), dtype)
  results = _parallel(
      static, _grads_kernel,
      dict(q=q, k=k, v=v, do=d_o, states=states, dstates=dstates, vec=vec), outs,
      (one((CHUNK, kd)), one((CHUNK, kd)), one((CHUNK, vd)), one((CHUNK, vd)),
       one((kd, vd)), one((kd, vd)), plgpu.SMEM((4, CHUNK), _F32),
       plgpu.SMEM((4, CHUNK), _F32), one((CHUNK, kd)), one((CHUNK, kd)), one((CHUNK, kd)),
       one((CHUNK, vd)), plgpu.SMEM((2, CHUNK), _F32),
       plgpu.SMEM((2, CHUNK), _F32), plgpu.Barrier(num_arrivals=6),
       plgpu.Barrier(num_arrivals=2))
      + ((plgpu.SMEM((kd,), _F32),) if with_dtot else ())
      + ((one((CHUNK, vd)),) if dv_split else ()),
      b, heads, threads=2)
  dq, dk, dv, parts = results[:4]
  # parts rows: db (row half), d e^b, db (column half), d e^a.
  dvec = jnp.stack([parts[..., 0, :] + parts[..., 2, :], parts[..., 1, :],
                    parts[..., 3, :]], axis=-2)
  rest = list(results[4:])
  dtot = [rest.pop(0)] if with_dtot else []
  dv = (dv, rest.pop(0)) if dv_split else dv
  return (dq, dk, dv, dvec) + tuple(dtot)


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
  bthd, bh = (0, 2), (0, 1)
  dq, dk, dv, dvec, dtot, dh0 = _shielded(
      static, functools.partial(_backward_call, static),
      (q, k, v, d_o.astype(q.dtype), states, vec, _tot_lanes(static, tot),
       dfinal.astype(_F32)),
      (bthd, bthd, bthd, bthd, bh, bh, bh, bh), (bthd, bthd, bthd, bh, (1, 2), bh))
  dvec = jnp.concatenate([dvec, jnp.zeros_like(dvec[..., :1, :])], axis=-2)  # document ids
  return dq, dk, dv, dvec, dtot.sum((0, -1)), dh0


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
  # Formed in the kernels' layout [B, H, T / C, C] from the start: one transpose of g
  # (and of its gradient), not of the four stacked rows, whose 4-wide minor dimension
  # XLA transposes slowly (a 21 us transpose fusion in the gated forward+backward at
  # B T H = 262144 on an H100 went away with this layout).
  gc = g.astype(_F32).transpose(0, 2, 1).reshape(batch, heads, nc, CHUNK)
  if starts is None:   # one document per row: plain range sums, no segment bookkeeping
    tot = jnp.exp(_suffix(gc, 3, exclusive=False)[..., 0])
    vec = jnp.stack([jnp.cumsum(gc, axis=3), jnp.exp(jnp.cumsum(gc, axis=3)),
                     jnp.exp(_suffix(gc, 3, exclusive=True)), jnp.zeros_like(gc)], axis=-2)
    return vec, tot
  st = jnp.broadcast_to(starts.reshape(batch, 1, nc, CHUNK), gc.shape)
  st_count = st.astype(jnp.int32)
  b = _segmented_prefix(st, jnp.where(st, 0.0, gc), 3)   # a start's own gate is unused
  into = _exp_where(jnp.cumsum(st_count, axis=3) == 0, b)
  after = _suffix(gc, 3, exclusive=True)
  out_of = _exp_where(_suffix(st_count, 3, exclusive=True) == 0, after)
  whole = _suffix(gc, 3, exclusive=False)[..., 0]
  tot = _exp_where(st_count.sum(axis=3) == 0, whole)     # [B, H, NC]
  doc = jnp.cumsum(starts.astype(jnp.int32), axis=1).astype(_F32)
  doc = jnp.broadcast_to(doc.reshape(batch, 1, nc, CHUNK), gc.shape)
  vec = jnp.stack([b, into, out_of, lax.stop_gradient(doc)], axis=-2)
  return vec, tot


def _pad_time(x, padded):
  """Zeros after the sequence up to ``padded`` tokens (padded tokens have k = v = 0 and
  g = 0, so they leave the state alone; their outputs are dropped)."""
  if x.shape[1] == padded:
    return x
  return jnp.pad(x, ((0, 0), (0, padded - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _pad_and_starts(arrays, segment_ids):
  """``arrays`` (``[B, T, ...]``) zero-padded to whole chunks, and the document starts
  ``[B, T_padded]`` (None without ``segment_ids``; the ids' last value continues over the
  padding). Returns ``(padded arrays, padded length, starts)``."""
  batch, length = arrays[0].shape[:2]
  padded = -(-length // CHUNK) * CHUNK
  starts = None
  if segment_ids is not None:
    ids = jnp.pad(jnp.asarray(segment_ids), ((0, 0), (0, padded - length)), mode="edge")
    starts = jnp.zeros((batch, padded), bool).at[:, 1:].set(ids[:, 1:] != ids[:, :-1])
  return tuple(_pad_time(x, padded) for x in arrays), padded, starts


# Jitted on its own so that an eager call (the interpreter's tests run op by op) does not
# dispatch its dozens of small ops one at a time; inside an outer jit it is inlined.
_gate_factors = jax.jit(gate_factors)


def _check(q, k, v, g, scale, initial_state, segment_ids, chunk_size):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V] with the same B, T, H; "
                     f"got {q.shape=}, {k.shape=}, {v.shape=}")
  if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must all be bfloat16 or all float16 (the GPU kernel's wgmma "
                     f"operands), got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.shape[-1] not in KEY_DIMS:
    raise ValueError(f"the key head dim must be one of {KEY_DIMS}, got {q.shape[-1]}")
  if v.shape[-1] not in VALUE_DIMS:
    raise ValueError(f"the value head dim must be one of {VALUE_DIMS}, got {v.shape[-1]}")
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
  (q, k, v, g), padded, starts = _pad_and_starts((q, k, v, g.astype(_F32)), segment_ids)
  pad = padded - length
  vec, tot = _gate_factors(g, starts)
  h0 = (jnp.zeros((batch, heads, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  static = _Static(float(scale), padded // CHUNK, kd, vd, bool(interpret))
  o, final = _chunked(static, q, k, v, vec, tot, h0)
  o = o[:, :length] if pad else o
  return o, (final if output_final_state else None)
