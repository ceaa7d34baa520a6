"""Chunked GLA (a gate per key channel) for Hopper GPUs in Mosaic GPU: forward and
backward.

GLA (Yang et al. 2023) per head, with a float32 state ``S [K, V]``::

    S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T        o_t = scale q_t^T S_t

Same contract as ``pallas_kernels/tpu/chunked_linear.py``'s ``gla`` (this module does
not import attnlab). Chunks of ``C = 64`` tokens; inside a chunk, with ``b [C, K]`` the
gates summed from the chunk's start, ``e^b`` ("into", zero for
tokens whose document starts inside the chunk), ``e^a`` (the gates after each token,
"out of", zero before the chunk's last document start) and ``e^G`` (the whole chunk, per
channel; zero when a document starts in it)::

    o  = scale (q~ S + A v)          q~ = q * e^b,   A = gla_scores.forward_call(q, k, b)
    S' = diag(e^G) S + k~^T v        k~ = k * e^a

So GLA is simple GLA's chunk with the pair decay moved into ``A`` and the per-token
factors folded into q and k, and it runs on the same launches:

* ``A`` for every chunk at once (``gla_scores.py``);
* the states walk of ``chunked_linear.py`` on ``k~`` with the per-channel ``e^G``;
* an output launch ``scale (q~ S + A v)``;
* backward: ``chunked_linear``'s state-gradient walk on ``q~`` (it also gives
  ``<S, dS>`` per channel, the gradient of ``e^G``), a gradient launch (``dq~ = scale dO
  S^T``, ``dk~ = v dS^T``, ``dv = scale A^T dO + k~ dS``, ``dA`` and ``dA^T``), then
  ``gla_scores.backward_call`` (``dq``, ``dk`` and ``db`` through ``A``).

The factors are sums of gates over exact ranges computed in XLA (float32 products with
0/1 matrices; segmented scans where documents start), and their gradients come from JAX's
autodiff.

Inputs bfloat16 or float16; ``K`` and ``V`` 64 or 128. Runs on an H100/H200 and, slowly,
on CPU in the Mosaic GPU interpreter of jax 0.10.2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import chunked_linear as base
from pallas_kernels.gpu import gla_scores as scores
from pallas_kernels.gpu import tiles

# pylint: disable=protected-access
CHUNK = base.CHUNK
_F32 = jnp.float32
_SQUARE = (CHUNK, CHUNK)


# --------------------------------------------------------------------------- kernels


def _output_kernel(static, refs, scratch):
  """One chunk's output: ``scale (q~ S + A v)``."""
  q_s, v_s, h_s, a_s, o_s, bar = scratch
  interp = static.interpret
  c, head, batch = base._chunk_position()
  rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
  base._copy_in([(refs["q"].at[rows], q_s), (refs["v"].at[rows], v_s),
                 (refs["states"].at[batch, head, c], h_s),
                 (refs["a"].at[batch, head, c], a_s)], bar)
  plgpu.barrier_wait(bar)
  o = tiles.matmul(q_s, h_s, (CHUNK, static.value_dim), interp)
  o = tiles.matmul_add(o, a_s, v_s, interp)
  o_s[...] = (o * static.scale).astype(o_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, refs["o"].at[rows])
  plgpu.wait_smem_to_gmem(0)


def _grads_kernel(static, refs, scratch):
  """One chunk's ``dq~``, ``dk~`` (float32), ``dv``, ``dA`` and ``dA^T``."""
  q_s, k_s, v_s, do_s, hc_s, dh_s, a_s, sq_s, dv_s, bar = scratch
  interp, scale = static.interpret, static.scale
  c, head, batch = base._chunk_position()
  rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
  tile_k, tile_v = (CHUNK, static.key_dim), (CHUNK, static.value_dim)
  base._copy_in([(refs["q"].at[rows], q_s), (refs["k"].at[rows], k_s),
                 (refs["v"].at[rows], v_s), (refs["do"].at[rows], do_s),
                 (refs["states"].at[batch, head, c], hc_s),
                 (refs["dstates"].at[batch, head, c], dh_s),
                 (refs["a"].at[batch, head, c], a_s)], bar)
  plgpu.barrier_wait(bar)
  for name, lhs, rhs in (("da", do_s, v_s), ("dat", v_s, do_s))[:1 + ("dat" in refs)]:
    d = tiles.matmul(lhs, rhs, _SQUARE, interp, transpose_b=True)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    sq_s[...] = (d * scale).astype(sq_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sq_s, refs[name].at[batch, head, c])
  dv = tiles.matmul(a_s, do_s, tile_v, interp, transpose_a=True) * scale
  dv = tiles.matmul_add(dv, k_s, dh_s, interp)
  dv_s[...] = dv.astype(dv_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dv_s, refs["dv"].at[rows])
  dq = tiles.matmul(do_s, hc_s, tile_k, interp, transpose_b=True) * scale
  base._stage_out(static, dq, refs["dq"].at[rows])
  dk = tiles.matmul(v_s, dh_s, tile_k, interp, transpose_b=True)
  base._stage_out(static, dk, refs["dk"].at[rows])
  plgpu.wait_smem_to_gmem(0)


