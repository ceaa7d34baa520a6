"""Diagonal state-space recurrences (CATALOG.md section 2, the vector recurrences).

Every op here, and Mega's EMA in :mod:`attnlab.ops.ema`, is an elementwise affine
recurrence ``h_t = a_t * h_{t-1} + b_t`` over a state of fixed size, read out per token:

==============  =========================================================================
op              per token (elementwise over the state)
==============  =========================================================================
selective_scan  Mamba's S6 (Gu & Dao 2023, eq. 2a-2b and Alg. 2), state ``[D, N]``:
                ``h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n]
                + delta_t[d] B_t[n] x_t[d]``, ``y_t[d] = sum_n C_t[n] h_t[d, n] + D[d]
                x_t[d]``: eq. 4's zero-order hold for A (``Abar = exp(delta A)``) and
                the first-order ``Bbar = delta B`` that the paper simplifies B to
rg_lru          Griffin's RG-LRU (De et al. 2024, eqs. 3-4), state ``[D]``:
                ``a_t = sigmoid(Lambda)^(c r_t)``, ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2)
                (i_t x_t)``, ``y_t = h_t``
==============  =========================================================================

Arguments are the recurrence's own inputs: Mamba's ``delta`` is the step size after the
layer's softplus (positive), RG-LRU's ``gate_r``, ``gate_i`` the gates after their sigmoid
(eqs. 1-2, in [0, 1]); the projections producing them are the mixers'
(:mod:`attnlab.layers.ssm_mixers`). With ``segment_ids [B, T]`` the state restarts from
zeros wherever the id changes (packed documents); ``initial_state`` reaches the first
document only; with ``lengths [B]`` (right padding) the tokens at ``t >= lengths[b]``
leave the state as it is (their outputs are the held state's readout). Every op computes
in float32 and returns ``(y in x's dtype, final float32 state or None)``.

Tiers: ``reference`` is a ``lax.scan`` of the decode step, token by token. ``xla`` cuts the
sequence into chunks of C tokens: inside a chunk ``lax.associative_scan`` composes the
affine maps ``(a, b)`` in ``log C`` depth, and a ``lax.scan`` carries the state from chunk
to chunk. Each chunk's body is rematerialized (``jax.checkpoint``) in the backward pass,
so only one ``[B, C, *state]`` block is live at a time and the saved residuals are the
inputs plus one state per chunk: memory ``O(T D + T D N / C)`` instead of the
``O(T D N)`` of a scan that keeps every expanded state (the point of Mamba's
hardware-aware scan, §3.3.2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnlab.ops import registry

__all__ = ["selective_scan", "selective_scan_step", "rg_lru", "rg_lru_step"]

RG_LRU_C = 8.0  # Griffin's c (De et al. 2024, §2.4)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["seq", "params", "initial_state", "segment_ids", "valid"],
                   meta_fields=["chunk_size", "causal"])
@dataclasses.dataclass(frozen=True)
class ScanCall:
  """The canonical arguments of every tier of a diagonal recurrence.

  ``seq``: the per-token inputs ``[B, T, ...]`` (float32); ``params``: the per-channel
  parameters (float32); ``initial_state`` float32 or None; ``segment_ids [B, T]`` or None;
  ``valid [B, T]`` bool (False: the token leaves the state alone) or None; ``causal``:
  False only for Mega's bidirectional form."""

  seq: dict
  params: dict
  initial_state: Any
  segment_ids: Any
  valid: Any
  chunk_size: int
  causal: bool = True


# ---------------------------------------------------------------- the shared scans


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _expand(mask, ndim):
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def document_starts(segment_ids, batch, length):
  """``[B, T]`` bool: a new document starts at t (> 0), where the id changes."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  ids = segment_ids
  return jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _combine(first, second):
  """Compose two affine maps ``h -> a h + b``: ``first`` then ``second``."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def _scan_reference(h0, seq, starts, valid, coefficients, readout):
  """Token by token: ``h = a_t (h, or 0 at a document start) + b_t``, ``y_t = readout``."""

  def step(h, inputs):
    token, start, keep = inputs
    token = {n: x[:, None] for n, x in token.items()}  # a block of one token
    a, b = coefficients(token)
    new = jnp.where(_expand(start, h.ndim), 0.0, h) * a[:, 0] + b[:, 0]
    h = jnp.where(_expand(keep, h.ndim), new, h)
    return h, readout(h[:, None], token)[:, 0]

  time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (seq, starts, valid))
  h, y = lax.scan(step, h0, time_major)
  return jnp.moveaxis(y, 0, 1), h


