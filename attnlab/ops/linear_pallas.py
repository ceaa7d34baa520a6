"""Chunked linear attention, pallas tier: the Mosaic TPU kernels of
``pallas_kernels/tpu/chunked_linear.py`` and the Mosaic GPU kernel of
``pallas_kernels/gpu/chunked_linear.py``.

One entry point serves the six ops of ``attnlab.ops.linear_attention``, chosen by the
canonical call's gates: no gate and no ``beta`` (``linear_attn``) and a ``[B, T, H]`` gate
(``retention``, ``simple_gla``) run the simple GLA kernel (zeros as the gate of plain
linear attention); a ``[B, T, H, K]`` gate runs the GLA kernel; ``beta`` runs the delta-rule
kernels (with or without the gate). Packed documents restart the state inside the
kernels; float32 states and accumulation.

* TPU: all six ops, q / k / v bfloat16 or float32, chunk sizes a multiple of 16. Tested
  on CPU in TPU interpret mode (``attnlab.ops.pallas_target.interpret_kernels("tpu")``);
  joins automatic dispatch only once it has run on a TPU.
* GPU (Hopper): the simple-GLA family (``linear_attn``, ``retention``, ``simple_gla``,
  ``pallas_kernels/gpu/chunked_linear.py``), GLA (``pallas_kernels/gpu/chunked_gla.py``
  and ``gla_scores.py``) and the delta rules (``delta_rule``, ``gated_delta_rule``,
  ``pallas_kernels/gpu/chunked_delta.py`` and ``chunked_ut.py``) with
  q / k / v bfloat16 or float16, key and value head dims up to 128 (zero-padded to 64 or
  128; automatic dispatch takes 64 and 128 only, the padded dims having run in the
  interpreter only so far), chunks of 64. Tested on an H100 and, on
  CPU, in the Mosaic GPU interpreter (``interpret_kernels("gpu")``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops.pallas_target import kernel_target, not_hopper_reason
from pallas_kernels.gpu import chunked_delta as gpu_delta
from pallas_kernels.gpu import chunked_gla as gpu_gla
from pallas_kernels.gpu import chunked_linear as gpu_linear
from pallas_kernels.tpu import chunk_math
from pallas_kernels.tpu import chunked_linear

MIN_GPU_LENGTH = 17


def _padded(dim, dims):
  """The smallest kernel head dim that holds ``dim`` (None: none does)."""
  return next((d for d in dims if d >= dim), None)


def _gpu_supports(call) -> str | None:
  if call.q.dtype not in gpu_linear.DTYPES or call.k.dtype != call.q.dtype \
      or call.v.dtype != call.q.dtype:
    return (f"the GPU kernel takes q, k, v all bfloat16 or all float16 (wgmma operands), "
            f"got {call.q.dtype}, {call.k.dtype}, {call.v.dtype}")
  if _padded(call.q.shape[-1], gpu_linear.KEY_DIMS) is None or \
      _padded(call.v.shape[-1], gpu_linear.VALUE_DIMS) is None:
    return (f"the GPU kernel takes head dims up to {gpu_linear.KEY_DIMS[-1]} (padded with "
            f"zeros to one of {gpu_linear.KEY_DIMS}), got K={call.q.shape[-1]}, "
            f"V={call.v.shape[-1]}")
  if call.q.shape[1] < MIN_GPU_LENGTH and kernel_target() == ("gpu", False):
    return (f"sequences shorter than {MIN_GPU_LENGTH} tokens (got {call.q.shape[1]}) run on "
            f"xla: XLA 0.11.2 fails to compile the kernel's padding for T = 1, 2, 3 and 5 "
            f"on an H100 (an emitter error); 17 and longer are verified")
  if call.chunk_size != gpu_linear.CHUNK:
    return f"the GPU kernel's chunk is {gpu_linear.CHUNK} tokens, got {call.chunk_size}"
  return None


def linear_pallas_supports(call) -> str | None:
  """None when the current backend's kernel can run ``call``, else the reason."""
  backend, _ = kernel_target()
  if backend is None:
    return "the chunked linear kernels run on TPU (Mosaic TPU) or GPU (Mosaic GPU)"
  if backend == "gpu":
    return _gpu_supports(call)
  if call.q.dtype not in (jnp.bfloat16, jnp.float32) or call.k.dtype != call.q.dtype \
      or call.v.dtype != call.q.dtype:
    return (f"the TPU kernels take q, k, v all bfloat16 or all float32, got "
            f"{call.q.dtype}, {call.k.dtype}, {call.v.dtype}")
  if call.chunk_size % chunk_math.SUB_CHUNK:
    return (f"the TPU kernels take chunk sizes that are multiples of {chunk_math.SUB_CHUNK}, "
            f"got {call.chunk_size}")
  return None


