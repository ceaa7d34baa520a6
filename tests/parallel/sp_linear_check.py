"""Run as a script with 8 simulated CPU devices (see test_linear_state_passing.py): every
core linear op sharded over the sequence against the same op on one device.

Prints one JSON object: per case, the relative errors ``||x - ref|| / ||ref||`` of the
output, the final state and every gradient against the single-device op (``single``) and
the float64 oracle (``oracle``), and the collectives in the compiled HLO of the forward
(``hlo_forward``) and of the forward + backward (``hlo_backward``).
"""

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from attnlab import ops
from attnlab.ops.linear_attention import MECHANISMS
from attnlab.parallel import sequence_parallel
from tests import oracle_linear as oracle

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_cpu_enable_async_dispatch", False)  # as tests/conftest.py

BATCH, LENGTH, HEADS, KEY_DIM, VALUE_DIM = 2, 64, 2, 8, 8
SPAN = LENGTH // 8
CHUNK = 4   # two chunks per span, so resets fall inside chunks, on chunk and span edges
DELTA_OPS = ("delta_rule", "gated_delta_rule")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
               "all-to-all")

# Document starts (8 spans of 8 tokens). Row 0: on the span edge 8, inside span 1 at 13,
# a document 13..44 crossing the edges 16, 24, 32 and 40, one on the edge 48, a
# one-token document at 50. Row 1: inside span 0 at 3, a document 3..31 crossing three
# edges, one starting exactly on the edge 32 and running to the end (crossing 4 edges).
STARTS = ((8, 13, 45, 48, 50, 51), (3, 32))


def segment_ids():
  starts = np.zeros((BATCH, LENGTH), bool)
  for row, positions in enumerate(STARTS):
    starts[row, list(positions)] = True
  # Ids need not increase, only change where a document starts.
  return (np.cumsum(starts, axis=1) % 3 + 2).astype(np.int32)


def problem(op, rng, features):
  b, t, h, kd, vd = BATCH, LENGTH, HEADS, KEY_DIM, VALUE_DIM
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  diff = {"q": normal(b, t, h, kd)}
  k = rng.standard_normal((b, t, h, kd))
  if op in DELTA_OPS:   # stable without l2norm only for beta |k|^2 < 2
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  diff["k"] = jnp.asarray(k, jnp.float32)
  diff["v"] = normal(b, t, h, vd)
  if op in ("simple_gla", "gla", "gated_delta_rule"):
    shape = (b, t, h, kd) if op == "gla" else (b, t, h)
    diff["g"] = jnp.asarray(-rng.uniform(0.05, 0.5, shape), jnp.float32)
  if op == "retention" and "default_gamma" not in features:
    diff["g_gamma"] = jnp.asarray(-rng.uniform(0.05, 0.5, h), jnp.float32)
  if op in DELTA_OPS:
    diff["beta"] = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))),
                               jnp.float32)
  static = {"output_final_state": True, "chunk_size": CHUNK}
  if "normalize" in features:
    static.update(normalize=True, feature_map="elu_plus_one")
  if "l2norm" in features:
    static["use_qk_l2norm"] = True
  extra = 1 if "normalize" in features else 0
  diff["initial_state"] = normal(b, h, kd, vd + extra)
  cotangents = (normal(b, t, h, vd), normal(b, h, kd, vd + extra))
  return diff, static, cotangents


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def collectives(hlo_text):
  """Instructions per collective kind (an async ``-start``/``-done`` pair counts once),
  and the result shapes of the all-gathers (``f32[8,136]``)."""
  counts = {kind: len(re.findall(rf"\s{kind}(?:-start)?\(", hlo_text))
            for kind in COLLECTIVES}
  counts["all-gather shapes"] = re.findall(r"(\w+\[[\d,]*\])\S* all-gather(?:-start)?\(",
                                           hlo_text)
  return counts


def padded_spec(x):
  """The mesh axes of each dimension of ``x`` (a PartitionSpec omits trailing Nones)."""
  spec = tuple(x.sharding.spec)
  return list(spec + (None,) * (x.ndim - len(spec)))


