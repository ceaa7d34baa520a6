"""Float64 oracle of the feature-map linear attentions, written from the papers' equations.

It imports nothing from attnlab. Each function builds the dense ``[T, T]`` weights of one
head exactly as its paper writes them (no decomposition, no stabilization: plain ``exp``
in float64 on small random inputs), masked by ``mask[t, s]`` (same document, and s <= t
when causal). Gradients come from ``jax.grad`` of the same float64 code (:func:`grads`),
with x64 switched on only inside :func:`float64`.

    efficient_attention  o_t = sum_d softmax_d(q_t) sum_s [e^{k_sd} m_ts / sum_u e^{k_ud} m_tu] v_s
                         (Shen et al. 2021, eq. 4; rho_q, rho_k of §3.2)
    performer            A_ts = phi(q_t)^T phi(k_s) m_ts, phi(x) = exp(W x' - |x'|^2/2)/sqrt(M),
                         x' = x scale^{1/2}; o = A v / A 1 (Choromanski et al. 2021, Lemma 1)
    cosformer            A_ts = ReLU(q_t)^T ReLU(k_s) cos(pi/2 (t - s)/M) m_ts;
                         o = A v / (A 1 + eps) (Qin et al. 2022, the cos re-weighting)
    cottention           A_ts = q_t^T k_s / (|q_t| |k_s|) m_ts; o_t = sum_s A_ts v_s / n_s^p,
                         n_s = sum_u m_su (Mongaras et al. 2024: N(Q) N(K)^T V / s^sigmoid(m))
    lln_attention        A_ts = exp(alpha q_t)^T exp(beta k_s) m_ts; o = A v / A 1 (Nahshan et
                         al. 2024, §4)
    focused_linear       A_ts = f_p(ReLU(q_t))^T f_p(ReLU(k_s)) m_ts, f_p(x) = |x|/|x^p| x^p;
                         o = A v / (A 1 + eps) (Han et al. 2023, eqs. 5-6)
    slab_attention       A_ts = ReLU(q_t)^T ReLU(k_s) m_ts; o = A v / (A 1 + eps) (Guo et al.
                         2024, §3.2)

Cottention's norms carry the same ``eps`` inside the square root as attnlab
(``x / sqrt(|x|^2 + 1e-6)``), the ReLU maps the same ``1e-6`` in the denominator.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6


@contextlib.contextmanager
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


def mask(length, causal, segment_ids=None, batch=1):
  """``[B, T, S]`` float64: 1 where query t may see key s."""
  if segment_ids is None:
    docs = np.zeros((batch, length), np.int64)
  else:
    ids = np.asarray(segment_ids)
    docs = np.concatenate([np.zeros((ids.shape[0], 1), np.int64),
                           np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)
  m = docs[:, :, None] == docs[:, None, :]
  if causal:
    m = m & np.tril(np.ones((length, length), bool))[None]
  return m.astype(np.float64)


def _normalized(a, v, eps):
  return jnp.einsum("bhts,bshv->bthv", a, v) / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None]
                                                + eps)


def _scores(fq, fk, m):
  return jnp.einsum("bthf,bshf->bhts", fq, fk) * m[:, None]


def efficient_attention(q, k, v, *, m):
  rho_q = jnp.exp(q) / jnp.sum(jnp.exp(q), -1, keepdims=True)
  e = jnp.exp(k)[:, None] * m[..., None, None]  # [B, T, S, H, K]
  rho_k = e / jnp.sum(e, axis=2, keepdims=True)
  return jnp.einsum("bthd,btshd,bshv->bthv", rho_q, rho_k, v)


def performer(q, k, v, projection, *, m, scale):
  def phi(x):
    x = x * np.sqrt(scale)
    return jnp.exp(jnp.einsum("bthd,md->bthm", x, projection)
                   - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / np.sqrt(projection.shape[0])
  return _normalized(_scores(phi(q), phi(k), m), v, 0.0)


def cosformer(q, k, v, *, m, max_len):
  t = q.shape[1]
  i = np.arange(t)
  reweight = np.cos(np.pi / 2 * (i[:, None] - i[None, :]) / max_len)
  a = _scores(jax.nn.relu(q), jax.nn.relu(k), m * reweight[None])
  return _normalized(a, v, EPS)


def cottention(q, k, v, length_exponent, *, m):
  unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + EPS)
  # Each value row s divided by its own sequence length n_s^p, n_s = sum_u m[s, u]
  # (V / s^sigmoid(m) with a per-row length, as the authors' causal code does).
  n = jnp.sum(m, -1)[..., None]  # [B, S, 1]
  v = v / (n ** jnp.reshape(length_exponent, (1, 1, -1)))[..., None]
  return jnp.einsum("bhts,bshv->bthv", _scores(unit(q), unit(k), m), v)


def lln_attention(q, k, v, alpha, beta, *, m):
  head = lambda x: jnp.reshape(x, (1, 1, -1, 1))
  return _normalized(_scores(jnp.exp(head(alpha) * q), jnp.exp(head(beta) * k), m), v, 0.0)


def focused(x, power):
  r = jax.nn.relu(x)
  rp = r ** power
  n1, n2 = jnp.sum(r * r, -1, keepdims=True), jnp.sum(rp * rp, -1, keepdims=True)
  zero = n2 == 0
  return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, n1))
                   / jnp.sqrt(jnp.where(zero, 1.0, n2)) * rp)


def focused_linear_attention(q, k, v, *, m, power):
  return _normalized(_scores(focused(q, power), focused(k, power), m), v, EPS)


def slab_attention(q, k, v, *, m):
  return _normalized(_scores(jax.nn.relu(q), jax.nn.relu(k), m), v, EPS)


def softmax_attention(q, k, v, *, m, scale):
  """Plain softmax attention, the target of Performer's estimate."""
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  w = jnp.exp(logits) * m[:, None]
  return _normalized(w, v, 0.0)


def grads(fn, diff: dict, dout, **static):
  """``(out, {name: d<out, dout>/d name})`` of ``fn(**diff, **static)`` in float64."""
  with float64():
    diff = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in diff.items()}
    static = {n: (jnp.asarray(np.asarray(x, np.float64)) if isinstance(x, np.ndarray)
                  else x) for n, x in static.items()}
    dout = jnp.asarray(np.asarray(dout, np.float64))
    arrays = {n: x for n, x in static.items() if isinstance(x, jax.Array)}
    scalars = {n: x for n, x in static.items() if n not in arrays}

    def out_and_grads(diff, arrays, dout):
      out, vjp = jax.vjp(lambda d: fn(**d, **arrays, **scalars), diff)
      return out, vjp(dout)[0]

    out, g = jax.jit(out_and_grads)(diff, arrays, dout)
    return np.asarray(out), {n: np.asarray(x) for n, x in g.items()}
