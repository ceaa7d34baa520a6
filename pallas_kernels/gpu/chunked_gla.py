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
factors folded into q and k, and it runs on the same walks:

* ``gla_scores.forward_call``, every chunk at once: ``b`` and ``a`` as exact range sums of
  the gates (float32 products with 0/1 matrices), ``q~``, ``k~`` and ``A``;
* the states walk of ``chunked_linear.py`` on ``k~`` with the per-channel ``e^G``;
* an output launch ``scale (q~ S + A v)``;
* backward: ``chunked_linear``'s state-gradient walk on ``q~`` (it also gives
  ``<S, dS>`` per channel, the gradient of ``e^G``), a gradient launch (``dq~ = scale dO
  S^T``, ``dk~ = v dS^T``, ``dv = scale A^T dO + k~ dS``, ``dA`` and, for the scores'
  pair-by-pair mode, ``dA^T``), then ``gla_scores.backward_call``: ``dq``, ``dk`` and the
  gates' gradient through ``A``, ``q~`` and ``k~``, again by exact range sums.

XLA computes only the chunks' totals ``G`` (a sum over the chunk), the document masks
and the scores' mode (``gla_scores.mode``: one launch-wide choice of how ``A`` splits its
decays, from the gates' magnitudes; compiled, all three are built and ``lax.switch``
runs one).

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


def _forward(static, mode_, q, k, v, g, vec, tot, h0):
  bsz, _, heads, _ = q.shape
  a, qt, kt = scores.forward_call(static, mode_, q, k, g, vec)
  states, final = base.states_call(static, kt, v, _walk_vec(static, bsz, heads), tot, h0)
  return _output_call(static, qt, v, states, a), final, a, states, qt, kt


def _backward(static, mode_, q, k, v, g, vec, tot, a, states, qt, kt, d_o, dfinal):
  bsz, _, heads, _ = q.shape
  dstates, dh0, dtot = base.dstates_call(static, qt, d_o, states,
                                         _walk_vec(static, bsz, heads), tot, dfinal)
  dqt, dkt, dv, *da = _grads_call(static, mode_, qt, kt, v, d_o, states, dstates, a)
  dq, dk, dg = scores.backward_call(static, mode_, q, k, g, vec, dqt, dkt, *da)
  return dq, dk, dv, dg, dtot.sum(0), dh0


_BTHD, _BH = (0, 2), (0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(static, mode_, q, k, v, g, vec, tot, h0):
  o, final, *_ = _fwd_impl(static, mode_, q, k, v, g, vec, tot, h0)
  return o, final


def _fwd_impl(static, mode_, *args):
  return base._shielded(static, functools.partial(_forward, static, mode_), args,
                        (_BTHD,) * 4 + (_BH,) * 3,
                        (_BTHD, _BH, _BH, _BH, _BTHD, _BTHD))


def _chunked_fwd(static, mode_, q, k, v, g, vec, tot, h0):
  o, final, a, states, qt, kt = _fwd_impl(static, mode_, q, k, v, g, vec, tot, h0)
  return (o, final), (q, k, v, g, vec, tot, a, states, qt, kt)


def _chunked_bwd(static, mode_, res, cotangents):
  d_o, dfinal = cotangents
  dq, dk, dv, dg, dtot, dh0 = base._shielded(
      static, functools.partial(_backward, static, mode_),
      res + (d_o.astype(res[0].dtype), dfinal.astype(_F32)),
      (_BTHD,) * 4 + (_BH,) * 4 + (_BTHD,) * 3 + (_BH,),
      (_BTHD,) * 4 + (_BH, _BH))
  return dq, dk, dv, dg, jnp.zeros_like(res[4]), dtot, dh0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------ chunk inputs


def chunk_inputs(g, starts):
  """The kernels' per-chunk inputs from log gates ``g [B, T, H, K]`` (``T`` a multiple of
  the chunk) and document starts ``[B, T]`` (None: one document per row): ``vec [B, H,
  T / C, 4, C]`` (rows: the document index, the masks of ``e^b`` and ``e^a`` -- zero for
  tokens whose document starts inside the chunk, and before its last start -- and zeros)
  and the chunks' decays ``e^G [B, H, T / C, K]`` (zero where a document starts inside).
  ``G`` is a sum of exactly the chunk's gates (so is its gradient); ``b`` and ``a`` are
  summed in the kernels."""
  batch, length, heads, kd = g.shape
  nc = length // CHUNK
  whole = g.astype(_F32).reshape(batch, nc, CHUNK, heads, kd).sum(axis=2)
  if starts is None:
    ones = jnp.ones((batch, nc, CHUNK), _F32)
    rows = [jnp.zeros_like(ones), ones, ones]
    tot = jnp.exp(whole)
  else:
    st = starts.reshape(batch, nc, CHUNK).astype(jnp.int32)
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1).astype(_F32).reshape(batch, nc, CHUNK)
    rows = [doc, (jnp.cumsum(st, axis=2) == 0).astype(_F32),
            (base._suffix(st, 2, exclusive=True) == 0).astype(_F32)]
    tot = base._exp_where((st.sum(axis=2) == 0)[..., None, None], whole)
  vec = jnp.stack(rows + [jnp.zeros_like(rows[0])], axis=2)         # [B, NC, 4, C]
  vec = jnp.broadcast_to(vec[:, None], (batch, heads, nc, 4, CHUNK))
  return lax.stop_gradient(vec), tot.transpose(0, 2, 1, 3)


_chunk_inputs = jax.jit(chunk_inputs)


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
  (q, k, v, g), padded, starts = base._pad_and_starts((q, k, v, g.astype(_F32)),
                                                      segment_ids)
  pad = padded - length
  vec, tot = _chunk_inputs(g, starts)
  h0 = (jnp.zeros((batch, heads, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  static = base._Static(float(scale), padded // CHUNK, kd, vd, bool(interpret))
  args = (q, k, v, g, vec, tot, h0)
  mode_ = scores.mode(lax.stop_gradient(g), q.dtype)
  try:
    mode_ = int(mode_)        # eager (the interpreter's tests): run that mode only
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    mode_ = None
  if mode_ is None:           # traced: every mode compiled, one run
    o, final = lax.switch(scores.mode(lax.stop_gradient(g), q.dtype),
                          [functools.partial(_chunked, static, m) for m in scores.MODES],
                          *args)
  else:
    o, final = _chunked(static, mode_, *args)
  o = o[:, :length] if pad else o
  return o, (final if output_final_state else None)
