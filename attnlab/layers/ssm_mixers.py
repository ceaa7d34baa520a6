"""Mixers of the diagonal recurrences (``attnlab.ops.ssm``, ``attnlab.ops.ema``).

========  ==============  ==================================================================
mixer     op              layer
========  ==============  ==================================================================
mamba     selective_scan  Mamba block (Gu & Dao 2023, §3.4, Fig. 3): ``[x, z] = u W_in``;
                          x through a causal depthwise conv (width 4, bias) and SiLU;
                          ``[dt, B, C] = x W_x`` (dt of rank ceil(D / 16)),
                          ``delta = softplus(dt W_dt + b_dt)``; the selective SSM with
                          ``A = -exp(A_log)`` (S4D-real init ``A[:, n] = -(n + 1)``) and skip
                          D; ``out = (y * silu(z)) W_out``. Inner width ``mamba_expand * D``,
                          ``N = state_size``.
rg_lru    rg_lru          Griffin's recurrent block (De et al. 2024, Fig. 2c): a GeLU
                          branch ``gelu(u W_y)``; a recurrent branch ``x = conv(u W_x)``
                          (temporal conv, width 4), ``r = sigmoid(x W_a + b_a)``,
                          ``i = sigmoid(x W_i + b_i)`` (eqs. 1-2), the RG-LRU (§2.4, c = 8);
                          ``out = (h * gelu branch) W_out``. Width ``D_RNN`` = num_heads
                          blocks of ``ceil(expand_v * head_dim)`` (expand_v default 4/3:
                          about 4/3 D); Lambda drawn so that ``a^c`` is uniform in
                          [0.9, 0.999].
mega_ema  mega_ema        Mega's EMA sub-layer with its gated output (Ma et al. 2022, §3.2
                          and §3.3) and the attention left out: ``X' = EMA(X)``,
                          ``phi = sigmoid(X' W_phi + b_phi)``, ``H = silu(X' W_h + b_h)``,
                          ``Y = phi * H + (1 - phi) * X``. The single-head gated attention
                          term ``(gamma * O) U_h`` inside H is not included (a
                          simplification); ``alpha = sigmoid(.)``, ``delta = sigmoid(.)``,
                          ``N = state_size``. Non-causal: the bidirectional EMA.
========  ==============  ==================================================================

Padding (``lengths``) reaches the ops as ``lengths``: padded tokens leave the state alone,
so a prefill's state is the state after each row's own prompt. Mamba and the RG-LRU block
are causal only (their papers define decoders).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import ops
from attnlab.layers.common import ShortConv, dense, named_param
from attnlab.layers.config import MixerConfig

__all__ = ["Mamba", "RGLRUBlock", "MegaEMA", "MIXERS"]


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


def _conv_size(c, default):
  return default if c.conv_size is None else c.conv_size


class _ScanMixer(nnx.Module):
  """A mixer around one diagonal recurrence: the optional causal convolution, the op's
  inputs, the op (whole sequence) or its step (decoding), the output.

  Subclasses set ``config``, ``conv`` (a ShortConv or None) and define ``_conv_input``,
  ``_inputs``, ``_sequence``, ``_step``, ``_output`` and ``_state_shape``."""

  forms = ("causal",)
  conv = None

  def _conv_input(self, x):
    """``[B, T, C]``: what the causal convolution sees (when ``self.conv`` is set)."""
    raise NotImplementedError

  def _forward(self, x, segment_ids, lengths, output_final_state=False):
    conv_in = conv_out = None
    if self.conv is not None:
      conv_in = self._conv_input(x)
      if lengths is not None:
        # Padding is no history for the convolution of a later decode step.
        valid = jnp.arange(x.shape[1])[None] < lengths[:, None]
        conv_in = conv_in * valid[..., None].astype(conv_in.dtype)
      conv_out = self.conv(conv_in, segment_ids)
    f = self._inputs(x, conv_out)
    o, state = self._sequence(f, segment_ids, lengths, output_final_state)
    return self._output(o, x, f), state, conv_in

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``."""
    del positions
    return self._forward(x, segment_ids, lengths)[0]

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")

  def init_cache(self, batch, max_len):
    del max_len
    cache = {"state": jnp.zeros((batch,) + self._state_shape(), jnp.float32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, self.config.dtype)
    return cache

  def prefill(self, x, lengths, max_len):
    """Prompts ``x [B, T, D]``, row b valid up to ``lengths[b]`` -> ``(y, cache)``."""
    del max_len
    self._check_decoder()
    y, state, conv_in = self._forward(x, None, lengths, output_final_state=True)
    cache = {"state": state}
    if self.conv is not None:
      cache["conv"] = self.conv.state_after(conv_in, lengths).astype(self.config.dtype)
    return y, cache

  def decode(self, x_t, cache, positions):
    """``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t [B, 1, D], cache)``."""
    del positions
    self._check_decoder()
    new_cache = {}
    conv_out = None
    if self.conv is not None:
      y_c, new_cache["conv"] = self.conv.step(self._conv_input(x_t)[:, 0], cache["conv"])
      conv_out = y_c[:, None]
    f = self._inputs(x_t, conv_out)
    o_t, new_cache["state"] = self._step({n: a[:, 0] for n, a in f.items()}, cache["state"])
    return self._output(o_t[:, None], x_t, f), new_cache

  def _op_kwargs(self, segment_ids, lengths, output_final_state):
    c = self.config
    return dict(segment_ids=segment_ids, lengths=lengths,
                output_final_state=output_final_state, chunk_size=c.chunk_size,
                implementation=c.implementation)


# ---------------------------------------------------------------------------- Mamba


def _dt_bias_init(dt_min, dt_max):
  """``softplus(bias)`` log-uniform in ``[dt_min, dt_max]`` (Mamba's step-size init)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape)
    dt = jnp.exp(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)
  return init


class Mamba(_ScanMixer):
  """The Mamba block around the selective SSM (S6)."""

  op = "selective_scan"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    inner = self.inner = c.mamba_expand * c.width
    n = self.state_size = c.state_size
    self.dt_rank = -(-c.width // 16)
    kw = _kw(c, rngs)
    self.in_proj = dense(c.width, 2 * inner, ("embed", "heads"), **kw)
    size = _conv_size(c, 4)
    self.conv = (ShortConv(inner, size, rngs=rngs, use_bias=True, param_dtype=c.param_dtype)
                 if size else None)
    self.x_proj = dense(inner, self.dt_rank + 2 * n, ("heads", None), **kw)
    self.dt_proj = dense(self.dt_rank, inner, (None, "heads"), use_bias=True,
                         bias_init=_dt_bias_init(c.dt_min, c.dt_max), **kw)
    # S4D-real: A[d, n] = -(n + 1) for every channel.
    a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (inner, n)))
    self.a_log = named_param(a_log.astype(c.param_dtype), ("heads", None))
    self.d_skip = named_param(jnp.ones((inner,), c.param_dtype), ("heads",))
    self.out_proj = dense(inner, c.width, ("heads", "embed"), **kw)

  def _state_shape(self):
    return (self.inner, self.state_size)

  def _conv_input(self, x):
    return self.in_proj(x)[..., :self.inner]

  def _inputs(self, x, conv_out):
    xz = self.in_proj(x)
    xs = jax.nn.silu(xz[..., :self.inner]) if conv_out is None else conv_out
    dt, b, c = jnp.split(self.x_proj(xs), [self.dt_rank, self.dt_rank + self.state_size],
                         axis=-1)
    delta = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))
    return {"x": xs, "delta": delta, "B": b, "C": c, "z": xz[..., self.inner:]}

  def _params(self):
    return (-jnp.exp(self.a_log[...].astype(jnp.float32)), self.d_skip[...])

  def _sequence(self, f, segment_ids, lengths, output_final_state):
    a, d = self._params()
    return ops.selective_scan(f["x"], f["delta"], a, f["B"], f["C"], d,
                              **self._op_kwargs(segment_ids, lengths, output_final_state))

  def _step(self, f, state):
    a, d = self._params()
    return ops.selective_scan_step(f["x"], f["delta"], a, f["B"], f["C"], d, state)

  def _output(self, o, x, f):
    return self.out_proj(o * jax.nn.silu(f["z"]))


# --------------------------------------------------------------------------- RG-LRU


def _lambda_init(c_value, low=0.9, high=0.999):
  """Lambda with ``sigmoid(Lambda)^c`` uniform in ``[low, high]`` (Griffin, §2.4)."""
  def init(key, shape, dtype=jnp.float32):
    a_c = jax.random.uniform(key, shape, minval=low, maxval=high)
    a = a_c ** (1.0 / c_value)
    return (jnp.log(a) - jnp.log1p(-a)).astype(dtype)  # logit(a)
  return init


class RGLRUBlock(_ScanMixer):
  """Griffin's recurrent block around the RG-LRU."""

  op = "rg_lru"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    expand = 4.0 / 3.0 if c.expand_v is None else c.expand_v
    inner = self.inner = c.num_heads * int(np.ceil(c.dim * expand))
    kw = _kw(c, rngs)
    self.y_proj = dense(c.width, inner, ("embed", "heads"), **kw)
    self.x_proj = dense(c.width, inner, ("embed", "heads"), **kw)
    size = _conv_size(c, 4)
    self.conv = (ShortConv(inner, size, rngs=rngs, use_bias=True, activation=False,
                           param_dtype=c.param_dtype) if size else None)
    self.gate_a = dense(inner, inner, (None, "heads"), use_bias=True, **kw)
    self.gate_x = dense(inner, inner, (None, "heads"), use_bias=True, **kw)
    self.lam = named_param(_lambda_init(ops.ssm.RG_LRU_C)(rngs.params(), (inner,),
                                                          c.param_dtype), ("heads",))
    self.out_proj = dense(inner, c.width, ("heads", "embed"), **kw)

  def _state_shape(self):
    return (self.inner,)

  def _conv_input(self, x):
    return self.x_proj(x)

  def _inputs(self, x, conv_out):
    xs = self.x_proj(x) if conv_out is None else conv_out
    return {"x": xs, "r": jax.nn.sigmoid(self.gate_a(xs).astype(jnp.float32)),
            "i": jax.nn.sigmoid(self.gate_x(xs).astype(jnp.float32)),
            "y": jax.nn.gelu(self.y_proj(x))}

  def _sequence(self, f, segment_ids, lengths, output_final_state):
    return ops.rg_lru(f["x"], f["r"], f["i"], self.lam[...],
                      **self._op_kwargs(segment_ids, lengths, output_final_state))

  def _step(self, f, state):
    return ops.rg_lru_step(f["x"], f["r"], f["i"], self.lam[...], state)

  def _output(self, o, x, f):
    return self.out_proj(o * f["y"])


# ------------------------------------------------------------------------------ Mega


class MegaEMA(_ScanMixer):
  """Mega's damped-EMA sub-layer and gated output, without the gated attention."""

  op = "mega_ema"
  forms = ("causal", "non_causal")

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    n = self.state_size = c.state_size
    lead = () if c.causal else (2,)  # the non-causal form: forward and backward EMAs
    names = (None,) * len(lead) + ("embed", None)
    shape = lead + (c.width, n)
    normal = lambda scale: named_param(
        scale * jax.random.normal(rngs.params(), shape, c.param_dtype), names)
    # alpha = sigmoid(.), delta = sigmoid(.) start near 1/2; beta, eta normal.
    self.alpha_logit = normal(0.2)
    self.delta_logit = normal(0.2)
    self.beta = normal(1.0)
    self.eta = normal(n ** -0.5)
    kw = _kw(c, rngs)
    self.phi_proj = dense(c.width, c.width, ("embed", "heads"), use_bias=True, **kw)
    self.h_proj = dense(c.width, c.width, ("embed", "heads"), use_bias=True, **kw)

  def _state_shape(self):
    return (self.config.width, self.state_size)

  def _params(self):
    f32 = lambda p: p[...].astype(jnp.float32)
    return (jax.nn.sigmoid(f32(self.alpha_logit)), jax.nn.sigmoid(f32(self.delta_logit)),
            f32(self.beta), f32(self.eta))

  def _inputs(self, x, conv_out):
    del conv_out
    return {"x": x}

  def _sequence(self, f, segment_ids, lengths, output_final_state):
    kw = self._op_kwargs(segment_ids, lengths, output_final_state)
    if not self.config.causal:
      kw["causal"] = False
    return ops.mega_ema(f["x"], *self._params(), **kw)

  def _step(self, f, state):
    return ops.mega_ema_step(f["x"], *self._params(), state)

  def _output(self, o, x, f):
    phi = jax.nn.sigmoid(self.phi_proj(o))
    h = jax.nn.silu(self.h_proj(o))
    return phi * h + (1 - phi) * x


MIXERS = {"mamba": Mamba, "rg_lru": RGLRUBlock, "mega_ema": MegaEMA}
