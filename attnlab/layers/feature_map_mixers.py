"""Mixers of the feature-map linear attentions (``attnlab.ops.feature_map_attention``).

===================  ========================  ==============================================
mixer                op                        layer
===================  ========================  ==============================================
efficient_attention  efficient_attention       q, k, v projections, the op, output projection
performer            performer                 the same; the random features are a
                                               non-trainable ``RandomFeatures`` variable,
                                               ``M = head_dim * expand_k`` (default 2),
                                               drawn from the init rngs, ``redraw(key)``
cosformer            cosformer                 the same; positions feed the cos re-weighting,
                                               ``M = max_len`` (class attribute, 4096)
cottention           cottention                the same; ``p = sigmoid(m)`` with a learned
                                               scalar m per head (init 0.5 as in the
                                               authors' code, p ~ 0.62)
lln_attention        lln_attention             the same; alpha, beta moment-matched (§4.1)
                                               for unit-variance q, k
                                               (``lln_moment_matching(1, 1)``)
flatten              focused_linear_attention  p = 3, plus FLatten's depthwise convolution
                                               on V (rank restoration), ``conv_size``
                                               default 5 (0 = none)
slab                 slab_attention            plus SLAB's depthwise convolution on V,
                                               ``conv_size`` default 3 (0 = none)
===================  ========================  ==============================================

Every mixer has both forms. The non-causal form runs the op's non-causal form (not the
forward + backward sum of the gated mixers); FLatten's and SLAB's convolution is causal
in the causal form (taps ``t - W + 1 .. t``) and centred in the non-causal one (taps
``t - (W-1)//2 .. t + W//2``), and never reaches across a document boundary. Padding
(``lengths``) reaches the op as ``lengths``, so the exponential maps, whose zero input is
not a zero feature, ignore padded keys too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import ShortConv, dense, named_param, trailing
from attnlab.layers.config import MixerConfig
from attnlab.layers.recurrent_base import RecurrentMixer

_OPS = {
    "efficient_attention": (ops.efficient_attention, ops.efficient_attention_step),
    "performer": (ops.performer, ops.performer_step),
    "cosformer": (ops.cosformer, ops.cosformer_step),
    "cottention": (ops.cottention, ops.cottention_step),
    "lln_attention": (ops.lln_attention, ops.lln_attention_step),
    "focused_linear_attention": (ops.focused_linear_attention,
                                 ops.focused_linear_attention_step),
    "slab_attention": (ops.slab_attention, ops.slab_attention_step),
}


class RandomFeatures(nnx.Variable):
  """Performer's projection: state of the layer, not a trained parameter."""


def _heads(x, num_heads):
  return x.reshape(x.shape[:2] + (num_heads, -1))


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


def _shift(x, steps):
  """``y[:, t] = x[:, t - steps]`` (either sign), zeros outside the sequence."""
  if steps == 0:
    return x
  t = x.shape[1]
  pad = [(0, 0)] * x.ndim
  if steps > 0:
    pad[1] = (steps, 0)
    return jnp.pad(x, pad)[:, :t]
  pad[1] = (0, -steps)
  return jnp.pad(x, pad)[:, -steps:]


def centered_depthwise_conv(x, weight, segment_ids=None):
  """``y_t = sum_i w_i x_{t - (W-1)//2 + i}`` of ``x [B, T, C]`` with ``weight [W, C]``,
  zeros beyond the sequence and across document boundaries (the non-causal DWC)."""
  w = weight.astype(jnp.float32)
  size = w.shape[0]
  x32 = x.astype(jnp.float32)
  y = jnp.zeros_like(x32)
  for i in range(size):
    steps = (size - 1) // 2 - i
    tap = _shift(x32, steps)
    if segment_ids is not None and steps:
      same = segment_ids == _shift(segment_ids, steps)
      tap = jnp.where(same[..., None], tap, 0.0)
    y = y + tap * trailing(w[i], tap.ndim)
  return y.astype(x.dtype)