def run_case(op, mesh, features=(), *, batch_axis=None, head_axis=None, seed=0):
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  diff, static, cotangents = problem(op, rng, features)
  ids = jnp.asarray(segment_ids())

  def forward_backward(fn):
    def f(diff, ids, cotangents):
      (o, final), vjp = jax.vjp(lambda d: fn(**d, segment_ids=ids, **static), diff)
      return o, final, vjp(cotangents)[0]
    return f

  sharded = sequence_parallel(op, mesh, "sequence", batch_axis=batch_axis,
                              head_axis=head_axis)
  forward = jax.jit(lambda d, ids: sharded(**d, segment_ids=ids, **static))
  hlo_forward = forward.lower(diff, ids).compile().as_text()
  compiled = jax.jit(forward_backward(sharded)).lower(diff, ids, cotangents).compile()
  o, final, grads = compiled(diff, ids, cotangents)
  o1, final1, grads1 = jax.jit(forward_backward(getattr(ops, op)))(diff, ids, cotangents)

  res = oracle.OPS[op](**{n: np.asarray(x, np.float64) for n, x in diff.items()},
                       **{n: x for n, x in static.items()
                          if n not in ("output_final_state", "chunk_size")},
                       segment_ids=np.asarray(ids), dout=np.asarray(cotangents[0]),
                       dfinal=np.asarray(cotangents[1]))
  single = {"out": rel_err(o, o1), "final_state": rel_err(final, final1)}
  single.update({f"grad_{n}": rel_err(grads[n], grads1[n]) for n in diff})
  vs_oracle = {"out": rel_err(o, res.out), "final_state": rel_err(final, res.final_state)}
  vs_oracle.update({f"grad_{n}": rel_err(grads[n], res.grads[n]) for n in diff})
  # What one device sends: its transition (K x K for the delta rules, its diagonal K
  # otherwise) and local state per batch row and head, and its first and last id per row.
  batch, heads = BATCH, HEADS
  state_cols = diff["initial_state"].shape[-1]
  transition = KEY_DIM * KEY_DIM if op in DELTA_OPS else KEY_DIM
  if batch_axis:
    batch //= mesh.shape[batch_axis]
  if head_axis:
    heads //= mesh.shape[head_axis]
  expected_gather = [mesh.shape["sequence"],
                     batch * heads * (transition + KEY_DIM * state_cols) + 2 * batch]
  return {"single": single, "oracle": vs_oracle, "expected_gather": expected_gather,
          "hlo_forward": collectives(hlo_forward),
          "hlo_backward": collectives(compiled.as_text()),
          "o_sharding": padded_spec(o), "final_sharding": padded_spec(final),
          "seconds": time.perf_counter() - start}


def errors_raised(mesh):
  """The messages of calls that must fail before any work."""
  fn = sequence_parallel("simple_gla", mesh)
  x = jnp.ones((1, 12, 1, 4))
  messages = {}
  for name, call in (("length", lambda: fn(x, x, x, jnp.zeros((1, 12, 1)))),
                     ("op", lambda: sequence_parallel("softmax", mesh)),
                     ("axis", lambda: sequence_parallel("gla", mesh, "time"))):
    try:
      call()
      messages[name] = None
    except ValueError as e:
      messages[name] = str(e)
  return messages


# (name, op, features, batch and head sharded). The options applied per token inside the
# op (normalize with a feature map, l2norm, the default gamma) each get one case; the
# last case also shards B and H ("data" 2 x "sequence" 2 x "heads" 2).
CASES = [(op, op, (), False) for op in MECHANISMS] + [
    ("linear_attn_normalize_elu", "linear_attn", ("normalize",), False),
    ("retention_default_gamma", "retention", ("default_gamma",), False),
    ("gated_delta_rule_l2norm_data2_seq2_heads2", "gated_delta_rule", ("l2norm",), True),
]


def main():
  assert len(jax.devices()) == 8, jax.devices()
  start = time.perf_counter()
  # jax.make_mesh gives explicit axes; the 2 x 2 x 2 mesh automatic ones (Mesh(...)).
  seq_mesh = jax.make_mesh((8,), ("sequence",))
  cube = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "sequence", "heads"))
  results = {}
  for seed, (name, op, features, sharded) in enumerate(CASES):
    axes = {"batch_axis": "data", "head_axis": "heads"} if sharded else {}
    results[name] = run_case(op, cube if sharded else seq_mesh, features, **axes, seed=seed)
  json.dump({"cases": results, "errors": errors_raised(seq_mesh),
             "seconds": time.perf_counter() - start}, sys.stdout)


if __name__ == "__main__":
  main()
