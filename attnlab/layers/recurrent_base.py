"""The shared machinery of the linear-attention mixers: full forward, bidirectional form,
prefill and one-token decode around one op of ``attnlab.ops``.

A mixer subclass says how ``x`` becomes the op's inputs and how the op's output becomes
``y``; this base runs the op (chunked) for whole sequences and its ``_step`` for decoding,
so the two paths share every projection. Right-padded positions (``lengths``) get zero
keys, values, log gates and betas, which leaves the state unchanged through them.

Under a mesh whose ``sequence`` axis has more than one device (``jax.set_mesh``, see
:mod:`attnlab.parallel.mesh_context`) a mixer whose op is one of the six core linear ops
runs it by state passing over that axis (:func:`attnlab.parallel.sequence_parallel`).
Everything else (projections, gates, the short convolution, the output) is per token and
stays in the global view; XLA moves the convolution's ``W - 1`` boundary tokens between
neighbouring shards itself. A mixer running another op runs it on the whole sequence
(XLA gathers it): correct, not parallel.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnlab import ops
from attnlab.parallel import linear_state_passing, mesh_context

# op name -> (whole-sequence op, decode step, the gate arguments it takes in order).
OPS = {
    "linear_attn": (ops.linear_attn, ops.linear_attn_step, ()),
    "simple_gla": (ops.simple_gla, ops.simple_gla_step, ("g",)),
    "gla": (ops.gla, ops.gla_step, ("g",)),
    "delta_rule": (ops.delta_rule, ops.delta_rule_step, ("beta",)),
    "gated_delta_rule": (ops.gated_delta_rule, ops.gated_delta_rule_step, ("g", "beta")),
}


# The ops that have a sequence-parallel form, by function.
_SEQUENCE_PARALLEL = {fn: name for name, fn in linear_state_passing.OPS.items()}


def _mask_features(f, valid):
  """Zero k, v and every gate where ``valid [B, T]`` is False."""
  f = dict(f)
  for name in ("k", "v"):
    f[name] = f[name] * valid[:, :, None, None].astype(f[name].dtype)
  for name in ("g", "beta"):
    if name in f:
      keep = valid.reshape(valid.shape + (1,) * (f[name].ndim - 2))
      f[name] = jnp.where(keep, f[name], 0)
  return f


class RecurrentMixer(nnx.Module):
  """Base of the linear mixers. Subclasses set ``op``, ``num_heads``, ``key_dim``,
  ``value_dim``, ``conv`` (a ShortConv or None) and define ``_conv_input``,
  ``_features`` and ``_output``."""

  op: str = ""
  conv = None
  forms = ("causal", "non_causal")

  def _op_kwargs(self) -> dict:
    return {}

  def _op_functions(self):
    """``(whole-sequence op, decode step, gate argument names)``; a subclass that runs an
    op outside :data:`OPS` (a feature-map attention, say) overrides this."""
    return OPS[self.op]

  def _conv_input(self, x):
    """``[B, T, C]`` channels the short convolution sees, or None."""
    del x
    return None

  def _features(self, x, conv_out, positions) -> dict:
    """The op's inputs ``q, k, v`` ``[B, T, H, *]`` and gates, plus extras the output
    needs."""
    raise NotImplementedError

  def _output(self, o, x, features):
    raise NotImplementedError

  def state_value_dim(self) -> int:
    return self.value_dim

  # --------------------------------------------------------------------- forward

  def _forward(self, x, segment_ids, positions, valid, output_final_state=False):
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    conv_in = self._conv_input(x)
    if conv_in is not None and valid is not None:
      # Padding is no history: in the backward pass of the bidirectional form the pads
      # come first, and the convolution must see zeros there as at a sequence start.
      conv_in = conv_in * valid[..., None].astype(conv_in.dtype)
    conv_out = conv_in if self.conv is None else self.conv(conv_in, segment_ids)
    f = self._features(x, conv_out, positions)
    if valid is not None:
      f = _mask_features(f, valid)
    fn, _, gates = self._op_functions()
    mesh = mesh_context.sequence_mesh()
    if mesh is not None and fn in _SEQUENCE_PARALLEL:
      fn = linear_state_passing.sequence_parallel(
          _SEQUENCE_PARALLEL[fn], mesh, mesh_context.SEQUENCE_AXIS,
          batch_axis=mesh_context.batch_axes(mesh, b),
          head_axis=mesh_context.head_axis(mesh, f["q"].shape[2]))
    o, state = fn(f["q"], f["k"], f["v"], *(f[g] for g in gates),
                  segment_ids=segment_ids, output_final_state=output_final_state,
                  chunk_size=self.config.chunk_size,
                  implementation=self.config.implementation, **self._op_kwargs())
    return self._output(o, x, f), state, conv_in

  def __call__(self, x, *, segment_ids=None, positions=None, lengths=None):
    """``x [B, T, D]`` -> ``[B, T, D]``. Non-causal mixers sum the recurrence run
    forward and run backward over the sequence (the bidirectional form of Vim / Hydra)."""
    t = x.shape[1]
    valid = None if lengths is None else jnp.arange(t)[None] < lengths[:, None]
    y = self._forward(x, segment_ids, positions, valid)[0]
    if self.config.causal:
      return y
    flip = lambda a: None if a is None else jnp.flip(a, axis=1)
    back = self._forward(flip(x), flip(segment_ids), flip(positions), flip(valid))[0]
    return y + flip(back)

  # -------------------------------------------------------------------- decoding

  def _check_decoder(self):
    if not self.config.causal:
      raise ValueError("decoding needs a causal mixer, got MixerConfig.causal=False")

  def init_cache(self, batch, max_len):
    del max_len
    cache = {"state": jnp.zeros((batch, self.num_heads, self.key_dim,
                                 self.state_value_dim()), jnp.float32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch, self.config.dtype)
    return cache

  def prefill(self, x, lengths, max_len):
    """Prompts ``x [B, T, D]``, row b valid up to ``lengths[b]`` -> ``(y, cache)``."""
    del max_len
    self._check_decoder()
    valid = jnp.arange(x.shape[1])[None] < lengths[:, None]
    y, state, conv_in = self._forward(x, None, None, valid, output_final_state=True)
    cache = {"state": state}
    if self.conv is not None:
      cache["conv"] = self.conv.state_after(conv_in, lengths).astype(self.config.dtype)
    return y, cache

  def decode(self, x_t, cache, positions):
    """``x_t [B, 1, D]`` at ``positions [B]`` -> ``(y_t [B, 1, D], cache)``."""
    self._check_decoder()
    conv_in = self._conv_input(x_t)
    new_cache = {}
    conv_out = conv_in
    if self.conv is not None:
      y_c, new_cache["conv"] = self.conv.step(conv_in[:, 0], cache["conv"])
      conv_out = y_c[:, None]
    f = self._features(x_t, conv_out, positions[:, None])
    _, step, gates = self._op_functions()
    first = {name: value[:, 0] for name, value in f.items()}
    o_t, new_cache["state"] = step(first["q"], first["k"], first["v"],
                                   *(first[g] for g in gates), cache["state"],
                                   **self._op_kwargs())
    return self._output(o_t[:, None], x_t, f), new_cache