def _scan_chunked(h0, seq, starts, valid, coefficients, readout, chunk):
  """The same recurrence, an associative scan inside chunks of ``chunk`` tokens and a
  sequential scan over chunks, each chunk rematerialized in the backward pass."""
  batch, length = starts.shape
  num = -(-length // chunk)
  pad = num * chunk - length

  def blocks(x):  # [B, T, ...] -> [num, B, chunk, ...], zero-padded
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((batch, num, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(h, inputs):
    token, start, keep = inputs
    a, b = coefficients(token)
    # Invalid and padded tokens map h to itself; a document start forgets h (a = 0).
    a = jnp.where(_expand(keep, a.ndim), jnp.where(_expand(start, a.ndim), 0.0, a), 1.0)
    b = jnp.where(_expand(keep, b.ndim), b, 0.0)
    a_cum, b_cum = lax.associative_scan(_combine, (a, b), axis=1)
    hs = a_cum * h[:, None] + b_cum
    return hs[:, -1], readout(hs, token)

  inputs = jax.tree.map(blocks, (seq, starts, valid))
  h, y = lax.scan(body, h0, inputs)
  y = jnp.moveaxis(y, 0, 1)
  return y.reshape((batch, num * chunk) + y.shape[3:])[:, :length], h


def diagonal_scan(call: ScanCall, coefficients: Callable, readout: Callable,
                  state_shape: tuple, reference: bool):
  """Run ``h_t = a_t * h_{t-1} + b_t``, ``y_t = readout(h_t)`` over ``call.seq``.

  ``coefficients(block) -> (a, b)`` maps a dict of ``[B, L, ...]`` inputs to
  ``[B, L, *state_shape]`` arrays; ``readout(h [B, L, *state_shape], block) -> y
  [B, L, ...]``. Both must be finite, with finite derivatives, on zero inputs (the
  chunked tier pads with zeros). Returns ``(y, h_T)``."""
  any_input = next(iter(call.seq.values()))
  batch, length = any_input.shape[:2]
  starts = document_starts(call.segment_ids, batch, length)
  valid = jnp.ones((batch, length), bool) if call.valid is None else call.valid
  h0 = call.initial_state
  if h0 is None:
    h0 = jnp.zeros((batch,) + tuple(state_shape), jnp.float32)
  if reference:
    return _scan_reference(h0, call.seq, starts, valid, coefficients, readout)
  return _scan_chunked(h0, call.seq, starts, valid, coefficients, readout, call.chunk_size)


# ------------------------------------------------------------------------- checks


def check_array(name, x, shape, kind=jnp.floating):
  x = jnp.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {name}.shape={x.shape}")
  if not jnp.issubdtype(x.dtype, kind):
    raise ValueError(f"{name} must be {kind.__name__}, got {name}.dtype={x.dtype}")
  return x


def check_sequence(name, x):
  """``x [B, T, D]`` floating point."""
  x = jnp.asarray(x)
  if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating [B, T, D] array, got {name}.shape="
                     f"{x.shape}, dtype={x.dtype}")
  return x


def check_common(batch, length, initial_state, state_shape, output_final_state,
                 segment_ids, lengths, chunk_size):
  """The arguments every op shares: ``initial_state`` of ``[B, *state_shape]``,
  ``segment_ids [B, T]`` integer, ``lengths [B]`` integer (-> ``valid [B, T]``),
  ``chunk_size`` a positive int."""
  if not isinstance(output_final_state, bool):
    raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
  if initial_state is not None:
    initial_state = _f32(check_array("initial_state", initial_state,
                                     (batch,) + tuple(state_shape)))
  if segment_ids is not None:
    segment_ids = check_array("segment_ids", segment_ids, (batch, length), jnp.integer)
  valid = None
  if lengths is not None:
    lengths = check_array("lengths", lengths, (batch,), jnp.integer)
    valid = jnp.arange(length)[None] < lengths[:, None]
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  return initial_state, segment_ids, valid, int(chunk_size)


def check_state(state, shape):
  if jnp.shape(state) != tuple(shape):
    raise ValueError(f"state must be {tuple(shape)}, got state.shape={jnp.shape(state)}")
  return _f32(state)


def check_token(name, x, shape):
  x = jnp.asarray(x)
  if x.shape != tuple(shape) or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array of shape {tuple(shape)}, got "
                     f"{name}.shape={x.shape}, dtype={x.dtype}")
  return x


@functools.cache
def _compiled(fn):
  return jax.jit(fn)


def run(mechanism, implementation, call, out_dtype, output_final_state):
  # Jitted per tier: called eagerly, the scans compile once per shape instead of
  # dispatching their many small primitives one by one.
  y, final = _compiled(registry.select(mechanism, implementation, call).fn)(call)
  return y.astype(out_dtype), (final if output_final_state else None)


# ---------------------------------------------------------------- selective scan


def _grouped(x, groups):
  """``[B, L, D] -> [B, L, G, D / G]``: channel d reads group ``d // (D / G)``."""
  return x.reshape(x.shape[:2] + (groups, -1))


def _mamba_coefficients(block, params):
  """``a = exp(delta A)``, ``b = delta B x`` over ``[B, L, G, P, N]``."""
  a = jnp.exp(block["delta"][..., None] * params["A"][None, None])
  b = (block["delta"] * block["x"])[..., None] * block["B"][:, :, :, None, :]
  return a, b


def _mamba_readout(h, block):
  return jnp.sum(h * block["C"][:, :, :, None, :], axis=-1)  # [B, L, G, P]


def _mamba_tier(reference):
  def tier(call):
    p = call.params
    groups, per_group, n = p["A"].shape
    y, h = diagonal_scan(call, lambda blk: _mamba_coefficients(blk, p), _mamba_readout,
                         (groups, per_group, n), reference)
    y = y + call.seq["x"] * p["D"][None, None]
    batch, length = y.shape[:2]
    return y.reshape(batch, length, -1), h.reshape(batch, groups * per_group, n)
  return tier


def _check_bc(name, x, batch, length, channels):
  """``[B, T, N]`` or ``[B, T, G, N]`` with G dividing D -> ``[B, T, G, N]``."""
  x = jnp.asarray(x)
  if x.ndim == 3:
    x = x[:, :, None]
  if (x.ndim != 4 or x.shape[:2] != (batch, length) or channels % x.shape[2]
      or not jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"{name} must be a floating [B={batch}, T={length}, N] or [B, T, G, N] "
                     f"array with G dividing D={channels}, got {name}.shape="
                     f"{jnp.shape(x)}, dtype={x.dtype}")
  return x


def _mamba_params(A, D, channels, groups):
  A = jnp.asarray(A)
  if A.ndim != 2 or A.shape[0] != channels or not jnp.issubdtype(A.dtype, jnp.floating):
    raise ValueError(f"A must be a floating [D={channels}, N] array, got A.shape={A.shape}, "
                     f"dtype={A.dtype}")
  D = jnp.zeros((channels,), jnp.float32) if D is None else check_array("D", D, (channels,))
  return {"A": _f32(A).reshape(groups, channels // groups, A.shape[1]),
          "D": _f32(D).reshape(groups, channels // groups)}


def selective_scan(x, delta, A, B, C, D=None, *, initial_state=None,
                   output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
                   implementation=None):
  """Mamba's selective SSM (S6; Gu & Dao 2023, Alg. 2): per channel d and state dim n,
  ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = C_t^T h_t + D x_t``.

  Args:
    x: ``[B, T, D]`` input.
    delta: ``[B, T, D]`` step sizes, positive: the layer's ``softplus(dt + bias)``, taken
      as given (no softplus inside).
    A: ``[D, N]`` state matrix (diagonal per channel), negative for a decaying state.
    B, C: ``[B, T, N]`` input-dependent projections shared by all channels, or
      ``[B, T, G, N]``: G groups, channel d reads group ``d // (D / G)``.
    D: ``[D]`` skip, or None (no skip).
    initial_state: ``[B, D, N]`` float32 (zeros by default).
    output_final_state: also return the state after the last token.
    segment_ids: ``[B, T]`` packed documents; the state restarts at each.
    lengths: ``[B]`` right padding: tokens at ``t >= lengths[b]`` leave the state alone.
    chunk_size: the xla tier's chunk length.
    implementation: None, ``"reference"`` or ``"xla"``.

  Returns:
    ``(y [B, T, D] in x's dtype, final_state [B, D, N] float32 or None)``.
  """
  x = check_sequence("x", x)
  batch, length, channels = x.shape
  delta = check_array("delta", delta, x.shape)
  B = _check_bc("B", B, batch, length, channels)
  C = _check_bc("C", C, batch, length, channels)
  if B.shape != C.shape:
    raise ValueError(f"B and C must have the same shape, got B.shape={B.shape}, "
                     f"C.shape={C.shape}")
  groups = B.shape[2]
  params = _mamba_params(A, D, channels, groups)
  state_shape = (channels, params["A"].shape[-1])
  if B.shape[-1] != state_shape[1]:
    raise ValueError(f"B, C must have N={state_shape[1]} (A's last axis), got "
                     f"B.shape={B.shape}")
  h0, segment_ids, valid, chunk_size = check_common(
      batch, length, initial_state, state_shape, output_final_state, segment_ids, lengths,
      chunk_size)
  if h0 is not None:
    h0 = h0.reshape(batch, groups, channels // groups, -1)
  seq = {"x": _grouped(_f32(x), groups), "delta": _grouped(_f32(delta), groups),
         "B": _f32(B), "C": _f32(C)}
  call = ScanCall(seq, params, h0, segment_ids, valid, chunk_size)
  return run("selective_scan", implementation, call, x.dtype, output_final_state)


def selective_scan_step(x_t, delta_t, A, B_t, C_t, D, state):
  """One decode step of :func:`selective_scan`: ``x_t, delta_t [B, D]``, ``B_t, C_t
  [B, N]`` or ``[B, G, N]``, ``D [D]`` or None, ``state [B, D, N]`` -> ``(y_t [B, D] in
  x_t's dtype, state)``."""
  x_t = jnp.asarray(x_t)
  if x_t.ndim != 2:
    raise ValueError(f"x_t must be [B, D], got x_t.shape={x_t.shape}")
  batch, channels = x_t.shape
  delta_t = check_token("delta_t", delta_t, x_t.shape)
  B_t = _check_bc("B_t", jnp.asarray(B_t)[:, None], batch, 1, channels)
  C_t = _check_bc("C_t", jnp.asarray(C_t)[:, None], batch, 1, channels)
  if B_t.shape != C_t.shape:
    raise ValueError(f"B_t and C_t must have the same shape, got {B_t.shape[::2]}, "
                     f"{C_t.shape[::2]}")
  groups = B_t.shape[2]
  params = _mamba_params(A, D, channels, groups)
  n = params["A"].shape[-1]
  h = check_state(state, (batch, channels, n)).reshape(batch, groups, -1, n)
  block = {"x": _grouped(_f32(x_t)[:, None], groups),
           "delta": _grouped(_f32(delta_t)[:, None], groups), "B": _f32(B_t), "C": _f32(C_t)}
  a, b = _mamba_coefficients(block, params)
  h = a[:, 0] * h + b[:, 0]
  y = _mamba_readout(h[:, None], block)[:, 0] + block["x"][:, 0] * params["D"][None]
  return y.reshape(batch, channels).astype(x_t.dtype), h.reshape(batch, channels, n)


# ------------------------------------------------------------------------- RG-LRU


def _rg_lru_coefficients(block, params):
  """``log a_t = c r_t log sigmoid(Lambda)``, ``b_t = sqrt(1 - a_t^2) i_t x_t``."""
  log_a = -params["c"] * block["r"] * jax.nn.softplus(-params["lam"])[None, None]
  one_minus_sq = -jnp.expm1(2.0 * log_a)
  # sqrt has an infinite slope at 0 (r_t = 0, a padded or fully closed gate): there the
  # multiplier is 0 with zero gradient, so no inf * 0 reaches the gradients.
  positive = one_minus_sq > 0
  scale = jnp.where(positive, jnp.sqrt(jnp.where(positive, one_minus_sq, 1.0)), 0.0)
  return jnp.exp(log_a), scale * block["i"] * block["x"]


def _identity_readout(h, block):
  del block
  return h


def _rg_lru_tier(reference):
  def tier(call):
    return diagonal_scan(call, lambda blk: _rg_lru_coefficients(blk, call.params),
                         _identity_readout, (call.params["lam"].shape[0],), reference)
  return tier


def _check_c(c):
  if (not isinstance(c, (int, float, np.floating)) or isinstance(c, bool)
      or not np.isfinite(c) or c <= 0):
    raise ValueError(f"c must be a positive finite number, got c={c!r}")
  return float(c)


def rg_lru(x, gate_r, gate_i, lam, *, c=RG_LRU_C, initial_state=None,
           output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
           implementation=None):
  """Griffin's Real-Gated Linear Recurrent Unit (De et al. 2024, §2.4, eqs. 3-4):
  ``a_t = a^(c r_t)`` with ``a = sigmoid(Lambda)``, ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2)
  (i_t x_t)``, ``y_t = h_t``; computed as ``log a_t = -c r_t softplus(-Lambda)``.

  Args:
    x: ``[B, T, D]`` input.
    gate_r, gate_i: ``[B, T, D]`` the recurrence and input gates ``sigmoid(W x + b)``
      of eqs. 1-2, in [0, 1].
    lam: ``[D]`` Lambda (``a = sigmoid(Lambda)``).
    c: the gate's temperature (the paper's c = 8).
    initial_state: ``[B, D]`` float32.
    output_final_state, segment_ids, lengths, chunk_size, implementation: as
      :func:`selective_scan`.

  Returns:
    ``(y [B, T, D] in x's dtype, final_state [B, D] float32 or None)``.
  """
  x = check_sequence("x", x)
  batch, length, channels = x.shape
  gate_r = check_array("gate_r", gate_r, x.shape)
  gate_i = check_array("gate_i", gate_i, x.shape)
  params = {"lam": _f32(check_array("lam", lam, (channels,))), "c": _check_c(c)}
  h0, segment_ids, valid, chunk_size = check_common(
      batch, length, initial_state, (channels,), output_final_state, segment_ids, lengths,
      chunk_size)
  seq = {"x": _f32(x), "r": _f32(gate_r), "i": _f32(gate_i)}
  call = ScanCall(seq, params, h0, segment_ids, valid, chunk_size)
  return run("rg_lru", implementation, call, x.dtype, output_final_state)


def rg_lru_step(x_t, gate_r_t, gate_i_t, lam, state, *, c=RG_LRU_C):
  """One decode step of :func:`rg_lru`: ``x_t, gate_r_t, gate_i_t [B, D]``, ``lam [D]``,
  ``state [B, D]`` -> ``(y_t [B, D] in x_t's dtype, state)``."""
  x_t = jnp.asarray(x_t)
  if x_t.ndim != 2:
    raise ValueError(f"x_t must be [B, D], got x_t.shape={x_t.shape}")
  params = {"lam": _f32(check_array("lam", lam, x_t.shape[1:])), "c": _check_c(c)}
  block = {"x": _f32(x_t)[:, None],
           "r": _f32(check_token("gate_r_t", gate_r_t, x_t.shape))[:, None],
           "i": _f32(check_token("gate_i_t", gate_i_t, x_t.shape))[:, None]}
  h = check_state(state, x_t.shape)
  a, b = _rg_lru_coefficients(block, params)
  h = a[:, 0] * h + b[:, 0]
  return h.astype(x_t.dtype), h


# ------------------------------------------------------------------ registration

_XLA_PATH = ("chunked diagonal scan: associative scan inside chunks, lax.scan over "
             "chunks, chunks rematerialized")

registry.describe("selective_scan", registry.MechanismInfo(
    paper="Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
    family="gated linear", causal=True, non_causal=False, state="D x N (N per channel)",
    cost="O(T D N)", step="selective_scan_step", xla_path=_XLA_PATH))
registry.describe("rg_lru", registry.MechanismInfo(
    paper="De et al. 2024, Griffin: Mixing Gated Linear Recurrences with Local Attention "
          "for Efficient Language Models (RG-LRU)",
    family="gated linear", causal=True, non_causal=False, state="D (one per channel)",
    cost="O(T D)", step="rg_lru_step", xla_path=_XLA_PATH))
for _name, _tier in (("selective_scan", _mamba_tier), ("rg_lru", _rg_lru_tier)):
  registry.register(_name, registry.Implementation("reference", _tier(True),
                                                   automatic=False))
  registry.register(_name, registry.Implementation("xla", _tier(False), priority=10))
