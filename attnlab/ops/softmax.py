"""Softmax attention: the public op, its argument checks and its registered tiers.

``dot_product_attention`` is a superset of ``jax.nn.dot_product_attention``: the same
arguments with the same meanings, plus segment ids, soft capping, sinks, the mask
vocabulary of :mod:`attnlab.ops.masks` and score modifiers. It checks its arguments,
folds every masking option into one :class:`~attnlab.ops.masks.Mask` and every additive
term into one :class:`~attnlab.ops.masks.ScoreMod`, and hands that canonical call to the
tier the registry picks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import masks as masks_lib
from attnlab.ops import registry
from attnlab.ops.softmax_cudnn import cudnn_supports, dot_product_attention_cudnn
from attnlab.ops.softmax_pallas import (KERNEL_BLOCK_SIZES, dot_product_attention_pallas,
                                        pallas_automatic, pallas_supports)
from attnlab.ops.softmax_reference import dot_product_attention_reference
from attnlab.ops.softmax_xla import BlockSizes, dot_product_attention_xla

MECHANISM = "dot_product_attention"


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """The canonical arguments every tier takes (batched, masks and biases folded)."""

  query: Any
  key: Any
  value: Any
  bias: masks_lib.ScoreMod | None
  mask: masks_lib.Mask | None
  scale: float
  logits_soft_cap: float | None
  sinks: Any
  block_sizes: BlockSizes | None

  def run(self, fn):
    return fn(self.query, self.key, self.value, self.bias, self.mask, scale=self.scale,
              logits_soft_cap=self.logits_soft_cap, sinks=self.sinks,
              block_sizes=self.block_sizes)


def _reference(query, key, value, bias=None, mask=None, *, scale, logits_soft_cap=None,
               sinks=None, block_sizes=None):
  del block_sizes  # the dense definition has no blocks
  return dot_product_attention_reference(query, key, value, bias, mask, scale=scale,
                                         logits_soft_cap=logits_soft_cap, sinks=sinks)


registry.describe(MECHANISM, registry.MechanismInfo(
    paper="Vaswani et al. 2017; FlashAttention (Dao et al. 2022) for the blockwise form",
    family="softmax", causal=True, non_causal=True, state="KV cache, T x (K + V)",
    cost="O(T^2 K), O(T w K) with a window; block-sparse masks skip empty blocks",
    xla_path="blockwise online softmax (its own)"))
registry.register(MECHANISM, registry.Implementation(
    "reference", _reference, priority=0, automatic=False))
registry.register(MECHANISM, registry.Implementation(
    "xla", dot_product_attention_xla, priority=10))
registry.register(MECHANISM, registry.Implementation(
    "cudnn", dot_product_attention_cudnn, supports=cudnn_supports, priority=20))
registry.register(MECHANISM, registry.Implementation(
    "pallas", dot_product_attention_pallas, supports=pallas_supports, priority=15,
    automatic_supports=pallas_automatic))


def _shape(x):
  return tuple(np.shape(x))


def _broadcastable(shape, target) -> bool:
  if len(shape) != len(target):
    return False
  return all(s in (1, t) for s, t in zip(shape, target))


def _check_int_array(name, x, shape):
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {name}.shape={x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got {name}.dtype={x.dtype}")
  return x


def _window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(
      local_window_size, bool):
    left = right = int(local_window_size)
  elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) for w in local_window_size)):
    left, right = (int(w) for w in local_window_size)
  else:
    raise ValueError("local_window_size must be an int or a (left, right) pair of ints, "
                     f"got local_window_size={local_window_size!r}")
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must be non-negative, got {(left, right)}")
  return masks_lib.LocalWindow(left, right)


def canonicalize(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                 local_window_size=None, segment_ids=None, logits_soft_cap=None,
                 sinks=None, query_seq_lengths=None, key_value_seq_lengths=None,
                 block_sizes=None) -> tuple[AttentionCall, bool]:
  """Check the arguments and fold them into an :class:`AttentionCall`.

  Returns the call (batched) and whether the inputs were unbatched ``[T, N, H]``.
  Raises ValueError naming the argument and the shapes it got, before any computation.
  """
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  if query.ndim not in (3, 4):
    raise ValueError(f"query must be [B, T, N, H] or [T, N, H], got {query.shape=}")
  if key.ndim != query.ndim or value.ndim != query.ndim:
    raise ValueError(f"query, key and value must have the same rank, got "
                     f"{query.shape=}, {key.shape=}, {value.shape=}")
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"query, key and value must share a dtype, got "
                     f"{query.dtype=}, {key.dtype=}, {value.dtype=}")
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape, got "
                     f"{key.shape=}, {value.shape=}")
  batch, q_len, num_heads, head_dim = query.shape
  if key.shape[0] != batch or key.shape[3] != head_dim:
    raise ValueError("key must be [B, S, K, H] with the query's B and H, got "
                     f"{query.shape=}, {key.shape=}")
  num_kv = key.shape[2]
  kv_len = key.shape[1]
  if num_kv == 0 or num_heads % num_kv:
    raise ValueError(f"the query heads N={num_heads} must be a multiple of the key/value "
                     f"heads K={num_kv} (GQA/MQA); got {query.shape=}, {key.shape=}")
  if q_len == 0 or kv_len == 0:
    raise ValueError(f"sequence lengths must be positive, got {query.shape=}, {key.shape=}")
  full = (batch, num_heads, q_len, kv_len)

  if scale is None:
    scale = head_dim ** -0.5
  if not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got scale={scale!r}")
  if logits_soft_cap is not None:
    if not isinstance(logits_soft_cap, (int, float, np.floating)) or not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be a positive float, got {logits_soft_cap!r}")
    logits_soft_cap = float(logits_soft_cap)

  bias_mod = None
  if isinstance(bias, masks_lib.ScoreMod):
    bias_mod = bias
  elif bias is not None:
    bias = jnp.asarray(bias)
    if unbatched and bias.ndim == 3:
      bias = bias[None]
    if not _broadcastable(bias.shape, full):
      raise ValueError(f"bias must be broadcastable to [B, N, T, S]={full}, "
                       f"got {bias.shape=}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got {bias.dtype=}")
    bias_mod = masks_lib.ArrayBias(bias)

  parts = []
  if isinstance(mask, masks_lib.Mask):
    parts.append(mask)
  elif mask is not None:
    mask = jnp.asarray(mask)
    if unbatched and mask.ndim == 3:
      mask = mask[None]
    if not _broadcastable(mask.shape, full):
      raise ValueError(f"mask must be broadcastable to [B, N, T, S]={full}, "
                       f"got {mask.shape=}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype=}")
    parts.append(masks_lib.ArrayMask(mask))
  if not isinstance(is_causal, bool):
    raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
  if is_causal:
    parts.append(masks_lib.Causal())
  parts.append(_window(local_window_size))
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be an array [B, T] or a pair (q_ids [B, T], "
                         f"kv_ids [B, S]), got a sequence of {len(segment_ids)}")
      q_ids, kv_ids = segment_ids
    else:
      if q_len != kv_len:
        raise ValueError(f"segment_ids as one array needs T == S, got T={q_len}, "
                         f"S={kv_len}; pass (q_segment_ids, kv_segment_ids)")
      q_ids = kv_ids = segment_ids
    if unbatched:
      q_ids, kv_ids = jnp.asarray(q_ids)[None], jnp.asarray(kv_ids)[None]
    q_ids = _check_int_array("segment_ids (query)", q_ids, (batch, q_len))
    kv_ids = _check_int_array("segment_ids (key/value)", kv_ids, (batch, kv_len))
    parts.append(masks_lib.Documents(q_ids, kv_ids))
  if query_seq_lengths is not None or key_value_seq_lengths is not None:
    if unbatched:
      raise ValueError("query_seq_lengths / key_value_seq_lengths need batched inputs")
    ql = _check_int_array("query_seq_lengths", query_seq_lengths, (batch,))
    kl = _check_int_array("key_value_seq_lengths", key_value_seq_lengths, (batch,))
    parts.append(masks_lib.Padding(ql, kl))
  mask_obj = masks_lib.combine_masks(*parts)
  if mask_obj is not None:
    mask_obj.check(batch, num_heads, q_len, kv_len)
  if bias_mod is not None:
    bias_mod.check(batch, num_heads, q_len, kv_len)

  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (num_heads,):
      raise ValueError(f"sinks must have shape [N]=({num_heads},), got {sinks.shape=}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(f"sinks must be floating point, got {sinks.dtype=}")
  if block_sizes is not None and not isinstance(block_sizes, (BlockSizes,) + KERNEL_BLOCK_SIZES):
    raise ValueError(f"block_sizes must be attnlab.ops.BlockSizes or a kernel's BlockSizes, "
                     f"got {block_sizes!r}")
  call = AttentionCall(query, key, value, bias_mod, mask_obj, float(scale),
                       logits_soft_cap, sinks, block_sizes)
  return call, unbatched


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, local_window_size=None, segment_ids=None,
                          logits_soft_cap=None, sinks=None, query_seq_lengths=None,
                          key_value_seq_lengths=None, implementation=None,
                          block_sizes=None):
  """Scaled dot-product attention with GQA/MQA, masks, score mods, soft cap and sinks.

  Shapes: ``query [B, T, N, H]``, ``key``/``value [B, S, K, H]`` with ``N % K == 0``
  (unbatched ``[T, N, H]`` / ``[S, K, H]`` also work). Returns ``[B, T, N, H]`` in the
  query dtype. For each head ``n`` (key head ``n // (N // K)``)::

      logits = scale * q k^T                      # scale defaults to H ** -0.5
      logits = cap * tanh(logits / cap)           # if logits_soft_cap=cap
      logits = logits + bias                      # array [B|1, N|1, T|1, S] or ScoreMod
      p      = softmax over allowed keys (and the sink logit sinks[n], if given)
      out    = p @ v                              # the sink carries no value

  A query that sees no key returns zeros (zero gradients), never NaN.

  Args:
    query, key, value: floating arrays of one dtype.
    bias: additive logits bias broadcastable to ``[B, N, T, S]``, or a
      :class:`~attnlab.ops.masks.ScoreMod` (``Alibi``, ``RelativePositionBias``).
    mask: boolean array broadcastable to ``[B, N, T, S]`` (True = attend) or a
      :class:`~attnlab.ops.masks.Mask` from the mask vocabulary (``Causal()``,
      ``LocalWindow(l, r)``, ``ChunkedCausal(c)``, ``PrefixLM(p)``, ...).
    scale: logits scale, a Python float.
    is_causal: query ``i`` sees keys ``j <= i``.
    local_window_size: ``w`` or ``(left, right)``: ``i - left <= j <= i + right``.
    segment_ids: ``[B, T]`` (when T == S) or ``(q_ids [B, T], kv_ids [B, S])``: queries
      see keys of their own segment (packed documents).
    logits_soft_cap: ``c > 0``: logits become ``c * tanh(logits / c)`` before the bias.
    sinks: ``[N]`` learned sink logits that join each row's softmax denominator.
    query_seq_lengths, key_value_seq_lengths: ``[B]`` int lengths (right padding).
    implementation: None (fastest tier that supports the call on this backend) or one
      of ``attnlab.ops.implementations("dot_product_attention")``.
    block_sizes: :class:`~attnlab.ops.BlockSizes` for the blockwise tiers (the
      reference tier has no blocks and ignores it).
  """
  call, unbatched = canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      local_window_size=local_window_size, segment_ids=segment_ids,
      logits_soft_cap=logits_soft_cap, sinks=sinks, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, block_sizes=block_sizes)
  impl = registry.select(MECHANISM, implementation, call)
  out = call.run(impl.fn)
  return out[0] if unbatched else out
