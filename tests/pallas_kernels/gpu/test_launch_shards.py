"""Each Mosaic GPU linear launch computes a (batch row, head) from that row and head alone,
along the dims it declares to ``partition.batch_head_partitioned``.

Under a multi-device ``jit`` the launches of ``chunked_linear.py`` and ``chunked_delta.py``
run per batch / head shard (``chunked_linear._shielded``). That is right only if every
array's declared ``(batch, head)`` dims are its batch and head axes and no output of one
row and head depends on another. Here, in the Mosaic GPU interpreter on CPU, every launch
of simple GLA and of the gated delta rule (forward and backward) is recorded, then re-run
on one shard of its inputs (batch row 1, head 1, cut along the declared dims); its outputs
must equal the full run's outputs cut the same way, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels.gpu import chunked_delta as cd
from pallas_kernels.gpu import chunked_linear as cl
from tests.pallas_kernels.gpu.test_chunked_linear import interpreted

B, T, H, K, V = 2, 40, 2, 64, 64


def _cut(x, dims, row, head):
  batch_dim, head_dim = dims
  if batch_dim is not None:
    x = lax.slice_in_dim(x, row, row + 1, axis=batch_dim)
  if head_dim is not None:
    x = lax.slice_in_dim(x, head, head + 1, axis=head_dim)
  return x


def _inputs(rng):
  def normal(shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  k = rng.standard_normal((B, T, H, K))
  k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.bfloat16)
  ids = np.zeros((B, T), np.int32)
  ids[:, 20:] = 1
  return dict(q=normal((B, T, H, K)), k=k, v=normal((B, T, H, V)),
              g=jnp.asarray(-rng.uniform(0.1, 1.0, (B, T, H)), jnp.float32),
              beta=jnp.asarray(rng.uniform(0.1, 1.0, (B, T, H)), jnp.float32),
              initial_state=normal((B, H, K, V), jnp.float32),
              segment_ids=jnp.asarray(ids), do=normal((B, T, H, V)),
              dfinal=normal((B, H, K, V), jnp.float32))


@interpreted
def test_each_launch_computes_its_shard_from_its_shard(monkeypatch, rng):
  calls = []
  original = cl._shielded

  def record(static, fn, arrays, in_dims, out_dims):
    out = original(static, fn, arrays, in_dims, out_dims)
    calls.append((fn, arrays, in_dims, out_dims, out))
    return out

  monkeypatch.setattr(cl, "_shielded", record)
  x = _inputs(rng)
  common = dict(scale=0.3, initial_state=x["initial_state"], output_final_state=True,
                segment_ids=x["segment_ids"], interpret=True)
  ops = (lambda q, k, v: cl.simple_gla(q, k, v, x["g"], **common),
         lambda q, k, v: cd.gated_delta_rule(q, k, v, x["g"], x["beta"], **common))
  for op in ops:
    _, vjp = jax.vjp(op, x["q"], x["k"], x["v"])
    vjp((x["do"], x["dfinal"]))
  assert len(calls) == 4, [c[0] for c in calls]   # forward and backward of each op

  for fn, arrays, in_dims, out_dims, outs in calls:
    for array, dims in list(zip(arrays, in_dims)) + list(zip(outs, out_dims)):
      assert array.shape[dims[0]] == B and array.shape[dims[1]] == H, (array.shape, dims)
    shard = fn(*[_cut(a, d, 1, 1) for a, d in zip(arrays, in_dims)])
    assert len(shard) == len(outs)
    for got, want, dims in zip(shard, outs, out_dims):
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    np.asarray(_cut(want, dims, 1, 1), np.float32))