class _FeatureMapMixer(RecurrentMixer):
  """q, k, v projections -> the op -> output projection; subclasses add their options.

  The causal form reuses :class:`RecurrentMixer`'s prefill; ``__call__``, ``_forward``,
  ``init_cache`` and ``decode`` are redone here because the ops take ``causal``,
  ``lengths`` and per-call options (positions, random features) the gated ops do not."""

  forms = ("causal", "non_causal")
  default_conv = 0

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = c.dim
    self.value_dim = c.dim
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.o_proj = dense(h * self.value_dim, c.width, ("heads", "embed"), **kw)
    size = self.default_conv if c.conv_size is None else c.conv_size
    self.conv = (ShortConv(h * self.value_dim, size, rngs=rngs, activation=False,
                           param_dtype=c.param_dtype) if size else None)

  # ---------------------------------------------------------------- subclass hooks

  def _op_functions(self):
    return _OPS[self.op] + ((),)

  def _seq_kwargs(self, positions) -> dict:
    del positions
    return self._op_kwargs()

  def _step_kwargs(self, positions) -> dict:
    del positions
    return self._op_kwargs()

  def _state_rows(self) -> int:
    return self.key_dim

  def state_value_dim(self) -> int:
    return self.value_dim + 1

  def _conv_input(self, x):
    return None if self.conv is None else self.v_proj(x)

  def _features(self, x, conv_out, positions):
    h = self.num_heads
    f = {"q": _heads(self.q_proj(x), h), "k": _heads(self.k_proj(x), h),
         "v": _heads(self.v_proj(x), h)}
    if conv_out is not None:
      f["dwc"] = _heads(conv_out, h)
    return f

  def _output(self, o, x, f):
    if "dwc" in f:
      o = o + f["dwc"].astype(o.dtype)
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))

  # -------------------------------------------------------------------- forward

  def _forward(self, x, segment_ids, positions, valid, output_final_state=False):
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    conv_in = self._conv_input(x)
    conv_out = None
    if conv_in is not None:
      if valid is not None:
        conv_in = conv_in * valid[..., None].astype(conv_in.dtype)
      if self.config.causal:
        conv_out = self.conv(conv_in, segment_ids)
      else:
        conv_out = centered_depthwise_conv(conv_in, self.conv.weight[...], segment_ids)
    f = self._features(x, conv_out, positions)
    lengths = None if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)
    fn = self._op_functions()[0]
    o, state = fn(f["q"], f["k"], f["v"], causal=self.config.causal,
                  segment_ids=segment_ids, lengths=lengths,
                  output_final_state=output_final_state, chunk_size=self.config.chunk_size,
                  implementation=self.config.implementation, **self._seq_kwargs(positions))
    return self._output(o, x, f), state, conv_in

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``, the op's causal or non-causal form."""
    valid = None if lengths is None else jnp.arange(x.shape[1])[None] < lengths[:, None]
    return self._forward(x, segment_ids, positions, valid)[0]

  # ------------------------------------------------------------------- decoding

  def init_cache(self, batch, max_len):
    del max_len
    cache = {"state": jnp.zeros((batch, self.num_heads, self._state_rows(),
                                 self.state_value_dim()), jnp.float32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, self.config.dtype)
    return cache

  def decode(self, x_t, cache, positions):
    """``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t [B, 1, D], cache)``."""
    self._check_decoder()
    new_cache = {}
    conv_out = None
    if self.conv is not None:
      y_c, new_cache["conv"] = self.conv.step(self._conv_input(x_t)[:, 0], cache["conv"])
      conv_out = y_c[:, None]
    f = self._features(x_t, conv_out, positions[:, None])
    step = self._op_functions()[1]
    o_t, new_cache["state"] = step(f["q"][:, 0], f["k"][:, 0], f["v"][:, 0], cache["state"],
                                   **self._step_kwargs(positions))
    return self._output(o_t[:, None], x_t, f), new_cache


class EfficientAttention(_FeatureMapMixer):
  """``E = rho_q(Q) (rho_k(K)^T V)`` per head (Shen et al. 2021, eq. 4)."""

  op = "efficient_attention"

  def state_value_dim(self):
    return self.value_dim + 2


class Performer(_FeatureMapMixer):
  """FAVOR+ with ``M = head_dim * expand_k`` orthogonal random features (default 2)."""

  op = "performer"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    expand = 2 if config.expand_k is None else config.expand_k
    self.num_features = int(round(config.dim * expand))
    if self.num_features < 1:
      raise ValueError(f"MixerConfig.expand_k={config.expand_k} gives no random features")
    self.projection = RandomFeatures(ops.performer_features(
        rngs.params(), self.num_features, self.key_dim))

  def redraw(self, key):
    """Draw new random features from ``key`` (FAVOR+'s feature redrawing)."""
    self.projection[...] = ops.performer_features(key, self.num_features, self.key_dim)

  def _op_kwargs(self):
    return {"projection": self.projection[...]}

  def _state_rows(self):
    return self.num_features

  def state_value_dim(self):
    return self.value_dim + 2


class CosFormer(_FeatureMapMixer):
  """cosFormer with ``M = max_len``: distances up to M keep the re-weighting >= 0."""

  op = "cosformer"
  max_len = 4096

  def _seq_kwargs(self, positions):
    return {"max_len": self.max_len, "positions": positions}

  def _step_kwargs(self, positions):
    return {"max_len": self.max_len, "position": positions}

  def _state_rows(self):
    return 2 * self.key_dim


class Cottention(_FeatureMapMixer):
  """Cosine attention with the values divided by ``n^sigmoid(m)``, m a learned scalar per
  head."""

  op = "cottention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    # m = 0.5 at init, as the authors' code (norm_const = 0.5) does.
    self.length_logit = named_param(jnp.full((config.num_heads,), 0.5, config.param_dtype),
                                    ("heads",))

  def _op_kwargs(self):
    return {"length_exponent": jax.nn.sigmoid(self.length_logit[...].astype(jnp.float32))}


class LLNAttention(_FeatureMapMixer):
  """Linear log-normal attention with alpha, beta moment-matched for unit-variance q, k."""

  op = "lln_attention"

  def _op_kwargs(self):
    alpha, beta = ops.lln_moment_matching(1.0, 1.0)
    return {"alpha": alpha, "beta": beta}

  def state_value_dim(self):
    return self.value_dim + 2


class FLatten(_FeatureMapMixer):
  """Focused linear attention (p = 3) plus the depthwise convolution on V."""

  op = "focused_linear_attention"
  default_conv = 5

  def _op_kwargs(self):
    return {"power": 3.0}


class SLAB(_FeatureMapMixer):
  """Simplified linear attention (ReLU kernel) plus the depthwise convolution on V."""

  op = "slab_attention"
  default_conv = 3


MIXERS = {
    "efficient_attention": EfficientAttention,
    "performer": Performer,
    "cosformer": CosFormer,
    "cottention": Cottention,
    "lln_attention": LLNAttention,
    "flatten": FLatten,
    "slab": SLAB,
}