def _output_call(static, qt, v, states, a):
  b, tp, heads, kd = qt.shape
  vd, dtype = static.value_dim, qt.dtype
  (o,) = base._parallel(
      static, _output_kernel, dict(q=qt, v=v, states=states, a=a),
      dict(o=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype)),
      (tiles.swizzled((CHUNK, kd), dtype), tiles.swizzled((CHUNK, vd), dtype),
       tiles.swizzled((kd, vd), dtype), tiles.swizzled(_SQUARE, dtype),
       tiles.swizzled((CHUNK, vd), dtype), plgpu.Barrier(num_arrivals=4)), b, heads)
  return o


def _grads_call(static, mode_, qt, kt, v, d_o, states, dstates, a):
  """``dq~``, ``dk~`` (float32), ``dv``, ``dA`` and, for the scores' PAIRS mode only,
  ``dA^T``."""
  b, tp, heads, kd = qt.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, qt.dtype
  one = lambda shape: tiles.swizzled(shape, dtype)
  square = jax.ShapeDtypeStruct((b, heads, nc, CHUNK, CHUNK), dtype)
  transposed = dict(dat=square) if mode_ == scores.PAIRS else {}
  return base._parallel(
      static, _grads_kernel,
      dict(q=qt, k=kt, v=v, do=d_o, states=states, dstates=dstates, a=a),
      dict(dq=jax.ShapeDtypeStruct((b, tp, heads, kd), _F32),
           dk=jax.ShapeDtypeStruct((b, tp, heads, kd), _F32),
           dv=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype), da=square, **transposed),
      (one((CHUNK, kd)), one((CHUNK, kd)), one((CHUNK, vd)), one((CHUNK, vd)),
       one((kd, vd)), one((kd, vd)), one(_SQUARE), one(_SQUARE), one((CHUNK, vd)),
       plgpu.Barrier(num_arrivals=7)), b, heads)


# -------------------------------------------------------------------------- launches


def _walk_vec(static, b, heads):
  """The walks' factor rows: ``e^a`` and ``e^b`` are folded into k~ and q~, so ones."""
  return jnp.ones((b, heads, static.num_chunks, 4, CHUNK), _F32)


def _scaled(x, factor):
  return (x.astype(_F32) * factor).astype(x.dtype)


def _forward(static, mode_, q, k, v, b, doc, into, out_of, tot, h0):
  bsz, _, heads, _ = q.shape
  qt, kt = _scaled(q, into), _scaled(k, out_of)
  a = scores.forward_call(static, mode_, q, k, b, doc)
  states, final = base.states_call(static, kt, v, _walk_vec(static, bsz, heads), tot, h0)
  return _output_call(static, qt, v, states, a), final, a, states, qt, kt


def _backward(static, mode_, q, k, v, b, doc, into, out_of, tot, a, states, qt, kt, d_o,
              dfinal):
  bsz, _, heads, _ = q.shape
  dstates, dh0, dtot = base.dstates_call(static, qt, d_o, states,
                                         _walk_vec(static, bsz, heads), tot, dfinal)
  dqt, dkt, dv, *da = _grads_call(static, mode_, qt, kt, v, d_o, states, dstates, a)
  dq, dk, db = scores.backward_call(static, mode_, q, k, b, doc, *da)
  return (dq + dqt * into, dk + dkt * out_of, dv, db, dqt * q.astype(_F32),
          dkt * k.astype(_F32), dtot.sum(0), dh0)


