"""TransNormer ("The Devil in Linear Transformer", Qin et al., EMNLP 2022,
arXiv:2210.10340): NormAttention and DiagAttention.

NormAttention drops the scaling (the denominator ``phi(q)^T sum phi(k)``) of kernel
linear attention, whose gradient the paper shows unbounded, and normalizes the output
instead, ``O_norm = XNorm(Q (K^T V))`` with Q, K after the kernel::

    O_norm = XNorm(phi(Q) (phi(K)^T V))

per head, with ``phi`` the kernel (``elu + 1`` by default; ``relu`` and ``identity`` are
offered for ablations) and XNorm an RMS norm or a LayerNorm (the paper allows either)
over each head's value dim, without learned scale (the layer owns it). The authors'
fairseq-evo configurations use ``1+elu`` (or ``elu``) for this kernel and a scale-free
("simple") RMS norm or a LayerNorm. Causal: ``S_t = S_{t-1} + phi(k_t) v_t^T``, ``o_t =
XNorm(phi(q_t)^T S_t)`` with the state ``[B, H, K, V]`` float32; non-causal: every key of
the query's document.

DiagAttention is attention inside non-overlapping blocks of ``w`` tokens (block-diagonal
attention, used in the early layers against attention dilution; cost ``O(n w d)``). The
authors' configurations use ``w = 64`` and come in two variants of the in-block attention:
softmax, and a ReLU kernel followed by a norm; this op is the softmax variant::

    O = softmax(Q K^T / sqrt(D) + M) V,   M_ij = 0 if i // w == j // w (and j <= i when
                                          causal), else -inf

With packed documents (``segment_ids``) the blocks restart at every document start, so a
packed document is attended as if alone. Its decode state is the current block's keys
and values (a ring of ``w`` slots).

Equation and section numbers could not be checked against the paper's full text (only
its abstract and secondary summaries were retrievable); the forms above were checked
against those summaries and the authors' fairseq-evo configurations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import learned_feature_maps as lfm
from attnlab.ops import linear_attention as la
from attnlab.ops import masks as masks_lib
from attnlab.ops import registry
from attnlab.ops.softmax import dot_product_attention

__all__ = ["transnormer_norm_attention", "transnormer_norm_attention_step",
           "transnormer_diag_attention", "transnormer_diag_attention_step",
           "transnormer_diag_attention_cache"]

NORMS = ("rmsnorm", "layernorm")
KERNELS = ("elu_plus_one", "relu", "identity")


# ---------------------------------------------------------------------- NormAttention


def _xnorm(o, norm, eps):
  """Parameter-free RMS norm or LayerNorm over the last axis, float32."""
  o = o.astype(jnp.float32)
  if norm == "layernorm":
    o = o - jnp.mean(o, axis=-1, keepdims=True)
  return o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps)


def _kernel(name):
  fn = la.FEATURE_MAPS[name]
  return lambda x: fn(x.astype(jnp.float32))


def _check_norm_options(feature_map, norm, eps):
  if feature_map not in KERNELS:
    raise ValueError(f"feature_map must be one of {KERNELS}, got feature_map={feature_map!r}")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got norm={norm!r}")
  if not isinstance(eps, (int, float, np.floating)) or not eps > 0:
    raise ValueError(f"eps must be a positive float, got eps={eps!r}")


def transnormer_norm_attention(q, k, v, *, feature_map="elu_plus_one", norm="rmsnorm",
                               eps=1e-6, causal=True, lengths=None, segment_ids=None,
                               initial_state=None, output_final_state=False, chunk_size=64,
                               implementation=None):
  """TransNormer's NormAttention: ``XNorm(phi(Q) (phi(K)^T V))`` per head, no scaling.

  ``q, k [B, T, H, K]``, ``v [B, T, H, V]``; ``feature_map`` phi (``"elu_plus_one"``,
  ``"relu"``, ``"identity"``), ``norm`` (``"rmsnorm"`` or ``"layernorm"`` over V, with
  ``eps``). ``causal``, ``lengths [B]`` (right padding: later keys ignored),
  ``segment_ids [B, T]``, ``initial_state [B, H, K, V]`` / ``output_final_state``
  (causal only), ``chunk_size``, ``implementation`` as in :func:`attnlab.ops.hedgehog`.
  Returns ``(o [B, T, H, V] in v's dtype, final_state or None)``.
  """
  q, k, v = la._check_qkv(q, k, v)
  _check_norm_options(feature_map, norm, eps)
  o, final = lfm.run_feature_op(
      "transnormer_norm_attention", q, k, v, (), _kernel(feature_map), causal=causal,
      normalize=False, lengths=lengths, segment_ids=segment_ids, initial_state=initial_state,
      output_final_state=output_final_state, chunk_size=chunk_size,
      implementation=implementation, feature_dim=q.shape[-1])
  return _xnorm(o, norm, eps).astype(v.dtype), final


def transnormer_norm_attention_step(q_t, k_t, v_t, state, *, feature_map="elu_plus_one",
                                    norm="rmsnorm", eps=1e-6):
  """One decode step of causal :func:`transnormer_norm_attention`: ``q_t, k_t [B, H,
  K]``, ``v_t [B, H, V]``, ``state [B, H, K, V]`` -> ``(o_t [B, H, V], state)``."""
  _check_norm_options(feature_map, norm, eps)
  q_t, k_t = jnp.asarray(q_t), jnp.asarray(k_t)
  phi = _kernel(feature_map)
  o_t, state = la.linear_attn_step(phi(q_t).astype(q_t.dtype), phi(k_t).astype(k_t.dtype),
                                   v_t, state, scale=1.0)
  return _xnorm(o_t, norm, eps).astype(o_t.dtype), state


registry.describe("transnormer_norm_attention", registry.MechanismInfo(
    paper="Qin et al. 2022, The Devil in Linear Transformer (TransNormer, NormAttention)",
    family="feature map", causal=True, non_causal=True, state="K x V",
    cost="O(T C (K + V)) chunked, C = chunk size",
    step="transnormer_norm_attention_step", xla_path="chunked linear_attn (no denominator)"))
registry.register("transnormer_norm_attention", registry.Implementation(
    "reference", lfm.linear_core_reference, automatic=False))
registry.register("transnormer_norm_attention", registry.Implementation(
    "xla", lfm.linear_core_xla, priority=10))


# ---------------------------------------------------------------------- DiagAttention


@dataclasses.dataclass(frozen=True)
class DiagCall:
  """Canonical call of DiagAttention."""

  q: Any
  k: Any
  v: Any
  block_size: int
  causal: bool
  scale: float
  lengths: Any
  segment_ids: Any

  def run(self, fn):
    return fn(self.q, self.k, self.v, block_size=self.block_size, causal=self.causal,
              scale=self.scale, lengths=self.lengths, segment_ids=self.segment_ids)


def block_ids(segment_ids, batch, length, block_size):
  """``[B, T]``: the position where each token's block starts. Blocks of ``block_size``
  tokens restart at every document start, so equal ids mean the same block of the same
  document."""
  t = jnp.arange(length, dtype=jnp.int32)[None]
  if segment_ids is None:
    start = jnp.zeros((batch, length), jnp.int32)
  else:
    change = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(change, t, 0), axis=1)
  return start + ((t - start) // block_size) * block_size


def _diag_reference(q, k, v, *, block_size, causal, scale, lengths, segment_ids):
  """The dense ``[T, T]`` softmax with the block-diagonal mask; a row with no allowed key
  gives 0."""
  batch, length = q.shape[:2]
  ids = block_ids(segment_ids, batch, length, block_size)
  allowed = ids[:, None, :, None] == ids[:, None, None, :]
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  if causal:
    allowed = allowed & (j <= i)[None, None]
  if lengths is not None:
    allowed = allowed & (j[None, None] < lengths[:, None, None, None])
  s = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32),
                         precision="highest")
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhij,bjhd->bihd", p, v.astype(jnp.float32), precision="highest")


def _diag_xla(q, k, v, *, block_size, causal, scale, lengths, segment_ids):
  """Blockwise softmax attention with the block ids as a document mask, so blocks off
  the diagonal are skipped."""
  ids = block_ids(segment_ids, q.shape[0], q.shape[1], block_size)
  return dot_product_attention(q, k, v, mask=masks_lib.Documents(ids, ids), is_causal=causal,
                               scale=scale, key_value_seq_lengths=lengths,
                               implementation="xla")


registry.describe("transnormer_diag_attention", registry.MechanismInfo(
    paper="Qin et al. 2022, The Devil in Linear Transformer (TransNormer, DiagAttention)",
    family="softmax", causal=True, non_causal=True, state="block KV cache, w x (K + V)",
    cost="O(T w K), w = block size", step="transnormer_diag_attention_step",
    xla_path="dot_product_attention, block-diagonal mask"))
registry.register("transnormer_diag_attention", registry.Implementation(
    "reference", _diag_reference, automatic=False))
registry.register("transnormer_diag_attention", registry.Implementation(
    "xla", _diag_xla, priority=10))


def _check_block_size(block_size):
  if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
      or block_size < 1):
    raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
  return int(block_size)


def transnormer_diag_attention(q, k, v, *, block_size, causal=True, scale=None,
                               lengths=None, segment_ids=None, implementation=None):
  """TransNormer's DiagAttention: softmax attention inside non-overlapping blocks of
  ``block_size`` tokens (causal inside the block when ``causal``).

  ``q, k [B, T, H, K]``, ``v [B, T, H, V]``; ``scale`` (default ``K ** -0.5``),
  ``lengths [B]`` (right padding: keys at ``t >= lengths[b]`` ignored), ``segment_ids
  [B, T]`` (blocks restart at each document start), ``implementation`` (None,
  ``"reference"``, ``"xla"``). Returns ``o [B, T, H, V]`` in v's dtype.
  """
  q, k, v = la._check_qkv(q, k, v)
  if v.shape[-1] != q.shape[-1]:
    raise ValueError(f"v must have q's head dim (softmax attention), got {q.shape=}, "
                     f"{v.shape=}")
  block_size = _check_block_size(block_size)
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got causal={causal!r}")
  scale = lfm._default_scale(scale, q.shape[-1])
  lengths = lfm.check_lengths(lengths, q.shape[0], q.shape[1])
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != q.shape[:2]:
      raise ValueError(f"segment_ids must be [B, T]={q.shape[:2]}, got "
                       f"segment_ids.shape={segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
  if q.dtype != k.dtype or k.dtype != v.dtype:
    raise ValueError(f"q, k and v must share a dtype, got {q.dtype=}, {k.dtype=}, "
                     f"{v.dtype=}")
  call = DiagCall(q, k, v, block_size, causal, scale, lengths, segment_ids)
  o = call.run(registry.select("transnormer_diag_attention", implementation, call).fn)
  return o.astype(v.dtype)


def transnormer_diag_attention_cache(batch, num_heads, head_dim, block_size,
                                     dtype=jnp.float32):
  """An empty decode cache: ``{"k", "v": [B, w, H, D]}``."""
  block_size = _check_block_size(block_size)
  kv = jnp.zeros((batch, block_size, num_heads, head_dim), dtype)
  return {"k": kv, "v": kv}


def transnormer_diag_attention_step(q_t, k_t, v_t, cache, positions, *, scale=None):
  """One decode step of causal :func:`transnormer_diag_attention`.

  ``q_t, k_t, v_t [B, H, D]``, ``cache`` from :func:`transnormer_diag_attention_cache`
  (its slot count is the block size ``w``), ``positions [B]`` (each row's position in
  its document). Slot ``p % w`` receives the token; the query sees the slots ``<= p % w``
  (its block so far). Returns ``(o_t [B, H, D], cache)``.
  """
  q_t, k_t, v_t = (jnp.asarray(x) for x in (q_t, k_t, v_t))
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3 or x.shape != q_t.shape:
      raise ValueError(f"{name} must be [B, H, D] like q_t, got {name}.shape={x.shape}")
  batch, heads, dim = q_t.shape
  if (not isinstance(cache, dict) or set(cache) != {"k", "v"}
      or cache["k"].shape[0] != batch or cache["k"].shape[2:] != (heads, dim)
      or cache["v"].shape != cache["k"].shape):
    raise ValueError("cache must be {'k', 'v': [B, w, H, D]} with q_t's B, H, D, got "
                     f"{jax.tree.map(jnp.shape, cache)}")
  positions = jnp.asarray(positions)
  if positions.shape != (batch,) or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be [B]=({batch},) integers, got "
                     f"positions.shape={positions.shape}, dtype={positions.dtype}")
  scale = lfm._default_scale(scale, dim)
  slots = cache["k"].shape[1]
  slot = positions % slots
  write = jnp.arange(slots)[None] == slot[:, None]
  k_cache = jnp.where(write[..., None, None], k_t[:, None].astype(cache["k"].dtype), cache["k"])
  v_cache = jnp.where(write[..., None, None], v_t[:, None].astype(cache["v"].dtype), cache["v"])
  allowed = jnp.arange(slots)[None] <= slot[:, None]
  s = scale * jnp.einsum("bhd,bshd->bhs", q_t.astype(jnp.float32),
                         k_cache.astype(jnp.float32), precision="highest")
  s = jnp.where(allowed[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o_t = jnp.einsum("bhs,bshd->bhd", p, v_cache.astype(jnp.float32), precision="highest")
  return o_t.astype(v_t.dtype), {"k": k_cache, "v": v_cache}