def linear_pallas_automatic(call) -> str | None:
  backend, interpret = kernel_target()
  if backend == "gpu" and not interpret:
    # Tested compiled on one H100 for everything _gpu_supports lets through; the per-shard
    # path under a multi-device jit has not run on several GPUs yet.
    if jax.device_count() > 1:
      return ("the GPU kernel's sharded path is untested on several GPUs; "
              "name implementation='pallas'")
    if call.q.shape[-1] not in gpu_linear.KEY_DIMS or \
        call.v.shape[-1] not in gpu_linear.VALUE_DIMS:
      return (f"head dims other than {gpu_linear.KEY_DIMS} run zero-padded, so far tested "
              f"in the Mosaic GPU interpreter only (got K={call.q.shape[-1]}, "
              f"V={call.v.shape[-1]}); name implementation='pallas'")
    return not_hopper_reason()
  if backend == "gpu":
    return "interpreted kernels are for tests; name implementation='pallas'"
  return "the TPU kernels have run in interpret mode only; name implementation='pallas'"


def _gpu_padded(q, k, v, g, beta, common):
  """The GPU kernels on head dims zero-padded to theirs: zero key channels leave every
  product and the state's extra rows at zero (the delta rules' ``k k^T`` too), zero value
  columns give zero outputs and state columns; both are cut off again."""
  kd, vd = q.shape[-1], v.shape[-1]
  kp, vp = _padded(kd, gpu_linear.KEY_DIMS), _padded(vd, gpu_linear.VALUE_DIMS)
  pad = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
  if (kp, vp) != (kd, vd):
    q, k, v = pad(q, kp), pad(k, kp), pad(v, vp)
    state = common["initial_state"]
    if state is not None:
      common = dict(common, initial_state=jnp.pad(state, ((0, 0), (0, 0), (0, kp - kd),
                                                          (0, vp - vd))))
  if beta is not None:
    o, final = gpu_delta.gated_delta_rule(q, k, v, g, beta, **common)
  elif g.ndim == 4:   # zero gates on the padded key channels: no decay, and k = 0 there
    o, final = gpu_gla.gla(q, k, v, pad(g, kp) if kp != kd else g, **common)
  else:
    o, final = gpu_linear.simple_gla(q, k, v, g, **common)
  return o[..., :vd], final[:, :, :kd, :vd]


def linear_recurrence_pallas(q, k, v, g=None, beta=None, *, scale, initial_state=None,
                             segment_ids=None, chunk_size=64):
  """Same arguments and result as the other tiers: ``(o [B, T, H, V], final [B, H, K, V]
  float32)``, ``o`` in v's dtype."""
  backend, interpret = kernel_target()
  if backend is None:
    raise ValueError("the chunked linear kernels run on TPU (Mosaic TPU) or GPU (Mosaic GPU)")
  common = dict(scale=scale, initial_state=initial_state, output_final_state=True,
                segment_ids=segment_ids, chunk_size=chunk_size, interpret=interpret)
  if g is None and beta is None:
    g = jnp.zeros(q.shape[:3], jnp.float32)  # plain linear attention: no decay
  if backend == "gpu":
    return _gpu_padded(q, k, v, g, beta, common)
  if beta is not None:
    if g is None:
      return chunked_linear.delta_rule(q, k, v, beta, **common)
    return chunked_linear.gated_delta_rule(q, k, v, g, beta, **common)
  if g.ndim == 4:
    return chunked_linear.gla(q, k, v, g, **common)
  return chunked_linear.simple_gla(q, k, v, g, **common)
