"""Mixers of the catalog's newer matrix-state recurrences (CATALOG.md section 2).

=================  ====================  ==========================================================
mixer              op                    layer
=================  ====================  ==========================================================
kda                kimi_delta_attention  Kimi Linear's KDA layer (Kimi Team 2025): q, k, v
                                         through a short conv and SiLU, q, k L2-normed in the
                                         op; per-channel log decay ``g = -exp(A_log_h)
                                         softplus(x W_down W_up + dt_bias)`` (low rank, rank =
                                         the value head dim); ``beta = sigmoid(x W_beta)``;
                                         output ``RMSNorm(o) * sigmoid(x W_g_down W_g_up + b)``
log_linear_mamba2  log_linear_attention  log-linear Mamba-2 (Guo et al. 2025, §3.3): the Mamba-2
                                         block of :class:`attnlab.layers.linear_mixers.Mamba2`
                                         with level weights ``lambda_t = softplus(x W_lambda +
                                         b_lambda)`` per head and Fenwick level
=================  ====================  ==========================================================

KDA's ``dt_bias`` is one per key channel and, like Gated DeltaNet's here, starts with
``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]`` (Mamba's init; the paper gives
none); ``A_log`` is per head with ``exp(A_log)`` uniform in ``a_init_range``. With
``conv_size=0`` q, k, v take SiLU alone.

The log-linear mixer has ``MixerConfig.num_levels`` levels (default 16: documents of up
to 32768 tokens). ``b_lambda = log(e - 1)`` makes ``lambda = 1`` for a zero projection,
where the layer is Mamba-2 exactly. Its decode state is ``[B, H, L, N, P]`` (one Mamba-2
state per level) and decoding takes the token's position. Right padding reaches the op as
``lengths`` (dropped tokens do not advance the Fenwick counter); the non-causal form adds
the recurrence run over each row's valid tokens reversed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import ops
from attnlab.layers.common import RMSNorm, dense, named_param, trailing
from attnlab.layers.config import MixerConfig
# The gated mixers' shared helpers and initializers (Mamba's dt and A inits).
from attnlab.layers.linear_mixers import Mamba2, _a_log, _conv, _dim, _dt_bias, _heads, _kw
from attnlab.layers.recurrent_base import RecurrentMixer


class KimiDeltaAttention(RecurrentMixer):
  """Kimi Delta Attention layer: ``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} +
  beta_t k_t v_t^T`` with a per-channel gate ``g_t``, then a sigmoid-gated RMS norm per
  head and the output projection."""

  op = "kimi_delta_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 1)
    self.value_dim = _dim(c, c.expand_v, 1)
    kw = _kw(c, rngs)
    hk, hv = h * self.key_dim, h * self.value_dim
    rank = self.value_dim  # the paper's low-rank gates have the head dim as rank
    self.qkv_proj = dense(c.width, 2 * hk + hv, ("embed", "heads"), **kw)
    self.conv = _conv(c, 2 * hk + hv, 4, rngs)
    self.f_down = dense(c.width, rank, ("embed", None), **kw)
    self.f_up = dense(rank, hk, (None, "heads"), **kw)
    self.dt_bias = named_param(_dt_bias(rngs, hk, c.dt_min, c.dt_max), ("heads",))
    self.a_log = named_param(_a_log(rngs, h, tuple(c.a_init_range)), ("heads",))
    self.beta_proj = dense(c.width, h, ("embed", "heads"), **kw)
    self.g_down = dense(c.width, rank, ("embed", None), **kw)
    self.g_up = dense(rank, hv, (None, "heads"), use_bias=True, **kw)
    self.norm = RMSNorm(self.value_dim, "head_dim", eps=c.norm_eps)
    self.o_proj = dense(hv, c.width, ("heads", "embed"), **kw)

  def _op_functions(self):
    return ops.kimi_delta_attention, ops.kimi_delta_attention_step, ("g", "beta")

  def _op_kwargs(self):
    return {"use_qk_l2norm": True}

  def _conv_input(self, x):
    return self.qkv_proj(x)

  def _features(self, x, conv_out, positions):
    h, hk = self.num_heads, self.num_heads * self.key_dim
    if self.conv is None:
      conv_out = jax.nn.silu(conv_out)
    q, k, v = jnp.split(conv_out, [hk, 2 * hk], axis=-1)
    rate = jax.nn.softplus(self.f_up(self.f_down(x)).astype(jnp.float32)
                           + trailing(self.dt_bias[...].astype(jnp.float32), 3))
    a = jnp.exp(self.a_log[...].astype(jnp.float32))[:, None]              # [H, 1]
    g = -trailing(a, 4) * _heads(rate, h)
    beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
    return {"q": _heads(q, h), "k": _heads(k, h), "v": _heads(v, h), "g": g, "beta": beta}

  def _output(self, o, x, f):
    gate = jax.nn.sigmoid(self.g_up(self.g_down(x)))
    y = self.norm(o).reshape(o.shape[:2] + (-1,)) * gate.astype(o.dtype)
    return self.o_proj(y)


def _reverse_prefix(x, lengths):
  """Each row's first ``lengths[b]`` entries reversed along axis 1, the rest in place (an
  involution)."""
  if x is None:
    return None
  t = jnp.arange(x.shape[1])[None]
  idx = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class LogLinearMamba2(Mamba2):
  """Log-linear Mamba-2: Mamba-2's SSD recurrence read through Fenwick-tree states,
  ``y_t = sum_l lambda_t^l C_t^T S_t^l + D x_t`` (``S_t^l`` the level-``l`` bucket of the
  prefix), ``lambda_t = softplus(x_t W_lambda + b_lambda) [H, L]``."""

  op = "log_linear_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.num_levels = c.num_levels
    self.lambda_proj = dense(
        c.width, c.num_heads * c.num_levels, ("embed", "heads"), use_bias=True,
        bias_init=nnx.initializers.constant(float(np.log(np.expm1(1.0)))), **_kw(c, rngs))

  def _op_functions(self):
    return ops.log_linear_attention, ops.log_linear_attention_step, ("g", "lam")

  def _features(self, x, conv_out, positions):
    f = super()._features(x, conv_out, positions)
    lam = jax.nn.softplus(self.lambda_proj(x).astype(jnp.float32))
    f["lam"] = _heads(lam, self.num_heads)
    return f

  def _forward(self, x, segment_ids, positions, valid, output_final_state=False):
    """As the base, with padding (always a right padding here) passed as ``lengths``."""
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    conv_in = self._conv_input(x)
    lengths = None
    if valid is not None:
      conv_in = conv_in * valid[..., None].astype(conv_in.dtype)
      lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    conv_out = conv_in if self.conv is None else self.conv(conv_in, segment_ids)
    f = self._features(x, conv_out, positions)
    o, state = ops.log_linear_attention(
        f["q"], f["k"], f["v"], f["g"], f["lam"], segment_ids=segment_ids, lengths=lengths,
        output_final_state=output_final_state, chunk_size=self.config.chunk_size,
        implementation=self.config.implementation, **self._op_kwargs())
    return self._output(o, x, f), state, conv_in

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``; the non-causal form adds the pass over each row's
    valid tokens in reverse order (padding stays at the end, outside the Fenwick count)."""
    t = x.shape[1]
    valid = None if lengths is None else jnp.arange(t)[None] < lengths[:, None]
    y = self._forward(x, segment_ids, positions, valid)[0]
    if self.config.causal:
      return y
    if lengths is None:
      lengths = jnp.full((x.shape[0],), t, jnp.int32)
    rev = lambda a: _reverse_prefix(a, lengths)
    back = self._forward(rev(x), rev(segment_ids), rev(positions), valid)[0]
    return y + rev(back)

  def init_cache(self, batch, max_len):
    cache = super().init_cache(batch, max_len)
    cache["state"] = jnp.zeros((batch, self.num_heads, self.num_levels, self.key_dim,
                                self.value_dim), jnp.float32)
    return cache

  def decode(self, x_t, cache, positions):
    """``x_t [B, 1, D]`` at ``positions [B]`` (the Fenwick counter) -> ``(y_t, cache)``."""
    self._check_decoder()
    conv_out, new_cache = self._conv_input(x_t), {}
    if self.conv is not None:
      y_c, new_cache["conv"] = self.conv.step(conv_out[:, 0], cache["conv"])
      conv_out = y_c[:, None]
    f = self._features(x_t, conv_out, positions[:, None])
    first = {name: value[:, 0] for name, value in f.items()}
    o_t, new_cache["state"] = ops.log_linear_attention_step(
        first["q"], first["k"], first["v"], first["g"], first["lam"], cache["state"],
        positions, **self._op_kwargs())
    return self._output(o_t[:, None], x_t, f), new_cache


MIXERS = {
    "kda": KimiDeltaAttention,
    "log_linear_mamba2": LogLinearMamba2,
}
