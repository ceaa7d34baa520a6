"""Linear-attention benchmark: attnlab's chunked ops, checked then timed.

For each op and sequence length ``T`` (batch ``B = tokens // T``): build random inputs
(q, k, v and the op's gates), check the forward output and every gradient of the timed
tier against the ``reference`` tier (the token-by-token scan) on the first batch row and
first two heads, then
time the passes in ``config.passes``: ``"fwd"`` (the output), ``"fwdbwd"`` (the
gradients of q, k, v and every gate of ``<o, dO>``; the standard measure of
../shared/BENCHMARKS.md) and ``"train"`` (the loss ``<o, dO>`` and those gradients, as a
training step needs them: under ``"fwdbwd"`` XLA drops whatever only computes o, since
no gradient reads it). Reports ms, tokens/s and the fraction of the memory floor:
forward+backward must read q, k, v, the gates and dO and write o, dq, dk, dv and the gate
gradients once each.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

import attnlab.ops

def _gates(name, key, batch, seq_len, heads, key_dim):
  """The op's gates as the papers' layers produce them: log-sigmoid decays near 1 (GLA's
  divided by 16), sigmoid betas (the delta rules also get unit-norm q and k)."""
  k1, k2 = jax.random.split(key)
  scalar = jax.nn.log_sigmoid(jax.random.normal(k1, (batch, seq_len, heads)) + 4.0)
  beta = jax.nn.sigmoid(jax.random.normal(k2, (batch, seq_len, heads)))
  if name == "simple_gla":
    return (scalar,)
  if name == "gla":
    return (jax.nn.log_sigmoid(jax.random.normal(k1, (batch, seq_len, heads, key_dim))) / 16,)
  if name == "delta_rule":
    return (beta,)
  if name == "gated_delta_rule":
    return (scalar, beta)
  return ()


def _op(name, implementation, chunk_size, l2norm_in_op=True):
  fn = getattr(attnlab.ops, name)
  options = {"use_qk_l2norm": True} if "delta" in name and l2norm_in_op else {}
  return functools.partial(fn, implementation=implementation, chunk_size=chunk_size,
                           **options)


def _unit(x):
  x32 = x.astype(jnp.float32)
  return (x32 / jnp.linalg.norm(x32, axis=-1, keepdims=True)).astype(x.dtype)


def _relerr(x, ref):
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def run_linear(config, emit: Callable[[dict[str, Any]], None], *, time_call, temp_bytes,
               error_message) -> list[dict[str, Any]]:
  rows = []
  dtype = jnp.dtype(config.dtype)
  tolerance = config.tolerance[dtype.name]
  timing = dict(warmup=config.warmup, iters=config.iters, reps=config.reps)
  heads, key_dim, value_dim = config.num_heads, config.head_dim, config.head_dim
  itemsize = dtype.itemsize
  for name in config.linear_ops:
    for seq_len in config.seq_lens:
      batch = config.tokens // seq_len
      keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), seq_len), 5)
      q = jax.random.normal(keys[0], (batch, seq_len, heads, key_dim), dtype)
      k = jax.random.normal(keys[1], (batch, seq_len, heads, key_dim), dtype)
      in_op = config.get("qk_l2norm_in_op", True)
      if "delta" in name and not in_op:   # unit-norm inputs, as the peers' scripts pass
        q, k = (_unit(x) for x in (q, k))
      v = jax.random.normal(keys[2], (batch, seq_len, heads, value_dim), dtype)
      d_out = jax.random.normal(keys[3], (batch, seq_len, heads, value_dim), dtype)
      gates = _gates(name, keys[4], batch, seq_len, heads, key_dim)
      args = (q, k, v, *gates)
      gate_elems = sum(g.size for g in gates)
      floor_bytes = (2 * (3 * q.size + 2 * v.size + d_out.size) * itemsize  # in + grads
                     + v.size * itemsize + 2 * gate_elems * 4)
      for implementation in config.implementations:
        op = _op(name, implementation, config.chunk_size, in_op)
        shape = {"op": name, "impl": implementation, "T": seq_len, "B": batch, "H": heads,
                 "K": key_dim, "V": value_dim, "dtype": dtype.name,
                 "chunk": config.chunk_size}
        if "delta" in name:
          shape["qk_l2norm"] = "in_op" if in_op else "inputs"

        def forward(*a, op=op):
          return op(*a)[0]

        def loss(*a, op=op):
          return jnp.sum(op(*a)[0].astype(jnp.float32) * d_out.astype(jnp.float32))

        argnums = tuple(range(len(args)))
        programs = {"fwd": forward, "fwdbwd": jax.grad(loss, argnums=argnums),
                    "train": jax.value_and_grad(loss, argnums=argnums)}
        try:
          # The reference scan's backward keeps one [K, V] state per token and head:
          # check on the first batch row and the first two heads (heads are independent).
          first = tuple(x[:1, :, :2] for x in args)
          ref_op = _op(name, "reference", config.chunk_size, in_op)
          ref_o = jax.jit(lambda *a: ref_op(*a)[0])(*first)
          ref_g = jax.jit(jax.grad(
              lambda *a: jnp.sum(ref_op(*a)[0].astype(jnp.float32)
                                 * d_out[:1, :, :2].astype(jnp.float32)),
              argnums=tuple(range(len(args)))))(*first)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
          row = {**shape, "status": "error", "error": error_message(error)}
          rows.append(row), emit(row)
          continue
        for pass_name in config.passes:
          fn = programs[pass_name]
          row = {**shape, "pass": pass_name}
          try:
            compiled = jax.jit(fn).lower(*args).compile()
            result = compiled(*args)
            if pass_name == "fwd":
              relerr = {"o": _relerr(result[:1, :, :2], ref_o)}
            else:
              grads = result[1] if pass_name == "train" else result
              names = ("dq", "dk", "dv") + tuple(f"dgate{i}" for i in range(len(gates)))
              relerr = {n: _relerr(x[:1, :, :2], r) for n, x, r in zip(names, grads, ref_g)}
            row.update(relerr=relerr, tolerance=tolerance)
            if not max(relerr.values()) <= tolerance:
              row.update(status="mismatch", error="relative error above the tolerance")
            else:
              seconds = time_call(compiled, args, **timing)
              row.update(status="ok", ms=seconds * 1e3,
                         tokens_per_s=batch * seq_len / seconds,
                         temp_bytes=temp_bytes(compiled))
              if pass_name != "fwd":
                row["floor_ms"] = floor_bytes / config.copy_bandwidth * 1e3
          except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            row.update(status="error", error=error_message(error))
          rows.append(row)
          emit(row)
  return rows


def markdown_table(rows) -> str:
  lines = ["| op | impl | T | fwd ms | fwdbwd ms | train ms | fwdbwd / floor | "
           "temp MB fwdbwd | relerr o / worst grad |", "|---|---|---|---|---|---|---|---|---|"]
  by_key = {}
  for row in rows:
    by_key.setdefault((row["op"], row["impl"], row["T"]), {})[row.get("pass")] = row
  for (op, impl, seq_len), passes in by_key.items():
    fwd, bwd, train = (passes.get(p, {}) for p in ("fwd", "fwdbwd", "train"))
    cell = lambda r, k, f: (f.format(r[k]) if r.get(k) is not None else
                            r.get("status", "-"))
    ratio = (f"{bwd['ms'] / bwd['floor_ms']:.1f}x" if bwd.get("ms") and bwd.get("floor_ms")
             else "-")
    temp = (f"{bwd['temp_bytes'] / 2**20:.0f}" if bwd.get("temp_bytes") is not None else "-")
    err_o = f"{fwd['relerr']['o']:.1e}" if fwd.get("relerr") else "-"
    err_g = f"{max(bwd['relerr'].values()):.1e}" if bwd.get("relerr") else "-"
    ms = " | ".join(cell(r, "ms", "{:.3f}") for r in (fwd, bwd, train))
    lines.append(f"| {op} | {impl} | {seq_len} | {ms} | {ratio} | {temp} | "
                 f"{err_o} / {err_g} |")
  return "\n".join(lines)
