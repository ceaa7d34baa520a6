"""Decoder language model: embeddings, a stack of pre-norm blocks, final norm, LM head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnlab.layers import RMSNorm
from attnlab.layers.common import dense, named_init
from attnlab.models.blocks import Stack
from attnlab.models.config import ModelConfig


def _check_tokens(name, tokens, ndim):
  if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of rank {ndim}, got "
                     f"{name}.shape={tokens.shape}, dtype={tokens.dtype}")


class Embedder(nnx.Module):
  """Token embedding and the LM head (tied to the embedding or separate)."""

  def __init__(self, config: ModelConfig, *, rngs):
    init = named_init(nnx.initializers.normal(0.02), ("vocab", "embed"))
    self.embed = nnx.Embed(config.vocab_size, config.width, dtype=config.dtype,
                           param_dtype=config.param_dtype, embedding_init=init, rngs=rngs)
    self.head = None if config.tie_embeddings else dense(
        config.width, config.vocab_size, ("embed", "vocab"), rngs=rngs,
        dtype=config.dtype, param_dtype=config.param_dtype)

  def __call__(self, tokens):
    return self.embed(tokens)

  def logits(self, x):
    out = self.embed.attend(x) if self.head is None else self.head(x)
    return out.astype(jnp.float32)


class DecoderLM(nnx.Module):
  """A causal LM over the layer pattern of ``config``.

  ``model(tokens [B, T])`` returns float32 logits ``[B, T, V]``; ``segment_ids [B, T]``
  packs documents (no information crosses a document boundary) and ``positions [B, T]``
  overrides the default ``0..T-1`` (RoPE). For generation, ``prefill`` runs right-padded
  prompts and returns the caches, and ``decode`` advances one token per row.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not config.causal:
      raise ValueError("DecoderLM needs ModelConfig.causal=True; use Encoder for False")
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.stack = Stack(config, rngs=rngs)
    self.final_norm = RMSNorm(config.width, eps=config.norm_eps)

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    _check_tokens("tokens", tokens, 2)
    x = self.stack(self.embedder(tokens), segment_ids, positions)
    return self.embedder.logits(self.final_norm(x))

  def prefill(self, tokens, lengths, max_len):
    """``tokens [B, T]`` right-padded prompts of ``lengths [B]`` (1 <= lengths <= T);
    ``max_len`` bounds prompt plus generated tokens. Returns ``(logits [B, T, V],
    cache)``; logits past a row's length are meaningless."""
    _check_tokens("tokens", tokens, 2)
    _check_tokens("lengths", lengths, 1)
    if tokens.shape[1] > max_len:
      raise ValueError(f"max_len={max_len} is shorter than the prompts, "
                       f"tokens.shape={tokens.shape}")
    x, cache = self.stack.prefill(self.embedder(tokens), lengths, max_len)
    return self.embedder.logits(self.final_norm(x)), cache

  def decode(self, tokens_t, cache, positions):
    """``tokens_t [B]`` at ``positions [B]`` (each row's length so far) -> ``(logits
    [B, V], cache)``."""
    _check_tokens("tokens_t", tokens_t, 1)
    x, cache = self.stack.decode(self.embedder(tokens_t[:, None]), cache, positions)
    return self.embedder.logits(self.final_norm(x))[:, 0], cache
