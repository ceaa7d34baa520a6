"""Chunked linear attention, pallas tier: the Mosaic TPU kernels of
``pallas_kernels/tpu/chunked_linear.py``.

One entry point serves the six ops of ``attnlab.ops.linear_attention``, chosen by the
canonical call's gates: no gate and no ``beta`` (``linear_attn``) and a ``[B, T, H]`` gate
(``retention``, ``simple_gla``) run the simple GLA kernel (zeros as the gate of plain
linear attention); a ``[B, T, H, K]`` gate runs the GLA kernel; ``beta`` runs the delta-rule
kernels (with or without the gate). Packed documents restart the state inside the
kernels; float32 states and accumulation; q / k / v bfloat16 or float32.

On a TPU the tier runs compiled; it is tested on CPU in TPU interpret mode
(``attnlab.ops.pallas_target.interpret_kernels("tpu")``) and, like the softmax kernel,
joins automatic dispatch only once it has run on a TPU. The Mosaic GPU kernels of these
ops are not written yet: on a GPU the tier refuses with that reason.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnlab.ops.pallas_target import kernel_target
from pallas_kernels.tpu import chunk_math
from pallas_kernels.tpu import chunked_linear


def linear_pallas_supports(call) -> str | None:
  """None when the current backend's kernel can run ``call``, else the reason."""
  backend, _ = kernel_target()
  if backend is None:
    return "the chunked linear kernels run on TPU (Mosaic TPU); this backend has none"
  if backend == "gpu":
    return "the Mosaic GPU chunked linear kernels are not written yet; the xla tier runs"
  if call.q.dtype not in (jnp.bfloat16, jnp.float32) or call.k.dtype != call.q.dtype \
      or call.v.dtype != call.q.dtype:
    return (f"the TPU kernels take q, k, v all bfloat16 or all float32, got "
            f"{call.q.dtype}, {call.k.dtype}, {call.v.dtype}")
  if call.chunk_size % chunk_math.SUB_CHUNK:
    return (f"the TPU kernels take chunk sizes that are multiples of {chunk_math.SUB_CHUNK}, "
            f"got {call.chunk_size}")
  return None


def linear_pallas_automatic(call) -> str | None:
  del call
  return "the TPU kernels have run in interpret mode only; name implementation='pallas'"


def linear_recurrence_pallas(q, k, v, g=None, beta=None, *, scale, initial_state=None,
                             segment_ids=None, chunk_size=64):
  """Same arguments and result as the other tiers: ``(o [B, T, H, V], final [B, H, K, V]
  float32)``, ``o`` in v's dtype."""
  backend, interpret = kernel_target()
  if backend != "tpu":
    raise ValueError(linear_pallas_supports(None) if backend is None else
                     "the Mosaic GPU chunked linear kernels are not written yet")
  common = dict(scale=scale, initial_state=initial_state, output_final_state=True,
                segment_ids=segment_ids, chunk_size=chunk_size, interpret=interpret)
  if beta is not None:
    if g is None:
      return chunked_linear.delta_rule(q, k, v, beta, **common)
    return chunked_linear.gated_delta_rule(q, k, v, g, beta, **common)
  if g is not None and g.ndim == 4:
    return chunked_linear.gla(q, k, v, g, **common)
  if g is None:
    g = jnp.zeros(q.shape[:3], jnp.float32)  # plain linear attention: no decay
  return chunked_linear.simple_gla(q, k, v, g, **common)
