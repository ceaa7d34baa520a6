"""Softmax attention, cudnn tier: ``jax.nn.dot_product_attention(implementation="cudnn")``.

GPU only. It joins automatic dispatch for the calls its GPU tests cover
(``tests/ops/test_softmax_cudnn.py``, run on the H100): float16 / bfloat16, lengths that
are multiples of 64, head dim a multiple of 8 up to 128, causal or no mask, optional
right padding; no sinks, soft cap, score mods or other masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import masks as masks_lib
from attnlab.ops import registry


def cudnn_supports(call) -> str | None:
  """None when cuDNN can run ``call`` (an ``AttentionCall``), else the reason."""
  if registry.current_backend() != "gpu":
    return f"cuDNN runs on GPU only, the backend is {registry.current_backend()!r}"
  if call.query.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs float16 or bfloat16 inputs, got {call.query.dtype}"
  q_len, kv_len = call.query.shape[1], call.key.shape[1]
  if q_len % 64 or kv_len % 64:
    return (f"the cuDNN path is tested for lengths that are multiples of 64, got "
            f"T={q_len}, S={kv_len} (jax's cuDNN call rejects odd lengths in training)")
  head_dim = call.query.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return f"head dim {head_dim} is not a multiple of 8 up to 128"
  if call.sinks is not None:
    return "cuDNN has no attention sinks"
  if call.logits_soft_cap is not None:
    return "cuDNN has no logits soft cap"
  if call.bias is not None:
    return "score modifiers and bias arrays are not routed to cuDNN"
  for part in masks_lib.components(call.mask):
    if not isinstance(part, (masks_lib.Causal, masks_lib.Padding)):
      return f"cuDNN does not take the mask {type(part).__name__}"
  return None


def dot_product_attention_cudnn(query, key, value, bias=None, mask=None, *, scale,
                                logits_soft_cap=None, sinks=None, block_sizes=None):
  """cuDNN flash attention through ``jax.nn``; same canonical arguments as the others."""
  del block_sizes  # cuDNN picks its own tiles
  if bias is not None or logits_soft_cap is not None or sinks is not None:
    raise ValueError("the cudnn tier takes no bias, soft cap or sinks")
  is_causal, q_lengths, kv_lengths = False, None, None
  for part in masks_lib.components(mask):
    if isinstance(part, masks_lib.Causal):
      is_causal = True
    elif isinstance(part, masks_lib.Padding):
      q_lengths, kv_lengths = part.q_lengths, part.kv_lengths
    else:
      raise ValueError(f"the cudnn tier does not take the mask {type(part).__name__}")
  return jax.nn.dot_product_attention(
      query, key, value, scale=scale, is_causal=is_causal, query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths, implementation="cudnn")
