"""Chunked linear attention as Mosaic TPU kernels: simple GLA, GLA, the delta rule and
the gated delta rule, forward and backward.

Per head, with state ``S [K, V]`` (float32) and log gates ``g``::

    simple_gla         S_t = e^{g_t} S_{t-1} + k_t v_t^T                      g [B, T, H]
    gla                S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T                g [B, T, H, K]
    gated_delta_rule   S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    delta_rule         the same with g = 0                                    b [B, T, H]
    o_t = scale q_t^T S_t

(GLA, Yang et al. 2023; DeltaNet, Schlag et al. 2021 and Yang et al. 2024; Gated DeltaNet,
Yang et al. 2025.) ``S_0`` is ``initial_state`` (zeros by default), and with
``segment_ids [B, T]`` the state restarts from zeros wherever the id changes (packed
documents). Same contract as attnlab's ops of the same names (q and k already
normalized where the op asks for it); this module does not import attnlab.

Kernels. Grid ``(B, H, T / block)``; the last axis walks the sequence ("arbitrary") and
carries the state in a VMEM scratch from one block to the next. A block holds several
chunks of ``chunk_size`` tokens, visited by a ``fori_loop``; each chunk is the
chunk-parallel form of ``chunk_math.py`` (GLA family) or ``delta_chunk_math.py`` (delta
rules): intra-chunk matrix products plus the state's contribution, then the state
update. Big blocks amortize the fixed cost of a grid step; chunks set the shape of the
matrix products (docs/tpu_linear_kernels.md).

* forward: writes ``o``, the final state (only when asked for) and, for the backward, the
  state entering each block after the first (``[B, H, T / block - 1, K, V]`` float32;
  block 0 starts from ``initial_state``, which is read only when given).
* backward: the same grid walked from the last block to the first, carrying ``dS`` (the
  gradient of the state) in VMEM. Each block first recomputes the states entering its
  chunks from the saved block state (one ``k^T v`` product per chunk; the delta rules
  redo their triangular solve), then walks its chunks in reverse: intra-chunk gradients,
  the state's gradient terms, and ``dS_in`` (``decay dS + (q e^b)^T dO``, and
  ``- W^T dd`` for the delta rules). The gradient of ``initial_state`` is the ``dS``
  left after the first block (written only when there is an initial state). One pass
  computes every gradient: nothing but the state crosses chunks, so no gradient needs
  accumulating across the grid.

Documents: a start at position t (the id differs from t - 1) is the gate ``g_t = -inf``.
Every decay in ``chunk_math.py`` is ``exp`` of a sum of gates over the range it spans, so
a pair or a state contribution that crosses a start gets ``e^{-inf} = 0`` and the kernels
never see segment ids. The gate's gradient at a start is zero (JAX's gradient of the
``where`` that inserts the ``-inf``).

Layout. Callers keep ``[B, T, H, D]``. With ``D % 128 == 0`` the kernels read the free
view ``[B, T, H * D]`` (a ``(block, D)`` tile at lane offset ``h * D``); other head dims are
transposed here to ``[B, H, T, D]``. A scalar gate (and beta) travels as ``[B, H,
T / block, block / chunk, chunk]`` float32: one lane row per chunk, the whole tile as a
block, so any chunk count is a legal block shape. Sequences are zero-padded to a
multiple of the block (padded tokens have k = v = 0, g = 0 and beta = 0, so they leave
the state alone).

Nothing here has run on a TPU: the kernels are tested in TPU interpret mode on CPU and
lowered to Mosaic for TPU on CPU (tests/pallas_kernels/tpu/test_chunked_linear.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import chunk_math, delta_chunk_math

_LANES = 128
DEFAULT_BLOCK = 2048   # tokens per grid step (docs/tpu_linear_kernels.md)
_F32 = jnp.float32


# Per kind of chunk: (forward, backward, state update, gate inputs, per-channel gate).
_CHUNKS = {
    "simple_gla": (chunk_math.scalar_forward, chunk_math.scalar_backward,
                   chunk_math.scalar_state_update, 1, False),
    "gla": (chunk_math.vector_forward, chunk_math.vector_backward,
            chunk_math.vector_state_update, 1, True),
    "delta": (delta_chunk_math.delta_forward, delta_chunk_math.delta_backward,
              delta_chunk_math.delta_state_update, 2, False),
}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""

  kind: str
  scale: float
  chunk: int
  block: int
  num_blocks: int
  key_dim: int
  value_dim: int
  has_initial: bool
  has_final: bool
  interpret: Any

  @property
  def chunks_per_block(self) -> int:
    return self.block // self.chunk

  @property
  def key_lanes(self) -> bool:
    return self.key_dim % _LANES == 0

  @property
  def value_lanes(self) -> bool:
    return self.value_dim % _LANES == 0

  @property
  def chunk_forward(self):
    return _CHUNKS[self.kind][0]

  @property
  def chunk_backward(self):
    return _CHUNKS[self.kind][1]

  @property
  def state_update(self):
    return _CHUNKS[self.kind][2]

  @property
  def num_gates(self) -> int:
    """Gate-like inputs: g, or g and beta (delta rules)."""
    return _CHUNKS[self.kind][3]

  @property
  def vector_gate(self) -> bool:
    return _CHUNKS[self.kind][4]


# ------------------------------------------------------------------------------ layout


def _view(x, length: int, lanes: bool):
  """``[B, T, H, D]`` -> the kernel array (``[B, length, H * D]`` or ``[B, H, length, D]``),
  zero-padded along T."""
  if length > x.shape[1]:
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  b, t, h, d = x.shape
  return x.reshape(b, t, h * d) if lanes else x.transpose(0, 2, 1, 3)


def _unview(x, length: int, heads: int, lanes: bool):
  """Inverse of ``_view``."""
  if lanes:
    b, t, width = x.shape
    x = x.reshape(b, t, heads, width // heads)
  else:
    x = x.transpose(0, 2, 1, 3)
  return x[:, :length]


def _scalar_gate_view(cfg: _Config, g, length: int):
  """``[B, T, H]`` -> ``[B, H, blocks, chunks per block, chunk]`` float32, zero-padded."""
  b, t, h = g.shape
  g = jnp.pad(g.astype(_F32), ((0, 0), (0, length - t), (0, 0)))
  return g.transpose(0, 2, 1).reshape(b, h, cfg.num_blocks, cfg.chunks_per_block, cfg.chunk)


def _seq_spec(cfg: _Config, dim: int, lanes: bool, reverse: bool = False):
  """BlockSpec of one ``(block, dim)`` tile of a ``_view`` array on the grid ``(b, h, n)``;
  ``reverse`` walks the blocks from the last."""
  last = cfg.num_blocks - 1

  def block(n):
    return last - n if reverse else n

  if lanes:
    return pl.BlockSpec((None, cfg.block, dim), lambda b, h, n: (b, block(n), h))
  return pl.BlockSpec((None, None, cfg.block, dim), lambda b, h, n: (b, h, block(n), 0))


def _gate_spec(cfg: _Config, reverse: bool = False):
  if cfg.vector_gate:
    return _seq_spec(cfg, cfg.key_dim, cfg.key_lanes, reverse)
  last = cfg.num_blocks - 1
  return pl.BlockSpec((None, None, None, cfg.chunks_per_block, cfg.chunk),
                      lambda b, h, n: (b, h, last - n if reverse else n, 0, 0))


def _state_spec(cfg: _Config):
  """The ``[K, V]`` state of head ``(b, h)``, the same block for every step of the walk."""
  return pl.BlockSpec((None, None, cfg.key_dim, cfg.value_dim), lambda b, h, n: (b, h, 0, 0))


def _block_states_spec(cfg: _Config, reverse: bool = False):
  """The saved state entering block ``n >= 1`` is entry ``n - 1`` (block 0 starts from
  ``initial_state``, so nothing is saved for it); step 0 of the forward shares entry 0
  with step 1 and writes nothing."""
  last = cfg.num_blocks - 1

  def entry(b, h, n):
    block = last - n if reverse else n
    return b, h, jnp.maximum(block - 1, 0), 0, 0

  return pl.BlockSpec((None, None, None, cfg.key_dim, cfg.value_dim), entry)


def _saves_states(cfg: _Config) -> bool:
  return cfg.num_blocks > 1


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _chunk_rows(cfg: _Config, c):
  return pl.ds(pl.multiple_of(c * cfg.chunk, cfg.chunk), cfg.chunk)


def _load_gates(cfg: _Config, refs, c):
  """The gates (and beta) of chunk ``c``: ``(1, C)`` rows, or ``[C, K]`` for a per-channel
  gate, float32."""
  if cfg.vector_gate:
    return [ref[_chunk_rows(cfg, c), :].astype(_F32) for ref in refs]
  return [ref[pl.ds(c, 1), :] for ref in refs]


def _store_gates(cfg: _Config, refs, c, values):
  for ref, x in zip(refs, values):
    if cfg.vector_gate:
      ref[_chunk_rows(cfg, c), :] = x.astype(ref.dtype)
    else:
      ref[pl.ds(c, 1), :] = x


# ---------------------------------------------------------------------------- forward


def _forward_kernel(cfg: _Config, save_states: bool, *refs):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  gate_refs = refs[3:3 + cfg.num_gates]
  refs = refs[3 + cfg.num_gates:]
  s0_ref = refs.pop(0) if cfg.has_initial else None
  o_ref = refs.pop(0)
  final_ref = refs.pop(0) if cfg.has_final else None
  states_ref = refs.pop(0) if save_states else None
  (state_ref,) = refs
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state_ref[...] = (s0_ref[...] if cfg.has_initial
                      else jnp.zeros(state_ref.shape, _F32))

  if save_states:
    @pl.when(n > 0)
    def _():
      states_ref[...] = state_ref[...]

  def chunk(c, carry):
    rows = _chunk_rows(cfg, c)
    o, state = cfg.chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                 *_load_gates(cfg, gate_refs, c), state_ref[...], cfg.scale)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    state_ref[...] = state
    return carry

  lax.fori_loop(0, cfg.chunks_per_block, chunk, 0)

  if cfg.has_final:
    @pl.when(n == cfg.num_blocks - 1)
    def _():
      final_ref[...] = state_ref[...]


def _forward(cfg: _Config, q, k, v, gates, s0, save_states: bool):
  """Kernel-layout inputs (``s0`` None without an initial state) -> ``(o, final state
  [B, H, K, V] or None, saved block states [B, H, blocks - 1, K, V] or None)``."""
  batch, heads = q.shape[0], (q.shape[2] // cfg.key_dim if cfg.key_lanes else q.shape[1])
  save_states = save_states and _saves_states(cfg)
  seq_k = _seq_spec(cfg, cfg.key_dim, cfg.key_lanes)
  seq_v = _seq_spec(cfg, cfg.value_dim, cfg.value_lanes)
  state_shape = (batch, heads, cfg.key_dim, cfg.value_dim)
  in_specs = ([seq_k, seq_k, seq_v] + [_gate_spec(cfg)] * cfg.num_gates
              + [_state_spec(cfg)] * cfg.has_initial)
  out_specs = [seq_v] + [_state_spec(cfg)] * cfg.has_final
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_shape += [jax.ShapeDtypeStruct(state_shape, _F32)] * cfg.has_final
  if save_states:
    out_specs.append(_block_states_spec(cfg))
    out_shape.append(jax.ShapeDtypeStruct(
        (batch, heads, cfg.num_blocks - 1, cfg.key_dim, cfg.value_dim), _F32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg, save_states),
      grid=(batch, heads, cfg.num_blocks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((cfg.key_dim, cfg.value_dim), _F32)],
      compiler_params=_params(),
      interpret=cfg.interpret,
      name=f"{cfg.kind}_fwd",
  )(q, k, v, *gates, *([s0] if cfg.has_initial else []))
  outs = list(outs)
  o = outs.pop(0)
  final = outs.pop(0) if cfg.has_final else None
  states = outs.pop(0) if save_states else None
  return o, final, states


# --------------------------------------------------------------------------- backward


def _backward_kernel(cfg: _Config, *refs):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  gate_refs = refs[3:3 + cfg.num_gates]
  refs = refs[3 + cfg.num_gates:]
  states_ref = refs.pop(0) if _saves_states(cfg) else None
  s0_ref = refs.pop(0) if cfg.has_initial else None
  do_ref = refs.pop(0)
  dfinal_ref = refs.pop(0) if cfg.has_final else None
  dq_ref, dk_ref, dv_ref = refs[:3]
  d_gate_refs = refs[3:3 + cfg.num_gates]
  refs = refs[3 + cfg.num_gates:]
  ds0_ref = refs.pop(0) if cfg.has_initial else None
  d_state_ref, chunk_states_ref = refs
  step = pl.program_id(2)
  block = cfg.num_blocks - 1 - step

  @pl.when(step == 0)
  def _():
    d_state_ref[...] = (dfinal_ref[...] if cfg.has_final
                        else jnp.zeros(d_state_ref.shape, _F32))

  # The states entering this block's chunks, from the one saved per block.
  @pl.when(block == 0)
  def _():
    chunk_states_ref[0] = (s0_ref[...] if cfg.has_initial
                           else jnp.zeros(chunk_states_ref.shape[1:], _F32))

  if states_ref is not None:
    @pl.when(block > 0)
    def _():
      chunk_states_ref[0] = states_ref[...]

  def recompute(c, carry):
    rows = _chunk_rows(cfg, c)
    chunk_states_ref[c + 1] = cfg.state_update(
        k_ref[rows, :], v_ref[rows, :], *_load_gates(cfg, gate_refs, c), chunk_states_ref[c])
    return carry

  lax.fori_loop(0, cfg.chunks_per_block - 1, recompute, 0)

  def chunk(i, carry):
    c = cfg.chunks_per_block - 1 - i
    rows = _chunk_rows(cfg, c)
    dq, dk, dv, *d_gates, d_state = cfg.chunk_backward(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], *_load_gates(cfg, gate_refs, c),
        chunk_states_ref[c], do_ref[rows, :], d_state_ref[...], cfg.scale)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    _store_gates(cfg, d_gate_refs, c, d_gates)
    d_state_ref[...] = d_state
    return carry

  lax.fori_loop(0, cfg.chunks_per_block, chunk, 0)

  if cfg.has_initial:
    @pl.when(block == 0)
    def _():
      ds0_ref[...] = d_state_ref[...]


def _backward(cfg: _Config, q, k, v, gates, states, s0, do, dfinal):
  """Kernel-layout ``(dq, dk, dv, d gates, d initial_state or None)``."""
  batch, heads = q.shape[0], (q.shape[2] // cfg.key_dim if cfg.key_lanes else q.shape[1])
  seq_k = _seq_spec(cfg, cfg.key_dim, cfg.key_lanes, reverse=True)
  seq_v = _seq_spec(cfg, cfg.value_dim, cfg.value_lanes, reverse=True)
  gate = _gate_spec(cfg, reverse=True)
  state = _state_spec(cfg)
  inputs = [q, k, v, *gates]
  in_specs = [seq_k, seq_k, seq_v] + [gate] * cfg.num_gates
  if _saves_states(cfg):
    inputs.append(states)
    in_specs.append(_block_states_spec(cfg, reverse=True))
  if cfg.has_initial:
    inputs.append(s0)
    in_specs.append(state)
  inputs.append(do)
  in_specs.append(seq_v)
  if cfg.has_final:
    inputs.append(dfinal.astype(_F32))
    in_specs.append(state)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, *gates)]
  if cfg.has_initial:
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, cfg.key_dim, cfg.value_dim), _F32))
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, cfg),
      grid=(batch, heads, cfg.num_blocks),
      in_specs=in_specs,
      out_specs=[seq_k, seq_k, seq_v] + [gate] * cfg.num_gates + [state] * cfg.has_initial,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((cfg.key_dim, cfg.value_dim), _F32),
                      pltpu.VMEM((cfg.chunks_per_block, cfg.key_dim, cfg.value_dim), _F32)],
      compiler_params=_params(),
      interpret=cfg.interpret,
      name=f"{cfg.kind}_bwd",
  )(*inputs)
  dq, dk, dv, *d_gates = outs[:3 + cfg.num_gates]
  return dq, dk, dv, tuple(d_gates), (outs[-1] if cfg.has_initial else None)


# -------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(cfg, q, k, v, gates, s0):
  """``(o, final_state or None)`` on kernel-layout, padded arrays; ``gates`` is ``(g,)`` or
  ``(g, beta)``, ``s0`` None without an initial state (layout changes, padding and the
  document gates around this are differentiated by JAX)."""
  o, final, _ = _forward(cfg, q, k, v, gates, s0, save_states=False)
  return o, final


def _recurrence_fwd(cfg, q, k, v, gates, s0):
  o, final, states = _forward(cfg, q, k, v, gates, s0, save_states=True)
  return (o, final), (q, k, v, gates, states, s0)


def _recurrence_bwd(cfg, res, cotangents):
  q, k, v, gates, states, s0 = res
  do, dfinal = cotangents
  return _backward(cfg, q, k, v, gates, states, s0, do, dfinal)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ------------------------------------------------------------------------------- entry


def _check_gate(name, x, shape):
  x = jnp.asarray(x)
  if x.shape != tuple(shape) or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array of shape {tuple(shape)}, got "
                     f"{name}.shape={x.shape}, {name}.dtype={x.dtype}")
  return x


def _check(q, k, v, scale, initial_state, segment_ids, chunk_size, block_size):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must be [B, T, H, D], got {name}.shape={np.shape(x)}")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V] with the same B, T, H, "
                     f"got {q.shape=}, {k.shape=}, {v.shape=}")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"q, k, v must share dtype bfloat16 or float32, got {q.dtype=}, "
                     f"{k.dtype=}, {v.dtype=}")
  if min(q.shape) < 1 or v.shape[3] < 1:
    raise ValueError(f"empty input: {q.shape=}, {v.shape=}")
  if not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got scale={scale!r}")
  batch, _, heads, key_dim = q.shape
  state_shape = (batch, heads, key_dim, v.shape[3])
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    if initial_state.shape != state_shape or not jnp.issubdtype(initial_state.dtype,
                                                                 jnp.floating):
      raise ValueError(f"initial_state must be a float array [B, H, K, V]={state_shape}, "
                       f"got initial_state.shape={initial_state.shape}, "
                       f"dtype={initial_state.dtype}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype,
                                                              jnp.integer):
      raise ValueError(f"segment_ids must be an int array [B, T]={q.shape[:2]}, got "
                       f"segment_ids.shape={segment_ids.shape}, dtype={segment_ids.dtype}")
  sub = chunk_math.SUB_CHUNK
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0 or chunk_size % sub:
    raise ValueError(f"chunk_size must be a positive multiple of {sub}, got "
                     f"chunk_size={chunk_size!r}")
  if block_size is not None and (not isinstance(block_size, (int, np.integer))
                                 or block_size <= 0 or block_size % chunk_size):
    raise ValueError(f"block_size must be a positive multiple of chunk_size={chunk_size}, "
                     f"got block_size={block_size!r}")
  return q, k, v, initial_state, segment_ids


def _linear(kind, q, k, v, g, beta, *, scale, initial_state, output_final_state,
            segment_ids, chunk_size, block_size, interpret):
  """Checked arguments -> ``(o, final_state or None)``. ``g`` (log gates, None for the
  plain delta rule) and ``beta`` (delta rules only) are already shape-checked."""
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[3]
  padded_chunks = -(-length // chunk_size) * chunk_size
  block = min(block_size or DEFAULT_BLOCK, padded_chunks)
  block = -(-block // chunk_size) * chunk_size
  num_blocks = -(-length // block)
  padded = num_blocks * block
  cfg = _Config(kind=kind, scale=float(scale), chunk=int(chunk_size), block=block,
                num_blocks=num_blocks, key_dim=key_dim, value_dim=value_dim,
                has_initial=initial_state is not None, has_final=bool(output_final_state),
                interpret=interpret)

  if g is None:
    g = jnp.zeros(q.shape[:3], _F32)   # the plain delta rule: no decay
  if segment_ids is not None:
    # A document start is a gate of -inf: the state entering it decays to exactly zero.
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = starts[:, :, None, None] if cfg.vector_gate else starts[:, :, None]
    g = jnp.where(starts, jnp.asarray(-jnp.inf, g.dtype), g)
  gates = [_view(g, padded, cfg.key_lanes) if cfg.vector_gate
           else _scalar_gate_view(cfg, g, padded)]
  if beta is not None:
    gates.append(_scalar_gate_view(cfg, beta, padded))
  s0 = None if initial_state is None else initial_state.astype(_F32)
  o, final = _recurrence(cfg, _view(q, padded, cfg.key_lanes),
                         _view(k, padded, cfg.key_lanes), _view(v, padded, cfg.value_lanes),
                         tuple(gates), s0)
  return _unview(o, length, heads, cfg.value_lanes), final


_COMMON_ARGS = """
    scale: multiplies ``q_t^T S_t``.
    initial_state: ``[B, H, K, V]`` float, or None for zeros.
    output_final_state: return the float32 state after the last token.
    segment_ids: ``[B, T]`` int; the state restarts where the id changes.
    chunk_size: tokens per chunk, a multiple of 16.
    block_size: tokens per grid step, a multiple of ``chunk_size`` (default 2048, capped at
      the padded length).
    interpret: False on TPU; True or ``pltpu.InterpretParams()`` run on CPU.

  Returns:
    ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32 or None)``;
    differentiable in q, k, v, the gates and initial_state."""


def _documented(fn):
  fn.__doc__ = fn.__doc__.rstrip() + _COMMON_ARGS + "\n  "
  return fn


@_documented
def simple_gla(q, k, v, g, *, scale, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=64, block_size=None, interpret=False):
  """Simple GLA (a scalar gate per head and token) as Mosaic TPU kernels.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; all bfloat16 or all float32.
    g: ``[B, T, H]`` float log gates (``S_t = e^{g_t} S_{t-1} + k_t v_t^T``), normally <= 0."""
  q, k, v, initial_state, segment_ids = _check(q, k, v, scale, initial_state, segment_ids,
                                               chunk_size, block_size)
  g = _check_gate("g", g, q.shape[:3])
  return _linear("simple_gla", q, k, v, g, None, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids,
                 chunk_size=chunk_size, block_size=block_size, interpret=interpret)


@_documented
def gla(q, k, v, g, *, scale, initial_state=None, output_final_state=False,
        segment_ids=None, chunk_size=64, block_size=None, interpret=False):
  """GLA (a gate per key channel) as Mosaic TPU kernels.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; all bfloat16 or all float32.
    g: ``[B, T, H, K]`` float log gates (``S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T``)."""
  q, k, v, initial_state, segment_ids = _check(q, k, v, scale, initial_state, segment_ids,
                                               chunk_size, block_size)
  g = _check_gate("g", g, q.shape)
  return _linear("gla", q, k, v, g, None, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids,
                 chunk_size=chunk_size, block_size=block_size, interpret=interpret)


@_documented
def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None,
                     output_final_state=False, segment_ids=None, chunk_size=64,
                     block_size=None, interpret=False):
  """Gated delta rule (Gated DeltaNet) as Mosaic TPU kernels.

  Args:
    q, k: ``[B, T, H, K]`` (normalized by the caller if wanted); v: ``[B, T, H, V]``.
    g: ``[B, T, H]`` float log gates; beta: ``[B, T, H]`` float write strengths
      (``S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``)."""
  q, k, v, initial_state, segment_ids = _check(q, k, v, scale, initial_state, segment_ids,
                                               chunk_size, block_size)
  g = _check_gate("g", g, q.shape[:3])
  beta = _check_gate("beta", beta, q.shape[:3])
  return _linear("delta", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids,
                 chunk_size=chunk_size, block_size=block_size, interpret=interpret)


@_documented
def delta_rule(q, k, v, beta, *, scale, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=64, block_size=None, interpret=False):
  """Delta rule (DeltaNet) as Mosaic TPU kernels: the gated kernels with g = 0.

  Args:
    q, k: ``[B, T, H, K]`` (normalized by the caller if wanted); v: ``[B, T, H, V]``.
    beta: ``[B, T, H]`` float (``S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``)."""
  q, k, v, initial_state, segment_ids = _check(q, k, v, scale, initial_state, segment_ids,
                                               chunk_size, block_size)
  beta = _check_gate("beta", beta, q.shape[:3])
  return _linear("delta", q, k, v, None, beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids,
                 chunk_size=chunk_size, block_size=block_size, interpret=interpret)
