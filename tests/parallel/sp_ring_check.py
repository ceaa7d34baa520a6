"""Run as a script with 8 simulated CPU devices (see test_ring_attention.py): ring and
Ulysses attention sharded over the sequence against ``dot_product_attention`` on one
device.

Prints one JSON object: per case, the relative errors ``||x - ref|| / ||ref||`` of the
output and of dq, dk, dv against the single-device op, NaN and zero-row checks, and the
collectives executed by the compiled HLO of the forward (``hlo_forward``, for the cases
of ``HLO_CASES``) and of the forward + backward (``hlo_backward``), each as
``{"kind shape": count}`` with loops unrolled by their known trip counts.
"""

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from attnlab.parallel.ring import layout_positions, ring_attention, ulysses_attention

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_cpu_enable_async_dispatch", False)  # as tests/conftest.py

BATCH, LENGTH, HEAD_DIM = 2, 64, 8
DEVICES = 8
COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter",
               "all-to-all")

# Document starts. Over 8 devices of 8 tokens (zig-zag chunks of 4): row 0 has starts on
# a device edge (8), inside a device (13), a document 13..44 crossing four device edges,
# a start on the edge 48 and a one-token document at 50; row 1 a document 3..31 and one
# from 32 to the end.
STARTS = ((8, 13, 45, 48, 50, 51), (3, 32))


def segment_ids():
  starts = np.zeros((BATCH, LENGTH), bool)
  for row, positions in enumerate(STARTS):
    starts[row, list(positions)] = True
  return (np.cumsum(starts, axis=1) % 3 + 2).astype(np.int32)


