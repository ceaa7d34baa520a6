"""Softmax attention, pallas tier: the Pallas kernel of the current backend.

On a GPU it runs ``pallas_kernels.gpu.flash_attention`` (Mosaic GPU, Hopper); on a TPU
``pallas_kernels.tpu.flash_attention`` (Mosaic TPU). This module turns the canonical call
into kernel arguments: static masks (causal, windows, the whole static vocabulary and
their ``&`` / ``|``) go to the kernel as one mask object (element predicate and block
summary), packed documents and right padding become segment ids (the TPU kernel takes
lengths itself). Under a jit over several devices each kernel launch, GPU or TPU, is split
over batch and head shards by ``custom_partitioning`` (``pallas_kernels/partition.py``: a
Mosaic call cannot be partitioned by XLA).

Both kernels take every option of the op: ALiBi in registers (with its slope gradient);
bias arrays and relative position bias as one dense float32 bias streamed tile by tile
(its gradient from a launch of its own, which XLA drops when nothing needs it); boolean
mask arrays and masks composed with a dynamic side as ``-inf`` entries of that bias, whose
empty blocks are skipped too (block lists built on the device from the masks' jnp block
summaries; the GPU kernel skips the blocks documents and padding empty the same way). What the
GPU kernel takes, and so what automatic dispatch gives it: bfloat16 / float16, head dim
64 / 128 (the dims its H100 tests cover), any lengths. The TPU kernel takes bfloat16 /
float32 and any head dim. The tests (``tests/ops/test_softmax_pallas.py``) run
every one of those features against the float64 oracle: the GPU kernel interpreted on
CPU and compiled on an H100, the TPU kernel through the whole shared softmax suite in
TPU interpret mode (no TPU is reachable here).

``interpret_kernels("gpu" | "tpu")`` makes the tier run a kernel through its Pallas
interpreter on any backend (slow; for tests and for reading a kernel on a laptop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import masks as masks_lib
from attnlab.ops import registry
from attnlab.ops.pallas_target import (KERNEL_BACKENDS, interpret_kernels,  # noqa: F401 (re-exported)
                                       kernel_target, not_hopper_reason)
from pallas_kernels.gpu import flash_attention as gpu_flash_attention
from pallas_kernels.tpu import flash_attention as tpu_flash_attention

# Block-size classes the pallas tier accepts through ``block_sizes=``.
KERNEL_BLOCK_SIZES = (gpu_flash_attention.BlockSizes, tpu_flash_attention.BlockSizes)

def _kernel_module(backend):
  return gpu_flash_attention if backend == "gpu" else tpu_flash_attention


def _split_mask(mask):
  """(static mask or None, Documents or None, Padding or None, rest): the rest are the
  dynamic masks that are not the first Documents / Padding (arrays, compositions with a
  dynamic side), which the kernels take as ``-inf`` entries of a dense bias."""
  static, docs, pads, rest = [], None, None, []
  for part in masks_lib.components(mask):
    if part.is_static:
      static.append(part)
    elif isinstance(part, masks_lib.Documents) and docs is None:
      docs = part
    elif isinstance(part, masks_lib.Padding) and pads is None:
      pads = part
    else:
      rest.append(part)
  return masks_lib.combine_masks(*static), docs, pads, rest


def _rank4(x):
  x = jnp.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _dense_bias(bias, rest, batch, num_heads, q_len, kv_len):
  """``[B or 1, N or 1, T, S]`` float32, or None: the score modifier (but ALiBi, which the
  kernels compute in registers) plus ``-inf`` where a mask of ``rest`` forbids a pair.
  Differentiable in the modifier's arrays (the kernels return the bias gradient)."""
  out = None
  if bias is not None and not isinstance(bias, masks_lib.Alibi):
    out = _rank4(bias.dense(q_len, kv_len)).astype(jnp.float32)
  for part in rest:
    term = jnp.where(_rank4(part.dense(q_len, kv_len)), 0.0, -jnp.inf)
    out = term if out is None else out + term
  if out is None:
    return None
  return jnp.broadcast_to(out, (batch if out.shape[0] != 1 else 1,
                                num_heads if out.shape[1] != 1 else 1, q_len, kv_len))


def pallas_automatic(call) -> str | None:
  """What automatic dispatch asks on top of :func:`pallas_supports`: the GPU kernel on a
  Hopper GPU only (sm_90 instructions), and the TPU kernel never until it has run on a
  TPU (it is tested in interpret mode only; name ``implementation="pallas"`` to use it)."""
  backend, interpret = kernel_target()
  if interpret:
    return None
  if backend == "tpu":
    return "the TPU kernel has run in interpret mode only; name implementation='pallas'"
  return not_hopper_reason() if backend == "gpu" else None


