"""Low-rank approximations of softmax attention (CATALOG.md section 4): Linformer and
Nystromformer. Both are non-causal (encoder) mechanisms without a decode step.

Linformer (Wang et al. 2020, eq. 7) projects keys and values along the sequence axis with
``E, F [k, n]`` (``n`` the fixed sequence length)::

    head = softmax(Q (E K)^T / sqrt(d)) (F V)

Nystromformer (Xiong et al. 2021, section 3) builds ``m`` landmarks as segment means of q
and k (``Q~``, ``K~`` ``[m, d]``) and approximates ``softmax(Q K^T / sqrt(d)) V`` by::

    F~ = softmax(Q K~^T / sqrt(d))      [n, m]
    A~ = softmax(Q~ K~^T / sqrt(d))     [m, m]
    B~ = softmax(Q~ K^T / sqrt(d))      [m, n]
    out = F~ A~^+ (B~ V)

with ``A~^+`` the Moore-Penrose pseudo-inverse: exact (SVD, ``jnp.linalg.pinv``) in the
``reference`` tier, the paper's iteration (:func:`iterative_pinv`) in the ``xla`` tier.

Both ops take ``lengths [B]`` for right padding: key/value positions ``t >= lengths[b]``
never contribute (Linformer zeroes them before the projection; Nystromformer leaves them
out of the landmarks and of ``B~``). Outputs at padded query rows are defined but
meaningless. Everything is computed in float32 and returned in v's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import registry
from attnlab.ops.softmax import dot_product_attention

__all__ = ["linformer", "nystromformer", "iterative_pinv"]

_HIGHEST = jax.lax.Precision.HIGHEST
NYSTROM_ITERATIONS = 6   # Xiong et al. 2021 use 6 iterations of the pseudo-inverse


def _einsum(spec, *args):
  return jnp.einsum(spec, *args, precision=_HIGHEST)


# ------------------------------------------------------------------------ shared checks


def check_qkv(q, k, v, *, same_value_dim=False):
  """q, k ``[B, T, H, D]``, v ``[B, T, H, Dv]`` as arrays, or a ValueError naming the
  argument and what it got."""
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, H, D], got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape [B, T, H, D], got "
                     f"{q.shape=}, {k.shape=}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must be [B, T, H, Dv] with q's B, T, H, got {q.shape=}, {v.shape=}")
  if same_value_dim and v.shape != k.shape:
    raise ValueError(f"v must have k's shape [B, T, H, D], got {k.shape=}, {v.shape=}")
  if q.shape[1] == 0:
    raise ValueError(f"sequence length must be positive, got {q.shape=}")
  return q, k, v


def check_scale(scale, head_dim):
  if scale is None:
    return head_dim ** -0.5
  if (not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool)
      or not np.isfinite(scale)):
    raise ValueError(f"scale must be a finite Python float, got scale={scale!r}")
  return float(scale)


def check_lengths(lengths, batch):
  """``lengths [B]`` integers (valid prefix of each row, >= 1), or None."""
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must be [B]=({batch},), got lengths.shape={lengths.shape}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integers, got lengths.dtype={lengths.dtype}")
  return lengths


def check_count(name, value):
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
  return int(value)


def valid_positions(lengths, batch, length):
  """``[B, T]`` bool: position t of row b is inside its first ``lengths[b]`` tokens."""
  if lengths is None:
    return jnp.ones((batch, length), bool)
  return jnp.arange(length)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------- segment means


def segment_means(x, num_segments, lengths=None):
  """Means of ``num_segments`` contiguous segments of each row's valid prefix.

  Row b's valid prefix ``[0, L)`` (``L = lengths[b]``, default T) is cut into segments
  ``j = [floor(j L / m), floor((j + 1) L / m))``: for ``m | L`` the paper's equal
  segments of ``L / m`` tokens (Nystromformer section 3, "segment-means"), otherwise
  sizes ``floor(L / m)`` or ``ceil(L / m)``. Padded positions never enter a mean, so the
  means of a padded row equal those of the row cut to its length. For ``L < m`` some
  segments are empty; their mean is 0 and they are flagged invalid.

  Args:
    x: ``[B, T, H, D]``.
    num_segments: m.
    lengths: ``[B]`` ints or None.

  Returns:
    ``(means [B, m, H, D] float32, valid [B, m] bool)``.
  """
  batch, length = x.shape[:2]
  total = (jnp.full((batch,), length, jnp.int32) if lengths is None
           else lengths.astype(jnp.int32))
  j = jnp.arange(num_segments + 1, dtype=jnp.int32)
  edges = (j[None, :] * total[:, None]) // num_segments            # [B, m + 1]
  start, stop = edges[:, :-1], edges[:, 1:]
  t = jnp.arange(length, dtype=jnp.int32)
  member = (t[None, None, :] >= start[..., None]) & (t[None, None, :] < stop[..., None])
  count = (stop - start).astype(jnp.float32)
  weights = member.astype(jnp.float32) / jnp.maximum(count, 1.0)[..., None]  # [B, m, T]
  means = _einsum("bmt,bthd->bmhd", weights, x.astype(jnp.float32))
  return means, count > 0


def _masked_softmax(logits, allowed):
  """Softmax over the last axis restricted to ``allowed``; a row with nothing allowed
  is all zeros."""
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(p.dtype).tiny)


# ---------------------------------------------------------------------------- Linformer


@dataclasses.dataclass(frozen=True)
class LinformerCall:
  """The canonical arguments of every Linformer tier."""

  q: Any
  k: Any
  v: Any
  e: Any          # [H, k, n] float
  f: Any          # [H, k, n] float
  lengths: Any    # None or [B] int
  scale: float

  def run(self, fn):
    return fn(self.q, self.k, self.v, self.e, self.f, lengths=self.lengths,
              scale=self.scale)


def _linformer_projections(k, v, e, f, lengths):
  """``E K`` and ``F V`` per head, ``[B, k, H, D]`` float32, padded keys zeroed."""
  valid = valid_positions(lengths, k.shape[0], k.shape[1])[..., None, None]
  k32 = jnp.where(valid, k.astype(jnp.float32), 0.0)
  v32 = jnp.where(valid, v.astype(jnp.float32), 0.0)
  k_proj = _einsum("hrn,bnhd->brhd", e.astype(jnp.float32), k32)
  v_proj = _einsum("hrn,bnhd->brhd", f.astype(jnp.float32), v32)
  return k_proj, v_proj


def _linformer_reference(q, k, v, e, f, *, lengths, scale):
  """The literal eq. 7: the ``[T, k]`` context mapping ``P = softmax(Q (E K)^T / sqrt(d))``
  materialized in float32, then ``P (F V)``."""
  k_proj, v_proj = _linformer_projections(k, v, e, f, lengths)
  logits = scale * _einsum("bthd,brhd->bhtr", q.astype(jnp.float32), k_proj)
  p = jax.nn.softmax(logits, axis=-1)
  return _einsum("bhtr,brhd->bthd", p, v_proj).astype(v.dtype)


def _linformer_xla(q, k, v, e, f, *, lengths, scale):
  """Project, then run the k projected keys through the registry's softmax attention
  (blockwise online softmax, or cuDNN where it applies)."""
  k_proj, v_proj = _linformer_projections(k, v, e, f, lengths)
  o = dot_product_attention(q, k_proj.astype(q.dtype), v_proj.astype(q.dtype), scale=scale)
  return o.astype(v.dtype)


registry.describe("linformer", registry.MechanismInfo(
    paper="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
    family="low rank", causal=False, non_causal=True, state="-",
    cost="O(T k D), k = projected length",
    xla_path="dot_product_attention on projected keys and values"))
registry.register("linformer", registry.Implementation(
    "reference", _linformer_reference, automatic=False))
registry.register("linformer", registry.Implementation("xla", _linformer_xla, priority=10))


def _check_projection(name, x, heads, length):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if x.ndim == 2:
    x = jnp.broadcast_to(x[None], (heads,) + x.shape)
  if x.ndim != 3 or x.shape[0] != heads:
    raise ValueError(f"{name} must be [k, n] (shared by the heads) or [H, k, n] with "
                     f"H={heads}, got {name}.shape={x.shape}")
  if x.shape[2] != length:
    raise ValueError(f"{name} projects sequences of length n={x.shape[2]}, but the inputs "
                     f"have T={length}; right-pad them to n and pass lengths")
  if x.shape[1] == 0:
    raise ValueError(f"{name} must project to k >= 1 rows, got {name}.shape={x.shape}")
  return x


def linformer(q, k, v, e, f=None, *, lengths=None, scale=None, implementation=None):
  """Linformer attention (Wang et al. 2020, eq. 7), non-causal.

  ``o = softmax(Q (E K)^T * scale) (F V)`` per head, where ``E K`` and ``F V`` project
  the keys and values along the sequence axis to k rows.

  Args:
    q, k, v: ``[B, T, H, D]`` (one shape for all three).
    e: the key projection ``[k, n]`` (headwise sharing) or ``[H, k, n]`` (one per head),
      with ``n == T``.
    f: the value projection, same shapes; None shares ``e`` (the paper's key-value
      sharing, F = E).
    lengths: ``[B]`` ints: row b is right padded after ``lengths[b]`` tokens; padded keys
      and values are zeroed before the projection, so they never contribute.
    scale: logits scale (default ``D ** -0.5``).
    implementation: None, ``"reference"`` or ``"xla"``.

  Returns:
    ``o [B, T, H, D]`` in v's dtype.
  """
  q, k, v = check_qkv(q, k, v, same_value_dim=True)
  batch, length, heads, dim = q.shape
  e = _check_projection("e", e, heads, length)
  f = e if f is None else _check_projection("f", f, heads, length)
  if f.shape != e.shape:
    raise ValueError(f"e and f must have the same shape, got {e.shape=}, {f.shape=}")
  call = LinformerCall(q, k, v, e, f, check_lengths(lengths, batch),
                       check_scale(scale, dim))
  return call.run(registry.select("linformer", implementation, call).fn)


# ------------------------------------------------------------------------ Nystromformer


def iterative_pinv(a, num_iterations=NYSTROM_ITERATIONS):
  """Moore-Penrose pseudo-inverse of ``a [..., m, m]`` by Xiong et al. 2021's iteration
  (their "Approximating the Moore-Penrose inverse", after Razavi et al. 2014)::

      Z_0     = A^T / (||A||_1 ||A||_inf)
      Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

  ``||A||_1`` is the largest column sum of |A|, ``||A||_inf`` the largest row sum; the
  scaling puts every singular value of ``A Z_0`` in (0, 1], where the iteration converges
  to ``A^+``. Computed in float32 at the highest matmul precision.
  """
  a = a.astype(jnp.float32)
  eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
  norm_1 = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
  norm_inf = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)
  z = jnp.swapaxes(a, -1, -2) / jnp.maximum(norm_1 * norm_inf,
                                            jnp.finfo(a.dtype).tiny)[..., None, None]

  def mm(x, y):
    return jnp.matmul(x, y, precision=_HIGHEST)

  for _ in range(num_iterations):
    az = mm(a, z)
    z = 0.25 * mm(z, 13 * eye - mm(az, 15 * eye - mm(az, 7 * eye - az)))
  return z


@dataclasses.dataclass(frozen=True)
class NystromCall:
  """The canonical arguments of every Nystromformer tier."""

  q: Any
  k: Any
  v: Any
  num_landmarks: int
  lengths: Any
  scale: float
  num_iterations: int

  def run(self, fn):
    return fn(self.q, self.k, self.v, num_landmarks=self.num_landmarks,
              lengths=self.lengths, scale=self.scale, num_iterations=self.num_iterations)


def _nystrom_factors(q, k, num_landmarks, lengths, scale):
  """``F~ [B, H, T, m]``, ``A~ [B, H, m, m]``, ``B~ [B, H, m, T]`` (float32).

  Empty landmarks (``lengths[b] < m``) get zero rows in ``A~`` and ``B~`` and zero
  columns in ``F~`` and ``A~``: ``A~`` is then block diagonal with a zero block, whose
  pseudo-inverse keeps the zero block, so they drop out of ``F~ A~^+ B~`` exactly."""
  batch, length = q.shape[:2]
  q_l, valid_l = segment_means(q, num_landmarks, lengths)
  k_l, _ = segment_means(k, num_landmarks, lengths)
  valid_t = valid_positions(lengths, batch, length)
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  rows = valid_l[:, None, :, None]
  f_t = _masked_softmax(scale * _einsum("bthd,bmhd->bhtm", q32, k_l), valid_l[:, None, None])
  a_t = _masked_softmax(scale * _einsum("bmhd,bnhd->bhmn", q_l, k_l), valid_l[:, None, None])
  a_t = jnp.where(rows, a_t, 0.0)
  b_t = _masked_softmax(scale * _einsum("bmhd,bthd->bhmt", q_l, k32), valid_t[:, None, None])
  b_t = jnp.where(rows, b_t, 0.0)
  return f_t, a_t, b_t


def _nystrom(q, k, v, pinv, *, num_landmarks, lengths, scale):
  f_t, a_t, b_t = _nystrom_factors(q, k, num_landmarks, lengths, scale)
  bv = _einsum("bhmt,bthd->bhmd", b_t, v.astype(jnp.float32))
  o = _einsum("bhtm,bhmd->bthd", f_t, jnp.matmul(pinv(a_t), bv, precision=_HIGHEST))
  return o.astype(v.dtype)


def _nystrom_reference(q, k, v, *, num_landmarks, lengths, scale, num_iterations):
  """The Nystrom approximation with the exact (SVD) pseudo-inverse."""
  del num_iterations  # exact inverse
  return _nystrom(q, k, v, jnp.linalg.pinv, num_landmarks=num_landmarks, lengths=lengths,
                  scale=scale)


def _nystrom_xla(q, k, v, *, num_landmarks, lengths, scale, num_iterations):
  """The paper's algorithm: the pseudo-inverse by ``num_iterations`` matmul iterations."""
  return _nystrom(q, k, v, lambda a: iterative_pinv(a, num_iterations),
                  num_landmarks=num_landmarks, lengths=lengths, scale=scale)


