"""Mixers of Hedgehog, Based and TransNormer.

=================  ==========================  =================================================
mixer              op                          layer
=================  ==========================  =================================================
hedgehog           hedgehog                    Zhang et al. 2024 (arXiv:2402.04347): q, k, v
                                               projections, the learned map phi =
                                               [softmax(xW + b), softmax(-(xW + b))] per head
                                               (W starts at the identity), normalized linear
                                               attention, W_O
based              based, dot_product_         Arora et al. 2024 (arXiv:2402.18668): q, k
                   attention                   projected to a small feature dim (16), the
                                               Taylor linear attention, plus a sliding-window
                                               softmax branch (``SoftmaxAttention`` with
                                               ``sliding_window``, default 64), the two
                                               outputs summed (not the paper's layout: below)
transnormer_norm   transnormer_norm_attention  Qin et al. 2022 (arXiv:2210.10340),
                                               NormAttention: phi = elu + 1,
                                               ``RMSNorm(phi(Q)(phi(K)^T V))`` per head with a
                                               learned scale, W_O
transnormer_diag   transnormer_diag_attention  Qin et al. 2022, DiagAttention: softmax
                                               attention in blocks of ``sliding_window``
                                               tokens (default 64)
=================  ==========================  =================================================

The Based paper does not sum branches inside one layer: it stacks its Taylor linear-
attention, sliding-window-attention and gated-convolution (BaseConv) mixers as separate
layers (the authors' 360M config: 27 layers, linear attention at layers 1, 6, 11, 16, 21,
sliding window at 2, 7, 12, 17, 22, BaseConv elsewhere). ``based`` here is a different,
one-layer hybrid: the linear and window branches summed, so that one mixer name gives the
recall-throughput hybrid. Its window branch cannot be switched off (a window of 1 still
adds softmax over the token itself, i.e. a projection of ``v_t``), so the paper's exact
layer pattern is not expressible with these mixer names alone.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.layers.common import dense, named_param, trailing
from attnlab.layers.config import MixerConfig
from attnlab.layers.recurrent_base import RecurrentMixer
from attnlab.layers.softmax_attention import SoftmaxAttention

BASED_FEATURE_DIM = 16   # Arora et al. 2024 project q, k to 16 dims per head
DEFAULT_WINDOW = 64      # Based's window and TransNormer's block when sliding_window is None


def _heads(x, num_heads):
  return x.reshape(x.shape[:2] + (num_heads, -1))


def _kw(c, rngs):
  return dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)


class _FeatureMapMixer(RecurrentMixer):
  """A RecurrentMixer whose op has its own causal and non-causal forms and honours right
  padding itself (``lengths``): the feature maps here give ``phi(0) != 0``, so padded
  keys are masked after the map, inside the op."""

  forms = ("causal", "non_causal")

  def _run(self, x, segment_ids, positions, lengths, output_final_state=False):
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    f = self._features(x, None, positions)
    fn, _, gates = self._op_functions()
    o, state = fn(f["q"], f["k"], f["v"], *(f[g] for g in gates), causal=self.config.causal,
                  lengths=lengths, segment_ids=segment_ids,
                  output_final_state=output_final_state, chunk_size=self.config.chunk_size,
                  implementation=self.config.implementation, **self._op_kwargs())
    return self._output(o, x, f), state

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    return self._run(x, segment_ids, positions, lengths)[0]

  def prefill(self, x, lengths, max_len):
    del max_len
    self._check_decoder()
    y, state = self._run(x, None, None, lengths, output_final_state=True)
    return y, {"state": state}


class Hedgehog(_FeatureMapMixer):
  """Hedgehog attention: ``phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` on
  q and k of each head h, ``o = phi(q)^T S / phi(q)^T z``, ``y = o W_O``."""

  op = "hedgehog"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h, d = self.num_heads, self.head_dim = c.num_heads, c.dim
    self.key_dim = 2 * d           # the state's key side: 2F features, F = D
    self.value_dim = d
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.o_proj = dense(h * d, c.width, ("heads", "embed"), **kw)
    # Identity start: phi begins as the softmax of q (and of -q) over the head dim.
    self.map_w = named_param(jnp.broadcast_to(jnp.eye(d, dtype=c.param_dtype), (h, d, d)),
                             ("heads", "head_dim", None))
    self.map_b = named_param(jnp.zeros((h, d), c.param_dtype), ("heads", None))

  def _op_functions(self):
    return ops.hedgehog, ops.hedgehog_step, ()

  def _op_kwargs(self):
    return {"w": self.map_w[...], "b": self.map_b[...]}

  def state_value_dim(self):
    return self.value_dim + 1

  def _features(self, x, conv_out, positions):
    h = self.num_heads
    return {"q": _heads(self.q_proj(x), h), "k": _heads(self.k_proj(x), h),
            "v": _heads(self.v_proj(x), h)}

  def _output(self, o, x, f):
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class _TaylorLinear(_FeatureMapMixer):
  """Based's linear branch: q, k projected to 16 dims per head, ``phi(q)^T phi(k) = 1 +
  q^T k / 4 + (q^T k)^2 / 32``, normalized; values at the head dim."""

  op = "based"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h, n = self.num_heads, self.feature_dim = c.num_heads, BASED_FEATURE_DIM
    self.key_dim = 1 + n + n * n
    self.value_dim = c.dim
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * n, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * n, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * c.dim, ("embed", "heads"), **kw)
    self.o_proj = dense(h * c.dim, c.width, ("heads", "embed"), **kw)

  def _op_functions(self):
    return ops.based, ops.based_step, ()

  def state_value_dim(self):
    return self.value_dim + 1

  def _features(self, x, conv_out, positions):
    h = self.num_heads
    return {"q": _heads(self.q_proj(x), h), "k": _heads(self.k_proj(x), h),
            "v": _heads(self.v_proj(x), h)}

  def _output(self, o, x, f):
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class Based(nnx.Module):
  """Based: the Taylor linear attention (global, fixed state) plus softmax attention over
  a sliding window of ``sliding_window`` tokens (default 64; exact local recall), the two
  branch outputs summed. Decoding carries the linear state and the window's ring cache."""

  op = "based"
  ops = ("based", "dot_product_attention")
  forms = ("causal", "non_causal")

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    self.config = config
    window = config.sliding_window or DEFAULT_WINDOW
    self.linear = _TaylorLinear(config, rngs=rngs)
    self.window = SoftmaxAttention(config.replace(sliding_window=window), rngs=rngs)

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    kw = dict(segment_ids=segment_ids, positions=positions, lengths=lengths)
    return self.linear(x, **kw) + self.window(x, **kw)

  def init_cache(self, batch, max_len):
    return {"linear": self.linear.init_cache(batch, max_len),
            "window": self.window.init_cache(batch, max_len)}

  def prefill(self, x, lengths, max_len):
    y_lin, c_lin = self.linear.prefill(x, lengths, max_len)
    y_win, c_win = self.window.prefill(x, lengths, max_len)
    return y_lin + y_win, {"linear": c_lin, "window": c_win}

  def decode(self, x_t, cache, positions):
    y_lin, c_lin = self.linear.decode(x_t, cache["linear"], positions)
    y_win, c_win = self.window.decode(x_t, cache["window"], positions)
    return y_lin + y_win, {"linear": c_lin, "window": c_win}


class TransNormerNorm(_FeatureMapMixer):
  """NormAttention: ``y = (g * RMSNorm(phi(Q)(phi(K)^T V))) W_O`` with ``phi = elu + 1``
  and a learned scale ``g`` per head and channel."""

  op = "transnormer_norm_attention"

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    h = self.num_heads = c.num_heads
    self.key_dim = self.value_dim = c.dim
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * c.dim, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * c.dim, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * c.dim, ("embed", "heads"), **kw)
    self.o_proj = dense(h * c.dim, c.width, ("heads", "embed"), **kw)
    self.norm_scale = named_param(jnp.ones((h, c.dim), c.param_dtype), ("heads", "head_dim"))

  def _op_functions(self):
    return ops.transnormer_norm_attention, ops.transnormer_norm_attention_step, ()

  def _op_kwargs(self):
    return {"feature_map": "elu_plus_one", "norm": "rmsnorm", "eps": self.config.norm_eps}

  def _features(self, x, conv_out, positions):
    h = self.num_heads
    return {"q": _heads(self.q_proj(x), h), "k": _heads(self.k_proj(x), h),
            "v": _heads(self.v_proj(x), h)}

  def _output(self, o, x, f):
    o = o * trailing(self.norm_scale[...], o.ndim).astype(o.dtype)
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))


class TransNormerDiag(nnx.Module):
  """DiagAttention: ``y = W_O concat_h softmax_block(q_h k_h^T / sqrt(D)) v_h`` with
  blocks of ``sliding_window`` tokens (default 64), causal inside a block for a decoder.
  Its decode cache is the current block's keys and values."""

  op = "transnormer_diag_attention"
  forms = ("causal", "non_causal")

  def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.block_size = c.sliding_window or DEFAULT_WINDOW
    h, d = c.num_heads, c.dim
    kw = _kw(c, rngs)
    self.q_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.k_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.v_proj = dense(c.width, h * d, ("embed", "heads"), **kw)
    self.o_proj = dense(h * d, c.width, ("heads", "embed"), **kw)

  def _qkv(self, x):
    h = self.config.num_heads
    return _heads(self.q_proj(x), h), _heads(self.k_proj(x), h), _heads(self.v_proj(x), h)

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    del positions  # blocks are counted from each document's start
    q, k, v = self._qkv(x)
    o = ops.transnormer_diag_attention(q, k, v, block_size=self.block_size,
                                       causal=self.config.causal, lengths=lengths,
                                       segment_ids=segment_ids,
                                       implementation=self.config.implementation)
    return self.o_proj(o.reshape(o.shape[:2] + (-1,)))

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")

  def init_cache(self, batch, max_len):
    del max_len
    c = self.config
    return ops.transnormer_diag_attention_cache(batch, c.num_heads, c.dim, self.block_size,
                                                c.dtype)

  def prefill(self, x, lengths, max_len):
    """The prompts' outputs and a cache holding each row's current block: slot ``s``
    holds position ``(lengths // w) * w + s`` when that is before ``lengths``."""
    del max_len
    self._check_decoder()
    y = self(x, lengths=lengths)
    _, k, v = self._qkv(x)
    w, t = self.block_size, x.shape[1]
    pos = (lengths // w * w)[:, None] + jnp.arange(w)[None]
    keep = (pos < lengths[:, None])[..., None, None]
    idx = jnp.clip(pos, 0, t - 1)[..., None, None]
    take = lambda a: jnp.where(keep, jnp.take_along_axis(a, idx, 1), 0).astype(self.config.dtype)
    return y, {"k": take(k), "v": take(v)}

  def decode(self, x_t, cache, positions):
    self._check_decoder()
    q, k, v = self._qkv(x_t)
    o, cache = ops.transnormer_diag_attention_step(q[:, 0], k[:, 0], v[:, 0], cache,
                                                   positions)
    return self.o_proj(o.reshape(o.shape[0], 1, -1)), cache


MIXERS = {"hedgehog": Hedgehog, "based": Based, "transnormer_norm": TransNormerNorm,
          "transnormer_diag": TransNormerDiag}