_BTHD, _BH = (0, 2), (0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(static, mode_, q, k, v, b, doc, into, out_of, tot, h0):
  o, final, *_ = _fwd_impl(static, mode_, q, k, v, b, doc, into, out_of, tot, h0)
  return o, final


def _fwd_impl(static, mode_, *args):
  return base._shielded(static, functools.partial(_forward, static, mode_), args,
                        (_BTHD, _BTHD, _BTHD, _BTHD, _BH, _BTHD, _BTHD, _BH, _BH),
                        (_BTHD, _BH, _BH, _BH, _BTHD, _BTHD))


def _chunked_fwd(static, mode_, q, k, v, b, doc, into, out_of, tot, h0):
  o, final, a, states, qt, kt = _fwd_impl(static, mode_, q, k, v, b, doc, into, out_of,
                                          tot, h0)
  return (o, final), (q, k, v, b, doc, into, out_of, tot, a, states, qt, kt)


def _chunked_bwd(static, mode_, res, cotangents):
  q, k, v, b, doc, into, out_of, tot, a, states, qt, kt = res
  d_o, dfinal = cotangents
  dq, dk, dv, db, dinto, dout_of, dtot, dh0 = base._shielded(
      static, functools.partial(_backward, static, mode_),
      res + (d_o.astype(q.dtype), dfinal.astype(_F32)),
      (_BTHD,) * 4 + (_BH,) + (_BTHD,) * 2 + (_BH,) * 3 + (_BTHD,) * 3 + (_BH,),
      (_BTHD,) * 6 + (_BH, _BH))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv, db, jnp.zeros_like(doc), dinto,
          dout_of, dtot, dh0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------------- factors


def _range_sums(gc, upper):
  """Sums of ``gc [B, NC, C, H, K]`` over the chunk axis against the 0/1 matrix ``upper``
  (``[C, C]``, row ``t`` selecting the range of ``t``): a float32 matrix product, so every
  sum holds exactly the gates of its range (and so does its gradient)."""
  return jnp.einsum("ts,bnshk->bnthk", upper.astype(_F32), gc,
                    precision=lax.Precision.HIGHEST)


def channel_factors(g, starts):
  """From log gates ``g [B, T, H, K]`` (``T`` a multiple of the chunk) and document starts
  ``[B, T]`` (None: one document per row): the in-chunk sums ``b`` for the scores (plain
  sums from the chunk's start: a pair of one document decays by the gates between its
  tokens either way, and pairs across documents are masked), ``e^b`` into the chunk and
  ``e^a`` out of it ``[B, T, H, K]`` (zero across document starts), the chunks' ``e^G
  [B, H, T / C, K]`` and the document index ``[B, H, T / C, C]``; every exponent a sum of
  exactly the gates of its range."""
  batch, length, heads, kd = g.shape
  nc = length // CHUNK
  gc = g.astype(_F32).reshape(batch, nc, CHUNK, heads, kd)
  t = jnp.arange(CHUNK)
  b = _range_sums(gc, t[:, None] >= t[None, :])
  if starts is None:
    into = jnp.exp(b)
    out_of = jnp.exp(_range_sums(gc, t[None, :] > t[:, None]))
    tot = jnp.exp(gc.sum(axis=2))
    doc = jnp.zeros((batch, heads, nc, CHUNK), _F32)
  else:
    st = jnp.broadcast_to(starts.reshape(batch, nc, CHUNK, 1, 1), gc.shape)
    st_count = st.astype(jnp.int32)
    seg = base._segmented_prefix(st, jnp.where(st, 0.0, gc), 2)
    into = base._exp_where(jnp.cumsum(st_count, axis=2) == 0, seg)
    out_of = base._exp_where(base._suffix(st_count, 2, exclusive=True) == 0,
                             base._suffix(gc, 2, exclusive=True))
    tot = base._exp_where(st_count.sum(axis=2) == 0,
                          base._suffix(gc, 2, exclusive=False)[:, :, 0])
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1).astype(_F32)
    doc = jnp.broadcast_to(doc.reshape(batch, 1, nc, CHUNK), (batch, heads, nc, CHUNK))
  flat = lambda x: x.reshape(batch, length, heads, kd)
  return flat(b), flat(into), flat(out_of), tot.transpose(0, 2, 1, 3), doc


_channel_factors = jax.jit(channel_factors)


def gla(q, k, v, g, *, scale, initial_state=None, output_final_state=False,
        segment_ids=None, chunk_size=CHUNK, interpret=False):
  """GLA as Mosaic GPU kernels.

  Args:
    q, k: ``[B, T, H, K]`` (K = 64 or 128); v: ``[B, T, H, V]`` (V = 64 or 128); all
      bfloat16 or all float16.
    g: ``[B, T, H, K]`` float log gates (<= 0), one per key channel.
    scale, initial_state, output_final_state, segment_ids, chunk_size, interpret: as
      ``chunked_linear.simple_gla``.

  Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None)``.
  """
  if getattr(g, "shape", None) != q.shape:
    raise ValueError(f"g must be [B, T, H, K] = {q.shape} (one gate per key channel), "
                     f"got {getattr(g, 'shape', g)}")
  base._check(q, k, v, g[..., 0], scale, initial_state, segment_ids, chunk_size)
  batch, length, heads, kd = q.shape
  vd = v.shape[-1]
  padded = -(-length // CHUNK) * CHUNK
  pad = padded - length
  q, k, v, g = (base._pad_time(x, padded) for x in (q, k, v, g.astype(_F32)))
  starts = None
  if segment_ids is not None:
    ids = jnp.pad(jnp.asarray(segment_ids), ((0, 0), (0, pad)), mode="edge")
    starts = jnp.zeros((batch, padded), bool).at[:, 1:].set(ids[:, 1:] != ids[:, :-1])
  b, into, out_of, tot, doc = _channel_factors(g, starts)
  h0 = (jnp.zeros((batch, heads, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  static = base._Static(float(scale), padded // CHUNK, kd, vd, bool(interpret))
  args = (q, k, v, b, lax.stop_gradient(doc), into, out_of, tot, h0)
  mode_ = scores.mode(lax.stop_gradient(b), q.dtype)
  try:
    mode_ = int(mode_)        # eager (the interpreter's tests): run that mode only
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    mode_ = None
  if mode_ is None:           # traced: every mode compiled, one run
    o, final = lax.switch(scores.mode(lax.stop_gradient(b), q.dtype),
                          [functools.partial(_chunked, static, m) for m in scores.MODES],
                          *args)
  else:
    o, final = _chunked(static, mode_, *args)
  o = o[:, :length] if pad else o
  return o, (final if output_final_state else None)
