"""Softmax attention benchmark: attnlab's tiers and jax.nn's, side by side in one run.

For each sequence length ``T`` (batch ``B = tokens // T``) and causal setting, every
implementation is first checked against attnlab's float32 reference (output, and the
gradients of q, k, v when the backward pass is timed), then timed forward and
forward+backward. Prints one JSON line per measurement and a markdown table at the end;
see ``configs/benchmark.py`` for the launch commands.

Implementations are named as in the config: an attnlab tier by its registry name
(``"reference"``, ``"xla"``, ``"cudnn"``, ``"pallas"``, ...), a jax.nn peer as
``"jax_nn_xla"`` / ``"jax_nn_cudnn"``, or jax-linear-attention's Mosaic GPU attention as
``"jla_mosaic_gpu"`` (when that package is installed; causal only). One that raises (a tier that cannot run here, out of memory) gives an
error row and the run goes on; one whose result exceeds the tolerance is not timed and
makes the run exit non-zero.
"""

import contextlib
import functools
import importlib.metadata
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import attnlab.ops
from experiments import linear_bench

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Benchmark config file, e.g. configs/benchmark.py:smoke.",
    lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Also write the JSON lines to this file.")

PEER_PREFIX = "jax_nn_"
JLA_PEER = "jla_mosaic_gpu"
ERROR_CHARS = 400

# f(query [B, T, N, H], key [B, T, K, H], value [B, T, K, H], is_causal) -> [B, T, N, H]
AttentionFn = Callable[..., jax.Array]


def _attnlab_attention(query, key, value, is_causal, *, implementation):
  return attnlab.ops.dot_product_attention(
      query, key, value, is_causal=is_causal, implementation=implementation)


def _jax_nn_attention(query, key, value, is_causal, *, implementation):
  return jax.nn.dot_product_attention(
      query, key, value, is_causal=is_causal, implementation=implementation)


def _jla_attention(query, key, value, is_causal):
  # jax-linear-attention's Mosaic GPU flash attention (a peer, measured, never copied).
  from jla.ops.mosaic_gpu.attention import flash_attention  # pylint: disable=import-outside-toplevel
  if not is_causal:
    raise ValueError("the jla_mosaic_gpu peer is measured causal only")
  return flash_attention(query, key, value)


def attention_fns(implementations, peers) -> dict[str, AttentionFn]:
  """The functions to measure, by name: attnlab tiers first, then the peers."""
  fns = {}
  for name in implementations:
    fns[name] = functools.partial(_attnlab_attention, implementation=name)
  for name in peers:
    if name == JLA_PEER:
      fns[name] = _jla_attention
      continue
    if not name.startswith(PEER_PREFIX):
      raise ValueError(f"peers are named {PEER_PREFIX}<implementation>, got {name!r}")
    fns[name] = functools.partial(
        _jax_nn_attention, implementation=name.removeprefix(PEER_PREFIX))
  return fns


def attention_flops(batch, seq_len, num_heads, head_dim, causal, backward=False) -> float:
  """Matmul FLOPs of softmax attention, as BENCHMARKS.md counts them."""
  forward = 4 * batch * num_heads * seq_len * seq_len * head_dim / (2 if causal else 1)
  return 3.5 * forward if backward else forward


def make_inputs(rng, batch, seq_len, num_heads, num_kv_heads, head_dim, dtype):
  """Random normal ``q, k, v, dO``: ``[B, T, N, H]``, ``[B, T, K, H]`` twice, ``[B, T, N, H]``."""
  k_q, k_k, k_v, k_do = jax.random.split(rng, 4)
  q_shape = (batch, seq_len, num_heads, head_dim)
  kv_shape = (batch, seq_len, num_kv_heads, head_dim)
  return (jax.random.normal(k_q, q_shape, dtype), jax.random.normal(k_k, kv_shape, dtype),
          jax.random.normal(k_v, kv_shape, dtype), jax.random.normal(k_do, q_shape, dtype))


def forward_fn(attention: AttentionFn, causal: bool):
  """``(q, k, v, dO) -> o``; dO is taken so both passes share one signature."""

  def forward(query, key, value, d_out):
    del d_out
    return attention(query, key, value, causal)

  return forward


