"""Softmax attention layer: projections, GQA, RoPE / ALiBi, qk-norm, output gate, masks,
sinks, soft cap, an optional short convolution on q, k, v, and a KV cache (a ring of
``sliding_window`` slots for windowed layers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import RMSNorm, ShortConv, dense, named_param, rope
from attnlab.layers.config import MixerConfig
from attnlab.ops import masks as masks_lib
from attnlab.parallel import mesh_context, ring


class SoftmaxAttention(nnx.Module):
  """Multi-head softmax attention (Vaswani et al. 2017, eq. 1) with GQA/MQA.

  ``y = W_O concat_n(g_n * softmax(q_n k_n^T / sqrt(H) + bias) v_n)`` where ``g_n`` is
  the optional per-head sigmoid output gate of Qiu et al. 2025 (``g = sigmoid(x W_g)``).
  With ``conv_size > 0`` the q, k, v projections first pass a causal depthwise
  convolution and SiLU (as the linear mixers' ``conv_size``), which lets one layer see the
  previous tokens: a key can carry the token before it, as an induction head needs.

  Under a mesh whose ``sequence`` axis has more than one device (``jax.set_mesh``, see
  :mod:`attnlab.parallel.mesh_context`) the attention runs as ring attention over that
  axis (zig-zag layout when causal); the projections, RoPE and the convolution are per
  token and stay in the caller's global view (XLA moves the convolution's few boundary
  tokens between neighbouring shards itself).
  """

  op = "dot_product_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    n, k, h, d = c.num_heads, c.kv_heads, c.dim, c.width
    kw = dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)
    self.q_proj = dense(d, n * h, ("embed", "heads"), **kw)
    self.k_proj = dense(d, k * h, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(d, k * h, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(n * h, d, ("heads", "embed"), **kw)
    self.q_norm = RMSNorm(h, "head_dim", eps=c.norm_eps) if c.qk_norm else None
    self.k_norm = RMSNorm(h, "head_dim", eps=c.norm_eps) if c.qk_norm else None
    self.gate_proj = dense(d, n, ("embed", "heads"), **kw) if c.output_gate else None
    self.sinks = (named_param(jnp.zeros((n,), c.param_dtype), ("heads",))
                  if c.sinks else None)
    self.conv = (ShortConv((n + 2 * k) * h, c.conv_size, rngs=rngs,
                           param_dtype=c.param_dtype) if c.conv_size else None)

  def _projections(self, x):
    """``[B, T, (N + 2K) H]``: q, k and v projections side by side (the conv's input)."""
    return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

  def _qkv(self, x, positions, segment_ids=None, conv_out=None):
    """q, k, v ``[B, T, *, H]``; ``conv_out`` given (decode) skips the convolution."""
    c = self.config
    b, t, _ = x.shape
    if self.conv is None:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    else:
      if conv_out is None:
        conv_out = self.conv(self._projections(x), segment_ids)
      q, k, v = jnp.split(conv_out, [c.num_heads * c.dim, (c.num_heads + c.kv_heads) * c.dim],
                          axis=-1)
    q = q.reshape(b, t, c.num_heads, c.dim)
    k = k.reshape(b, t, c.kv_heads, c.dim)
    v = v.reshape(b, t, c.kv_heads, c.dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if c.position == "rope":
      q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
    return q, k, v

  def _alibi_slopes(self):
    if self.config.position != "alibi":
      return None
    return jnp.asarray(masks_lib.alibi_slopes(self.config.num_heads), jnp.float32)

  def _window(self):
    w = self.config.sliding_window
    if w is None:
      return None
    return (w - 1, 0) if self.config.causal else (w - 1, w - 1)

  def _sinks(self):
    return None if self.sinks is None else self.sinks[...]

  def _output(self, o, x):
    b, t = o.shape[:2]
    if self.gate_proj is not None:
      o = o * jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))[..., None].astype(o.dtype)
    return self.o_proj(o.reshape(b, t, -1))

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``. ``lengths [B]`` marks right padding."""
    c = self.config
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x, positions, segment_ids)
    slopes = self._alibi_slopes()
    bias = None if slopes is None else masks_lib.Alibi(slopes)
    mesh = mesh_context.sequence_mesh()
    attention = (ops.dot_product_attention if mesh is None
                 else self._ring_attention(mesh, b, lengths))
    o = attention(
        q, k, v, bias=bias, mask=c.mask, is_causal=c.causal,
        local_window_size=self._window(), segment_ids=segment_ids,
        logits_soft_cap=c.logits_soft_cap, sinks=self._sinks(),
        key_value_seq_lengths=lengths, implementation=c.implementation)
    return self._output(o, x)

  def _ring_attention(self, mesh, batch, lengths):
    """``dot_product_attention`` as ring attention over the mesh's sequence axis; the
    options ring attention lacks raise here, named by their config field."""
    c = self.config
    unsupported = {
        "MixerConfig.position='alibi'": c.position == "alibi",
        "MixerConfig.sinks=True": c.sinks,
        f"MixerConfig.implementation={c.implementation!r} (each ring step runs the xla "
        "tier)": c.implementation not in (None, "xla"),
        "lengths (right padding; pack documents with segment_ids instead)":
            lengths is not None,
    }
    for option, present in unsupported.items():
      if present:
        raise ValueError(
            f"sequence parallelism (mesh axis {mesh_context.SEQUENCE_AXIS!r} of "
            f"{mesh.shape[mesh_context.SEQUENCE_AXIS]} devices) runs softmax attention as "
            f"ring attention, which does not support {option}")
    # Zig-zag balances causal work (T a multiple of 2P); without a causal mask every
    # device has the same work in the plain layout.
    return ring.ring_attention(
        mesh, mesh_context.SEQUENCE_AXIS, layout="zigzag" if c.causal else "contiguous",
        batch_axis=mesh_context.batch_axes(mesh, batch),
        head_axis=mesh_context.head_axis(mesh, c.num_heads, c.kv_heads))

  # ----------------------------------------------------------------------- decoding

  def cache_len(self, max_len):
    w = self.config.sliding_window
    return max_len if w is None else min(w, max_len)

  def init_cache(self, batch, max_len):
    c = self.config
    slots = self.cache_len(max_len)
    kv = jnp.zeros((batch, slots, c.kv_heads, c.dim), c.dtype)
    cache = {"k": kv, "v": kv, "pos": jnp.full((batch, slots), -1, jnp.int32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, c.dtype)
    return cache

  def prefill(self, x, lengths, max_len):
    """Run the prompts ``x [B, T, D]`` (row b valid up to ``lengths[b]``) and return
    ``(y, cache)`` holding each row's last keys and values."""
    self._check_decoder()
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    y = self(x, positions=positions)
    _, k, v = self._qkv(x, positions)
    slots = self.cache_len(max_len)
    s = jnp.arange(slots)[None]
    last = lengths[:, None] - 1
    # Slot s holds the latest prompt position p <= last with p % slots == s.
    pos = jnp.where(last >= s, s + slots * ((last - s) // slots), -1).astype(jnp.int32)
    idx = jnp.clip(pos, 0, t - 1)[..., None, None]
    k_cache = jnp.where((pos >= 0)[..., None, None], jnp.take_along_axis(k, idx, 1), 0)
    v_cache = jnp.where((pos >= 0)[..., None, None], jnp.take_along_axis(v, idx, 1), 0)
    cache = {"k": k_cache.astype(self.config.dtype),
             "v": v_cache.astype(self.config.dtype), "pos": pos}
    if self.conv is not None:
      cache["conv"] = self.conv.state_after(self._projections(x), lengths).astype(
          self.config.dtype)
    return y, cache

  def decode(self, x_t, cache, positions):
    """One token per row: ``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t, cache)``."""
    self._check_decoder()
    c = self.config
    conv_out, new_conv = None, None
    if self.conv is not None:
      y_c, new_conv = self.conv.step(self._projections(x_t)[:, 0], cache["conv"])
      conv_out = y_c[:, None]
    q, k, v = self._qkv(x_t, positions[:, None], conv_out=conv_out)
    slots = cache["pos"].shape[1]
    write = (jnp.arange(slots)[None] == (positions % slots)[:, None])
    k_cache = jnp.where(write[..., None, None], k.astype(cache["k"].dtype), cache["k"])
    v_cache = jnp.where(write[..., None, None], v.astype(cache["v"].dtype), cache["v"])
    pos = jnp.where(write, positions[:, None], cache["pos"])
    p = positions[:, None]
    allowed = (pos >= 0) & (pos <= p)
    if c.sliding_window is not None:
      allowed &= p - pos < c.sliding_window
    if c.mask is not None:
      allowed &= c.mask.predicate(p, pos)
    bias, slopes = None, self._alibi_slopes()
    if slopes is not None:
      dist = jnp.abs(p - pos).astype(jnp.float32)
      bias = -slopes[None, :, None, None] * dist[:, None, None, :]
    o = ops.dot_product_attention(
        q, k_cache, v_cache, bias=bias, mask=allowed[:, None, None, :],
        logits_soft_cap=c.logits_soft_cap, sinks=self._sinks(),
        implementation=c.implementation)
    new_cache = {"k": k_cache, "v": v_cache, "pos": pos}
    if new_conv is not None:
      new_cache["conv"] = new_conv
    return self._output(o, x_t), new_cache

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")
