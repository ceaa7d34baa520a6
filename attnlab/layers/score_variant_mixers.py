"""Mixers of the score-variant attentions: sparse weights, selective attention, multi-token
attention (``attnlab.ops.sparse_softmax``, ``selective_attention``,
``multi_token_attention``).

=====================  =====================  ==========================================
mixer                  op                     layer
=====================  =====================  ==========================================
sparsemax_attention    sparsemax_attention    q, k, v projections (RoPE), the op,
                                              output projection: multi-head attention
                                              with sparsemax weights (Martins &
                                              Astudillo 2016)
entmax15_attention     entmax15_attention     the same with 1.5-entmax weights (Correia
                                              et al. 2019, alpha fixed at 1.5 instead of
                                              learned per head)
selective_attention    selective_attention    the same with head 0's logits selecting
                                              (parameter-free); causal only
multi_token_attention  multi_token_attention  the same with the key-query convolution
                                              theta ``[H, 6, 11]`` and head mixing in
                                              groups of 2 after the softmax (c_q = 6,
                                              c_k = 11 as in the authors' configs; c_h = 1
                                              with an odd head count), both set to the
                                              identity at init, then the per-head RMS
                                              group norm of §3.3 (scale init 1) before
                                              the output projection
=====================  =====================  ==========================================

Every mixer decodes from a cache of keys and values by position (up to ``max_len``),
plus the accumulated selection (selective) or the last ``c_q - 1`` queries
(multi-token). The xla tiers work on key blocks of ``MixerConfig.chunk_size`` keys.
``MixerConfig.num_kv_heads``, ``sliding_window``, ``mask``, ``sinks``,
``logits_soft_cap``, ``qk_norm`` and ``output_gate`` do not apply and are ignored.
MTA's group norm uses no depth-dependent scale: a mixer does not know its depth.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import RMSNorm, dense, named_param, rope
from attnlab.layers.config import MixerConfig


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


class _ScoreVariant(nnx.Module):
  """q, k, v projections -> the op -> output projection, with a KV-cache decoder.

  Subclasses set ``op`` and define ``_attend`` (the whole sequence), ``_step`` (one
  token) and, where the cache holds more than keys and values, ``_extra_cache`` /
  ``_prefill_extra``."""

  forms = ("causal", "non_causal")

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    if c.position not in ("rope", "none"):
      raise ValueError(f"mixer {self.op!r} supports MixerConfig.position 'rope' or 'none', "
                       f"got {c.position!r}")
    h, d = c.num_heads, c.dim
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.o_proj = dense(h * d, c.width, ("heads", "embed"), **kw)

  def _qkv(self, x, positions):
    c = self.config
    shape = x.shape[:2] + (c.num_heads, c.dim)
    q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
    if c.position == "rope":
      q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
    return q, k, v

  def _output(self, o):
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``; ``lengths [B]`` marks right padding."""
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x, positions)
    return self._output(self._attend(q, k, v, segment_ids, lengths)[0])

  # ---------------------------------------------------------------------- decoding

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")

  def _extra_cache(self, batch, max_len):
    del batch, max_len
    return {}

  def init_cache(self, batch, max_len):
    c = self.config
    cache = ops.sparse_attention_cache(batch, max_len, c.num_heads, c.dim, c.dim, c.dtype)
    cache.update(self._extra_cache(batch, max_len))
    return cache

  def _prefill_extra(self, q, extra, lengths, max_len):
    del q, lengths, max_len
    return {}

  def prefill(self, x, lengths, max_len):
    """Run the prompts ``x [B, T, D]`` (row b valid up to ``lengths[b]``); return
    ``(y, cache)`` with each row's keys and values (and extras) up to its length."""
    self._check_decoder()
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x, positions)
    o, extra = self._attend(q, k, v, None, lengths, output_final_state=True)
    keep = (jnp.arange(t)[None] < lengths[:, None])[..., None, None]
    pad = [(0, 0), (0, max_len - t), (0, 0), (0, 0)]
    cache = {"k": jnp.pad(jnp.where(keep, k, 0), pad).astype(self.config.dtype),
             "v": jnp.pad(jnp.where(keep, v, 0), pad).astype(self.config.dtype)}
    cache.update(self._prefill_extra(q, extra, lengths, max_len))
    return self._output(o), cache

  def decode(self, x_t, cache, positions):
    """One token per row: ``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t, cache)``."""
    self._check_decoder()
    q, k, v = self._qkv(x_t, positions[:, None])
    o, cache = self._step(q[:, 0], k[:, 0], v[:, 0], cache, positions)
    return self._output(o[:, None]), cache


