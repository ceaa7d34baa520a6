"""Mixers of the softmax-family variants (``attnlab.ops.softmax_variants``,
``attnlab.ops.attention_rnn``).

==================  ===================  ===============================================
mixer               op                   layer
==================  ===================  ===============================================
sigmoid_attention   sigmoid_attention    q, k, v projections (GQA, RoPE, optional qk-norm),
                                         ``b = -log(context_length)`` (4096 by default,
                                         fixed so that decoding sees the same b), output
                                         projection, then an RMSNorm of the output (the
                                         paper's hybrid-norm, which keeps the sigmoid
                                         weights' small initial norm from stalling)
rela                rela                 the same projections; ReLA-g's gated RMSNorm of
                                         the heads' concatenation (gain init 1, gate init
                                         0, i.e. sigmoid = 1/2), output projection
softplus_attention  softplus_attention   the same; ``power = 1`` (LSSA) by default: the
                                         paper applies the re-weighting (p = 15) without
                                         retraining, so build the mixer with ``power=15``
                                         to evaluate LSSAR
cog_attention       cog_attention        the same projections and output projection (the
                                         paper keeps softmax attention in the first and
                                         last layers: a layer pattern of the model)
aaren               aaren                Aaren: a learned query token per head, k and v
                                         projections, the prefix scan, output projection;
                                         causal only, decode state ``[B, H, V + 2]``
==================  ===================  ===============================================

The attention mixers decode from a KV cache (``variant_attention_cache``, one slot per
position up to ``max_len``); ``MixerConfig.sliding_window``, ``mask``, ``sinks``,
``logits_soft_cap`` and ``output_gate`` do not apply to them and are ignored.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import RMSNorm, dense, named_param, rope
from attnlab.layers.config import MixerConfig

_STEPS = {
    "sigmoid_attention": (ops.sigmoid_attention, ops.sigmoid_attention_step),
    "rela": (ops.rela, ops.rela_step),
    "softplus_attention": (ops.softplus_attention, ops.softplus_attention_step),
    "cog_attention": (ops.cog_attention, ops.cog_attention_step),
}


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


class _VariantAttention(nnx.Module):
  """q, k, v projections -> a variant op -> output projection, with a KV-cache decoder.

  Subclasses set ``op`` and may add op arguments (``_op_kwargs``) or change the output
  (``_output``)."""

  op = ""
  forms = ("causal", "non_causal")

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    if c.position not in ("rope", "none"):
      raise ValueError(f"mixer {self.op!r} supports MixerConfig.position 'rope' or 'none', "
                       f"got {c.position!r}")
    n, kv, h, d = c.num_heads, c.kv_heads, c.dim, c.width
    kw = _kw(c, rngs)
    self.q_proj = dense(d, n * h, ("embed", "heads"), **kw)
    self.k_proj = dense(d, kv * h, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(d, kv * h, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(n * h, d, ("heads", "embed"), **kw)
    self.q_norm = RMSNorm(h, "head_dim", eps=c.norm_eps) if c.qk_norm else None
    self.k_norm = RMSNorm(h, "head_dim", eps=c.norm_eps) if c.qk_norm else None

  def _op_kwargs(self) -> dict:
    return {}

  def _qkv(self, x, positions):
    c = self.config
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.dim)
    k = self.k_proj(x).reshape(b, t, c.kv_heads, c.dim)
    v = self.v_proj(x).reshape(b, t, c.kv_heads, c.dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if c.position == "rope":
      q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
    return q, k, v

  def _output(self, o):
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``. ``lengths [B]`` marks right padding."""
    c = self.config
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x, positions)
    o = _STEPS[self.op][0](q, k, v, causal=c.causal, segment_ids=segment_ids,
                           lengths=lengths, implementation=c.implementation,
                           **self._op_kwargs())
    return self._output(o)

  # ----------------------------------------------------------------------- decoding

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")

  def init_cache(self, batch, max_len):
    c = self.config
    return ops.variant_attention_cache(batch, max_len, c.kv_heads, c.dim, dtype=c.dtype)

  def prefill(self, x, lengths, max_len):
    """Prompts ``x [B, T, D]`` (row b valid up to ``lengths[b]``) -> ``(y, cache)`` with
    the prompts' keys and values in slots ``0 .. lengths[b] - 1``."""
    self._check_decoder()
    b, t, _ = x.shape
    if max_len < t:
      raise ValueError(f"max_len={max_len} must hold the prompt of length {t}")
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    y = self(x, positions=positions)
    _, k, v = self._qkv(x, positions)
    slots = jnp.arange(max_len)[None]
    pos = jnp.where(slots < lengths[:, None], slots, -1).astype(jnp.int32)
    pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
    keep = (pos >= 0)[..., None, None]
    cache = {"k": jnp.where(keep, jnp.pad(k, pad), 0).astype(self.config.dtype),
             "v": jnp.where(keep, jnp.pad(v, pad), 0).astype(self.config.dtype), "pos": pos}
    return y, cache

  def decode(self, x_t, cache, positions):
    """One token per row: ``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t, cache)``."""
    self._check_decoder()
    q, k, v = self._qkv(x_t, positions[:, None])
    o, cache = _STEPS[self.op][1](q[:, 0], k[:, 0], v[:, 0], cache, positions,
                                  **self._op_kwargs())
    return self._output(o[:, None]), cache


