"""Linear-attention mixers, each following its paper's layer definition.

=================  ===========  ===============================================================
mixer              op           layer
=================  ===========  ===============================================================
linear_attention   linear_attn  Katharopoulos et al. 2020, eqs. 6-7: phi = elu + 1, normalized
retention          simple_gla   RetNet, Sun et al. 2023, §2.1-2.2: fixed per-head decay,
                                rotation, GroupNorm and swish gate
gla                gla          GLA, Yang et al. 2023, §4.4: low-rank sigmoid gate ** (1/16),
                                LN and swish output gate
simple_gla         simple_gla   GLA's layer with one scalar gate per head (Yang et al. 2023,
                                the head-wise gate of its §4.4 discussion; RetNet with a
                                data-dependent decay)
hgrn2              gla          HGRN2, Qin et al. 2024, §3: forget gate f, input key 1 - f
mamba2             simple_gla   Mamba-2, Dao & Gu 2024, §7 (Fig. 6): q = C, k = B, v = dt x,
                                g = dt A, D skip, gated RMS norm
deltanet           delta_rule   DeltaNet, Yang et al. 2024 (its layer): short conv, L2-normed
                                q/k, sigmoid beta, output norm
gated_deltanet     gated_delta  Gated DeltaNet, Yang et al. 2025 (its layer): Mamba-2 decay
                   _rule        gate, sigmoid beta, gated output norm
=================  ===========  ===============================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.layers.common import (HeadLayerNorm, RMSNorm, ShortConv, dense, named_param,
                                   rope, trailing)
from attnlab.layers.config import MixerConfig
from attnlab.layers.recurrent_base import RecurrentMixer
from attnlab.ops import retention_gammas


def _heads(x, num_heads):
  return x.reshape(x.shape[:2] + (num_heads, -1))


def _dim(config, expand, default):
  expand = default if expand is None else expand
  dim = int(config.dim * expand)
  if dim < 1 or dim != config.dim * expand:
    raise ValueError(f"head_dim={config.dim} times expand={expand} must be a positive int")
  return dim


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


def _conv(c, channels, default, rngs, use_bias=False):
  size = default if c.conv_size is None else c.conv_size
  if size == 0:
    return None
  return ShortConv(channels, size, rngs=rngs, use_bias=use_bias,
                   param_dtype=c.param_dtype)


class _OptionalConvQKV:
  """For mixers whose paper has no short convolution: with ``conv_size > 0`` the q, k, v
  projections go through one (SiLU after it, as in DeltaNet), the ``use_short_conv``
  option researchers add to any linear mixer."""

  def _init_conv(self, c, rngs):
    self.conv = _conv(c, 2 * self.num_heads * self.key_dim + self.num_heads * self.value_dim,
                      0, rngs)

  def _conv_input(self, x):
    if self.conv is None:
      return None
    return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

  def _raw_qkv(self, x, conv_out):
    h = self.num_heads
    if self.conv is None:
      return (_heads(self.q_proj(x), h), _heads(self.k_proj(x), h),
              _heads(self.v_proj(x), h))
    hk = h * self.key_dim
    q, k, v = jnp.split(conv_out, [hk, 2 * hk], axis=-1)
    return _heads(q, h), _heads(k, h), _heads(v, h)


class LinearAttention(_OptionalConvQKV, RecurrentMixer):
  """``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)`` with ``phi = elu + 1`` (eqs. 6-7)."""

  op = "linear_attn"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 1)
    self.value_dim = _dim(c, c.expand_v, 1)
    self.q_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **_kw(c, rngs))
    self.k_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **_kw(c, rngs))
    self.v_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **_kw(c, rngs))
    self.o_proj = dense(h * self.value_dim, c.width, ("heads", "embed"), **_kw(c, rngs))
    self._init_conv(c, rngs)

  def _op_kwargs(self):
    return {"normalize": True, "feature_map": "identity"}

  def state_value_dim(self):
    return self.value_dim + 1  # the normalizer z rides along as an extra column

  def _features(self, x, conv_out, positions):
    phi = lambda a: jax.nn.elu(a) + 1.0
    q, k, v = self._raw_qkv(x, conv_out)
    return {"q": phi(q), "k": phi(k), "v": v}

  def _output(self, o, x, f):
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class Retention(_OptionalConvQKV, RecurrentMixer):
  """Multi-scale retention: ``S_t = gamma_h S_{t-1} + k_t v_t^T`` with RoPE-rotated q, k
  (the paper's ``Theta``), ``Y = GroupNorm(o)``, ``y = (swish(x W_G) * Y) W_O``."""

  op = "simple_gla"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 1)
    self.value_dim = _dim(c, c.expand_v, 2)  # RetNet's value heads are twice as wide
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.g_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.o_proj = dense(h * self.value_dim, c.width, ("heads", "embed"), **kw)
    self.norm = HeadLayerNorm(h, self.value_dim, eps=c.norm_eps)
    self._init_conv(c, rngs)

  def _features(self, x, conv_out, positions):
    c, h = self.config, self.num_heads
    q, k, v = self._raw_qkv(x, conv_out)
    q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
    g = jnp.broadcast_to(jnp.asarray(retention_gammas(h), jnp.float32), q.shape[:3])
    return {"q": q, "k": k, "v": v, "g": g}

  def _output(self, o, x, f):
    y = self.norm(o).reshape(o.shape[:2] + (-1,))
    return self.o_proj(jax.nn.silu(self.g_proj(x)) * y)


