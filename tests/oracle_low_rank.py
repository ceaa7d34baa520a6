"""Float64 NumPy oracles of Linformer, Nystromformer and agent attention, written from the
papers' equations. Imports nothing from attnlab.

Each mechanism is written for one head (``*_head``: ``[T, D]`` matrices) and applied to
``[B, T, H, D]`` inputs by looping over rows and heads, with row b cut to its valid prefix
``L = lengths[b]`` wherever keys or values enter (right padding). Query rows are all T
rows (padded query rows get an output too, from the same formula).

* Linformer (Wang et al. 2020, eq. 7): ``softmax(Q (E K)^T s) (F V)`` with padded keys
  and values left out of the projection: ``E[:, :L] K[:L]``.
* Landmarks / agents: segment j of the valid prefix is ``[floor(j L / m),
  floor((j + 1) L / m))`` (the paper's segment means when m divides L); empty segments
  (L < m) are left out.
* Nystromformer (Xiong et al. 2021, section 3): ``F~ A~^+ (B~ V)`` with
  ``F~ = softmax(Q K~^T s)``, ``A~ = softmax(Q~ K~^T s)``, ``B~ = softmax(Q~ K^T s)``;
  ``A~^+`` exact (``np.linalg.pinv``) or by the paper's iteration
  ``Z_0 = A^T / (||A||_1 ||A||_inf)``, ``Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I -
  A Z_j))) / 4``.
* Agent attention (Han et al. 2024, eqs. 3 and 5):
  ``softmax(Q A^T s + B_2) softmax(A K^T s + B_1) V`` with agents the segment means of Q.

Every batch function returns ``(out, grads)``: with a cotangent ``dout``, ``grads`` maps
each differentiable argument to the gradient of ``<out, dout>``, by float64 central
differences of the per-head function (a head's inputs only move that head's output, so
each perturbation re-evaluates one head).
"""

from __future__ import annotations

import numpy as np

STEP = 1e-6


def softmax(x):
  e = np.exp(x - np.max(x, axis=-1, keepdims=True))
  return e / np.sum(e, axis=-1, keepdims=True)


def segments(length, m):
  """The non-empty segments ``(j, lo, hi)`` of a valid prefix of ``length`` tokens."""
  out = []
  for j in range(m):
    lo, hi = (j * length) // m, ((j + 1) * length) // m
    if hi > lo:
      out.append((j, lo, hi))
  return out


def _means(x, segs):
  return np.stack([x[lo:hi].mean(0) for _, lo, hi in segs])


def _fd(fn, args, dout):
  """Central differences of ``<fn(*args), dout>`` w.r.t. every array in ``args``."""
  args = [np.array(a, np.float64) for a in args]
  grads = []
  for x in args:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      orig = x[idx]
      x[idx] = orig + STEP
      up = np.sum(fn(*args) * dout)
      x[idx] = orig - STEP
      down = np.sum(fn(*args) * dout)
      x[idx] = orig
      g[idx] = (up - down) / (2 * STEP)
    grads.append(g)
  return grads


def _run(head_fn, q, k, v, lengths, per_head, dout):
  """Apply ``head_fn(q [T, D], k [L, D], v [L, D], *per_head(b, h, L))`` to every row and
  head. Returns out and, with ``dout``, the gradients (q, k, v, then the per-head args,
  each a list of ``(b, h, L, grad)``)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, t, heads, _ = q.shape
  out = np.zeros(v.shape)
  grads = None if dout is None else [np.zeros(q.shape), np.zeros(k.shape),
                                     np.zeros(v.shape), []]
  for b in range(batch):
    n = t if lengths is None else int(lengths[b])
    for h in range(heads):
      args = [q[b, :, h], k[b, :n, h], v[b, :n, h]] + list(per_head(b, h, n))
      out[b, :, h] = head_fn(*args)
      if dout is not None:
        g = _fd(head_fn, args, dout[b, :, h])
        grads[0][b, :, h] += g[0]
        grads[1][b, :n, h] += g[1]
        grads[2][b, :n, h] += g[2]
        grads[3].append((b, h, n, g[3:]))
  return out, grads


# ---------------------------------------------------------------------------- Linformer


def linformer_head(q, k, v, e, f, scale):
  """Eq. 7 for one head: ``softmax(Q (E K)^T s) (F V)``."""
  return softmax(q @ (e @ k).T * scale) @ (f @ v)


def linformer(q, k, v, e, f=None, lengths=None, scale=None, dout=None):
  """E, F ``[k, n]`` (shared by heads) or ``[H, k, n]``; f None shares e (F = E)."""
  shared_f = f is None
  e = np.asarray(e, np.float64)
  f = e if shared_f else np.asarray(f, np.float64)
  d = np.shape(q)[3]
  scale = d ** -0.5 if scale is None else scale

  def proj(x, h, n):
    return (x if x.ndim == 2 else x[h])[:, :n]

  def head(q_, k_, v_, e_, f_):
    return linformer_head(q_, k_, v_, e_, e_ if shared_f else f_, scale)

  out, g = _run(head, q, k, v, lengths, lambda b, h, n: (proj(e, h, n), proj(f, h, n)), dout)
  if dout is None:
    return out, None
  de, df = np.zeros(e.shape), np.zeros(f.shape)
  for _, h, n, (ge, gf) in g[3]:
    (de if e.ndim == 2 else de[h])[:, :n] += ge
    (df if f.ndim == 2 else df[h])[:, :n] += gf
  grads = {"q": g[0], "k": g[1], "v": g[2], "e": de}
  if not shared_f:
    grads["f"] = df
  return out, grads


# ------------------------------------------------------------------------ Nystromformer


def pinv_iterative(a, num_iterations):
  eye = np.eye(a.shape[0])
  z = a.T / (np.abs(a).sum(axis=0).max() * np.abs(a).sum(axis=1).max())
  for _ in range(num_iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def nystromformer_head(q, k, v, num_landmarks, scale, num_iterations=None):
  """``F~ A~^+ (B~ V)``; landmarks from the valid prefix (``len(k)`` tokens)."""
  segs = segments(len(k), num_landmarks)
  q_l, k_l = _means(q[:len(k)], segs), _means(k, segs)
  f_t = softmax(q @ k_l.T * scale)
  a_t = softmax(q_l @ k_l.T * scale)
  b_t = softmax(q_l @ k.T * scale)
  a_pinv = (np.linalg.pinv(a_t) if num_iterations is None
            else pinv_iterative(a_t, num_iterations))
  return f_t @ (a_pinv @ (b_t @ v))


def nystromformer(q, k, v, num_landmarks, lengths=None, scale=None, num_iterations=None,
                  dout=None):
  """``num_iterations=None``: the exact pseudo-inverse; else the paper's iteration."""
  d = np.shape(q)[3]
  scale = d ** -0.5 if scale is None else scale

  def head(q_, k_, v_):
    return nystromformer_head(q_, k_, v_, num_landmarks, scale, num_iterations)

  out, g = _run(head, q, k, v, lengths, lambda b, h, n: (), dout)
  return out, (None if dout is None else {"q": g[0], "k": g[1], "v": g[2]})