def pallas_supports(call) -> str | None:
  """None when the current backend's kernel can run ``call``, else the reason."""
  backend, _ = kernel_target()
  if backend is None:
    return (f"the Pallas kernels run on GPU (Mosaic GPU) and TPU (Mosaic TPU), the backend "
            f"is {registry.current_backend()!r}")
  if backend == "tpu":
    if call.query.dtype not in (jnp.bfloat16, jnp.float32):
      return f"the TPU kernel takes bfloat16 / float32 inputs, got {call.query.dtype}"
    return None
  if call.query.dtype not in (jnp.bfloat16, jnp.float16):
    return (f"the GPU kernel takes bfloat16 / float16 inputs (wgmma operands), got "
            f"{call.query.dtype}")
  if call.query.shape[-1] not in (64, 128):
    return f"the pallas tier gives the GPU kernel head dims 64 and 128 (its tested ones), got {call.query.shape[-1]}"
  return None


def _segment_ids(doc, pad, batch, q_len, kv_len):
  """Documents and right padding as one pair of segment-id arrays (or None, None).

  Padding becomes ids no real token shares: queries past their length get the int32
  minimum, keys past theirs the maximum, so those pairs never match."""
  if doc is None and pad is None:
    return None, None
  q_ids = jnp.zeros((batch, q_len), jnp.int32)
  kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
  if doc is not None:
    q_ids = doc.q_segment_ids.astype(jnp.int32)
    kv_ids = doc.kv_segment_ids.astype(jnp.int32)
  info = np.iinfo(np.int32)
  if pad is not None:
    if pad.q_lengths is not None:
      rows = jnp.arange(q_len)[None, :] < pad.q_lengths[:, None]
      q_ids = jnp.where(rows, q_ids, info.min)
    if pad.kv_lengths is not None:
      cols = jnp.arange(kv_len)[None, :] < pad.kv_lengths[:, None]
      kv_ids = jnp.where(cols, kv_ids, info.max)
  return q_ids, kv_ids


def dot_product_attention_pallas(query, key, value, bias=None, mask=None, *, scale,
                                 logits_soft_cap=None, sinks=None, block_sizes=None):
  """The current backend's kernel; same canonical arguments and result as the others.

  ``block_sizes``: the kernel's own ``BlockSizes`` (``pallas_kernels.gpu.flash_attention
  .BlockSizes``) or None for its defaults; the xla tier's ``attnlab.ops.BlockSizes`` does
  not apply to kernels and is ignored."""
  backend, interpret = kernel_target()
  if backend is None:
    raise ValueError(pallas_supports(None))
  static, doc, pad, rest = _split_mask(mask)
  kernel = _kernel_module(backend)
  if isinstance(block_sizes, KERNEL_BLOCK_SIZES) and not isinstance(block_sizes,
                                                                    kernel.BlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r} belongs to another backend's kernel; "
                     f"this call runs the {backend} kernel")
  if not isinstance(block_sizes, kernel.BlockSizes):
    block_sizes = None  # the xla tier's BlockSizes: the kernels keep their own defaults
  alibi = bias.slopes if isinstance(bias, masks_lib.Alibi) else None
  batch, q_len, num_heads = query.shape[:3]
  dense = _dense_bias(bias, rest, batch, num_heads, q_len, key.shape[1])
  if backend == "tpu":
    # The TPU kernel takes lengths and ALiBi itself (and skips blocks past the lengths).
    return kernel.flash_attention(
        query, key, value, scale=scale, soft_cap=logits_soft_cap, sinks=sinks, mask=static,
        q_segment_ids=None if doc is None else doc.q_segment_ids,
        kv_segment_ids=None if doc is None else doc.kv_segment_ids,
        q_lengths=None if pad is None else pad.q_lengths,
        kv_lengths=None if pad is None else pad.kv_lengths,
        alibi_slopes=alibi, bias=dense, block_mask=masks_lib.combine_masks(*rest),
        block_sizes=block_sizes, interpret=interpret)
  q_ids, kv_ids = _segment_ids(doc, pad, batch, q_len, key.shape[1])
  return kernel.flash_attention(
      query, key, value, scale=scale, soft_cap=logits_soft_cap, sinks=sinks, mask=static,
      q_segment_ids=q_ids, kv_segment_ids=kv_ids, bias=dense, alibi_slopes=alibi,
      block_mask=masks_lib.combine_masks(doc, pad, *rest), block_sizes=block_sizes,
      interpret=interpret)