class GLA(_OptionalConvQKV, RecurrentMixer):
  """Gated linear attention: ``alpha_t = sigmoid(x W_a1 W_a2 + b) ** (1 / 16)``,
  ``y = (swish(x W_r + b_r) * LN(o)) W_O`` (LN as an RMS norm per head)."""

  op = "gla"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 0.5)
    self.value_dim = _dim(c, c.expand_v, 1)
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.gate_down = dense(c.width, c.gate_low_rank, ("embed", None), **kw)
    self.gate_up = dense(c.gate_low_rank, h * self.key_dim, (None, "heads"),
                         use_bias=True, **kw)
    self.r_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), use_bias=True,
                        **kw)
    self.o_proj = dense(h * self.value_dim, c.width, ("heads", "embed"), **kw)
    self.norm = RMSNorm(self.value_dim, "head_dim", eps=c.norm_eps)
    self._init_conv(c, rngs)

  def _features(self, x, conv_out, positions):
    logits = self.gate_up(self.gate_down(x)).astype(jnp.float32)
    g = jax.nn.log_sigmoid(logits) / self.config.gate_normalizer
    q, k, v = self._raw_qkv(x, conv_out)
    return {"q": q, "k": k, "v": v, "g": _heads(g, self.num_heads)}

  def _output(self, o, x, f):
    y = self.norm(o).reshape(o.shape[:2] + (-1,))
    return self.o_proj(jax.nn.silu(self.r_proj(x)) * y)


class SimpleGLA(GLA):
  """GLA with a scalar log gate per head and token, ``g = logsigmoid(x W_g + b) / 16``:
  the state decays as a whole, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``."""

  op = "simple_gla"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    kw = _kw(config, rngs)
    self.gate_up = dense(config.gate_low_rank, self.num_heads, (None, "heads"),
                         use_bias=True, **kw)

  def _features(self, x, conv_out, positions):
    f = super()._features(x, conv_out, positions)
    logits = self.gate_up(self.gate_down(x)).astype(jnp.float32)
    f["g"] = jax.nn.log_sigmoid(logits) / self.config.gate_normalizer
    return f


