"""Float64 oracle of sparsemax and 1.5-entmax attention, written from the papers' definitions.

It imports nothing from attnlab. Per head, ``z = scale q k^T`` over the keys a query sees
(``m[t, s] = 1``), and ``o = p v`` with

    sparsemax   p = argmin_{p in simplex} |p - z|^2 = [z - tau]_+          (Martins &
                Astudillo 2016, eqs. 2-3)
    1.5-entmax  p = [z / 2 - tau]_+^2                                     (Correia et al.
                2019, alpha-entmax [(alpha - 1) z - tau]_+^{1/(alpha - 1)}, alpha = 1.5)

with tau such that p sums to one. The threshold is found from the optimality (KKT)
conditions rather than a running criterion: for every support size k of the sorted
``x = (alpha - 1) z``, ``tau_k`` solves ``sum_{j <= k} (x_(j) - tau)^{1/(alpha-1)} = 1``
(the smaller root for 1.5-entmax), and the support is the one k with
``x_(k) > tau_k >= x_(k+1)``. Gradients go through a ``custom_vjp`` that builds each
row's Jacobian as a matrix, ``J = diag(s) - s s^T / sum(s)`` with ``s = p^{2 - alpha}``
on the support (Martins & Astudillo §2.5; Correia et al. Prop. 2), and returns
``J^T g``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_FAR = -1e6  # a score no support can reach (the oracle's inputs are O(1))


def _kkt_threshold(x, m, alpha):
  """``tau [...]`` of ``x [..., S]`` over the entries with ``m = 1``."""
  u = -jnp.sort(-jnp.where(m > 0, x, _FAR), axis=-1)
  size = x.shape[-1]
  k = jnp.arange(1, size + 1, dtype=x.dtype).reshape((1,) * (x.ndim - 1) + (size,))
  c1 = jnp.cumsum(u, axis=-1)
  if alpha == 2.0:
    tau = (c1 - 1.0) / k
  else:
    # k tau^2 - 2 c1 tau + c2 - 1 = 0, the root below the mean.
    disc = c1 * c1 - k * (jnp.cumsum(u * u, axis=-1) - 1.0)
    tau = (c1 - jnp.sqrt(jnp.maximum(disc, 0.0))) / k
  following = jnp.concatenate([u[..., 1:], jnp.full(u[..., :1].shape, -jnp.inf)], axis=-1)
  count = jnp.sum(m, axis=-1, keepdims=True)
  ok = (u > tau) & (tau >= following) & (k <= count)
  return jnp.sum(jnp.where(ok, tau, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def sparse_map(z, m, alpha):
  """The weights ``p [..., S]`` of scores ``z`` over the keys with ``m = 1``."""
  x = (alpha - 1.0) * z
  r = jnp.maximum(x - _kkt_threshold(x, m, alpha)[..., None], 0.0) * m
  return r if alpha == 2.0 else r * r


def _sparse_map_fwd(z, m, alpha):
  p = sparse_map(z, m, alpha)
  return p, (p, m)


def _sparse_map_bwd(alpha, res, g):
  p, m = res
  s = (p > 0).astype(p.dtype) if alpha == 2.0 else jnp.sqrt(p)
  size = p.shape[-1]
  eye = jnp.eye(size, dtype=p.dtype).reshape((1,) * (p.ndim - 1) + (size, size))
  jac = (eye * s[..., None, :]
         - s[..., :, None] * s[..., None, :] / jnp.sum(s, -1)[..., None, None])
  return jnp.einsum("...ij,...i->...j", jac, g), jnp.zeros_like(m)


sparse_map.defvjp(_sparse_map_fwd, _sparse_map_bwd)


def _attention(q, k, v, m, scale, alpha):
  z = scale * jnp.einsum("bthd,bshd->bhts", q, k)
  p = sparse_map(z, jnp.broadcast_to(m[:, None], z.shape), alpha)
  return jnp.einsum("bhts,bshv->bthv", p, v)


def sparsemax_attention(q, k, v, *, m, scale):
  return _attention(q, k, v, m, scale, 2.0)


def entmax15_attention(q, k, v, *, m, scale):
  return _attention(q, k, v, m, scale, 1.5)


def weights(q, k, *, m, scale, alpha):
  """The attention weights ``[B, H, T, S]`` themselves."""
  z = scale * jnp.einsum("bthd,bshd->bhts", q, k)
  return sparse_map(z, jnp.broadcast_to(m[:, None], z.shape), alpha)
