"""Mega's multi-dimensional damped EMA (Ma et al. 2022, "Mega: Moving Average Equipped
Gated Attention", §3.1, eq. 3).

Each of the D channels is expanded to N dimensions by ``beta``, smoothed by a damped EMA
and projected back by ``eta``:

    u_t = beta x_t,   h_t = alpha u_t + (1 - alpha delta) h_{t-1},   y_t = eta^T h_t

with ``alpha, delta in (0, 1)^N`` and ``beta, eta in R^N`` per channel (the paper's
``sigmoid`` of free parameters; the ``mega_ema`` mixer applies it). The coefficients do not
depend on the token, so the EMA is also the causal convolution ``y = K * x`` with
``K_k = sum_n eta_n alpha_n beta_n (1 - alpha_n delta_n)^k`` (the paper's kernel).

Bidirectional (non-causal) form: a forward EMA with one set of parameters plus a backward
EMA (over the reversed sequence) with another, both including the current token,
``y_t = sum_{s<=t} K_{t-s} x_s + sum_{s>=t} K'_{s-t} x_s`` (the parameters are stacked
``[2, D, N]``: index 0 forward, 1 backward). This is the two-sided kernel of the authors'
released model for encoder tasks; the paper's equations state the causal form.

Tiers: ``reference`` steps token by token (``lax.scan``); ``xla`` runs the chunked
diagonal scan of :mod:`attnlab.ops.ssm` (associative scan inside chunks, memory linear in
T). An FFT convolution would also be O(T log T) but cannot restart the EMA at the
document boundaries of packed sequences, which the scan does exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnlab.ops import registry
from attnlab.ops.ssm import (ScanCall, check_array, check_common, check_sequence,
                             check_state, check_token, diagonal_scan, run)

__all__ = ["mega_ema", "mega_ema_step"]

_PARAMS = ("alpha", "delta", "beta", "eta")


def _coefficients(block, p):
  """``a = 1 - alpha delta``, ``b = alpha beta x`` over ``[B, L, D, N]``."""
  x = block["x"][..., None]
  b = (p["alpha"] * p["beta"])[None, None] * x
  a = jnp.broadcast_to((1.0 - p["alpha"] * p["delta"])[None, None], b.shape)
  return a, b


def _readout(eta):
  return lambda h, block: jnp.sum(h * eta[None, None], axis=-1)


def _one_direction(call, p, reference):
  return diagonal_scan(call, lambda blk: _coefficients(blk, p), _readout(p["eta"]),
                       p["alpha"].shape, reference)


def _tier(reference):
  def tier(call):
    if call.causal:
      return _one_direction(call, call.params, reference)
    forward = {n: x[0] for n, x in call.params.items()}
    backward = {n: x[1] for n, x in call.params.items()}
    flip = lambda a: None if a is None else jnp.flip(a, axis=1)
    y, _ = _one_direction(call, forward, reference)
    reverse = ScanCall({"x": flip(call.seq["x"])}, backward, None, flip(call.segment_ids),
                       flip(call.valid), call.chunk_size)
    y_back, _ = _one_direction(reverse, backward, reference)
    return y + flip(y_back), None
  return tier


def _check_params(values, shape):
  return {n: check_array(n, v, shape).astype(jnp.float32) for n, v in zip(_PARAMS, values)}


def mega_ema(x, alpha, delta, beta, eta, *, causal=True, initial_state=None,
             output_final_state=False, segment_ids=None, lengths=None, chunk_size=64,
             implementation=None):
  """Mega's multi-dimensional damped EMA (Ma et al. 2022, eq. 3), per channel d:
  ``h_t = alpha * beta x_t + (1 - alpha * delta) * h_{t-1}``, ``y_t = eta . h_t``.

  Args:
    x: ``[B, T, D]`` input.
    alpha, delta: ``[D, N]`` smoothing and damping factors in (0, 1); ``[2, D, N]``
      (forward, backward) for the non-causal form.
    beta, eta: ``[D, N]`` expansion and projection (``[2, D, N]`` non-causal).
    causal: the EMA (True) or the bidirectional sum of a forward and a backward EMA.
    initial_state: ``[B, D, N]`` float32 (causal only).
    output_final_state: also return the state after the last token (causal only).
    segment_ids: ``[B, T]`` packed documents; the EMA restarts at each.
    lengths: ``[B]`` right padding: tokens at ``t >= lengths[b]`` leave the state alone
      (in both directions, so the valid outputs ignore the padding).
    chunk_size: the xla tier's chunk length.
    implementation: None, ``"reference"`` or ``"xla"``.

  Returns:
    ``(y [B, T, D] in x's dtype, final_state [B, D, N] float32 or None)``.
  """
  x = check_sequence("x", x)
  batch, length, channels = x.shape
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  if not causal and (initial_state is not None or output_final_state):
    raise ValueError("initial_state and output_final_state need causal=True, got "
                     f"initial_state={'given' if initial_state is not None else None}, "
                     f"output_final_state={output_final_state}")
  alpha = jnp.asarray(alpha)
  lead = () if causal else (2,)
  if alpha.ndim != len(lead) + 2 or alpha.shape[:-1] != lead + (channels,):
    raise ValueError(f"alpha must be [{', '.join(map(str, lead + (channels,)))}, N] for "
                     f"causal={causal}, got alpha.shape={alpha.shape}")
  params = _check_params((alpha, delta, beta, eta), alpha.shape)
  h0, segment_ids, valid, chunk_size = check_common(
      batch, length, initial_state, alpha.shape[-2:], output_final_state, segment_ids,
      lengths, chunk_size)
  call = ScanCall({"x": x.astype(jnp.float32)}, params, h0, segment_ids, valid, chunk_size,
                  causal)
  return run("mega_ema", implementation, call, x.dtype, output_final_state)


def mega_ema_step(x_t, alpha, delta, beta, eta, state):
  """One decode step of the causal :func:`mega_ema`: ``x_t [B, D]``, parameters
  ``[D, N]``, ``state [B, D, N]`` -> ``(y_t [B, D] in x_t's dtype, state)``."""
  x_t = jnp.asarray(x_t)
  if x_t.ndim != 2:
    raise ValueError(f"x_t must be [B, D], got x_t.shape={x_t.shape}")
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 2 or alpha.shape[0] != x_t.shape[1]:
    raise ValueError(f"alpha must be [D={x_t.shape[1]}, N], got alpha.shape={alpha.shape}")
  p = _check_params((alpha, delta, beta, eta), alpha.shape)
  h = check_state(state, x_t.shape + alpha.shape[-1:])
  block = {"x": check_token("x_t", x_t, x_t.shape).astype(jnp.float32)[:, None]}
  a, b = _coefficients(block, p)
  h = a[:, 0] * h + b[:, 0]
  return _readout(p["eta"])(h[:, None], block)[:, 0].astype(x_t.dtype), h


registry.describe("mega_ema", registry.MechanismInfo(
    paper="Ma et al. 2022, Mega: Moving Average Equipped Gated Attention (damped EMA, §3.1)",
    family="gated linear", causal=True, non_causal=True, state="D x N (N per channel)",
    cost="O(T D N)", step="mega_ema_step",
    xla_path="chunked diagonal scan (as selective_scan); non-causal: a forward and a "
             "backward scan"))
registry.register("mega_ema", registry.Implementation("reference", _tier(True),
                                                      automatic=False))
registry.register("mega_ema", registry.Implementation("xla", _tier(False), priority=10))
