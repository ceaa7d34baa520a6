"""Kernel calls that XLA's SPMD partitioner splits over batch and heads.

A Mosaic custom call is opaque to XLA: under a multi-device ``jit`` XLA cannot partition
it. ``batch_head_partitioned`` wraps one kernel launch in ``custom_partitioning`` with the
rule every attention kernel here obeys: batch rows and heads are independent. When the
operands arrive sharded over batch and/or heads, each device runs the kernel on its own
shard (no collective); any other dimension the caller sharded (the sequence, the head
dim) is gathered first, and block tables are replicated.

Each array operand and result is described by ``(batch_dim, head_dim)`` (either may be
None) or None for "replicated" (block lists, lengths tables). Head dims of different
arrays (query heads ``N`` and key/value heads ``K`` under GQA) are sharded by the same
mesh axes, so their shard counts must divide both.
"""

from __future__ import annotations

import functools
import itertools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def _axes(spec, dim):
  if dim is None or spec is None or dim >= len(spec):
    return None
  return spec[dim]


def _spec(ndim, dims, batch_axes, head_axes):
  parts = [None] * ndim
  if dims is not None:
    b, h = dims
    if b is not None:
      parts[b] = batch_axes
    if h is not None:
      parts[h] = head_axes
  return PartitionSpec(*parts)


def _mesh_size(mesh, axes):
  if axes is None:
    return 1
  names = axes if isinstance(axes, tuple) else (axes,)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size


def _choose(mesh, arg_shapes, in_dims):
  """The batch and head mesh axes of the first described operand, dropped where they do
  not divide every operand's batch / head size."""
  lead = next(i for i, d in enumerate(in_dims) if d is not None)
  spec = getattr(arg_shapes[lead].sharding, "spec", None)
  batch_axes = _axes(spec, in_dims[lead][0])
  head_axes = _axes(spec, in_dims[lead][1])
  for shape, dims in zip(arg_shapes, in_dims):
    if dims is None:
      continue
    b, h = dims
    if b is not None and shape.shape[b] % _mesh_size(mesh, batch_axes):
      batch_axes = None
    if h is not None and shape.shape[h] % _mesh_size(mesh, head_axes):
      head_axes = None
  return batch_axes, head_axes


def _rule(in_ndims, in_dims, out_ndims, out_dims):
  """Shardy rule: shared factors ``b`` and ``n`` for batch and heads, one factor per
  other dimension (each needing replication)."""
  count = itertools.count()
  others = []

  def operand(ndim, dims):
    names = []
    for d in range(ndim):
      if dims is not None and d == dims[0]:
        names.append("b")
      elif dims is not None and d == dims[1]:
        names.append("n")
      else:
        name = f"x{next(count)}"  # any number of them (a kernel launch has many)
        others.append(name)
        names.append(name)
    return " ".join(names) if names else ""

  lhs = ", ".join(operand(n, d) for n, d in zip(in_ndims, in_dims))
  rhs = ", ".join(operand(n, d) for n, d in zip(out_ndims, out_dims))
  return f"{lhs} -> {rhs}", tuple(others)


def batch_head_partitioned(fn, in_dims, out_dims):
  """``fn(*arrays) -> tuple of arrays``, partitioned per shard over batch and heads.

  ``in_dims`` / ``out_dims``: one entry per operand / result, ``(batch_dim, head_dim)`` or
  None (replicated)."""
  in_dims, out_dims = tuple(in_dims), tuple(out_dims)

  @custom_partitioning
  def call(*args):
    return fn(*args)

  def shardings(mesh, arg_shapes):
    batch_axes, head_axes = _choose(mesh, arg_shapes, in_dims)
    def make(ndim, dims):
      return NamedSharding(mesh, _spec(ndim, dims, batch_axes, head_axes))
    return batch_axes, head_axes, make

  def infer(mesh, arg_shapes, result_shape):
    _, _, make = shardings(mesh, arg_shapes)
    return tuple(make(len(r.shape), d) for r, d in zip(result_shape, out_dims))

  def partition(mesh, arg_shapes, result_shape):
    _, _, make = shardings(mesh, arg_shapes)
    args = tuple(make(len(a.shape), d) for a, d in zip(arg_shapes, in_dims))
    results = tuple(make(len(r.shape), d) for r, d in zip(result_shape, out_dims))
    return mesh, fn, results, args

  def define(arg_ndims, out_ndims):
    text, others = _rule(arg_ndims, in_dims, out_ndims, out_dims)
    call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                       sharding_rule=text, need_replication_factors=others)

  @functools.wraps(fn)
  def wrapped(*args):
    out_shapes = jax.eval_shape(fn, *args)
    define([a.ndim for a in args], [len(o.shape) for o in out_shapes])
    return call(*args)

  return wrapped
