"""Bidirectional encoder with a classification head (LRA-style tasks)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnlab.layers import RMSNorm
from attnlab.layers.common import dense
from attnlab.models.blocks import Stack
from attnlab.models.config import ModelConfig
from attnlab.models.lm import Embedder, _check_tokens


class Encoder(nnx.Module):
  """Non-causal mixers (softmax without a causal mask; linear mixers in their
  bidirectional form), mean pooling over each row's valid tokens, a linear classifier.

  ``model(tokens [B, T], lengths=None)`` returns float32 class logits ``[B, C]``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config = config.replace(causal=False)
    self.config = config
    self.embedder = Embedder(config.replace(tie_embeddings=True), rngs=rngs)
    self.stack = Stack(config, rngs=rngs)
    self.final_norm = RMSNorm(config.width, eps=config.norm_eps)
    self.classifier = dense(config.width, config.num_classes, ("embed", None),
                            use_bias=True, rngs=rngs, dtype=config.dtype,
                            param_dtype=config.param_dtype)

  def __call__(self, tokens, lengths=None):
    _check_tokens("tokens", tokens, 2)
    b, t = tokens.shape
    if lengths is None:
      lengths = jnp.full((b,), t, jnp.int32)
    _check_tokens("lengths", lengths, 1)
    x = self.final_norm(self.stack(self.embedder(tokens), lengths=lengths))
    valid = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float32)[..., None]
    pooled = (x.astype(jnp.float32) * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)
    return self.classifier(pooled.astype(x.dtype)).astype(jnp.float32)
