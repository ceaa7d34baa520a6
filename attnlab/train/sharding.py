"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (``attnlab.layers.LOGICAL_AXES``); a short rules
table maps each name to a mesh axis (or None = replicated). The mesh has four axes:
``data`` (batch), ``fsdp`` (batch, and parameters sharded along ``embed``), ``tensor``
(heads and the MLP hidden dim) and ``sequence`` (the tokens of every sequence: the
mixers switch to ring attention and linear-attention state passing when it has more
than one device, see :mod:`attnlab.parallel.mesh_context`). A batch ``[B, T]`` is split
over ``(data, fsdp)`` along B and over ``sequence`` along T.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.parallel.mesh_context import BATCH_AXES, SEQUENCE_AXIS

MESH_AXES = ("data", "fsdp", "tensor", SEQUENCE_AXIS)

DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A ``(data, fsdp, tensor, sequence)`` mesh of ``shape``; its size must equal the
  device count. A shape of three entries has ``sequence`` 1."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(int(s) for s in shape)
  if len(shape) not in (3, 4) or any(s < 1 for s in shape):
    raise ValueError(f"mesh shape must be 3 or 4 positive ints for {MESH_AXES}, got "
                     f"{shape}")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} holds {int(np.prod(shape))} devices but "
                     f"{len(devices)} are available (config field: mesh_shape)")
  shape += (1,) * (len(MESH_AXES) - len(shape))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(names, rules: Mapping[str, str | None]) -> PartitionSpec:
  """The PartitionSpec of a parameter whose axes are named ``names``."""
  axes, used = [], set()
  for name in names:
    axis = rules.get(name) if name is not None else None
    # A mesh axis may shard only one dimension of an array.
    axes.append(axis if axis not in used else None)
    if axis is not None:
      used.add(axis)
  return PartitionSpec(*axes)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every leaf of an NNX state (Variables without names replicate)."""
  rules = dict(rules)

  def one(var):
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    spec = spec_for(names, rules) if names else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``[B, T, ...]`` arrays: B over the batch axes, T over ``sequence`` (if the mesh has
  it)."""
  tokens = SEQUENCE_AXIS if SEQUENCE_AXIS in mesh.axis_names else None
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, tokens))