class SigmoidAttention(_VariantAttention):
  """``y = RMSNorm(W_O concat_n sigmoid(q_n k_n^T / sqrt(H) + b) v_n)``, b = -log(n)."""

  op = "sigmoid_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, context_length: int = 4096):
    super().__init__(config, rngs=rngs)
    if not isinstance(context_length, int) or context_length < 1:
      raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    self.bias = -math.log(context_length)
    self.out_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype)

  def _op_kwargs(self):
    return {"bias": self.bias}

  def _output(self, o):
    return self.out_norm(super()._output(o))


class ReLA(_VariantAttention):
  """Rectified linear attention with the gated RMSNorm of the heads' concatenation."""

  op = "rela"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    shape = (config.num_heads, config.dim)
    self.norm_scale = named_param(jnp.ones(shape, config.param_dtype), ("heads", "head_dim"))
    self.norm_gate = named_param(jnp.zeros(shape, config.param_dtype), ("heads", "head_dim"))

  def _op_kwargs(self):
    return {"norm_scale": self.norm_scale[...], "norm_gate": self.norm_gate[...],
            "eps": self.config.norm_eps}


class SoftplusAttention(_VariantAttention):
  """Length-scaled softplus attention (LSSA), with LSSAR's re-weighting when ``power > 1``."""

  op = "softplus_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, power: float = 1.0):
    super().__init__(config, rngs=rngs)
    if config.dim < 2:
      raise ValueError(f"softplus_attention needs head_dim >= 2 (log base), got {config.dim}")
    self.power = float(power)

  def _op_kwargs(self):
    return {"power": self.power}


class CogAttention(_VariantAttention):
  """Cog attention: signed weights ``sign(s) softmax(|s|)``."""

  op = "cog_attention"


class Aaren(nnx.Module):
  """Aaren (Feng et al. 2024): ``o_t = softmax_{i <= t}(q . k_i / sqrt(H)) v`` with a
  learned query ``q`` per head, by the prefix scan; ``y = W_O o``."""

  op = "aaren"
  forms = ("causal",)

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h, d = c.num_heads, c.dim
    kw = _kw(c, rngs)
    self.query = named_param(jax.random.normal(rngs.params(), (h, d), c.param_dtype),
                             ("heads", "head_dim"))
    self.k_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.o_proj = dense(h * d, c.width, ("heads", "embed"), **kw)

  def _kvq(self, x):
    c = self.config
    b, t, _ = x.shape
    k = self.k_proj(x).reshape(b, t, c.num_heads, c.dim)
    v = self.v_proj(x).reshape(b, t, c.num_heads, c.dim)
    q = jnp.broadcast_to(self.query[...].astype(k.dtype), (b, c.num_heads, c.dim))
    return q, k, v

  def _run(self, x, segment_ids, lengths, output_final_state):
    q, k, v = self._kvq(x)
    o, state = ops.aaren(q, k, v, segment_ids=segment_ids, lengths=lengths,
                         output_final_state=output_final_state,
                         implementation=self.config.implementation)
    return self.o_proj(o.reshape(o.shape[:2] + (-1,))), state

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]`` (no positions: the scan is ordered already)."""
    del positions
    return self._run(x, segment_ids, lengths, False)[0]

  def init_cache(self, batch, max_len):
    del max_len
    c = self.config
    return {"state": jnp.zeros((batch, c.num_heads, c.dim + 2), jnp.float32)}

  def prefill(self, x, lengths, max_len):
    """Prompts ``x [B, T, D]``, row b valid up to ``lengths[b]`` -> ``(y, cache)``."""
    del max_len
    y, state = self._run(x, None, lengths, True)
    return y, {"state": state}

  def decode(self, x_t, cache, positions):
    """``x_t [B, 1, D]`` -> ``(y_t [B, 1, D], cache)``."""
    del positions
    q, k, v = self._kvq(x_t)
    o, state = ops.aaren_step(q, k[:, 0], v[:, 0], cache["state"])
    return self.o_proj(o.reshape(o.shape[0], 1, -1)), {"state": state}


MIXERS = {
    "sigmoid_attention": SigmoidAttention,
    "rela": ReLA,
    "softplus_attention": SoftplusAttention,
    "cog_attention": CogAttention,
    "aaren": Aaren,
}