registry.describe("nystromformer", registry.MechanismInfo(
    paper="Xiong et al. 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating "
          "Self-Attention",
    family="low rank", causal=False, non_causal=True, state="-",
    cost="O(T m D + m^3), m = landmarks",
    xla_path="dense landmark products, iterative pseudo-inverse"))
registry.register("nystromformer", registry.Implementation(
    "reference", _nystrom_reference, automatic=False))
registry.register("nystromformer", registry.Implementation("xla", _nystrom_xla, priority=10))


def nystromformer(q, k, v, *, num_landmarks, lengths=None, scale=None,
                  num_iterations=NYSTROM_ITERATIONS, implementation=None):
  """Nystromformer attention (Xiong et al. 2021), non-causal.

  ``o = softmax(Q K~^T s) A~^+ (softmax(Q~ K^T s) V)`` with ``A~ = softmax(Q~ K~^T s)``,
  ``s = scale`` and the landmarks ``Q~, K~`` the segment means of q and k
  (:func:`segment_means`; lengths not divisible by m get segments of ``floor(L/m)`` or
  ``ceil(L/m)`` tokens).

  Args:
    q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``.
    num_landmarks: m.
    lengths: ``[B]`` ints (right padding): padded positions enter neither the landmarks
      nor ``B~``, so valid rows equal those of the row cut to its length.
    scale: logits scale (default ``D ** -0.5``).
    num_iterations: iterations of :func:`iterative_pinv` (``xla`` tier; the
      ``reference`` tier uses the exact SVD pseudo-inverse and ignores it).
    implementation: None, ``"reference"`` or ``"xla"``.

  Returns:
    ``o [B, T, H, Dv]`` in v's dtype.
  """
  q, k, v = check_qkv(q, k, v)
  batch, _, _, dim = q.shape
  call = NystromCall(q, k, v, check_count("num_landmarks", num_landmarks),
                     check_lengths(lengths, batch), check_scale(scale, dim),
                     check_count("num_iterations", num_iterations))
  return call.run(registry.select("nystromformer", implementation, call).fn)
