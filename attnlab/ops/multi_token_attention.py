"""Multi-token attention (Golovneva, Wang, Weston & Sukhbaatar 2025, "Multi-Token
Attention", §3).

Per head h, with the scores ``A^_ij = scale q_i . k_j`` and the allowed pairs ``M``
(``j <= i`` when causal, same document, key not padding):

* key-query convolution (§3.1, pre-softmax, in the paper's masked form
  ``softmax(Mask_-inf(Conv2d_theta(Mask_0(A^))))``: scores of pairs outside ``M`` are
  zeroed before the convolution and the result is masked with -inf after it)::

      C_ij = sum_{i'=0}^{c_q - 1} sum_{j'=-floor(c_k/2)}^{ceil(c_k/2) - 1}
                 theta_{i', j'} Mask_0(A^)_{i - i', j - j'}
      A = softmax_j(Mask_-inf(C))

  The taps reach back ``c_q - 1`` queries, ``floor(c_k / 2)`` keys later and
  ``ceil(c_k / 2) - 1`` earlier; with the mask before, query ``i`` never sees a score of a
  key after ``i``, so the causal form is causal. A tap never reaches across a document edge (the earlier query must be in
  query ``i``'s document; Mask_0 keeps every score inside its document), so packed
  documents behave as separate sequences, zero-padded at their edges like the sequence.
* head mixing (§3.2) within groups of ``c_h`` consecutive heads, after the softmax
  (``"post"``, the paper's choice) or on the convolved logits before it (``"pre"``)::

      A'^{g c_h + a} = sum_b w_{g, a, b} A^{g c_h + b}

* ``o^h = A'^h v^h``. The group normalization of §3.3 acts on the output and is the
  mixer's (``attnlab.layers.score_variant_mixers``).

``kernel`` holds ``theta [H, c_q, c_k]`` with ``kernel[h, i', j' + floor(c_k / 2)] =
theta^h_{i', j'}`` (the identity is ``kernel[:, 0, c_k // 2] = 1``); ``head_mix``
``[H / c_h, c_h, c_h]`` holds ``w``.

Tiers: both are dense ``[B, H, T, T]`` (memory ``O(H T^2)``). ``reference`` sums the
``c_q c_k`` shifted, masked score matrices tap by tap. ``xla`` runs ``c_q`` key
convolutions (``lax.conv_general_dilated``, grouped by head), each shifted by its query
lag under the document mask. Why dense: the convolution couples each score with its
neighbours over ``c_q`` rows and ``c_k`` columns, so a blockwise form must recompute key
blocks with a halo of ``c_k - 1`` columns (all queries at once, so the row taps need no
halo), keep ``c_h`` online-softmax accumulators per head for the post-softmax mixing,
and in a custom backward widen the halo again for the transposed convolution. That form
is possible but not written here; the paper's own implementation is dense as well.

Decode (causal): :func:`multi_token_attn_cache` holds keys and values by position
and the last ``c_q - 1`` queries; a step recomputes those queries' scores against the
cache (``c_q`` rows), convolves, masks and mixes as above.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import registry
from attnlab.ops.learned_feature_maps import _default_scale
from attnlab.ops.sparse_softmax import (allowed_pairs, check_attention_args, check_step,
                                        documents, masked_softmax, sparse_attention_cache,
                                        valid_positions, write_cache)

__all__ = ["multi_token_attn", "multi_token_attn_step",
           "multi_token_attn_cache"]

_HIGHEST = lax.Precision.HIGHEST
MECHANISM = "multi_token_attention"
HEAD_MIX_POSITIONS = ("post", "pre")


@dataclasses.dataclass(frozen=True)
class MultiTokenCall:
  """The canonical arguments of every tier."""

  q: Any
  k: Any
  v: Any
  kernel: Any
  head_mix: Any
  head_mix_position: str
  causal: bool
  scale: float
  segment_ids: Any
  lengths: Any


def _shift(x, rows, cols):
  """``y[..., i, j] = x[..., i - rows, j - cols]`` (``rows >= 0``), zeros outside."""
  t, s = x.shape[-2:]
  pad = [(0, 0)] * (x.ndim - 2) + [(rows, 0), (max(cols, 0), max(-cols, 0))]
  x = jnp.pad(x, pad)
  start = max(-cols, 0)
  return x[..., :t, start:start + s] if cols <= 0 else x[..., :t, :s]


def _same_document_lag(docs, lag):
  """``[B, T]``: query ``i - lag`` exists and lies in query ``i``'s document."""
  earlier = jnp.pad(docs, [(0, 0), (lag, 0)], constant_values=-1)[:, :docs.shape[1]]
  return earlier == docs