def forward_backward_fn(attention: AttentionFn, causal: bool):
  """``(q, k, v, dO) -> (dq, dk, dv)``: the gradients of ``sum(o * dO)``."""

  def loss(query, key, value, d_out):
    out = attention(query, key, value, causal)
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def check_slice(num_heads, num_kv_heads, check_batch, check_heads):
  """Index expressions ``(q_index, kv_index)`` that cut the inputs for the check.

  Keeps the first ``check_batch`` rows and whole GQA groups: the first key/value heads
  whose query heads cover ``check_heads``. Output and gradients on the cut equal the
  cut of the full ones, since heads and batch rows do not interact.
  """
  groups = num_heads // num_kv_heads
  kv_heads = min(num_kv_heads, -(-check_heads // groups))
  return (jnp.s_[:check_batch, :, :kv_heads * groups],
          jnp.s_[:check_batch, :, :kv_heads])


def oracle(inputs, causal, *, q_index, kv_index, backward):
  """The float32 reference on the checked slice: ``(o,)`` or ``(o, dq, dk, dv)``."""
  query, key, value, d_out = (
      x[index].astype(jnp.float32)
      for x, index in zip(inputs, (q_index, kv_index, kv_index, q_index)))
  attention = functools.partial(_attnlab_attention, implementation="reference")
  args = (query, key, value, d_out)
  out = jax.jit(forward_fn(attention, causal))(*args)
  if not backward:
    return (out,)
  return (out, *jax.jit(forward_backward_fn(attention, causal))(*args))


def relative_error(x, ref) -> float:
  """``||x - ref|| / ||ref||`` in float32."""
  x = x.astype(jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def temp_bytes(compiled) -> int | None:
  """Temporary device memory of a compiled function; None where the backend has no report."""
  try:
    analysis = compiled.memory_analysis()
  except NotImplementedError:
    return None
  return None if analysis is None else analysis.temp_size_in_bytes


def time_call(fn, args, *, warmup, iters, reps) -> float:
  """Seconds per call: the median over ``reps`` runs of ``iters`` back-to-back calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / iters)
  return statistics.median(per_call)


def _error_message(error: Exception) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:ERROR_CHARS]


def measure_pass(attention, inputs, causal, *, backward, reference, q_index, kv_index,
                 tolerance, flops, timing) -> dict[str, Any]:
  """Check, then time one pass of one implementation. Returns the row's measurements.

  ``reference`` is the oracle's ``(o,)`` or ``(o, dq, dk, dv)`` on the checked slice.
  Raises what the implementation raises.
  """
  make = forward_backward_fn if backward else forward_fn
  compiled = jax.jit(make(attention, causal)).lower(*inputs).compile()
  results = compiled(*inputs)
  results = results if backward else (results,)
  names = ("dq", "dk", "dv") if backward else ("o",)
  indices = (q_index, kv_index, kv_index) if backward else (q_index,)
  refs = reference[1:] if backward else reference[:1]
  relerr = {name: relative_error(x[index], ref)
            for name, x, index, ref in zip(names, results, indices, refs)}
  row = {"relerr": relerr, "tolerance": tolerance}
  worst = max(relerr.values())
  if not worst <= tolerance:  # also catches NaN
    row["status"] = "mismatch"
    row["error"] = f"relative error {worst:.3g} exceeds the tolerance {tolerance:g}"
    return row
  seconds = time_call(compiled, inputs, **timing)
  row.update(status="ok", ms=seconds * 1e3, tflops=flops / seconds / 1e12,
             temp_bytes=temp_bytes(compiled))
  return row


def run(config, emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
  """Every measurement of ``config``, each passed to ``emit`` as soon as it is made."""
  rows = []

  def record(row):
    rows.append(row)
    emit(row)

  dtype = jnp.dtype(config.dtype)
  tolerance = config.tolerance[dtype.name]
  timing = dict(warmup=config.warmup, iters=config.iters, reps=config.reps)
  backward_passes = [p == "fwdbwd" for p in config.passes]
  fns = attention_fns(config.implementations, config.peers)
  q_index, kv_index = check_slice(config.num_heads, config.num_kv_heads,
                                  config.check_batch, config.check_heads)
  for seq_len in config.seq_lens:
    batch = config.tokens // seq_len
    inputs = make_inputs(jax.random.fold_in(jax.random.key(config.seed), seq_len), batch,
                         seq_len, config.num_heads, config.num_kv_heads, config.head_dim,
                         dtype)
    for causal in config.causal:
      shape = {"T": seq_len, "B": batch, "N": config.num_heads, "K": config.num_kv_heads,
               "H": config.head_dim, "dtype": dtype.name, "causal": causal}
      try:
        reference = oracle(inputs, causal, q_index=q_index, kv_index=kv_index,
                           backward=any(backward_passes))
      except Exception as e:  # pylint: disable=broad-except
        record({"impl": "oracle", **shape, "status": "error", "error": _error_message(e)})
        continue
      for name, attention in fns.items():
        for pass_name, backward in zip(config.passes, backward_passes):
          row = {"impl": name, **shape, "pass": pass_name}
          flops = attention_flops(batch, seq_len, config.num_heads, config.head_dim,
                                  causal, backward)
          try:
            row.update(measure_pass(
                attention, inputs, causal, backward=backward, reference=reference,
                q_index=q_index, kv_index=kv_index, tolerance=tolerance, flops=flops,
                timing=timing))
          except Exception as e:  # pylint: disable=broad-except
            row.update(status="error", error=_error_message(e))
          record(row)
          if row["status"] != "ok":
            break  # a forward that fails says nothing new about the backward
  return rows


MASKS = {
    "causal": lambda: attnlab.ops.masks.Causal(),
    "window_1024": lambda: attnlab.ops.masks.Causal() & attnlab.ops.masks.LocalWindow(1023, 0),
    "chunked_causal_2048": lambda: attnlab.ops.masks.ChunkedCausal(2048),
    "power_of_two_512": lambda: attnlab.ops.masks.PowerOfTwo(512),
    "fixed_sparse_1024_128": lambda: attnlab.ops.masks.FixedSparse(1024, 128),
}


def run_masks(config, emit) -> list[dict[str, Any]]:
  """The pallas tier under each mask of ``config.mask_cases`` at one length: time against
  the fraction of (128 x 128) blocks the mask keeps, relative to the causal mask."""
  rows = []
  dtype = jnp.dtype(config.dtype)
  seq_len = config.mask_seq_len
  batch = max(1, config.tokens // seq_len)
  timing = dict(warmup=config.warmup, iters=config.iters, reps=config.reps)
  inputs = make_inputs(jax.random.key(config.seed), batch, seq_len, config.num_heads,
                       config.num_kv_heads, config.head_dim, dtype)
  for name in config.mask_cases:
    mask = MASKS[name]()
    summary = mask.block_summary(seq_len, seq_len, 128, 128)
    kept = float((summary != attnlab.ops.masks.EMPTY).mean())

    def attention(q, k, v, causal, mask=mask):
      del causal
      return attnlab.ops.dot_product_attention(q, k, v, mask=mask, implementation="pallas")

    for pass_name in config.passes:
      make = forward_backward_fn if pass_name == "fwdbwd" else forward_fn
      row = {"kind": "mask", "mask": name, "T": seq_len, "B": batch, "pass": pass_name,
             "kept_blocks": kept}
      try:
        compiled = jax.jit(make(attention, False)).lower(*inputs).compile()
        row.update(status="ok", ms=time_call(compiled, inputs, **timing) * 1e3)
      except Exception as e:  # pylint: disable=broad-except
        row.update(status="error", error=_error_message(e))
      rows.append(row)
      emit(row)
  return rows


def mask_table(rows) -> str:
  base = {r["pass"]: r for r in rows if r["mask"] == "causal" and r["status"] == "ok"}
  lines = ["| mask (pallas) | T | kept blocks | fwd ms | fwdbwd ms | time / causal | "
           "kept / causal |", "|---|---|---|---|---|---|---|"]
  by_mask = {}
  for r in rows:
    by_mask.setdefault(r["mask"], {})[r["pass"]] = r
  for name, passes in by_mask.items():
    fb = passes.get("fwdbwd") or passes.get("fwd")
    ref = base.get(fb["pass"]) if fb else None
    ratio = (f"{fb['ms'] / ref['ms']:.3f}" if fb and ref and fb["status"] == "ok" else "—")
    kept = (f"{fb['kept_blocks'] / ref['kept_blocks']:.3f}" if fb and ref else "—")
    cells = [_cell(passes.get(p), "ms", "{:.3f}") for p in ("fwd", "fwdbwd")]
    lines.append(f"| {name} | {fb['T']} | {fb['kept_blocks']:.3f} | {cells[0]} | {cells[1]} "
                 f"| {ratio} | {kept} |")
  return "\n".join(lines)


def _cell(row, key, fmt):
  if row is None or row.get(key) is None:
    return "—" if row is None or row["status"] == "ok" else row["status"]
  return fmt.format(row[key])


def markdown_table(rows) -> str:
  """One line per (implementation, T, causal); errors and mismatches listed below."""
  lines = ["| impl | T | causal | fwd ms | fwd TFLOP/s | fwdbwd ms | fwdbwd TFLOP/s "
           "| temp MB fwd / fwdbwd | relerr o / dq,dk,dv |",
           "|---|---|---|---|---|---|---|---|---|"]
  grouped = {}
  for row in rows:
    if "pass" in row:
      grouped.setdefault((row["impl"], row["T"], row["causal"]), {})[row["pass"]] = row
  for (impl, seq_len, causal), passes in grouped.items():
    fwd, fwdbwd = passes.get("fwd"), passes.get("fwdbwd")
    temp = " / ".join(
        "—" if r is None or r.get("temp_bytes") is None else f"{r['temp_bytes'] / 2**20:.1f}"
        for r in (fwd, fwdbwd))
    relerr = " / ".join(
        "—" if r is None or "relerr" not in r else f"{max(r['relerr'].values()):.2e}"
        for r in (fwd, fwdbwd))
    lines.append(
        f"| {impl} | {seq_len} | {causal} | {_cell(fwd, 'ms', '{:.3f}')} "
        f"| {_cell(fwd, 'tflops', '{:.3g}')} | {_cell(fwdbwd, 'ms', '{:.3f}')} "
        f"| {_cell(fwdbwd, 'tflops', '{:.3g}')} | {temp} | {relerr} |")
  problems = [r for r in rows if r["status"] != "ok"]
  if problems:
    lines.append("")
    lines.extend(f"- {r['impl']} T={r['T']} causal={r['causal']} {r.get('pass', '')}: "
                 f"{r['status']}: {r['error']}" for r in problems)
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  return {"kind": "environment", "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  allowed = ("fwd", "fwdbwd", "train") if config.family == "linear" else ("fwd", "fwdbwd")
  unknown = [p for p in config.passes if p not in allowed]
  if unknown:
    raise ValueError(f"config.passes: {unknown} not among {allowed} for the "
                     f"{config.family!r} family")
  paths = [_OUT.value] if _OUT.value else []
  if os.environ.get("OUT"):
    paths.append(os.path.join(os.environ["OUT"], "results.jsonl"))
  with contextlib.ExitStack() as stack:
    files = [stack.enter_context(open(path, "w")) for path in paths]

    def emit(row):
      line = json.dumps(row)
      for stream in (sys.stdout, *files):
        print(line, file=stream, flush=True)

    emit({**environment(), "variant": config.variant})
    if config.family == "linear":
      rows = linear_bench.run_linear(config, emit, time_call=time_call,
                                     temp_bytes=temp_bytes, error_message=_error_message)
    else:
      rows = run(config, emit)
      mask_rows = run_masks(config, emit) if config.get("mask_cases") else []
  table = linear_bench.markdown_table if config.family == "linear" else markdown_table
  print(table(rows))
  if config.family != "linear" and mask_rows:
    print()
    print(mask_table(mask_rows))
  return 1 if any(row["status"] == "mismatch" for row in rows) else 0


if __name__ == "__main__":
  app.run(main)