class _SparseAttention(_ScoreVariant):
  """Multi-head attention with sparse weights (sparsemax or 1.5-entmax)."""

  def _fns(self):
    return {"sparsemax_attention": (ops.sparsemax_attention, ops.sparsemax_attention_step),
            "entmax15_attention": (ops.entmax15_attention,
                                   ops.entmax15_attention_step)}[self.op]

  def _attend(self, q, k, v, segment_ids, lengths, output_final_state=False):
    del output_final_state  # the cache is the keys and values
    c = self.config
    o = self._fns()[0](q, k, v, causal=c.causal, segment_ids=segment_ids, lengths=lengths,
                       block_size=c.chunk_size, implementation=c.implementation)
    return o, None

  def _step(self, q_t, k_t, v_t, cache, positions):
    return self._fns()[1](q_t, k_t, v_t, cache, positions)


class SparsemaxAttention(_SparseAttention):
  """Attention weights ``sparsemax(q k^T / sqrt(D))`` (Martins & Astudillo 2016)."""

  op = "sparsemax_attention"


class Entmax15Attention(_SparseAttention):
  """Attention weights ``1.5-entmax(q k^T / sqrt(D))`` (Correia et al. 2019)."""

  op = "entmax15_attention"


class SelectiveAttention(_ScoreVariant):
  """Selective attention (Leviathan et al. 2024): head 0's ReLU'd logits, accumulated
  over earlier queries, are subtracted from every head's logits. Parameter-free."""

  op = "selective_attention"
  forms = ("causal",)

  def _attend(self, q, k, v, segment_ids, lengths, output_final_state=False):
    c = self.config
    return ops.selective_attn(q, k, v, segment_ids=segment_ids, lengths=lengths,
                              output_final_state=output_final_state,
                              block_size=c.chunk_size, implementation=c.implementation)

  def _extra_cache(self, batch, max_len):
    return {"f": jnp.zeros((batch, max_len), jnp.float32)}

  def _prefill_extra(self, q, extra, lengths, max_len):
    del lengths  # the op's F already counts only the rows before each length
    return {"f": jnp.pad(extra, [(0, 0), (0, max_len - extra.shape[1])])}

  def _step(self, q_t, k_t, v_t, cache, positions):
    return ops.selective_attn_step(q_t, k_t, v_t, cache, positions)


class MultiTokenAttention(_ScoreVariant):
  """Multi-token attention (Golovneva et al. 2025): a learned key-query convolution of
  each head's scores, head mixing after the softmax, a per-head RMS group norm."""

  op = "multi_token_attention"
  query_kernel = 6
  key_kernel = 11
  head_group = 2

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    h, p = config.num_heads, config.param_dtype
    # Identity initialization (the paper's): at init the layer is softmax attention.
    kernel = jnp.zeros((h, self.query_kernel, self.key_kernel), p)
    self.kernel = named_param(kernel.at[:, 0, self.key_kernel // 2].set(1.0),
                              ("heads", None, None))
    group = self.head_group if h % self.head_group == 0 else 1
    self.head_mix = named_param(jnp.tile(jnp.eye(group, dtype=p), (h // group, 1, 1)),
                                (None, None, None))
    self.group_norm = RMSNorm(config.dim, "head_dim", eps=config.norm_eps,
                              param_dtype=p)

  def _mta_args(self):
    return self.kernel[...], self.head_mix[...]

  def _output(self, o):
    return super()._output(self.group_norm(o))

  def _attend(self, q, k, v, segment_ids, lengths, output_final_state=False):
    del output_final_state  # the cache is read off the queries, keys and values
    c = self.config
    o = ops.multi_token_attn(q, k, v, *self._mta_args(), causal=c.causal,
                             segment_ids=segment_ids, lengths=lengths,
                             implementation=c.implementation)
    return o, None

  def _extra_cache(self, batch, max_len):
    c = self.config
    return {"q": jnp.zeros((batch, self.query_kernel - 1, c.num_heads, c.dim), c.dtype)}

  def _prefill_extra(self, q, extra, lengths, max_len):
    """Slot ``r`` of the query ring holds the latest prompt position ``a < lengths`` with
    ``a % (c_q - 1) == r``."""
    del extra, max_len
    ring = self.query_kernel - 1
    r = jnp.arange(ring)[None]
    last = lengths[:, None] - 1
    pos = jnp.where(last >= r, r + ring * ((last - r) // ring), 0)
    idx = jnp.clip(pos, 0, q.shape[1] - 1)[..., None, None]
    queries = jnp.where((last >= r)[..., None, None], jnp.take_along_axis(q, idx, 1), 0)
    return {"q": queries.astype(self.config.dtype)}

  def _step(self, q_t, k_t, v_t, cache, positions):
    return ops.multi_token_attn_step(q_t, k_t, v_t, cache, positions, *self._mta_args())


MIXERS = {
    "sparsemax_attention": SparsemaxAttention,
    "entmax15_attention": Entmax15Attention,
    "selective_attention": SelectiveAttention,
    "multi_token_attention": MultiTokenAttention,
}
