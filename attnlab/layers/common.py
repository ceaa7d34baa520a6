"""Building blocks shared by the mixers: named parameters, norms, RoPE, short convolution.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``; None for axes that are never sharded) in its
``out_sharding`` metadata. Creation never shards eagerly: the training code maps the
logical names to mesh axes and places the state (see ``attnlab.train``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")


def trailing(v, ndim):
  """``v`` with leading size-1 axes up to rank ``ndim`` (explicit rank promotion)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def named_init(init, names):
  """``init`` whose parameters carry the logical axis ``names``."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def named_param(value, names):
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def dense(in_dim, out_dim, names, *, rngs, use_bias=False, dtype=jnp.float32,
          param_dtype=jnp.float32, scale=1.0, bias_init=nnx.initializers.zeros_init()):
  """A linear map ``[.., in_dim] -> [.., out_dim]`` whose kernel is named ``names``."""
  init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nnx.Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    kernel_init=named_init(init, names),
                    bias_init=named_init(bias_init, names[-1:]))


class RMSNorm(nnx.Module):
  """RMS norm over the last axis, computed in float32 (Zhang & Sennrich 2019)."""

  def __init__(self, dim, name="embed", *, eps=1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = named_param(jnp.ones((dim,), param_dtype), (name,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * trailing(self.scale[...].astype(jnp.float32), y.ndim)).astype(x.dtype)


class HeadLayerNorm(nnx.Module):
  """Per-head LayerNorm of ``[.., H, D]`` (RetNet's GroupNorm with one group per head)."""

  def __init__(self, num_heads, dim, *, eps=1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = named_param(jnp.ones((num_heads, dim), param_dtype), ("heads", "head_dim"))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * trailing(self.scale[...].astype(jnp.float32), y.ndim)).astype(x.dtype)


def rope(x, positions, base=10000.0):
  """Rotary position embedding (Su et al. 2021, eq. 34) of ``x [B, T, H, D]`` at
  ``positions [B, T]``, rotating the two halves of the head dim."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * trailing(freq, 4)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), [half], axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def shift_right(x, steps, axis=1):
  """``y[t] = x[t - steps]`` along ``axis``, zeros for ``t < steps``."""
  if steps == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (steps, 0)
  return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[axis], axis=axis)


class ShortConv(nnx.Module):
  """Causal depthwise convolution over time, ``y_t = act(sum_i w_i x_{t-W+1+i} + b)``.

  The short convolution of DeltaNet / Gated DeltaNet / Mamba-2 (kernel 4). With
  ``segment_ids`` a tap never reaches into the previous document. Its decode state is
  the last ``W - 1`` inputs, ``[B, W - 1, C]``, oldest first.
  """

  def __init__(self, channels, kernel_size, *, rngs, use_bias=False, activation=True,
               param_dtype=jnp.float32):
    self.kernel_size = kernel_size
    self.activation = activation
    bound = kernel_size ** -0.5
    init = nnx.initializers.uniform(2 * bound)
    w = init(rngs.params(), (kernel_size, channels), param_dtype) - bound
    self.weight = named_param(w, (None, "heads"))
    self.bias = (named_param(jnp.zeros((channels,), param_dtype), ("heads",))
                 if use_bias else None)

  def _finish(self, y, dtype):
    if self.bias is not None:
      y = y + trailing(self.bias[...], y.ndim)
    if self.activation:
      y = jax.nn.silu(y)
    return y.astype(dtype)

  def __call__(self, x, segment_ids=None):
    w = self.weight[...].astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    y = jnp.zeros_like(x32)
    for lag in range(self.kernel_size):
      tap = shift_right(x32, lag)
      if segment_ids is not None and lag:
        same = segment_ids == shift_right(segment_ids, lag)
        tap = jnp.where(same[..., None], tap, 0.0)
      y = y + tap * trailing(w[self.kernel_size - 1 - lag], tap.ndim)
    return self._finish(y, x.dtype)

  def init_state(self, batch, dtype=jnp.float32):
    return jnp.zeros((batch, self.kernel_size - 1, self.weight.shape[1]), dtype)

  def state_after(self, x, lengths):
    """The decode state after the first ``lengths[b]`` tokens of ``x [B, T, C]``."""
    idx = lengths[:, None] - (self.kernel_size - 1) + jnp.arange(self.kernel_size - 1)[None]
    taken = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[..., None], axis=1)
    return jnp.where((idx >= 0)[..., None], taken, 0).astype(x.dtype)

  def step(self, x_t, state):
    """``x_t [B, C]``, ``state [B, W - 1, C]`` -> ``(y_t [B, C], state)``."""
    window = jnp.concatenate([state, x_t[:, None].astype(state.dtype)], axis=1)
    y = jnp.einsum("bwc,wc->bc", window.astype(jnp.float32),
                   self.weight[...].astype(jnp.float32))
    return self._finish(y, x_t.dtype), window[:, 1:]
