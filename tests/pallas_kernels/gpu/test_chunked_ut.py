"""The delta rules' UT-transform launches (``pallas_kernels/gpu/chunked_ut.py``) against a
float64 oracle written from the chunk equations, forward and backward.

Per chunk of 64 tokens: ``L_ts = beta_t e^{b_t - b_s} k_t . k_s`` (s < t, same
document), ``T = (I + L)^{-1}``, ``P = T diag(beta)``, ``N = -T diag(beta e^b) k``; the
backward is the gradient of ``sum(dU * (U + N S))`` with ``U = P v`` (``d = U + N S`` in
``chunked_delta.py``) with respect to k, v, beta, b and e^b.

The whole delta rule is tested against its oracle in ``test_chunked_delta.py``; there,
strong gates and random keys make ``L`` small. Here keys share a common direction and
gates are weak, so ``L`` is large (``|L_ts|`` up to ~0.7) and every substitution step and
merge of the inverse shows in the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import chunked_linear as cl
from pallas_kernels.gpu import chunked_ut as ut
from pallas_kernels.gpu import tiles
from tests.ops.test_linear_attention import rel_err
from tests.pallas_kernels.gpu.test_chunked_linear import gpu_only, interpreted

C = ut.CHUNK
# float32 results from products of 16-bit halves (>= 16 significant bits; X is kept as two
# such halves) and float32 substitution; N, P^T, dv and dk are rounded to the input dtype
# (bfloat16: 8 bits, ~2e-3 relative; float16: 11 bits, ~3e-4).
F32_TOL = 1e-4
ROUNDED_TOL = {jnp.bfloat16: 5e-3, jnp.float16: 1e-3}


def _inputs(rng, batch, length, heads, kd, vd, dtype):
  common = rng.standard_normal((1, 1, heads, kd))
  k = 0.8 * common + 0.6 * rng.standard_normal((batch, length, heads, kd))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((batch, length, heads, vd))
  beta = rng.uniform(0.5, 1.0, (batch, length, heads))
  g = -rng.uniform(0.01, 0.1, (batch, length, heads))
  ids = np.zeros((batch, length), np.int32)
  ids[:, 40:] = 1          # a document start inside the first chunk
  starts = jnp.asarray(np.concatenate([np.zeros((batch, 1), bool),
                                       ids[:, 1:] != ids[:, :-1]], axis=1))
  vec, _ = cl.gate_factors(jnp.asarray(g, jnp.float32), starts)
  nc = length // C
  k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  beta_c = jnp.asarray(beta.reshape(batch, nc, C, heads).transpose(0, 3, 1, 2), jnp.float32)
  states = jnp.asarray(rng.standard_normal((batch, heads, nc, kd, vd)), dtype)
  du = jnp.asarray(rng.standard_normal((batch, length, heads, vd)), jnp.float32)
  return k, v, beta_c, vec, states, du


def _oracle(k, v, beta, b, into, doc, states, du):
  """float64 ``(P^T, N, X, loss)`` with ``loss = sum(dU * (U + N S))``, chunk by chunk."""
  batch, length, heads, kd = k.shape
  nc = length // C

  def by_chunk(x):   # [B, T, H, D] -> [B, H, NC, C, D]
    return x.reshape(batch, nc, C, heads, -1).transpose(0, 3, 1, 2, 4)

  kc, vc, duc = by_chunk(k), by_chunk(v), by_chunk(du)
  lower = np.tril(np.ones((1, 1, 1, C, C), bool), -1) & (doc[..., :, None] == doc[..., None, :])
  gap = jnp.where(lower, b[..., :, None] - b[..., None, :], 0.0)
  big_l = jnp.where(lower, beta[..., :, None] * jnp.exp(gap)
                    * jnp.einsum("...tk,...sk->...ts", kc, kc), 0.0)
  t = jnp.linalg.inv(jnp.broadcast_to(jnp.eye(C), big_l.shape) + big_l)
  p = t * beta[..., None, :]
  n = -t @ ((beta * into)[..., None] * kc)
  loss = jnp.sum(duc * (p @ vc + n @ states))
  return jnp.swapaxes(p, -1, -2), n, jnp.swapaxes(t, -1, -2), loss


def _back(x):   # [B, H, NC, C, D] -> [B, T, H, D]
  batch, heads, nc, _, d = x.shape
  return np.asarray(x).transpose(0, 2, 3, 1, 4).reshape(batch, nc * C, heads, d)


SHAPES = [(64, 128, jnp.bfloat16), (128, 64, jnp.float16)]   # (K, V, dtype)


@pytest.mark.parametrize("kd,vd,dtype", SHAPES, ids=lambda x: str(getattr(x, "__name__", x)))
@pytest.mark.parametrize("interpret", [
    pytest.param(True, marks=interpreted, id="interpreted"),
    pytest.param(False, marks=gpu_only, id="on_gpu")])
def test_ut_transform_and_gradients_match_float64(interpret, kd, vd, dtype, rng,
                                                  monkeypatch):
  monkeypatch.setattr(ut, "MIN_CTAS", 1)   # both chunks in one CTA (the delta tests: one)
  batch, length, heads = 1, 2 * C, 2
  k, v, beta, vec, states, du = _inputs(rng, batch, length, heads, kd, vd, dtype)
  static = cl._Static(1.0, length // C, kd, vd, interpret)   # pylint: disable=protected-access

  dk_in = jnp.asarray(rng.standard_normal(k.shape), dtype)   # k's gradient so far

  def kernels(k, v, beta, vec, states, du, dk_in):
    pt, xt, n = ut.forward_call(static, k, beta, vec, with_n=True)
    # As the gradient launch hands it over (split outside a kernel, so with the bit mask
    # that XLA's excess-precision rule cannot drop).
    du_pair = tiles.split(du, dtype, interpret=True)
    return (pt, xt, n) + tuple(ut.backward_call(static, k, v, beta, vec, xt, du_pair,
                                               states, dk_in))

  run = kernels if interpret else jax.jit(kernels)
  pt, xt, n, dk, dv, dvec = run(k, v, beta, vec, states, du, dk_in)

  with jax.enable_x64():
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    args = [f64(x) for x in (k, v, beta, vec[..., 0, :], vec[..., 1, :])]
    fixed = dict(doc=np.asarray(vec[..., 3, :]), states=f64(states), du=f64(du))
    ref_pt, ref_n, ref_xt, _ = _oracle(*args, **fixed)
    grads = jax.grad(lambda *a: _oracle(*a, **fixed)[3], argnums=range(5))(*args)
    x_sum = np.asarray(xt[..., 0, :, :], np.float64) + np.asarray(xt[..., 1, :, :], np.float64)
    errors = {"X": rel_err(x_sum, np.asarray(ref_xt)),
              "db": rel_err(np.asarray(dvec[..., 0, :], np.float64), np.asarray(grads[3])),
              "dinto": rel_err(np.asarray(dvec[..., 1, :], np.float64),
                               np.asarray(grads[4])),
              "dbeta": rel_err(np.asarray(dvec[..., 2, :], np.float64),
                               np.asarray(grads[2]))}
    rounded = {"N": rel_err(np.asarray(n, np.float64), _back(ref_n)),
               "P^T": rel_err(np.asarray(pt, np.float64), np.asarray(ref_pt)),
               "dv": rel_err(np.asarray(dv, np.float64), np.asarray(grads[1])),
               "dk": rel_err(np.asarray(dk, np.float64),
                             np.asarray(grads[0]) + np.asarray(dk_in, np.float64))}
  assert all(e <= F32_TOL for e in errors.values()), errors
  assert all(e <= ROUNDED_TOL[dtype] for e in rounded.values()), rounded
