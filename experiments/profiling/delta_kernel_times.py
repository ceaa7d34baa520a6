"""Per-kernel GPU times inside the GPU delta rule's forward and forward+backward programs, from a
jax.profiler trace (run on the GPU machine).

    python3 experiments/profiling/delta_kernel_times.py TAG T...

Environment: LIST=1 also lists every launch of the last call with its name; ONLYGATED=1 times the gated rule; WIDE=1 / WIDE=0 forces the forward walk's
layout; READN=1 / READN=0 makes the forward walk read N or form N S from P. Prints, per
T and program, the launches of one call in order (us) and the sum.
Used for docs/runs/2026-11-24_h100_delta_fused_walk_kernels.txt."""
import collections, glob, os, sys, tempfile
import jax, jax.numpy as jnp
from pallas_kernels.gpu import chunked_delta as cd
if os.environ.get("WIDE") in ("0", "1") and hasattr(cd, "WIDE_WALK"):
  cd.WIDE_WALK = os.environ["WIDE"] == "1"
if os.environ.get("READN") in ("0", "1") and hasattr(cd, "READ_N"):
  cd.READ_N = os.environ["READN"] == "1"
tag = sys.argv[1]
H, D, tokens = 16, 128, 16384
name = "gated" if os.environ.get("ONLYGATED") else "delta"
def load_profile(path):
  try:
    from jax._src.lib import _profile_data
    return _profile_data.ProfileData.from_file(path)
  except Exception:
    from jax.profiler import ProfileData
    return ProfileData.from_file(path)
for T in [int(a) for a in sys.argv[2:]]:
  B = tokens // T
  ks = jax.random.split(jax.random.key(T), 8)
  q, k, v, do = (jax.random.normal(x, (B, T, H, D), jnp.bfloat16) for x in ks[:4])
  k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
  q = (q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 4.0) if name == "gated" else None
  beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
  def f(q, k, v, g, beta):
    return cd.gated_delta_rule(q, k, v, g, beta, scale=D ** -0.5)[0]
  def loss(q, k, v, g, beta):
    return jnp.sum(f(q, k, v, g, beta).astype(jnp.float32) * do.astype(jnp.float32))
  argn = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
  for prog, fn in (("fwd", jax.jit(f)), ("fwdbwd", jax.jit(jax.grad(loss, argnums=argn)))):
    jax.block_until_ready(fn(q, k, v, g, beta)); jax.block_until_ready(fn(q, k, v, g, beta))
    d = tempfile.mkdtemp()
    n = 10
    jax.profiler.start_trace(d)
    for _ in range(n):
      out = fn(q, k, v, g, beta)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
    pd = load_profile(path)
    tot = collections.Counter(); cnt = collections.Counter()
    for plane in pd.planes:
      if "GPU" not in plane.name:
        continue
      for line in plane.lines:
        if "Stream" not in line.name and "stream" not in line.name:
          continue
        evs = list(line.events)
        for ev in evs:
          tot[ev.name] += ev.duration_ns; cnt[ev.name] += 1
        per = len(evs) // n
        seq = [f"{e.duration_ns / 1e3:.0f}" for e in evs[per * (n - 1):] if e.duration_ns > 20000]
        print(f"PROF {tag} {name} T={T} {prog} last-iteration kernels (us, >20): {' '.join(seq)}", flush=True)
        if os.environ.get("LIST"):
          for e in evs[per * (n - 1):]:
            print(f"PROF     {e.duration_ns / 1e3:8.1f} us  {e.name[:100]}", flush=True)
    total = sum(tot.values()) / n / 1e6
    print(f"PROF {tag} {name} T={T} {prog} kernels-sum {total:.3f} ms", flush=True)
    for nm, ns in tot.most_common(3):
      print(f"PROF   {ns / n / 1e6:7.3f} ms  x{cnt[nm] // n}  {nm[:90]}", flush=True)
