"""In-kernel helpers shared by the Mosaic GPU kernels: shared-memory tiles for wgmma,
register layouts, and matrix products that also run in the Mosaic GPU interpreter.

The interpreter of jax 0.10.2 has no register layouts, no ``layout_cast`` and no
transposed wgmma operands, so every helper takes ``interpret`` and, when it is set, does
the same arithmetic with ``jnp`` (float32 accumulation) instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def swizzled(shape, dtype, swizzle=128):
  """Shared memory for a wgmma operand or a TMA-staged tile: rows of ``swizzle`` bytes
  (128: 64 values of 16 bits, 32 of 32 bits), swizzled. A product whose other operand is
  in registers takes ``swizzle // itemsize`` rows of this one per step (K = 16 of 16
  bits needs ``swizzle=32``)."""
  width = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, width)),
                                              plgpu.SwizzleTransform(swizzle)))


def cast(x, layout, interpret):
  """Fix the register layout of ``x`` (the interpreter has no layouts)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def load(ref, layout, interpret, optimized=True):
  """A shared-memory vector or tile into registers in ``layout`` (``optimized=False``
  for an untiled float32 tile, which the vectorised path does not take)."""
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=optimized)


def zeros(shape, interpret):
  return cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, interpret)


def full_rows(n, value, interpret):
  return cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)


def iota(shape, dim, interpret):
  return cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, interpret)


def rows(vector, shape):
  """A per-row vector (``Layout.WGMMA.reduce(1)``) broadcast over the columns."""
  return lax.broadcast_in_dim(vector, shape, [0])


def cols(vector, shape):
  """A per-column vector (``Layout.WGMMA.reduce(0)``) broadcast over the rows."""
  return lax.broadcast_in_dim(vector, shape, [1])


def high(x, dtype, interpret):
  """``x`` (float32) rounded to ``dtype``: ``(in dtype, as float32)``. The interpreter's
  arrays go through XLA, whose excess-precision rule may drop a float32 -> 16-bit ->
  float32 round trip, so there the value is cut with a bit mask; compiled, it is
  rounded."""
  if interpret:
    mask = 0xFFFF0000 if jnp.dtype(dtype) == jnp.bfloat16 else 0xFFFFE000
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(mask)
    out = lax.bitcast_convert_type(bits, jnp.float32)
    return out.astype(dtype), out
  out = x.astype(dtype)
  return out, out.astype(jnp.float32)


def split(x, dtype, interpret):
  """``x`` (float32) as ``high + low`` in ``dtype`` (16-bit products of float32 tiles:
  about 16 significant bits with bfloat16)."""
  hi, hi32 = high(x, dtype, interpret)
  return hi, (x - hi32).astype(dtype)


def _value(x, transpose):
  x = x if isinstance(x, jax.Array) else x[...]
  return x.T if transpose else x


def matmul(a, b, shape, interpret, transpose_b=False, after_issue=None, transpose_a=False):
  """``a @ b`` into a fresh float32 accumulator of ``shape`` (``transpose_a`` /
  ``transpose_b``: multiply by the transposed shared-memory tile).

  ``a`` is a shared-memory ref or a register array, ``b`` a shared-memory ref."""
  if interpret:
    out = jnp.dot(_value(a, transpose_a), _value(b, transpose_b),
                  preferred_element_type=jnp.float32)
    if after_issue is not None:
      after_issue()
    return out
  a = plgpu.transpose_ref(a, (1, 0)) if transpose_a else a
  b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b
  def body(acc):
    plgpu.wgmma(acc, a, b)
    if after_issue is not None:
      after_issue()  # runs while the product is in flight
    return acc[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def matmul_add(acc, a, b, interpret, transpose_b=False, transpose_a=False):
  """``acc + a @ b``, accumulated in place by the tensor cores (the interpreter adds a
  fresh product)."""
  if interpret:
    return acc + matmul(a, b, acc.shape, interpret, transpose_b, transpose_a=transpose_a)
  a = plgpu.transpose_ref(a, (1, 0)) if transpose_a else a
  b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def matmul_pair(first, second, interpret):
  """Two products issued together and waited for once. Each entry is
  ``(acc_or_shape, a, b, transpose_b)``: a tuple shape starts a fresh accumulator, an
  array accumulates into it. Returns the two results (``products`` with one term each)."""
  return products([(x, [(a, b, False, t)]) for x, a, b, t in (first, second)], interpret)


def products(terms, interpret):
  """Several accumulators, each ``acc + sum(a @ b)``, issued together and waited for
  once. ``terms`` is a list of ``(acc_or_shape, [(a, b, transpose_a, transpose_b),
  ...])``: a tuple shape starts a fresh accumulator, an array accumulates into it; ``a``
  is a shared-memory ref or (untransposed) a register array, ``b`` a shared-memory ref.
  Returns the accumulators in order."""
  if interpret:
    outs = []
    for acc, pairs in terms:
      out = jnp.zeros(acc, jnp.float32) if isinstance(acc, tuple) else acc
      for a, b, ta, tb in pairs:
        out = out + jnp.dot(_value(a, ta), _value(b, tb), preferred_element_type=jnp.float32)
      outs.append(out)
    return tuple(outs)
  accs = tuple(plgpu.ACC.init(zeros(acc, False) if isinstance(acc, tuple) else acc)
               for acc, _ in terms)

  def body(refs):
    for ref, (_, pairs) in zip(refs, terms):
      for a, b, ta, tb in pairs:
        plgpu.wgmma(ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                    plgpu.transpose_ref(b, (1, 0)) if tb else b)

  return pl.run_state(body)(accs)


def produce_ring(load, count, stages, free_barriers):
  """The producer's loop: fill the ring, refill each slot once its consumers free it, and
  finally wait for the last frees too, so that every barrier phase is observed by every
  thread that uses the barrier (the interpreter checks this)."""
  stages = jnp.int32(stages)

  def wait_free(s):
    slot = lax.rem(s, stages)
    for bar in free_barriers:
      plgpu.barrier_wait(bar.at[slot])

  def fill(s, _):
    load(s)

  def refill(s, _):
    wait_free(s - stages)
    load(s)

  lax.fori_loop(0, jnp.minimum(count, stages), fill, None)
  lax.fori_loop(stages, count, refill, None)
  lax.fori_loop(jnp.maximum(count - stages, 0), count, lambda s, _: wait_free(s), None)
