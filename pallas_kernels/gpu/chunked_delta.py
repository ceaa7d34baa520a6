"""Chunked delta rule and gated delta rule for Hopper GPUs in Mosaic GPU: forward and
backward.

Gated DeltaNet (Yang et al. 2025) per head, with a float32 state ``S [K, V]``; DeltaNet
(Schlag et al. 2021; Yang et al. 2024) is ``g = 0``::

    S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      o_t = scale q_t^T S_t

Same contract as ``pallas_kernels/tpu/chunked_linear.py``'s ``delta_rule`` and
``gated_delta_rule`` (q and k normalized by the caller where the op asks for it).

Chunk form (Yang et al. 2024, §3, the "UT transform"). With ``S`` the state entering a
chunk of ``C = 64`` tokens, ``b`` the gates summed from the chunk's (or the document's)
start and ``D_ts = e^{b_t - b_s}`` (``s <= t``, same document), each token writes
``d_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t)``; unrolled over the chunk::

    (I + L) d = beta v - (beta e^b k) S          L_ts = beta_t D_ts k_t . k_s   (s < t)
    d = U + N S        U = (I + L)^{-1} beta v,   N = -(I + L)^{-1} (beta e^b k)
    o = scale ((q k^T) * D) d + scale diag(e^b) q S
    S' = e^{G} S + (diag(e^a) k)^T d

which is simple GLA's chunk (``chunked_linear.py``) with the values ``v`` replaced by the
corrections ``d``. So:

* UT transform, grid ``(T / C / cpc, H, B)`` (``chunked_ut.py``, ``cpc`` chunks per CTA
  with the next one's keys prefetched): ``P^T = (T diag(beta))^T`` (input dtype) and
  ``X = (I + L)^{-T}`` (float32, saved for the backward as two 16-bit halves) for every
  chunk at once, so ``U = P v`` and ``N = -P diag(e^b) k``: ``N`` is never written, the
  walks form ``N S = -P (diag(e^b) k S)`` from the keys they read anyway (memory traffic
  bounds these launches at the standard shapes). The gate factors ``e^b``, ``e^a``,
  ``e^G`` are shared with ``chunked_linear.py`` (XLA, gradients by autodiff).
* forward walk: a producer warpgroup copies each chunk's q, k, v, ``P^T`` into a ring
  of two slots; each consumer warpgroup carries ``S[:, 64 values]`` in float32 registers
  and per chunk forms ``d = P (v - diag(e^b) k S)``, the output
  ``o = scale (diag(e^b) q S + ((q k^T) * D) d)`` and the state update, saving the state
  entering every chunk and ``d`` (input dtype). Grid ``(H, B)`` with one consumer per
  value block when ``B H`` fills the GPU (q, k, P read once per head), else
  ``(V / 64, H, B)`` with one consumer; with few CTAs (e.g. B = 1), where the walk is
  bound by its chain rather than by memory, the UT forward also writes ``N`` and the walk
  reads it: ``d = P v + N S`` in one round of products.
* state gradients, grid ``(V / 64, H, B)``, a producer warpgroup as above: walks back
  with ``dS`` (the gradient of the state leaving the chunk) in registers:
  ``dd = scale ((k q^T) * D^T) dO + diag(e^a) k dS``, then
  ``dS <- e^{G} dS + scale q^T diag(e^b) dO + N^T dd`` with
  ``N^T dd = -k^T diag(e^b) (P^T dd)``; saves ``dS``.
* gradients: ``chunked_linear.grads_call`` with ``v = d`` gives dq, dk, the gate factors'
  gradients, ``<S, dS>`` per chunk (the gradient of ``e^G``) and ``dd`` (as "dv", a
  float32 tile handed over as two 16-bit halves: ``beta``'s gradient sums terms that
  cancel).
* UT transform's gradient, grid ``(T / C, H, B)`` (``chunked_ut.py``): from ``dU = dd`` and
  ``dN = dd S^T``, the gradients of k (added to the walk's), v, ``beta``, ``b`` and ``e^b``.

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
from pallas_kernels.gpu import chunked_ut as ut
from pallas_kernels.gpu import tiles

# The launch helpers, chunk factors and checks of the simple GLA kernels are shared.
# pylint: disable=protected-access
CHUNK = base.CHUNK
BLOCK_V = base.BLOCK_V
_F32 = jnp.float32
_TILE = base._TILE


def _walk_position():
  vb = lax.axis_index("vb")
  return base._vblock(vb), vb, lax.axis_index("head"), lax.axis_index("batch")


# --------------------------------------------------------------------------- forward


# Forward walks over whole heads (both 64-column value blocks in one CTA, one consumer
# warpgroup each, so q, k and P are read once per head) when there are at least this many
# (batch row, head) pairs; else one CTA per value block (twice the CTAs for small
# batches). ``True`` / ``False`` force one layout.
WIDE_WALK_MIN_HEADS = 128
WIDE_WALK = None


# The forward walk reads N (written by the UT forward) when it runs fewer CTAs than this,
# so that each chunk's chain is one product shorter (B = 1, T = 16384: 476 against 575 us
# on an H100); with more CTAs it is bound by memory traffic and forms N S from P and the
# keys instead. ``True`` / ``False`` force one way (not with the wide layout, whose shared
# memory has no room for N). The state-gradient walk always forms N^T dd from P (as fast
# at B = 1, faster at B = 4).
READ_N_BELOW_CTAS = 66
READ_N = None


def _reads_n(static, batch, heads):
  if _wide(static, batch, heads):
    return False
  if READ_N is not None:
    return bool(READ_N)
  return (static.value_dim // BLOCK_V) * heads * batch < READ_N_BELOW_CTAS


def _wide(static, batch, heads):
  if WIDE_WALK is not None:
    return bool(WIDE_WALK) and static.value_dim > BLOCK_V
  return static.value_dim > BLOCK_V and batch * heads >= WIDE_WALK_MIN_HEADS


def _store_state(h, h_s, dest, pending):
  """A walk's state (float32 registers) out through ``h_s`` in its dtype, once at most
  ``pending`` earlier copies are still reading shared memory: the copies a step issues
  after its state copy, so that the last step's state copy is out before ``h_s`` is
  overwritten (one more and the copy may read the next state: a race)."""
  plgpu.wait_smem_to_gmem(pending, wait_read_only=True)
  h_s[...] = h.astype(h_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_s, dest)


def _forward_walk_kernel(static, wide, refs, scratch):
  """The output, the state entering every chunk, the corrections ``d`` (input dtype) and
  the final state, walking the chunks in order. A producer warpgroup copies each chunk's
  tiles into a ring of two slots (copies issued by a computing warpgroup cost it about
  0.1 us each); one consumer warpgroup per 64-column value block carries its block of
  ``S`` in float32 registers and per chunk forms

      d = P (v - diag(e^b) k S)     o = scale (diag(e^b) q S + ((q k^T) * D) d)
      S <- e^G S + (diag(e^a) k)^T d

  (``N S = -P diag(e^b) k S``: ``N`` is not read, which saves a quarter of the walk's
  memory traffic, at one more dependent product per chunk. With an ``n`` input, for
  launches too small to be bound by traffic, ``d = P v + N S`` in one round instead.)
  """
  (q_s, k_s, v_s, pt_s, vec_s, vect_s, tot_s, h_s, r_s, d_s, dout_s, full,
   free, *n_s) = scratch
  interp, scale = static.interpret, static.scale
  nv = static.value_dim // BLOCK_V if wide else 1
  head, batch = lax.axis_index("head"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  dtype, nc = q_s.dtype, static.num_chunks

  def vcols(j):
    return base._vblock(j if wide else lax.axis_index("vb"))

  def load(c):
    slot = lax.rem(c, 2)
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    base._copy_in([(refs["q"].at[rows], q_s.at[slot]), (refs["k"].at[rows], k_s.at[slot]),
                   (refs["pt"].at[batch, head, c], pt_s.at[slot]),
                   (refs["vec"].at[batch, head, c], vec_s.at[slot]),
                   (refs["vec"].at[batch, head, c], vect_s.at[slot]),
                   (refs["tot"].at[batch, head, c], tot_s.at[slot])]
                  + [(refs["v"].at[rows + (vcols(j),)], v_s.at[slot * nv + j])
                     for j in range(nv)]
                  + ([(refs["n"].at[rows], n_s[0].at[slot])] if n_s else []), full.at[slot])

  def consume(j):
    cols = vcols(j)
    # (``wg`` is ``j`` here: a constant index on these tiles fails to lower in a product)
    hj_s, rj_s, dj_s, doutj_s = (x.at[wg] for x in (h_s, r_s, d_s, dout_s))

    def step(c, h):
      slot = lax.rem(c, 2)
      rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
      with jax.named_scope("fw_store"):   # (once the last step's states copy is out)
        _store_state(h, hj_s, refs["states"].at[batch, head, c, :, cols], 2)
      with jax.named_scope("fw_wait"):
        plgpu.barrier_wait(full.at[slot])
      x = base._vectors(static, vec_s.at[slot], vect_s.at[slot], tot=tot_s.at[slot])
      with jax.named_scope("fw_d"):
        if n_s:
          d, qs, scores = tiles.products([
              ((CHUNK, BLOCK_V), [(pt_s.at[slot], v_s.at[slot * nv + wg], True, False),
                                  (n_s[0].at[slot], hj_s, False, False)]),
              ((CHUNK, BLOCK_V), [(q_s.at[slot], hj_s, False, False)]),
              ((CHUNK, CHUNK), [(q_s.at[slot], k_s.at[slot], False, True)])], interp)
        else:
          ks, qs, scores = tiles.products([
              ((CHUNK, BLOCK_V), [(k_s.at[slot], hj_s, False, False)]),
              ((CHUNK, BLOCK_V), [(q_s.at[slot], hj_s, False, False)]),
              ((CHUNK, CHUNK), [(q_s.at[slot], k_s.at[slot], False, True)])], interp)
          vv = tiles.load(v_s.at[slot * nv + wg], _TILE, interp).astype(_F32)
          rj_s[...] = (vv - ks * tiles.rows(x["into"], ks.shape)).astype(dtype)
          plgpu.commit_smem()
          (d,) = tiles.products(
              [((CHUNK, BLOCK_V), [(pt_s.at[slot], rj_s, True, False)])], interp)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the last step's d and o copies
        dj_s[...] = d.astype(dtype)
        doutj_s[...] = (d * tiles.rows(x["out_of"], d.shape)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dj_s, refs["d"].at[rows + (cols,)])
      with jax.named_scope("fw_out"):
        decay, _ = base._pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"],
                                    False)
        a = (scores * decay * scale).astype(dtype)
        o = qs * tiles.rows(x["into"] * scale, qs.shape)
        h = h * tiles.rows(x["tot"], h.shape)
        o, h = tiles.products([(o, [(a, dj_s, False, False)]),
                               (h, [(k_s.at[slot], doutj_s, True, False)])], interp)
        plgpu.barrier_arrive(free.at[slot])
        doutj_s[...] = o.astype(dtype)                    # the output goes out through it
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(doutj_s, refs["o"].at[rows + (cols,)])
      return h

    if wide and not interp:
      plgpu.set_max_registers(232, action="increase")
    h0 = tiles.load(refs["h0"].at[batch, head, :, cols], _TILE, interp, optimized=False)
    h = lax.fori_loop(0, nc, step, h0)
    plgpu.wait_smem_to_gmem(0)
    refs["final"].at[batch, head, :, cols][...] = h

  for j in range(nv):
    pl.when(wg == j)(functools.partial(consume, j))

  @pl.when(wg == nv)
  def _produce():
    if not interp:
      plgpu.set_max_registers(40, action="decrease")
    tiles.produce_ring(load, nc, 2, (free,))


def _forward(static, q, k, v, pt, vec, tot, h0, n=None):
  """The forward walk (after the UT transform's launch; ``n``: read N)."""
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  wide = _wide(static, b, heads)
  nv = vd // BLOCK_V if wide else 1
  two = lambda shape, dt=dtype: tiles.swizzled((2,) + shape, dt)
  per = lambda shape: tiles.swizzled((nv,) + shape, dtype)
  grid, names = ((heads, b), ("head", "batch")) if wide else (
      (vd // BLOCK_V, heads, b), ("vb", "head", "batch"))
  return base._launch(
      static, lambda st, refs, scratch: _forward_walk_kernel(st, wide, refs, scratch),
      dict(q=q, k=k, v=v, pt=pt, vec=vec, tot=tot, h0=h0, **({} if n is None else {"n": n})),
      dict(o=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype),
           states=jax.ShapeDtypeStruct((b, heads, nc, kd, vd), dtype),
           d=jax.ShapeDtypeStruct((b, tp, heads, vd), dtype),
           final=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32)),
      (two((CHUNK, kd)), two((CHUNK, kd)),
       tiles.swizzled((2 * nv, CHUNK, BLOCK_V), dtype), two((CHUNK, CHUNK)),
       plgpu.SMEM((2, 4, CHUNK), _F32), plgpu.SMEM((2, 4, CHUNK), _F32),
       plgpu.SMEM((2, kd), _F32), per((kd, BLOCK_V)), per((CHUNK, BLOCK_V)),
       per((CHUNK, BLOCK_V)), per((CHUNK, BLOCK_V)),
       plgpu.Barrier(num_arrivals=6 + nv + (n is not None), num_barriers=2),
       plgpu.Barrier(num_arrivals=nv, num_barriers=2))
      + (() if n is None else (two((CHUNK, kd)),)),
      grid, names, threads=nv + 1)


# -------------------------------------------------------------------------- backward


def _dstates_kernel(static, refs, scratch):
  """The gradient of the state leaving every chunk, walking the chunks in reverse, and the
  initial state's gradient; a producer warpgroup issues the copies into a ring of two
  slots, as in the forward walk. ``N^T dd = -k^T diag(e^b) P^T dd``: ``N`` is not read.
  (``<S, dS>``, the gate's gradient, is formed by the gradient launch, which reads both.)"""
  (q_s, k_s, pt_s, do_s, vec_s, vect_s, tot_s, dh_s, doin_s, dd_s, y_s, full,
   free) = scratch
  interp, scale = static.interpret, static.scale
  cols, _, head, batch = _walk_position()
  dtype, nc = q_s.dtype, static.num_chunks
  wg = lax.axis_index("wg")

  def load(i):
    c, slot = nc - 1 - i, lax.rem(i, 2)
    rows = (batch, pl.ds(c * CHUNK, CHUNK), head)
    base._copy_in([(refs["q"].at[rows], q_s.at[slot]), (refs["k"].at[rows], k_s.at[slot]),
                   (refs["pt"].at[batch, head, c], pt_s.at[slot]),
                   (refs["do"].at[rows + (cols,)], do_s.at[slot]),
                   (refs["vec"].at[batch, head, c], vec_s.at[slot]),
                   (refs["vec"].at[batch, head, c], vect_s.at[slot]),
                   (refs["tot"].at[batch, head, c], tot_s.at[slot])], full.at[slot])

  def step(i, dh):
    c, slot = nc - 1 - i, lax.rem(i, 2)
    with jax.named_scope("dS_store"):     # (once the last step's dS copy is out: the
      # only copy a step issues, so none may still be pending)
      _store_state(dh, dh_s, refs["dstates"].at[batch, head, c, :, cols], 0)
    with jax.named_scope("dS_wait"):
      plgpu.barrier_wait(full.at[slot])
    x = base._vectors(static, vec_s.at[slot], vect_s.at[slot], tot=tot_s.at[slot])
    with jax.named_scope("dS_dd"):
      do = tiles.load(do_s.at[slot], _TILE, interp).astype(_F32)
      doin_s[...] = (do * tiles.rows(x["into"] * scale, do.shape)).astype(dtype)
      plgpu.commit_smem()
      kdh, scores_t = tiles.products([
          ((CHUNK, BLOCK_V), [(k_s.at[slot], dh_s, False, False)]),
          ((CHUNK, CHUNK), [(k_s.at[slot], q_s.at[slot], False, True)])], interp)
      decay_t, _ = base._pair_decay(static, x["b_row"], x["b_col"], x["d_row"], x["d_col"],
                                    True)
      at = (scores_t * decay_t * scale).astype(dtype)
      (dd,) = tiles.products([(kdh * tiles.rows(x["out_of"], kdh.shape),
                               [(at, do_s.at[slot], False, False)])], interp)
      dd_s[...] = dd.astype(dtype)
      plgpu.commit_smem()
    with jax.named_scope("dS_y"):
      (y,) = tiles.products([((CHUNK, BLOCK_V), [(pt_s.at[slot], dd_s, False, False)])],
                            interp)                     # P^T dd
      y_s[...] = (y * tiles.rows(-x["into"], y.shape)).astype(dtype)
      plgpu.commit_smem()
    with jax.named_scope("dS_next"):
      dh = dh * tiles.rows(x["tot"], dh.shape)
      (dh,) = tiles.products([(dh, [(q_s.at[slot], doin_s, True, False),
                                    (k_s.at[slot], y_s, True, False)])], interp)
      plgpu.barrier_arrive(free.at[slot])
    return dh

  @pl.when(wg == 0)
  def _compute():
    dfinal = tiles.load(refs["dfinal"].at[batch, head, :, cols], _TILE, interp,
                        optimized=False)
    dh = lax.fori_loop(0, nc, step, dfinal)
    plgpu.wait_smem_to_gmem(0)
    refs["dh0"].at[batch, head, :, cols][...] = dh

  @pl.when(wg == 1)
  def _produce():
    if not interp:
      plgpu.set_max_registers(40, action="decrease")
    tiles.produce_ring(load, nc, 2, (free,))


def _backward_call(static, q, k, pt, d_o, states, d, vec, tot, dfinal):
  b, tp, heads, kd = q.shape
  vd, nc, dtype = static.value_dim, static.num_chunks, q.dtype
  two = lambda shape, dt=dtype: tiles.swizzled((2,) + shape, dt)
  one = lambda shape, dt=dtype: tiles.swizzled(shape, dt)
  dstates, dh0 = base._launch(
      static, _dstates_kernel,
      dict(q=q, k=k, pt=pt, do=d_o, vec=vec, tot=tot, dfinal=dfinal),
      dict(dstates=jax.ShapeDtypeStruct((b, heads, nc, kd, vd), dtype),
           dh0=jax.ShapeDtypeStruct((b, heads, kd, vd), _F32)),
      (two((CHUNK, kd)), two((CHUNK, kd)), two((CHUNK, CHUNK)), two((CHUNK, BLOCK_V)),
       plgpu.SMEM((2, 4, CHUNK), _F32), plgpu.SMEM((2, 4, CHUNK), _F32),
       plgpu.SMEM((2, kd), _F32), one((kd, BLOCK_V)), one((CHUNK, BLOCK_V)),
       one((CHUNK, BLOCK_V)), one((CHUNK, BLOCK_V)),
       plgpu.Barrier(num_arrivals=7, num_barriers=2), plgpu.Barrier(num_barriers=2)),
      (vd // BLOCK_V, heads, b), ("vb", "head", "batch"), threads=2)
  dq, dk, dd, dvec, dtot = base.grads_call(static, q, k, d, d_o, states, dstates, vec,
                                           dv_split=True, with_dtot=True)
  return dq, dk, dd, dvec, dtot, dh0


# -------------------------------------------------------------------------- wrappers

_BTHD, _BH = (0, 2), (0, 1)


def _forward_all(static, q, k, v, beta, vec, tot, h0):
  read_n = _reads_n(static, q.shape[0], q.shape[2])
  pt, xt, *n = ut.forward_call(static, k, beta, vec, with_n=read_n)
  o, states, d, final = _forward(static, q, k, v, pt, vec, tot, h0, *n)
  return o, final, states, d, pt, xt


def _fwd_impl(static, q, k, v, beta, vec, tot, h0):
  return base._shielded(static, functools.partial(_forward_all, static),
                        (q, k, v, beta, vec, base._tot_lanes(static, tot), h0),
                        (_BTHD,) * 3 + (_BH,) * 4, (_BTHD, _BH, _BH, _BTHD, _BH, _BH))


def _backward_all(static, q, k, v, beta, pt, xt, d_o, states, d, vec, tot, dfinal):
  dq, dk, dd, dvec, dtot, dh0 = _backward_call(static, q, k, pt, d_o, states, d, vec, tot,
                                               dfinal)
  dk, dv, dvec_ut = ut.backward_call(static, k, v, beta, vec, xt, dd, states, dk)
  return dq, dk, dv, dvec, dvec_ut, dtot, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(static, q, k, v, beta, vec, tot, h0):
  o, final = _fwd_impl(static, q, k, v, beta, vec, tot, h0)[:2]
  return o, final


def _chunked_fwd(static, q, k, v, beta, vec, tot, h0):
  o, final, states, d, pt, xt = _fwd_impl(static, q, k, v, beta, vec, tot, h0)
  return (o, final), (q, k, v, beta, vec, tot, states, d, pt, xt)


def _chunked_bwd(static, res, cotangents):
  q, k, v, beta, vec, tot, states, d, pt, xt = res
  d_o, dfinal = cotangents
  dq, dk, dv, dvec, dvec_ut, dtot, dh0 = base._shielded(
      static, functools.partial(_backward_all, static),
      (q, k, v, beta, pt, xt, d_o.astype(q.dtype), states, d, vec,
       base._tot_lanes(static, tot), dfinal.astype(_F32)),
      (_BTHD,) * 3 + (_BH, _BH, _BH, _BTHD, _BH, _BTHD) + (_BH,) * 3,
      (_BTHD,) * 3 + (_BH, _BH, (1, 2), _BH))
  # vec rows: b, e^b (from the walks and the UT transform), e^a, document ids.
  dvec = jnp.stack([dvec[..., 0, :] + dvec_ut[..., 0, :], dvec[..., 1, :] + dvec_ut[..., 1, :],
                    dvec[..., 2, :], jnp.zeros_like(dvec[..., 2, :])], axis=-2)
  return dq, dk, dv, dvec_ut[..., 2, :], dvec, dtot.sum((0, -1)), dh0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None,
                     output_final_state=False, segment_ids=None, chunk_size=CHUNK,
                     interpret=False):
  """Gated delta rule (Gated DeltaNet) as Mosaic GPU kernels.

  Args:
    q, k: ``[B, T, H, K]`` (K = 64 or 128; normalized by the caller if wanted);
      v: ``[B, T, H, V]`` (V = 64 or 128); all bfloat16 or all float16.
    g: ``[B, T, H]`` float log gates (<= 0) or None (the delta rule);
      beta: ``[B, T, H]`` float write strengths.
    scale, initial_state, output_final_state, segment_ids, chunk_size, interpret: as
      ``chunked_linear.simple_gla``.

  Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None)``.
  """
  if g is None:
    g = jnp.zeros(q.shape[:3], _F32)
  base._check(q, k, v, g, scale, initial_state, segment_ids, chunk_size)
  if beta.shape != q.shape[:3]:
    raise ValueError(f"beta must be [B, T, H] = {q.shape[:3]}, got {beta.shape=}")
  batch, length, heads, kd = q.shape
  vd = v.shape[-1]
  (q, k, v, g, beta), padded, starts = base._pad_and_starts(
      (q, k, v, g.astype(_F32), beta.astype(_F32)), segment_ids)
  pad = padded - length
  vec, tot = base._gate_factors(g, starts)
  nc = padded // CHUNK
  beta = beta.reshape(batch, nc, CHUNK, heads).transpose(0, 3, 1, 2)   # [B, H, NC, C]
  h0 = (jnp.zeros((batch, heads, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  static = base._Static(float(scale), nc, kd, vd, bool(interpret))
  o, final = _chunked(static, q, k, v, beta, vec, tot, h0)
  o = o[:, :length] if pad else o
  return o, (final if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=CHUNK, interpret=False):
  """Delta rule (DeltaNet) as Mosaic GPU kernels: the gated kernels with ``g = 0``."""
  return gated_delta_rule(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, segment_ids=segment_ids,
                          chunk_size=chunk_size, interpret=interpret)