class HGRN2(RecurrentMixer):
  """HGRN2's outer-product state expansion: ``S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T``,
  ``o_t = S_t^T q_t`` with ``f_t = sigmoid(x W_f)``, then an RMS norm per head and a swish
  output gate."""

  op = "gla"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 1)
    self.value_dim = _dim(c, c.expand_v, 1)
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.f_proj = dense(c.width, h * self.key_dim, ("embed", "heads"), **kw)
    self.i_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.g_proj = dense(c.width, h * self.value_dim, ("embed", "heads"), **kw)
    self.o_proj = dense(h * self.value_dim, c.width, ("heads", "embed"), **kw)
    self.norm = RMSNorm(self.value_dim, "head_dim", eps=c.norm_eps)

  def _features(self, x, conv_out, positions):
    h = self.num_heads
    f_logits = _heads(self.f_proj(x), h).astype(jnp.float32)
    # log f and 1 - f = sigmoid(-logits), both without cancellation.
    return {"q": _heads(self.q_proj(x), h), "k": jax.nn.sigmoid(-f_logits).astype(x.dtype),
            "v": _heads(self.i_proj(x), h), "g": jax.nn.log_sigmoid(f_logits)}

  def _output(self, o, x, f):
    y = self.norm(o).reshape(o.shape[:2] + (-1,))
    return self.o_proj(jax.nn.silu(self.g_proj(x)) * y)


def _dt_bias(rngs, num_heads, dt_min=1e-3, dt_max=0.1):
  """Mamba's step-size bias: softplus(bias) log-uniform in [dt_min, dt_max]."""
  u = jax.random.uniform(rngs.params(), (num_heads,))
  dt = jnp.exp(np.log(dt_min) + u * (np.log(dt_max) - np.log(dt_min)))
  return dt + jnp.log(-jnp.expm1(-dt))  # the inverse of softplus


def _a_log(rngs, num_heads, a_init_range=(1.0, 16.0)):
  """Mamba-2's ``A = -exp(A_log)`` with ``-A`` uniform in ``a_init_range``."""
  lo, hi = a_init_range
  return jnp.log(jax.random.uniform(rngs.params(), (num_heads,), minval=lo, maxval=hi))


class Mamba2(RecurrentMixer):
  """Mamba-2 block: ``[z, x, B, C, dt] = u W_in``; ``x, B, C`` through a short conv and
  SiLU; ``dt = softplus(dt + b)``; the SSD recurrence ``S_t = exp(dt A) S_{t-1} + B_t
  (dt x_t)^T``, ``y_t = C_t^T S_t + D x_t``; ``out = RMSNorm(y * silu(z)) W_out``."""

  op = "simple_gla"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    inner = self.inner = c.mamba_expand * c.width
    if inner % h:
      raise ValueError(f"mamba2 needs num_heads={h} to divide mamba_expand * width={inner}")
    self.key_dim = c.state_size
    self.value_dim = inner // h
    n = c.state_size
    kw = _kw(c, rngs)
    self.in_proj = dense(c.width, 2 * inner + 2 * n + h, ("embed", "heads"), **kw)
    self.conv = _conv(c, inner + 2 * n, 4, rngs, use_bias=True)
    self.dt_bias = named_param(_dt_bias(rngs, h, c.dt_min, c.dt_max), ("heads",))
    self.a_log = named_param(_a_log(rngs, h, tuple(c.a_init_range)), ("heads",))
    self.d_skip = named_param(jnp.ones((h,), c.param_dtype), ("heads",))
    self.norm = RMSNorm(inner, "heads", eps=c.norm_eps)
    self.out_proj = dense(inner, c.width, ("heads", "embed"), **kw)

  def _op_kwargs(self):
    return {"scale": 1.0}

  def _split(self, x):
    inner, n = self.inner, self.config.state_size
    return jnp.split(self.in_proj(x), [inner, 2 * inner + 2 * n], axis=-1)  # z, xBC, dt

  def _conv_input(self, x):
    return self._split(x)[1]

  def _features(self, x, conv_out, positions):
    h, inner, n = self.num_heads, self.inner, self.config.state_size
    _, _, dt = self._split(x)
    xs, b, c = jnp.split(conv_out, [inner, inner + n], axis=-1)
    xs = _heads(xs, h)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + trailing(self.dt_bias[...], 3))
    a = -jnp.exp(trailing(self.a_log[...].astype(jnp.float32), 3))
    shape = xs.shape[:3] + (n,)
    return {"q": jnp.broadcast_to(c[:, :, None], shape),
            "k": jnp.broadcast_to(b[:, :, None], shape),
            "v": (xs * dt[..., None]).astype(xs.dtype), "g": dt * a, "x": xs}

  def _output(self, o, x, f):
    z = self._split(x)[0]
    y = o + f["x"] * trailing(self.d_skip[...][:, None], 4).astype(o.dtype)
    y = y.reshape(o.shape[:2] + (-1,))
    return self.out_proj(self.norm(y * jax.nn.silu(z)))