def _mix_heads(x, head_mix):
  """``x [B, H, ...]`` mixed within head groups by ``head_mix [G, c, c]``."""
  if head_mix is None:
    return x
  groups, size = head_mix.shape[:2]
  grouped = x.reshape((x.shape[0], groups, size) + x.shape[2:])
  mixed = jnp.einsum("gab,ngb...->nga...", head_mix.astype(x.dtype), grouped,
                     precision=_HIGHEST)
  return mixed.reshape(x.shape)


def _scores(call):
  """``(A^ [B, H, T, S], allowed [B, 1, T, S], docs [B, T])`` in the compute dtype."""
  batch, length = call.q.shape[:2]
  cdt = jnp.promote_types(call.q.dtype, jnp.float32)
  z = call.scale * jnp.einsum("bthk,bshk->bhts", call.q.astype(cdt), call.k.astype(cdt),
                              precision=_HIGHEST)
  docs = documents(call.segment_ids, batch, length)
  pos = jnp.arange(length)
  allowed = allowed_pairs(docs, docs, valid_positions(call.lengths, batch, length), pos,
                          pos, call.causal)
  return z, allowed[:, None], docs


def _attend(call, convolved, allowed):
  """Mixing, masking, softmax and the values: ``o [B, T, H, V]`` in v's dtype."""
  mix = call.head_mix
  if mix is not None:
    mix = mix.astype(convolved.dtype)
  if call.head_mix_position == "pre":
    convolved = _mix_heads(convolved, mix)
  weights = masked_softmax(convolved, allowed)
  if call.head_mix_position == "post":
    weights = _mix_heads(weights, mix)
  o = jnp.einsum("bhts,bshv->bthv", weights, call.v.astype(weights.dtype),
                 precision=_HIGHEST)
  return o.astype(call.v.dtype)