def segment_ids_with_empty_rows():
  """``(q_ids, kv_ids)``: the keys of row 0's document 13..44 carry an id no query has,
  so its 32 queries (on five devices) see no key at all."""
  q_ids = segment_ids()
  kv_ids = q_ids.copy()
  kv_ids[0, 13:45] = 99
  return q_ids, kv_ids


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def executed_collectives(hlo_text):
  """``{"kind dtype[shape]": count}`` of the collectives one run of the program executes:
  instructions inside a while body count ``known_trip_count`` times (an async
  ``-start``/``-done`` pair counts once)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith("ENTRY"):
        computations["__entry__"] = current
    elif line == "}":
      current = None
    elif current is not None:
      current.append(line)

  def count(name):
    total = {}
    for line in computations[name]:
      for kind in COLLECTIVES:
        if re.search(rf"\s{kind}(?:-start)?\(", line):
          shape = re.search(r"= \(?(\w+\[[\d,]*\])", line).group(1)
          total[f"{kind} {shape}"] = total.get(f"{kind} {shape}", 0) + 1
      callees = re.findall(r"(?:body|calls|to_apply|true_computation|false_computation)="
                           r"%([\w.\-]+)", line)
      if " while(" in line:
        body = re.search(r"body=%([\w.\-]+)", line).group(1)
        inner = count(body)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        # The xla tier's loops over live blocks have data-dependent trip counts; they
        # hold no collectives.
        assert trips or not inner, f"collectives in a loop of unknown length: {line[:200]}"
        for key, n in inner.items():
          total[key] = total.get(key, 0) + n * int(trips.group(1))
        callees = [c for c in callees if c != body]
      for callee in callees:
        for key, n in count(callee).items():
          total[key] = total.get(key, 0) + n
    return total

  return count("__entry__")


def problem(rng, heads, kv_heads):
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  diff = {"query": normal(BATCH, LENGTH, heads, HEAD_DIM),
          "key": normal(BATCH, LENGTH, kv_heads, HEAD_DIM),
          "value": normal(BATCH, LENGTH, kv_heads, HEAD_DIM)}
  return diff, normal(BATCH, LENGTH, heads, HEAD_DIM)


def forward_backward(fn, options):
  def f(diff, cotangent):
    out, vjp = jax.vjp(lambda d: fn(**d, **options), diff)
    return out, vjp(cotangent)[0]
  return jax.jit(f)


def run_case(fn, heads, kv_heads, options, *, prelaid=None, hlo_forward=False, seed=0):
  """``prelaid``: the layout the sharded call takes its arrays in (reorder=False)."""
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  diff, cotangent = problem(rng, heads, kv_heads)
  out1, grads1 = forward_backward(ops.dot_product_attention, options)(diff, cotangent)
  sharded_diff, sharded_options, sharded_cotangent = diff, options, cotangent
  if prelaid is not None:
    pos = layout_positions(LENGTH, DEVICES, prelaid)
    sharded_diff = {n: x[:, pos] for n, x in diff.items()}
    sharded_cotangent = cotangent[:, pos]
    ids = options["segment_ids"]
    sharded_options = dict(options, segment_ids=ids[:, pos])
  compiled = forward_backward(fn, sharded_options).lower(
      sharded_diff, sharded_cotangent).compile()
  out, grads = compiled(sharded_diff, sharded_cotangent)
  if prelaid is not None:
    back = np.argsort(pos)
    out = np.asarray(out)[:, back]
    grads = {n: np.asarray(g)[:, back] for n, g in grads.items()}
  errors = {"out": rel_err(out, out1)}
  errors.update({f"grad_{n}": rel_err(grads[n], grads1[n]) for n in diff})
  finite = bool(np.isfinite(np.asarray(out)).all()
                and all(np.isfinite(np.asarray(g)).all() for g in grads.values()))
  result = {"single": errors, "finite": finite,
            "hlo_backward": executed_collectives(compiled.as_text()),
            "out_sharding": [str(a) for a in out.sharding.spec] if prelaid is None else None}
  if hlo_forward:
    forward = jax.jit(lambda d: fn(**d, **sharded_options))
    result["hlo_forward"] = executed_collectives(
        forward.lower(sharded_diff).compile().as_text())
  if isinstance(options.get("segment_ids"), tuple):
    # Row 0's queries 13..44 see no key: their output and dq are exactly zero.
    result["empty_rows_zero"] = bool(
        (np.asarray(out)[0, 13:45] == 0).all()
        and (np.asarray(grads["query"])[0, 13:45] == 0).all())
  result["seconds"] = time.perf_counter() - start
  return result


def errors_raised(seq_mesh, data_mesh):
  """The messages of calls that must fail before any work."""
  x = jnp.ones((1, 64, 4, 8))
  calls = {
      "ulysses_heads": lambda: ulysses_attention(seq_mesh)(x, x, x),
      "ring_length": lambda: ring_attention(seq_mesh)(x[:, :24], x[:, :24], x[:, :24]),
      "ring_bias": lambda: ring_attention(seq_mesh)(x, x, x, jnp.zeros((1, 4, 64, 64))),
      "ring_sinks": lambda: ring_attention(seq_mesh)(x, x, x, sinks=jnp.zeros(4)),
      "ring_cross": lambda: ring_attention(seq_mesh)(x, x[:, :32], x[:, :32]),
      "ring_layout": lambda: ring_attention(seq_mesh, layout="striped"),
      "ring_axis": lambda: ring_attention(seq_mesh, "time"),
      "ulysses_kv_heads": lambda: ulysses_attention(data_mesh)(
          jnp.ones((2, 64, 12, 8)), jnp.ones((2, 64, 3, 8)), jnp.ones((2, 64, 3, 8))),
  }
  messages = {}
  for name, call in calls.items():
    try:
      call()
      messages[name] = None
    except ValueError as e:
      messages[name] = str(e)
  return messages


def main():
  assert len(jax.devices()) == DEVICES, jax.devices()
  start = time.perf_counter()
  seq_mesh = jax.make_mesh((DEVICES,), ("sequence",))
  cube = jax.make_mesh((2, 2, 2), ("data", "sequence", "heads"))
  data_mesh = jax.make_mesh((2, 4), ("data", "sequence"))
  ids = jnp.asarray(segment_ids())
  pair = tuple(jnp.asarray(x) for x in segment_ids_with_empty_rows())
  ring = lambda **kw: ring_attention(seq_mesh, **kw)
  # name: (function, N, K, options, extra)
  cases = {
      "ring_full_contiguous": (ring(layout="contiguous"), 4, 4, {}, {"hlo_forward": True}),
      "ring_causal_zigzag_gqa": (ring(), 4, 2, {"is_causal": True}, {"hlo_forward": True}),
      "ring_causal_contiguous": (ring(layout="contiguous"), 4, 4, {"is_causal": True}, {}),
      "ring_window_empty_rows_zigzag_mqa": (
          ring(), 4, 1, {"local_window_size": (6, 3), "segment_ids": pair}, {}),
      "ring_causal_documents_zigzag_gqa": (
          ring(), 4, 2, {"is_causal": True, "segment_ids": ids}, {"hlo_forward": True}),
      "ring_causal_window_prelaid_zigzag": (
          ring(reorder=False), 4, 4,
          {"is_causal": True, "local_window_size": 5, "segment_ids": ids},
          {"prelaid": "zigzag", "hlo_forward": True}),
      "ring_causal_zigzag_data2_seq2_heads2": (
          ring_attention(cube, batch_axis="data", head_axis="heads"), 4, 2,
          {"is_causal": True}, {}),
      "ulysses_full_data2_seq4": (
          ulysses_attention(data_mesh, batch_axis="data"), 4, 4, {}, {"hlo_forward": True}),
      "ulysses_causal_documents_gqa_data2_seq4": (
          ulysses_attention(data_mesh, batch_axis="data"), 4, 2,
          {"is_causal": True, "segment_ids": ids}, {}),
  }
  results = {}
  for seed, (name, (fn, heads, kv_heads, options, extra)) in enumerate(cases.items()):
    results[name] = run_case(fn, heads, kv_heads, options, seed=seed, **extra)
  json.dump({"cases": results, "errors": errors_raised(seq_mesh, data_mesh),
             "seconds": time.perf_counter() - start}, sys.stdout)


if __name__ == "__main__":
  main()
