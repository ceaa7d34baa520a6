"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (``attnlab.layers.LOGICAL_AXES``); a short rules
table maps each name to a mesh axis (or None = replicated). The default mesh has three
axes: ``data`` (batch), ``fsdp`` (batch, and parameters sharded along ``embed``) and
``tensor`` (heads and the MLP hidden dim).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh of ``shape``; its size must equal the device count."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES) or any(s < 1 for s in shape):
    raise ValueError(f"mesh shape must be 3 positive ints for {MESH_AXES}, got {shape}")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} holds {int(np.prod(shape))} devices but "
                     f"{len(devices)} are available (config field: mesh_shape)")
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
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