def landmark_condition(q, k, num_landmarks, lengths=None, scale=None):
  """The largest condition number of ``A~`` over rows and heads: the factor by which an
  exact pseudo-inverse amplifies rounding."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, t, heads, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  worst = 0.0
  for b in range(batch):
    segs = segments(t if lengths is None else int(lengths[b]), num_landmarks)
    for h in range(heads):
      a_t = softmax(_means(q[b, :, h], segs) @ _means(k[b, :, h], segs).T * scale)
      worst = max(worst, np.linalg.cond(a_t))
  return worst


# ---------------------------------------------------------------------- agent attention


def agent_attention_head(q, k, v, agents, b1, b2, scale):
  """Eq. 3 with eq. 5's biases: ``softmax(Q A^T s + B_2) softmax(A K^T s + B_1) V``."""
  agent_v = softmax(agents @ k.T * scale + b1) @ v          # agent aggregation
  return softmax(q @ agents.T * scale + b2) @ agent_v       # agent broadcast


def agent_attention(q, k, v, num_agents=None, agents=None, agent_bias=None,
                    query_bias=None, lengths=None, scale=None, dout=None):
  """Agents given ``[B, A, H, D]`` or pooled from q (segment means, ``num_agents``);
  ``agent_bias`` B_1 ``[H, A, T]``, ``query_bias`` B_2 ``[H, T, A]``."""
  q = np.asarray(q, np.float64)
  t, d = q.shape[1], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  count = num_agents if agents is None else np.shape(agents)[1]
  b1_all = np.zeros((q.shape[2], count, t)) if agent_bias is None else agent_bias
  b2_all = np.zeros((q.shape[2], t, count)) if query_bias is None else query_bias
  b1_all, b2_all = np.asarray(b1_all, np.float64), np.asarray(b2_all, np.float64)

  def slots(n):
    if agents is not None:
      return list(range(count))
    return [j for j, _, _ in segments(n, count)]

  def per_head(b, h, n):
    s = slots(n)
    a = np.asarray(agents, np.float64)[b, :, h] if agents is not None else np.zeros(0)
    return a, b1_all[h][s][:, :n], b2_all[h][:, s]

  def head(q_, k_, v_, a, b1, b2):
    if agents is None:
      a = _means(q_[:len(k_)], segments(len(k_), count))
    return agent_attention_head(q_, k_, v_, a, b1, b2, scale)

  out, g = _run(head, q, k, v, lengths, per_head, dout)
  if dout is None:
    return out, None
  grads = {"q": g[0], "k": g[1], "v": g[2]}
  da, db1, db2 = (np.zeros(np.shape(agents)) if agents is not None else None,
                  np.zeros(b1_all.shape), np.zeros(b2_all.shape))
  for b, h, n, (ga, gb1, gb2) in g[3]:
    s = slots(n)
    if da is not None:
      da[b, :, h] += ga
    db1[h][np.ix_(s, range(n))] += gb1
    db2[h][:, s] += gb2
  if da is not None:
    grads["agents"] = da
  if agent_bias is not None:
    grads["agent_bias"] = db1
  if query_bias is not None:
    grads["query_bias"] = db2
  return out, grads