def _reference(call: MultiTokenCall):
  """The convolution tap by tap: ``c_q c_k`` shifted, masked score matrices."""
  z, allowed, docs = _scores(call)
  masked = jnp.where(allowed, z, 0.0)
  theta = call.kernel.astype(z.dtype)
  _, c_q, c_k = theta.shape
  convolved = jnp.zeros_like(z)
  for lag in range(c_q):
    same = _same_document_lag(docs, lag)[:, None, :, None]
    for col in range(c_k):
      tap = theta[:, lag, col][None, :, None, None]
      shifted = _shift(masked, lag, col - c_k // 2)
      convolved = convolved + tap * jnp.where(same, shifted, 0.0)
  return _attend(call, convolved, allowed)


@functools.partial(jax.jit, static_argnums=0)
def _xla_dense(static, q, k, v, kernel, head_mix, segment_ids, lengths):
  """``c_q`` grouped key convolutions, each shifted by its query lag (compiled once per
  shape: eager callers would otherwise dispatch the taps op by op)."""
  call = MultiTokenCall(q, k, v, kernel, head_mix, *static, segment_ids, lengths)
  z, allowed, docs = _scores(call)
  masked = jnp.where(allowed, z, 0.0)
  theta = kernel.astype(z.dtype)
  heads, c_q, c_k = theta.shape
  convolved = jnp.zeros_like(z)
  for lag in range(c_q):
    # Cross-correlation with the flipped taps is the convolution sum_j' theta_j' x_{j-j'}.
    taps = jnp.flip(theta[:, lag], axis=-1).reshape(heads, 1, 1, c_k)
    along_keys = lax.conv_general_dilated(
        masked, taps, window_strides=(1, 1),
        padding=((0, 0), ((c_k + 1) // 2 - 1, c_k // 2)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=heads,
        precision=_HIGHEST)
    same = _same_document_lag(docs, lag)[:, None, :, None]
    convolved = convolved + jnp.where(same, _shift(along_keys, lag, 0), 0.0)
  return _attend(call, convolved, allowed)


def _xla(call: MultiTokenCall):
  static = (call.head_mix_position, call.causal, call.scale)
  return _xla_dense(static, call.q, call.k, call.v, call.kernel, call.head_mix,
                    call.segment_ids, call.lengths)


registry.describe(MECHANISM, registry.MechanismInfo(
    paper="Golovneva et al. 2025, Multi-Token Attention",
    family="softmax", causal=True, non_causal=True,
    state="KV cache T x (K + V) + the last c_q - 1 queries",
    cost="O(T^2 (K + c_q c_k)), dense: memory O(H T^2)",
    step="multi_token_attn_step",
    xla_path="dense [T, T]: c_q grouped key convolutions (lax.conv) shifted by query "
             "lag (a blockwise form needs key halos of c_k - 1 in both passes; not "
             "written)"))
registry.register(MECHANISM, registry.Implementation("reference", _reference,
                                                     automatic=False))
registry.register(MECHANISM, registry.Implementation("xla", _xla, priority=10))


def _check_kernel(kernel, heads):
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 3 or kernel.shape[0] != heads or min(kernel.shape) < 1:
    raise ValueError(f"kernel must be [H={heads}, c_q, c_k] with c_q, c_k >= 1, got "
                     f"kernel.shape={kernel.shape}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be floating point, got kernel.dtype={kernel.dtype}")
  return kernel


def _check_head_mix(head_mix, head_mix_position, heads):
  if head_mix_position not in HEAD_MIX_POSITIONS:
    raise ValueError(f"head_mix_position must be one of {HEAD_MIX_POSITIONS}, got "
                     f"{head_mix_position!r}")
  if head_mix is None:
    return None
  head_mix = jnp.asarray(head_mix)
  if (head_mix.ndim != 3 or head_mix.shape[1] != head_mix.shape[2]
      or head_mix.shape[0] * head_mix.shape[1] != heads):
    raise ValueError(f"head_mix must be [H / c_h, c_h, c_h] with H={heads}, got "
                     f"head_mix.shape={head_mix.shape}")
  if not jnp.issubdtype(head_mix.dtype, jnp.floating):
    raise ValueError(f"head_mix must be floating point, got head_mix.dtype={head_mix.dtype}")
  return head_mix


def multi_token_attn(q, k, v, kernel, head_mix=None, *, head_mix_position="post",
                          causal=True, scale=None, segment_ids=None, lengths=None,
                          implementation=None):
  """Multi-token attention: softmax attention over key-query-convolved scores, with
  optional head mixing (see the module docstring for the equations).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype.
    kernel: ``theta [H, c_q, c_k]``, the per-head key-query convolution.
    head_mix: ``w [H / c_h, c_h, c_h]`` or None (no head mixing).
    head_mix_position: ``"post"`` (mix softmax weights) or ``"pre"`` (mix logits).
    causal: query i sees keys j <= i (and convolves only those scores).
    scale: score scale (default ``K ** -0.5``).
    segment_ids: ``[B, T]`` ints, packed documents (a new one where the id changes).
    lengths: ``[B]`` ints, right padding: padded keys are masked before and after the
      convolution.
    implementation: None (the xla tier), ``"reference"`` or ``"xla"``.

  Returns:
    ``o [B, T, H, V]`` in v's dtype (computed in float32).
  """
  q, k, v, scale, segment_ids, lengths = check_attention_args(
      q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, lengths=lengths)
  heads = q.shape[2]
  kernel = _check_kernel(kernel, heads)
  head_mix = _check_head_mix(head_mix, head_mix_position, heads)
  call = MultiTokenCall(q, k, v, kernel, head_mix, head_mix_position, causal, scale,
                        segment_ids, lengths)
  return registry.select(MECHANISM, implementation, call).fn(call)


def multi_token_attn_cache(batch, max_len, num_heads, key_dim, value_dim,
                                query_kernel_size, dtype=jnp.float32):
  """An empty decode cache: keys and values by position and a ring of the last
  ``c_q - 1`` queries, ``{"k": [B, L, H, K], "v": [B, L, H, V], "q": [B, c_q - 1, H, K]}``
  (query position ``a`` in slot ``a % (c_q - 1)``)."""
  cache = sparse_attention_cache(batch, max_len, num_heads, key_dim, value_dim, dtype)
  cache["q"] = jnp.zeros((batch, query_kernel_size - 1, num_heads, key_dim), dtype)
  return cache


def multi_token_attn_step(q_t, k_t, v_t, cache, positions, kernel, head_mix=None, *,
                               head_mix_position="post", scale=None):
  """One decode step of causal :func:`multi_token_attn` (one document per row).

  ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``cache`` from
  :func:`multi_token_attn_cache` with ``c_q - 1`` query slots, ``positions [B]``
  (the token's slot; it sees slots ``<= positions[b]``), ``kernel`` and ``head_mix`` as
  in :func:`multi_token_attn`. Returns ``(o_t [B, H, V], cache)``."""
  q_t, k_t, v_t, positions = check_step(q_t, k_t, v_t, cache, positions, extra=("q",))
  batch, heads, key_dim = q_t.shape
  kernel = _check_kernel(kernel, heads)
  head_mix = _check_head_mix(head_mix, head_mix_position, heads)
  _, c_q, c_k = kernel.shape
  if cache["q"].shape != (batch, c_q - 1, heads, key_dim):
    raise ValueError(f"cache['q'] must be [B, c_q - 1, H, K]={(batch, c_q - 1, heads, key_dim)}"
                     f" for kernel.shape={kernel.shape}, got {cache['q'].shape}")
  scale = _default_scale(scale, key_dim)
  keys = write_cache(cache["k"], k_t, positions)
  values = write_cache(cache["v"], v_t, positions)
  slots = jnp.arange(keys.shape[1])
  rows = []   # the score rows of queries p, p - 1, ..., p - c_q + 1: [B, H, L] each
  for lag in range(c_q):
    if lag == 0:
      query = q_t
    else:
      ring = (positions - lag) % (c_q - 1)
      query = jnp.take_along_axis(cache["q"], ring[:, None, None, None], axis=1)[:, 0]
    z = scale * jnp.einsum("bhk,bshk->bhs", query.astype(jnp.float32),
                           keys.astype(jnp.float32), precision=_HIGHEST)
    row = positions - lag
    seen = (slots[None] <= row[:, None]) & (row[:, None] >= 0)  # Mask_0 of that row
    rows.append(jnp.where(seen[:, None], z, 0.0))
  theta = kernel.astype(jnp.float32)
  convolved = jnp.zeros_like(rows[0])
  for lag in range(c_q):
    for col in range(c_k):
      shifted = _shift(rows[lag][:, :, None], 0, col - c_k // 2)[:, :, 0]
      convolved = convolved + theta[:, lag, col][None, :, None] * shifted
  call = MultiTokenCall(None, None, values, kernel,
                        None if head_mix is None else head_mix.astype(jnp.float32),
                        head_mix_position, True, scale, None, None)
  allowed = (slots[None] <= positions[:, None])[:, None, None]
  o = _attend(call, convolved[:, :, None], allowed)[:, 0].astype(v_t.dtype)  # one row
  new_q = cache["q"]
  if c_q > 1:
    slot = positions % (c_q - 1)
    new_q = jnp.where((jnp.arange(c_q - 1)[None] == slot[:, None])[..., None, None],
                      q_t[:, None].astype(new_q.dtype), new_q)
  return o, {"k": keys, "v": values, "q": new_q}
