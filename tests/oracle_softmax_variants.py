"""Float64 oracle of the softmax-family variants, written from the papers' equations.

It imports nothing from attnlab. Each function builds the dense ``[T, S]`` weights of every
head exactly as its paper writes them (plain ``exp`` / powers in float64 on small random
inputs, no stabilisation), masked by ``m[b, t, s]`` (1 where query t may see key s: same
document, and s <= t when causal). Key/value heads are repeated for grouped queries.
Gradients come from ``jax.vjp`` of the same float64 code (:func:`grads`), with x64 switched
on only inside :func:`float64`. ``s = scale q k^T`` throughout.

    sigmoid_attention   O = sigmoid(s + b) V, no normalizer (Ramapuram et al. 2024, §2:
                        SigmoidAttn(X) = sigma(Q K^T / sqrt(d_qk)) V, with the bias b)
    relu_attention      O = ReLU(s) V (Zhang et al. 2021: the ReLU in place of the softmax)
    rela                Z = ReLU(s) V of all heads concatenated; LN(Z) = g * Z / RMS(Z) *
                        sigmoid(w * Z) (same paper, ReLA-g's gated RMSNorm,
                        as the authors' implementation computes it)
    softplus_attention  A = softplus(log_d(n_t) s) / row sum, n_t the keys row t sees, d the
                        head dim (LSSA); R = A^p / row sum of A^p (the re-weighting);
                        O = R V (Gao & Spratling 2025)
    cog_attention       W = sign(s) * exp(|s|) / row sum exp(|s|); O = W V (Lv et al. 2024,
                        Cog attention: softmax of |QK^T| signed by QK^T)
    aaren               o_t = sum_{i <= t} exp(q . k_i scale) v_i / sum_{i <= t} exp(...)
                        with one query q per head (Feng et al. 2024, "Attention as an RNN":
                        attention as a many-to-many RNN, one output per prefix)
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


def mask(length, causal, segment_ids=None, batch=1, lengths=None):
  """``[B, T, S]`` float64: 1 where query t may see key s. A change of segment id starts a
  new document; keys at ``s >= lengths[b]`` are padding."""
  if segment_ids is None:
    docs = np.zeros((batch, length), np.int64)
  else:
    ids = np.asarray(segment_ids)
    docs = np.concatenate([np.zeros((ids.shape[0], 1), np.int64),
                           np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)
  m = docs[:, :, None] == docs[:, None, :]
  if causal:
    m = m & np.tril(np.ones((length, length), bool))[None]
  if lengths is not None:
    m = m & (np.arange(length)[None, None, :] < np.asarray(lengths)[:, None, None])
  return m.astype(np.float64)


def _scores(q, k, scale):
  """``[B, N, T, S]`` with the key heads repeated for the query heads."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return jnp.einsum("btnh,bsnh->bnts", q, k) * scale


def _apply(w, v, heads):
  v = jnp.repeat(v, heads // v.shape[2], axis=2)
  return jnp.einsum("bnts,bsnh->btnh", w, v)


def sigmoid_attention(q, k, v, *, m, scale, bias):
  w = jax.nn.sigmoid(_scores(q, k, scale) + bias) * m[:, None]
  return _apply(w, v, q.shape[2])


def relu_attention(q, k, v, *, m, scale):
  return _apply(jax.nn.relu(_scores(q, k, scale)) * m[:, None], v, q.shape[2])


def rela(q, k, v, norm_scale, norm_gate, *, m, scale, eps):
  z = relu_attention(q, k, v, m=m, scale=scale)
  b, t, n, h = z.shape
  rms = jnp.sqrt(jnp.mean(z.reshape(b, t, n * h) ** 2, axis=-1) + eps)[..., None, None]
  norm_scale, norm_gate = norm_scale[None, None], norm_gate[None, None]
  return norm_scale * z / rms * jax.nn.sigmoid(norm_gate * z)


def softplus_attention(q, k, v, *, m, scale, power):
  n = jnp.sum(m, axis=-1)  # [B, T]: the keys each row sees
  lam = (jnp.log(n) / np.log(q.shape[-1]))[:, None, :, None]
  a = jnp.log1p(jnp.exp(lam * _scores(q, k, scale))) * m[:, None]
  a = a / jnp.sum(a, axis=-1, keepdims=True)
  r = a ** power
  r = r / jnp.sum(r, axis=-1, keepdims=True)
  return _apply(r, v, q.shape[2])


def cog_attention(q, k, v, *, m, scale):
  s = _scores(q, k, scale)
  e = jnp.exp(jnp.abs(s)) * m[:, None]
  return _apply(jnp.sign(s) * e / jnp.sum(e, axis=-1, keepdims=True), v, q.shape[2])


def aaren(q, k, v, *, m, scale):
  """``q [B, H, K]``, ``k [B, T, H, K]``, ``v [B, T, H, V]``; ``m [B, T, S]``."""
  s = jnp.einsum("bhk,bshk->bhs", q, k) * scale
  e = jnp.exp(s)[:, :, None, :] * m[:, None]  # [B, H, T, S]
  return jnp.einsum("bhts,bshv->bthv", e / jnp.sum(e, axis=-1, keepdims=True), v)


@functools.lru_cache(maxsize=None)
def _compiled(fn, scalars):
  """One compiled float64 forward + vjp per oracle and static options: the f32, bf16 and
  reference-tier checks of one case reuse it."""
  scalars = dict(scalars)

  def out_and_grads(diff, arrays, dout):
    out, vjp = jax.vjp(lambda d: fn(**d, **arrays, **scalars), diff)
    return out, vjp(dout)[0]

  return jax.jit(out_and_grads)


def grads(fn, diff: dict, dout, **static):
  """``(out, {name: d<out, dout>/d name})`` of ``fn(**diff, **static)`` in float64."""
  with float64():
    diff = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in diff.items()}
    arrays = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in static.items()
              if isinstance(x, np.ndarray)}
    scalars = tuple(sorted((n, x) for n, x in static.items() if n not in arrays))
    dout = jnp.asarray(np.asarray(dout, np.float64))
    out, g = _compiled(fn, scalars)(diff, arrays, dout)
    return np.asarray(out), {n: np.asarray(x) for n, x in g.items()}
