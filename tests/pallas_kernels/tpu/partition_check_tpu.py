"""Run on 8 simulated CPU devices by test_flash_attention.py: the TPU flash attention under
``jit`` on inputs sharded over batch ('data', 2) and heads ('model', 4). Prints JSON.

* ``split``: interpret mode with the per-shard split forced (``fa._FORCE_PARTITION``; the
  interpreted kernels are plain HLO, which XLA would partition by itself), forward and
  backward against the same call on one device. GQA, a causal mask, sinks, ALiBi slopes,
  segment ids, lengths and a ``[B, N, T, S]`` bias: every kind of input the launches
  split. Each pass records the shapes it is traced with (the whole arrays once, for the
  output shapes, then one shard's in the partitioner); the compiled program of the
  forward and the q, k, v and bias gradients is searched for collectives.
* ``lanes``: the same at H = 128 (the ``[B, T, N * H]`` lane layout) with a bias shared
  by the heads ``[B, 1, T, S]``.
* ``hardware``: ``interpret=False``, nothing forced, lowered for TPU: with 8 devices each
  of the four launches is a custom-partitioning call, none a bare Mosaic call.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnlab.ops import masks  # noqa: E402
from pallas_kernels.tpu import flash_attention as fa  # noqa: E402

B, T, S, N, K = 2, 21, 27, 8, 4
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")
TRACED = {}


def _recording(name, fn):
  """``fn`` noting the shapes of q, k and the lengths, and the head counts, it is traced
  with."""
  def wrapped(cfg, q, k, *args):
    TRACED.setdefault(name, set()).add(
        (q.shape, k.shape, args[-2].shape, cfg.num_heads, cfg.num_kv))
    return fn(cfg, q, k, *args)
  return wrapped


for _name in ("_forward", "_dq_pass", "_dkv_pass", "_dbias_pass"):
  setattr(fa, _name, _recording(_name, getattr(fa, _name)))


def _inputs(rng, head_dim, bias_heads, full):
  """Differentiable inputs, the rest, and the output cotangent; ``full`` adds sinks,
  slopes and segment ids."""
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  bias = rng.standard_normal((B, bias_heads, T, S))
  bias[rng.random(bias.shape) < 0.05] = -np.inf
  diff = {"q": normal(B, T, N, head_dim), "k": normal(B, S, K, head_dim),
          "v": normal(B, S, K, head_dim), "bias": jnp.asarray(bias, jnp.float32)}
  data = {"q_lengths": jnp.asarray([T, 15], jnp.int32),
          "kv_lengths": jnp.asarray([S - 3, 20], jnp.int32)}
  if full:
    diff["sinks"] = normal(N)
    diff["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, N), jnp.float32)
    ids = np.cumsum(rng.random((B, S)) < 0.15, axis=1).astype(np.int32)
    data["q_segment_ids"], data["kv_segment_ids"] = jnp.asarray(ids[:, :T]), jnp.asarray(ids)
  return diff, data, normal(B, T, N, head_dim)


def _spec(name, x):
  if name in ("q", "k", "v", "dout"):
    return P("data", None, "model")
  if name == "bias":
    return P("data", "model" if x.shape[1] == N else None)
  return P("model") if name in ("sinks", "alibi_slopes") else P("data")


def _step(wrt, interpret=True):
  """``jit``: ``o`` and the gradients of the inputs named in ``wrt``."""
  def step(diff, data, dout):
    def attend(part):
      head_dim = diff["q"].shape[-1]
      return fa.flash_attention(
          **{**diff, **part}, **data, scale=head_dim ** -0.5, mask=masks.Causal(),
          # On hardware, blocks that do not cover the sequence must be multiples of 128.
          block_sizes=fa.BlockSizes(*[16] * 6) if interpret else None, interpret=interpret)
    o, vjp = jax.vjp(attend, {name: diff[name] for name in wrt})
    return o, vjp(dout)[0]
  return jax.jit(step)


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _sharded(mesh, diff, data, dout):
  put = lambda tree: {n: jax.device_put(x, NamedSharding(mesh, _spec(n, x)))  # noqa: E731
                      for n, x in tree.items()}
  return put(diff), put(data), put({"dout": dout})["dout"]


def _compare(mesh, diff, data, dout, local_only):
  """Errors of the forced split against one device, the traced shapes and, for the
  gradients in ``local_only`` (and the forward), the collectives of the compiled HLO."""
  fa._FORCE_PARTITION = False
  want_o, want_grads = _step(tuple(diff))(diff, data, dout)
  fa._FORCE_PARTITION = True
  TRACED.clear()
  args = _sharded(mesh, diff, data, dout)
  o, grads = _step(tuple(diff))(*args)
  hlo = _step(local_only).lower(*args).compile().as_text()
  fa._FORCE_PARTITION = False
  return {
      "errors": {"out": _rel(o, want_o), **{f"d{n}": _rel(grads[n], want_grads[n])
                                            for n in diff}},
      "o_spec": str(o.sharding.spec),
      "collectives": {c: hlo.count(c) for c in COLLECTIVES},
      "traced": {name: sorted(map(list, shapes), key=str) for name, shapes in TRACED.items()},
  }


def main():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  out = {}
  # The sink and slope gradients sum over the batch shards (an all-reduce is their due),
  # and a bias shared by the heads sums over the head shards; nothing else may cross.
  out["split"] = _compare(mesh, *_inputs(rng, 8, N, full=True), ("q", "k", "v", "bias"))
  out["lanes"] = _compare(mesh, *_inputs(rng, 128, 1, full=False), ("q", "k", "v"))
  args = _sharded(mesh, *_inputs(rng, 8, N, full=True))
  lowered = _step(("q", "k", "v", "bias"), interpret=False).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  out["hardware"] = {"partitioned": lowered.count("@CustomSPMDPartitioning("),
                     "mosaic": lowered.count("tpu_custom_call")}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
