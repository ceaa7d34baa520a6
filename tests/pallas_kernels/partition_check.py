"""Run on 8 simulated CPU devices by test_partition.py: a kernel stand-in (GQA attention in
jnp) wrapped by ``batch_head_partitioned`` under ``jit``, inputs sharded over batch and
heads (no collective expected) and over the sequence (gathered first). Prints JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pallas_kernels.partition import batch_head_partitioned  # noqa: E402

SHARD_SHAPES = []


def attention(q, k, offsets):
  """Stand-in for a kernel launch: softmax attention with GQA, a replicated table."""
  SHARD_SHAPES.append((q.shape, k.shape))
  groups = q.shape[2] // k.shape[2]
  kk = jnp.repeat(k, groups, 2)
  s = jnp.einsum("btnh,bsnh->bnts", q, kk) + offsets[0]
  o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s), kk)
  return o, s.max(-1)


def main():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((4, 16, 8, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((4, 16, 4, 8)), jnp.float32)
  offsets = jnp.asarray(rng.standard_normal(3), jnp.float32)
  want_o, want_m = attention(q, k, offsets)
  fn = jax.jit(batch_head_partitioned(attention, [(0, 2), (0, 2), None], [(0, 2), (0, 1)]))
  out = {}
  for name, spec in (("batch_heads", P("data", None, "model")),
                     ("sequence", P(None, "data", "model"))):
    qs = jax.device_put(q, NamedSharding(mesh, spec))
    ks = jax.device_put(k, NamedSharding(mesh, P("data", None, "model")))
    SHARD_SHAPES.clear()
    o, m = fn(qs, ks, offsets)
    hlo = fn.lower(qs, ks, offsets).compile().as_text()
    out[name] = {
        "err_o": float(np.abs(np.asarray(o) - np.asarray(want_o)).max()),
        "err_m": float(np.abs(np.asarray(m) - np.asarray(want_m)).max()),
        "o_spec": str(o.sharding.spec), "m_spec": str(m.sharding.spec),
        "shard_shapes": [list(map(list, s)) for s in SHARD_SHAPES],
        "collectives": sum(hlo.count(c) for c in ("all-gather", "all-to-all",
                                                   "collective-permute", "all-reduce")),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
