"""Mixers of Linformer, Nystromformer and agent attention: non-causal (encoder) layers.

Each projects ``x [B, T, D]`` to per-head q, k, v, runs its op and projects back. None
uses a position scheme of its own (``MixerConfig.position`` is ignored; the papers add
absolute positions at the input). ``lengths [B]`` (right padding) is honoured exactly:
valid rows equal those of the row cut to its length. Packed documents (``segment_ids``)
are not supported: the low-rank maps mix the whole sequence, so they raise.

* ``linformer`` (Wang et al. 2020): E, F ``[H, k, max_len]`` parameters, k =
  ``MixerConfig.state_size``. A sequence of T <= max_len tokens uses their first T
  columns, which is the op on the sequence right-padded to max_len.
* ``nystromformer`` (Xiong et al. 2021): m = ``state_size`` landmarks, plus the paper's
  skip connection of a depthwise convolution over the values (``conv_size``, default 33,
  0 = none).
* ``agent_attention`` (Han et al. 2024): ``state_size`` agents pooled from q, plus the
  paper's depthwise convolution on V (``conv_size``, default 3, the 1-D form of its
  3x3) and optionally its agent biases B_1, B_2 (``agent_bias=True``, sized by max_len).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import dense, named_param
from attnlab.layers.config import MixerConfig

DEFAULT_MAX_LEN = 64   # Linformer's E, F and agent biases: no MixerConfig field holds it


class _NonCausalMixer(nnx.Module):
  """q, k, v and output projections around ``_attend``, with an optional non-causal
  depthwise convolution skip on the values (``y = attend(q, k, v) + DWC(v)``)."""

  forms = ("non_causal",)
  default_conv = 0

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    n, h, d = c.num_heads, c.dim, c.width
    kw = dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)
    self.q_proj = dense(d, n * h, ("embed", "heads"), **kw)
    self.k_proj = dense(d, n * h, ("embed", "heads"), **kw)
    self.v_proj = dense(d, n * h, ("embed", "heads"), **kw)
    self.o_proj = dense(n * h, d, ("heads", "embed"), **kw)
    width = self.default_conv if c.conv_size is None else c.conv_size
    bound = max(width, 1) ** -0.5
    self.conv_weight = (named_param(jax.random.uniform(rngs.params(), (width, n * h),
                                                       c.param_dtype, -bound, bound),
                                    (None, "heads")) if width else None)

  def _conv(self, v, valid):
    """Centered depthwise convolution over time of ``v [B, T, C]``; padded positions are
    zeroed first, so they never reach a valid one."""
    v = jnp.where(valid[..., None], v.astype(jnp.float32), 0.0)
    w = self.conv_weight[...].astype(jnp.float32)
    width, channels = w.shape
    y = jax.lax.conv_general_dilated(
        v, w[:, None, :], window_strides=(1,),
        padding=[((width - 1) // 2, width // 2)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST)
    return y

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``. ``lengths [B]`` marks right padding."""
    del positions  # no position scheme inside the layer
    if segment_ids is not None:
      raise ValueError(f"{type(self).__name__} cannot keep attention inside packed "
                       "documents (its low-rank maps mix the whole sequence); got "
                       "segment_ids, pass one document per row with lengths instead")
    c = self.config
    b, t, _ = x.shape
    v_flat = self.v_proj(x)
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.dim)
    k = self.k_proj(x).reshape(b, t, c.num_heads, c.dim)
    v = v_flat.reshape(b, t, c.num_heads, c.dim)
    o = self._attend(q, k, v, lengths).reshape(b, t, -1)
    if self.conv_weight is not None:
      valid = (jnp.ones((b, t), bool) if lengths is None
               else jnp.arange(t)[None] < lengths[:, None])
      o = (o.astype(jnp.float32) + self._conv(v_flat, valid)).astype(o.dtype)
    return self.o_proj(o)

  def _attend(self, q, k, v, lengths):
    raise NotImplementedError


class Linformer(_NonCausalMixer):
  """Linformer (Wang et al. 2020, eq. 7) with one E_h, F_h ``[k, max_len]`` per head."""

  op = "linformer"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, max_len: int = DEFAULT_MAX_LEN):
    super().__init__(config, rngs=rngs)
    c = config
    self.max_len = max_len
    shape = (c.num_heads, c.state_size, max_len)
    init = nnx.initializers.normal(max_len ** -0.5)
    self.e = named_param(init(rngs.params(), shape, c.param_dtype), ("heads", None, None))
    self.f = named_param(init(rngs.params(), shape, c.param_dtype), ("heads", None, None))

  def _attend(self, q, k, v, lengths):
    t = q.shape[1]
    if t > self.max_len:
      raise ValueError(f"Linformer projects at most max_len={self.max_len} tokens, got a "
                       f"sequence of T={t}")
    return ops.linformer(q, k, v, self.e[..., :t], self.f[..., :t], lengths=lengths,
                         implementation=self.config.implementation)


class Nystromformer(_NonCausalMixer):
  """Nystromformer (Xiong et al. 2021) with ``state_size`` landmarks and the value skip
  convolution (default width 33, as the paper's experiments)."""

  op = "nystromformer"
  default_conv = 33

  def _attend(self, q, k, v, lengths):
    return ops.nystromformer(q, k, v, num_landmarks=self.config.state_size, lengths=lengths,
                             implementation=self.config.implementation)


class AgentAttention(_NonCausalMixer):
  """Agent attention (Han et al. 2024, eq. 5): ``state_size`` agents pooled from q, the
  depthwise convolution on V (default width 3) and, with ``agent_bias=True``, learned
  biases ``B_1 [H, A, max_len]`` and ``B_2 [H, max_len, A]`` (zeros at init)."""

  op = "agent_attention"
  default_conv = 3

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, agent_bias: bool = False,
               max_len: int = DEFAULT_MAX_LEN):
    super().__init__(config, rngs=rngs)
    c = config
    self.max_len = max_len
    a, n = c.state_size, c.num_heads
    self.agent_bias = (named_param(jnp.zeros((n, a, max_len), c.param_dtype),
                                   ("heads", None, None)) if agent_bias else None)
    self.query_bias = (named_param(jnp.zeros((n, max_len, a), c.param_dtype),
                                   ("heads", None, None)) if agent_bias else None)

  def _attend(self, q, k, v, lengths):
    t = q.shape[1]
    b1 = b2 = None
    if self.agent_bias is not None:
      if t > self.max_len:
        raise ValueError(f"agent biases cover max_len={self.max_len} tokens, got a "
                         f"sequence of T={t}")
      b1, b2 = self.agent_bias[..., :t], self.query_bias[:, :t]
    return ops.agent_attn(q, k, v, num_agents=self.config.state_size, agent_bias=b1,
                          query_bias=b2, lengths=lengths,
                          implementation=self.config.implementation)


MIXERS = {
    "linformer": Linformer,
    "nystromformer": Nystromformer,
    "agent_attention": AgentAttention,
}