class DeltaNet(RecurrentMixer):
  """DeltaNet: q, k, v through a short conv and SiLU, ``q, k`` L2-normalized,
  ``beta = sigmoid(x W_beta)``, ``S_t = (I - beta k k^T) S_{t-1} + beta k v^T``, an RMS
  norm per head (and a swish output gate with ``output_gate=True``, Gated DeltaNet's
  default)."""

  op = "delta_rule"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    self._build(config, rngs, gated=False)

  def _build(self, c, rngs, gated):
    self.config = c
    h = self.num_heads = c.num_heads
    self.key_dim = _dim(c, c.expand_k, 1)
    self.value_dim = _dim(c, c.expand_v, 1)
    kw = _kw(c, rngs)
    hk, hv = h * self.key_dim, h * self.value_dim
    self.qkv_proj = dense(c.width, 2 * hk + hv, ("embed", "heads"), **kw)
    self.conv = _conv(c, 2 * hk + hv, 4, rngs)
    self.beta_proj = dense(c.width, h, ("embed", "heads"), **kw)
    if gated:
      self.a_proj = dense(c.width, h, ("embed", "heads"), **kw)
      self.dt_bias = named_param(_dt_bias(rngs, h, c.dt_min, c.dt_max), ("heads",))
      self.a_log = named_param(_a_log(rngs, h, tuple(c.a_init_range)), ("heads",))
    self.g_proj = (dense(c.width, hv, ("embed", "heads"), **kw)
                   if (gated if c.output_gate is None else c.output_gate) else None)
    self.norm = RMSNorm(self.value_dim, "head_dim", eps=c.norm_eps)
    self.o_proj = dense(hv, c.width, ("heads", "embed"), **kw)

  def _op_kwargs(self):
    return {"use_qk_l2norm": True}

  def _conv_input(self, x):
    return self.qkv_proj(x)

  def _features(self, x, conv_out, positions):
    h, hk = self.num_heads, self.num_heads * self.key_dim
    q, k, v = jnp.split(conv_out, [hk, 2 * hk], axis=-1)
    beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
    return {"q": _heads(q, h), "k": _heads(k, h), "v": _heads(v, h), "beta": beta}

  def _output(self, o, x, f):
    y = self.norm(o).reshape(o.shape[:2] + (-1,))
    if self.g_proj is not None:
      y = y * jax.nn.silu(self.g_proj(x))
    return self.o_proj(y)


class GatedDeltaNet(DeltaNet):
  """Gated DeltaNet: DeltaNet with the decay ``alpha_t = exp(-exp(A_log) softplus(x W_a +
  b))`` of Mamba-2, ``S_t = alpha_t (I - beta k k^T) S_{t-1} + beta k v^T``, and the
  gated output norm ``RMSNorm(o) * silu(x W_g)`` (``output_gate=False`` leaves the gate
  out)."""

  op = "gated_delta_rule"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    self._build(config, rngs, gated=True)

  def _features(self, x, conv_out, positions):
    f = super()._features(x, conv_out, positions)
    dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + trailing(self.dt_bias[...], 3))
    f["g"] = -jnp.exp(trailing(self.a_log[...].astype(jnp.float32), 3)) * dt
    return f
