"""Where the time goes inside the GPU delta rule's launches: Mosaic GPU's in-kernel profiler
(run on the GPU machine).

    python3 experiments/profiling/region_times.py OUTDIR T [gated]

Sets ``ATTNLAB_MGPU_PROFILE_DIR`` (see ``pallas_kernels/gpu/chunked_linear._profiling``),
runs the op's forward+backward once after a warm-up, and prints per launch (the launches
are told apart by their ``jax.named_scope`` regions) each region's calls per warpgroup,
mean length and total per warpgroup, beside the warpgroup's whole span. Lengths are in
thousands of SM clock cycles (``%clock``; about 0.57 us at the H100's 1.755 GHz).
Regions may nest; a region's time includes its children. The raw traces stay in OUTDIR.
"""
import collections
import glob
import json
import os
import sys

out_dir, T = sys.argv[1], int(sys.argv[2])
gated = len(sys.argv) > 3 and sys.argv[3] == "gated"
os.makedirs(out_dir, exist_ok=True)
os.environ["ATTNLAB_MGPU_PROFILE_DIR"] = out_dir
# Room for five regions per chunk step; 336 at T = 4096 (416 overflowed the walks'
# shared memory there).
os.environ.setdefault("ATTNLAB_MGPU_PROFILE_SPACE", str(max(256, 5 * T // 64 + 16)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from pallas_kernels.gpu import chunked_delta as cd  # pylint: disable=g-import-not-at-top

H, D, TOKENS = 16, 128, 16384
B = TOKENS // T
keys = jax.random.split(jax.random.key(T), 8)
q, k, v, do = (jax.random.normal(x, (B, T, H, D), jnp.bfloat16) for x in keys[:4])
unit = lambda x: (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
                  ).astype(jnp.bfloat16)
q, k = unit(q), unit(k)
g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (B, T, H)) + 4.0) if gated else None
beta = jax.nn.sigmoid(jax.random.normal(keys[5], (B, T, H)))


def loss(q, k, v, g, beta):
  o = cd.gated_delta_rule(q, k, v, g, beta, scale=D ** -0.5)[0]
  return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))


fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)))
jax.block_until_ready(fn(q, k, v, g, beta))
jax.effects_barrier()
for path in glob.glob(os.path.join(out_dir, "*-trace.json")):
  os.remove(path)
jax.block_until_ready(fn(q, k, v, g, beta))
jax.effects_barrier()

for path in sorted(glob.glob(os.path.join(out_dir, "*-trace.json"))):
  events = json.load(open(path))["traceEvents"]
  if not events:
    continue
  per_trace = collections.defaultdict(list)
  for e in events:
    per_trace[e["tid"]].append(e)
  length = collections.defaultdict(float)
  calls = collections.Counter()
  spans = []
  for evs in per_trace.values():
    stack = []
    for e in evs:
      if e["ph"] == "B":
        stack.append(e)
      else:
        start = stack.pop()
        length[e["name"]] += e["ts"] - start["ts"]
        calls[e["name"]] += 1
    spans.append(evs[-1]["ts"] - evs[0]["ts"])
  traces = len(per_trace)
  first = {}
  for e in events:
    first.setdefault(e["name"], e["ts"])
  names = sorted(length, key=first.get)
  print(f"\n{os.path.basename(path)}: {traces} warpgroup traces, mean span "
        f"{sum(spans) / traces:.2f} kcycles (first to last event)")
  # Regions are recorded only by the warpgroups that run them: per-warpgroup figures
  # divide by the traces that recorded the region.
  users = collections.Counter()
  for evs in per_trace.values():
    for n in {e["name"] for e in evs}:
      users[n] += 1
  print(f"  {'region':24s} {'calls/wg':>9s} {'mean':>8s} {'total/wg':>9s}")
  for n in names:
    print(f"  {n:24s} {calls[n] / users[n]:9.1f} {length[n] / calls[n]:8.3f} "
          f"{length[n] / users[n]:9.2f}")
