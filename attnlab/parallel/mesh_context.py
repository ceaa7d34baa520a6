"""The mesh the layers shard the sequence over: the one in effect (``jax.set_mesh``).

A model is built once and learns of sequence parallelism at call time, from jax's mesh
context: under ``with jax.set_mesh(mesh):`` where ``mesh`` has a ``sequence`` axis of
more than one device, the softmax mixer runs ring attention and the linear mixers run
their op by state passing, each sharded over that axis; with no such mesh (one device,
or ``sequence`` of size 1) they run the plain op. Nothing is read from the environment.
``attnlab.train`` sets its ``(data, fsdp, tensor, sequence)`` mesh around every step.

Inside the sharded call the batch goes over the mesh's ``data`` / ``fsdp`` axes and the
heads over ``tensor`` (the train rules' axes for batch and heads) wherever they divide
evenly; an axis that does not divide is left out (the call is then replicated over it,
still correct).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

SEQUENCE_AXIS = "sequence"
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def sequence_mesh(axis_name: str = SEQUENCE_AXIS):
  """The mesh in effect (abstract under ``jit``) if its ``axis_name`` axis has more than
  one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names or mesh.shape[axis_name] < 2:
    return None
  return mesh


def batch_axes(mesh, batch: int):
  """The batch axes of ``mesh`` that together divide ``batch`` (a tuple, or None)."""
  axes, size = [], 1
  for axis in BATCH_AXES:
    n = mesh.shape[axis] if axis in mesh.axis_names else 1
    if n > 1 and batch % (size * n) == 0:
      axes.append(axis)
      size *= n
  return tuple(axes) or None


def head_axis(mesh, *head_counts: int):
  """``tensor`` if it is an axis of ``mesh`` that divides every count of heads, else None."""
  if HEAD_AXIS not in mesh.axis_names or mesh.shape[HEAD_AXIS] < 2:
    return None
  return HEAD_AXIS if all(n % mesh.shape[HEAD_AXIS] == 0 for n in head_counts) else None


def shard_tokens(x, axis_name: str = SEQUENCE_AXIS):
  """``x [B, T, ...]`` constrained to batch over the batch axes and T over ``axis_name``
  when a sequence mesh is in effect (the identity otherwise): the residual stream between
  the sequence-sharded mixers stays sharded the same way."""
  mesh = sequence_mesh(axis_name)
  if mesh is None or x.shape[1] % mesh.shape[axis_name]:
    return x
  spec = PartitionSpec(batch_axes(mesh, x.shape[0]), axis_name)
  return jax.lax.with_sharding_constraint(x, spec)
