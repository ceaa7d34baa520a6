"""Pre-norm residual blocks and the stack of pattern repeats (unrolled or scanned)."""

from __future__ import annotations

import jax
from flax import nnx

from attnlab.layers import RMSNorm, make_mixer
from attnlab.layers.common import dense
from attnlab.models.config import ModelConfig
from attnlab.parallel.mesh_context import shard_tokens


class SwiGLU(nnx.Module):
  """``(silu(x W_gate) * x W_up) W_down`` (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU)."""

  def __init__(self, width, hidden, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = dense(width, hidden, ("embed", "mlp"), **kw)
    self.up = dense(width, hidden, ("embed", "mlp"), **kw)
    self.down = dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, mixer_name, mixer_config, config: ModelConfig, *, rngs):
    self.mixer_norm = RMSNorm(config.width, eps=config.norm_eps)
    self.mixer = make_mixer(mixer_name, mixer_config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.width, eps=config.norm_eps)
    self.mlp = SwiGLU(config.width, config.hidden_dim, rngs=rngs, dtype=config.dtype,
                      param_dtype=config.param_dtype)

  def __call__(self, x, segment_ids=None, positions=None, lengths=None):
    x = shard_tokens(x)   # T over the mesh's sequence axis, when one is in effect
    x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions,
                       lengths=lengths)
    return x + self.mlp(self.mlp_norm(x))

  def prefill(self, x, lengths, max_len):
    y, cache = self.mixer.prefill(self.mixer_norm(x), lengths, max_len)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode(self, x, cache, positions):
    y, cache = self.mixer.decode(self.mixer_norm(x), cache, positions)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache


class Repeat(nnx.Module):
  """One repeat of the layer pattern."""

  def __init__(self, config: ModelConfig, *, rngs):
    self.blocks = nnx.List([Block(mixer, mixer_config, config, rngs=rngs)
                            for mixer, mixer_config in config.layer_specs()])

  def __call__(self, x, segment_ids=None, positions=None, lengths=None):
    for block in self.blocks:
      x = block(x, segment_ids, positions, lengths)
    return x

  def prefill(self, x, lengths, max_len):
    caches = []
    for block in self.blocks:
      x, cache = block.prefill(x, lengths, max_len)
      caches.append(cache)
    return x, caches

  def decode(self, x, caches, positions):
    new = []
    for block, cache in zip(self.blocks, caches):
      x, cache = block.decode(x, cache, positions)
      new.append(cache)
    return x, new


class Stack(nnx.Module):
  """``num_repeats`` pattern repeats: a list, or one stacked module run by ``nnx.scan``
  (``scan_layers``); each repeat rematerialized in the backward pass with ``remat``.

  Caches are a list over repeats, or (scanned) one cache whose leaves have a leading
  repeat axis.
  """

  def __init__(self, config: ModelConfig, *, rngs):
    self.scan = config.scan_layers
    self.remat = config.remat
    self.num_repeats = config.num_repeats
    if self.scan:
      @nnx.split_rngs(splits=config.num_repeats)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return Repeat(config, rngs=rngs)
      self.repeats = create(rngs)
    else:
      self.repeats = nnx.List([Repeat(config, rngs=rngs)
                               for _ in range(config.num_repeats)])

  def __call__(self, x, segment_ids=None, positions=None, lengths=None):
    def body(repeat, x):
      return repeat(x, segment_ids, positions, lengths)
    if self.remat:
      body = nnx.remat(body)
    if self.scan:
      return nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.repeats, x)
    for repeat in self.repeats:
      x = body(repeat, x)
    return x

  def prefill(self, x, lengths, max_len):
    def body(repeat, x):
      return repeat.prefill(x, lengths, max_len)
    if self.scan:
      return nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(
          self.repeats, x)
    caches = []
    for repeat in self.repeats:
      x, cache = body(repeat, x)
      caches.append(cache)
    return x, caches

  def decode(self, x, caches, positions):
    def body(repeat, x, cache):
      return repeat.decode(x, cache, positions)
    if self.scan:
      return nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
          self.repeats, x, caches)
    new = []
    for repeat, cache in zip(self.repeats, caches):
      x, cache = body(repeat, x, cache)
      new.append(cache)
    return x, new
