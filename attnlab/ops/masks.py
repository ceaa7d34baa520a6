"""The mask vocabulary and score modifiers of softmax attention.

A mask says which key positions ``j`` a query position ``i`` may attend to. Every mask
gives three views of itself, so the reference, the blockwise XLA path and the kernels all
read one definition:

* ``dense(q_len, kv_len)``: the boolean ``[T, S]`` matrix (``[B, 1, T, S]`` for masks
  that depend on data, such as documents), for the reference;
* ``predicate(q_idx, kv_idx)``: the element rule, evaluated inside one block with
  ``q_idx`` of shape ``[bq, 1]`` and ``kv_idx`` of shape ``[1, bk]``;
* ``block_summary(q_len, kv_len, block_q, block_k)``: ``[nq, nk]`` codes ``EMPTY``,
  ``PARTIAL`` or ``FULL`` for the grid of ``[block_q, block_k]`` blocks, so blockwise code
  never visits empty blocks and may drop the predicate on full ones. Block ``i`` covers
  query rows ``[i * block_q, min((i + 1) * block_q, T))``, likewise for keys.

Masks that depend only on positions are *static*: hashable, evaluated with NumPy, and
their summaries are computed once per shape. Masks that hold arrays (documents, padding,
a user's boolean array) are *dynamic*: their summary is computed on device and is
conservative (a block marked PARTIAL may still be empty; EMPTY and FULL are exact).

Masks compose with ``&`` and ``|``. Score modifiers (ALiBi, relative position bias, an
additive bias array) add to the logits and are evaluated per block the same way.

All masks and score modifiers are JAX pytrees, so they pass through ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def _static_dataclass(cls):
  """A frozen dataclass registered as a pytree whose fields are all static."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


def _data_dataclass(data, meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    return jax.tree_util.register_dataclass(
        cls, data_fields=list(data), meta_fields=list(meta))
  return wrap


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


class Mask:
  """Base class of the mask vocabulary. Subclasses define ``predicate``."""

  is_static = True

  def predicate(self, q_idx, kv_idx):
    """Boolean ``[..., bq, bk]`` for index grids ``q_idx [bq, 1]``, ``kv_idx [1, bk]``.

    Static masks return exactly the broadcast shape; dynamic masks prepend ``[B, 1]``.
    Works on NumPy and JAX integer arrays alike.
    """
    raise NotImplementedError

  def dense(self, q_len: int, kv_len: int):
    """The full boolean mask: ``[T, S]`` (static) or ``[B, 1, T, S]`` (dynamic)."""
    xp = np if self.is_static else jnp
    q = xp.arange(q_len)[:, None]
    k = xp.arange(kv_len)[None, :]
    out = self.predicate(q, k)
    return xp.broadcast_to(out, out.shape[:-2] + (q_len, kv_len))

  def block_summary(self, q_len: int, kv_len: int, block_q: int, block_k: int):
    """``[nq, nk]`` int8 codes (EMPTY, PARTIAL, FULL); NumPy when static."""
    return _static_summary(self, q_len, kv_len, block_q, block_k)

  def check(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
    """Raise ValueError if the mask's arrays do not fit a ``[B, N, T, S]`` call."""
    del batch, num_heads, q_len, kv_len

  def __and__(self, other: Mask) -> Mask:
    return And(self, _as_mask(other))

  def __or__(self, other: Mask) -> Mask:
    return Or(self, _as_mask(other))


def _check_array(owner, name, x, shape, kind):
  x_shape = tuple(np.shape(x))
  if x_shape != tuple(shape):
    raise ValueError(f"mask {owner}.{name} must have shape {tuple(shape)}, got {x_shape}")
  dtype = jnp.asarray(x).dtype
  if kind == "int" and not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"mask {owner}.{name} must be integers, got dtype {dtype}")


def _check_broadcast(owner, name, x, full, want_bool):
  shape = tuple(np.shape(x))
  if len(shape) != 4 or any(s not in (1, f) for s, f in zip(shape, full)):
    raise ValueError(f"{owner}.{name} must be broadcastable to [B, N, T, S]={full}, "
                     f"got shape {shape}")
  is_bool = jnp.asarray(x).dtype == jnp.bool_
  if want_bool and not is_bool:
    raise ValueError(f"{owner}.{name} must be boolean, got {jnp.asarray(x).dtype}")
  if not want_bool and not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(f"{owner}.{name} must be floating point, got {jnp.asarray(x).dtype}")


def _as_mask(m) -> Mask:
  if not isinstance(m, Mask):
    raise ValueError(f"masks compose only with masks, got {type(m).__name__}")
  return m


@functools.lru_cache(maxsize=256)
def _static_summary(mask: Mask, q_len, kv_len, block_q, block_k) -> np.ndarray:
  """Evaluate the predicate block row by block row (memory ``block_q * S``)."""
  nq, nk = _num_blocks(q_len, block_q), _num_blocks(kv_len, block_k)
  bounds = getattr(mask, "row_bounds", None)
  if bounds is not None and bounds(np.zeros(1, np.int64)) is not None:
    return _interval_summary(mask, q_len, kv_len, block_q, block_k)
  out = np.empty((nq, nk), np.int8)
  kv = np.arange(nk * block_k)
  kv_valid = (kv < kv_len).reshape(nk, block_k)
  for i in range(nq):
    rows = np.arange(i * block_q, min((i + 1) * block_q, q_len))
    m = np.broadcast_to(mask.predicate(rows[:, None], kv[None, :]),
                        (rows.size, kv.size)).reshape(rows.size, nk, block_k)
    any_ = (m & kv_valid).any(axis=(0, 2))
    all_ = (m | ~kv_valid).all(axis=(0, 2))
    out[i] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
  return out


def _interval_summary(mask, q_len, kv_len, block_q, block_k) -> np.ndarray:
  """Summary of a mask whose rows are intervals ``lo(i) <= j < hi(i)``: O(T * nk)."""
  nq, nk = _num_blocks(q_len, block_q), _num_blocks(kv_len, block_k)
  rows = np.arange(nq * block_q)
  lo, hi = mask.row_bounds(rows)
  lo = np.broadcast_to(lo, rows.shape).reshape(nq, block_q, 1)
  hi = np.broadcast_to(hi, rows.shape).reshape(nq, block_q, 1)
  row_valid = (rows < q_len).reshape(nq, block_q, 1)
  a = np.arange(nk)[None, None, :] * block_k
  b = np.minimum(a + block_k, kv_len)
  hit = (np.maximum(lo, a) < np.minimum(hi, b)) & row_valid
  cover = ((lo <= a) & (hi >= b)) | ~row_valid
  return np.where(cover.all(1), FULL, np.where(hit.any(1), PARTIAL, EMPTY)).astype(np.int8)


# ----------------------------------------------------------------------------- static


@_static_dataclass
class Full(Mask):
  """Every query sees every key."""

  def predicate(self, q_idx, kv_idx):
    return (q_idx >= 0) & (kv_idx >= 0)

  def row_bounds(self, q_idx):
    return np.zeros_like(q_idx), np.full_like(q_idx, np.iinfo(np.int64).max)


@_static_dataclass
class Causal(Mask):
  """Query ``i`` sees keys ``j <= i`` (top-left aligned when S != T, as ``jax.nn``)."""

  def predicate(self, q_idx, kv_idx):
    return kv_idx <= q_idx

  def row_bounds(self, q_idx):
    return np.zeros_like(q_idx), q_idx + 1


@_static_dataclass
class LocalWindow(Mask):
  """Query ``i`` sees keys ``i - left <= j <= i + right`` (``jax.nn`` semantics)."""

  left: int
  right: int

  def predicate(self, q_idx, kv_idx):
    return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

  def row_bounds(self, q_idx):
    return q_idx - self.left, q_idx + self.right + 1


@_static_dataclass
class ChunkedCausal(Mask):
  """Causal within chunks of ``chunk_size`` tokens: ``j <= i`` and ``j // c == i // c``."""

  chunk_size: int

  def predicate(self, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (kv_idx // self.chunk_size == q_idx // self.chunk_size)

  def row_bounds(self, q_idx):
    return (q_idx // self.chunk_size) * self.chunk_size, q_idx + 1


@_static_dataclass
class PrefixLM(Mask):
  """Bidirectional over the first ``prefix_length`` keys, causal after: ``j < p or j <= i``."""

  prefix_length: int

  def predicate(self, q_idx, kv_idx):
    return (kv_idx < self.prefix_length) | (kv_idx <= q_idx)

  def row_bounds(self, q_idx):
    return np.zeros_like(q_idx), np.maximum(q_idx + 1, self.prefix_length)


@_static_dataclass
class StridedSparse(Mask):
  """Sparse Transformer strided pattern (Child et al. 2019, §4.2): causal, and either
  within the last ``stride`` positions or a multiple of ``stride`` back."""

  stride: int

  def predicate(self, q_idx, kv_idx):
    d = q_idx - kv_idx
    return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))


@_static_dataclass
class FixedSparse(Mask):
  """Sparse Transformer fixed pattern (Child et al. 2019, §4.2): causal, and either in
  the query's own block of ``stride`` or in the last ``summary`` columns of any block."""

  stride: int
  summary: int = 1

  def predicate(self, q_idx, kv_idx):
    same_block = kv_idx // self.stride == q_idx // self.stride
    summary_col = kv_idx % self.stride >= self.stride - self.summary
    return (kv_idx <= q_idx) & (same_block | summary_col)


@_static_dataclass
class GlobalLocal(Mask):
  """ETC / BigBird global + local: the first ``num_global`` tokens see and are seen by
  all; the others see keys with ``|i - j| <= window``. Not causal (compose with
  ``Causal()`` for a decoder)."""

  num_global: int
  window: int

  def predicate(self, q_idx, kv_idx):
    local = (kv_idx >= q_idx - self.window) & (kv_idx <= q_idx + self.window)
    return (q_idx < self.num_global) | (kv_idx < self.num_global) | local


@_static_dataclass
class PowerOfTwo(Mask):
  """Dilated power-of-two pattern (PowerAttention): causal, and the block distance
  ``d = i // block_size - j // block_size`` is 0 or a power of two."""

  block_size: int = 1

  def predicate(self, q_idx, kv_idx):
    d = q_idx // self.block_size - kv_idx // self.block_size
    return (kv_idx <= q_idx) & ((d == 0) | ((d & (d - 1)) == 0))


# ---------------------------------------------------------------------------- dynamic


def _block_min_max(ids, block):
  """Per-block min and max of ``ids [B, L]`` -> ``[B, nblocks]`` each."""
  n = _num_blocks(ids.shape[1], block)
  pad = n * block - ids.shape[1]
  ids = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(ids.shape[0], n, block)
  return ids.min(-1), ids.max(-1)


@_data_dataclass(data=("q_segment_ids", "kv_segment_ids"))
class Documents(Mask):
  """Packed documents: query ``i`` sees key ``j`` of the same segment id.

  ``q_segment_ids [B, T]`` and ``kv_segment_ids [B, S]``, integers.
  """

  q_segment_ids: Any
  kv_segment_ids: Any
  is_static = False

  def predicate(self, q_idx, kv_idx):
    q = jnp.take(self.q_segment_ids, q_idx[:, 0], axis=1)
    k = jnp.take(self.kv_segment_ids, kv_idx[0, :], axis=1)
    return (q[:, :, None] == k[:, None, :])[:, None]

  def check(self, batch, num_heads, q_len, kv_len):
    _check_array("Documents", "q_segment_ids", self.q_segment_ids, (batch, q_len), "int")
    _check_array("Documents", "kv_segment_ids", self.kv_segment_ids, (batch, kv_len), "int")

  def block_summary(self, q_len, kv_len, block_q, block_k):
    qmin, qmax = _block_min_max(self.q_segment_ids, block_q)
    kmin, kmax = _block_min_max(self.kv_segment_ids, block_k)
    overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
    single = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
              & (qmin[:, :, None] == kmin[:, None, :]))
    return jnp.where(single.all(0), FULL,
                     jnp.where(overlap.any(0), PARTIAL, EMPTY)).astype(jnp.int8)


@_data_dataclass(data=("q_lengths", "kv_lengths"))
class Padding(Mask):
  """Right padding: query ``i`` and key ``j`` are real when ``i < q_lengths[b]`` and
  ``j < kv_lengths[b]`` (``jax.nn``'s ``query_seq_lengths`` / ``key_value_seq_lengths``).
  Either length array may be None (no padding on that side)."""

  q_lengths: Any
  kv_lengths: Any
  is_static = False

  def _lengths(self, lengths, full):
    if lengths is None:
      batch = (self.kv_lengths if self.q_lengths is None else self.q_lengths).shape[0]
      return jnp.full((batch,), full, jnp.int32)
    return lengths

  def check(self, batch, num_heads, q_len, kv_len):
    if self.q_lengths is None and self.kv_lengths is None:
      raise ValueError("mask Padding needs q_lengths or kv_lengths, got neither")
    for name in ("q_lengths", "kv_lengths"):
      if getattr(self, name) is not None:
        _check_array("Padding", name, getattr(self, name), (batch,), "int")

  def predicate(self, q_idx, kv_idx):
    ql = self._lengths(self.q_lengths, np.iinfo(np.int32).max)
    kl = self._lengths(self.kv_lengths, np.iinfo(np.int32).max)
    return ((q_idx[None] < ql[:, None, None]) & (kv_idx[None] < kl[:, None, None]))[:, None]

  def block_summary(self, q_len, kv_len, block_q, block_k):
    ql = self._lengths(self.q_lengths, q_len)[:, None, None]
    kl = self._lengths(self.kv_lengths, kv_len)[:, None, None]
    qa = jnp.arange(_num_blocks(q_len, block_q))[None, :, None] * block_q
    ka = jnp.arange(_num_blocks(kv_len, block_k))[None, None, :] * block_k
    qb, kb = jnp.minimum(qa + block_q, q_len), jnp.minimum(ka + block_k, kv_len)
    hit = (qa < ql) & (ka < kl)
    cover = (qb <= ql) & (kb <= kl)
    return jnp.where(cover.all(0), FULL, jnp.where(hit.any(0), PARTIAL, EMPTY)).astype(jnp.int8)


def _take_block(array, q_idx, kv_idx):
  """``array[..., q_idx, kv_idx]`` honouring size-1 (broadcast) query / key axes."""
  rows = q_idx[:, 0] if array.shape[-2] != 1 else jnp.zeros((1,), jnp.int32)
  cols = kv_idx[0, :] if array.shape[-1] != 1 else jnp.zeros((1,), jnp.int32)
  return jnp.take(jnp.take(array, rows, axis=-2), cols, axis=-1)


@_data_dataclass(data=("mask",))
class ArrayMask(Mask):
  """A user's boolean array, broadcastable to ``[B, N, T, S]`` (True = attend)."""

  mask: Any
  is_static = False

  def check(self, batch, num_heads, q_len, kv_len):
    _check_broadcast("mask ArrayMask", "mask", self.mask, (batch, num_heads, q_len, kv_len),
                     want_bool=True)

  def predicate(self, q_idx, kv_idx):
    return _take_block(self.mask, q_idx, kv_idx)

  def dense(self, q_len, kv_len):
    return jnp.broadcast_to(self.mask, self.mask.shape[:-2] + (q_len, kv_len))

  def block_summary(self, q_len, kv_len, block_q, block_k):
    m = self.dense(q_len, kv_len).reshape((-1, q_len, kv_len))
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(kv_len, block_k)
    pq, pk = nq * block_q - q_len, nk * block_k - kv_len
    anym = jnp.pad(m, ((0, 0), (0, pq), (0, pk)), constant_values=False)
    allm = jnp.pad(m, ((0, 0), (0, pq), (0, pk)), constant_values=True)
    anyb = anym.reshape(-1, nq, block_q, nk, block_k).any((0, 2, 4))
    allb = allm.reshape(-1, nq, block_q, nk, block_k).all((0, 2, 4))
    return jnp.where(allb, FULL, jnp.where(anyb, PARTIAL, EMPTY)).astype(jnp.int8)


# ---------------------------------------------------------------------------- compose


def _align(a, b):
  """Prepend unit axes so that two predicate results have the same rank."""
  rank = max(a.ndim, b.ndim)
  return (a.reshape((1,) * (rank - a.ndim) + a.shape),
          b.reshape((1,) * (rank - b.ndim) + b.shape))


class _Composite(Mask):
  """Two masks joined element-wise; subclasses name the element and summary rules."""

  a: Mask
  b: Mask

  @staticmethod
  def _join(a, b):
    raise NotImplementedError

  @staticmethod
  def _join_codes(a, b):
    raise NotImplementedError

  @property
  def is_static(self):
    return self.a.is_static and self.b.is_static

  def check(self, *shape):
    self.a.check(*shape)
    self.b.check(*shape)

  def __hash__(self):
    return hash((type(self), self.a, self.b))

  def __eq__(self, other):
    return type(other) is type(self) and (self.a, self.b) == (other.a, other.b)

  def predicate(self, q_idx, kv_idx):
    return self._join(*_align(self.a.predicate(q_idx, kv_idx),
                              self.b.predicate(q_idx, kv_idx)))

  def block_summary(self, q_len, kv_len, block_q, block_k):
    if self.is_static:
      return _static_summary(self, q_len, kv_len, block_q, block_k)
    sa = self.a.block_summary(q_len, kv_len, block_q, block_k)
    sb = self.b.block_summary(q_len, kv_len, block_q, block_k)
    return self._join_codes(jnp.asarray(sa), jnp.asarray(sb)).astype(jnp.int8)


@_data_dataclass(data=("a", "b"))
class And(_Composite):
  """Both masks allow the pair. Summary: the smaller code (EMPTY < PARTIAL < FULL)."""

  a: Mask
  b: Mask
  _join = staticmethod(lambda a, b: a & b)
  _join_codes = staticmethod(jnp.minimum)

  def row_bounds(self, q_idx):
    fa, fb = getattr(self.a, "row_bounds", None), getattr(self.b, "row_bounds", None)
    if fa is None or fb is None or fa(q_idx) is None or fb(q_idx) is None:
      return None
    (la, ha), (lb, hb) = fa(q_idx), fb(q_idx)
    return np.maximum(la, lb), np.minimum(ha, hb)


@_data_dataclass(data=("a", "b"))
class Or(_Composite):
  """Either mask allows the pair. Summary: the larger code."""

  a: Mask
  b: Mask
  _join = staticmethod(lambda a, b: a | b)
  _join_codes = staticmethod(jnp.maximum)


def combine_masks(*masks: Mask | None) -> Mask | None:
  """AND of the given masks, skipping None; None when there are none."""
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else And(out, m)
  return out


def components(mask: Mask | None) -> list[Mask]:
  """The AND-ed leaves of a mask (``[a, b, c]`` for ``a & b & c``)."""
  if mask is None:
    return []
  if isinstance(mask, And):
    return components(mask.a) + components(mask.b)
  return [mask]


# ------------------------------------------------------------------------- score mods


class ScoreMod:
  """An additive term of the logits, evaluated per block. Float fields are learnable:
  the attention's gradient flows to them."""

  def bias(self, q_idx, kv_idx):
    """``[..., bq, bk]`` float, leading dims broadcastable to ``[B, N]``."""
    raise NotImplementedError

  def check(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
    """Raise ValueError if the parameters do not fit a ``[B, N, T, S]`` call."""
    del batch, num_heads, q_len, kv_len

  def dense(self, q_len: int, kv_len: int):
    q = jnp.arange(q_len)[:, None]
    k = jnp.arange(kv_len)[None, :]
    return self.bias(q, k)

  def accumulate_grad(self, grad: ScoreMod, dlogits, q_idx, kv_idx) -> ScoreMod:
    """``grad`` plus the gradient of ``sum(dlogits * bias(q_idx, kv_idx))``.

    ``dlogits`` is ``[B, N, bq, bk]``. The default differentiates ``bias``; array
    biases override it with a scatter-add into their own shape.
    """
    _, vjp = jax.vjp(lambda mod: mod.bias(q_idx, kv_idx), self)
    out = self.bias(q_idx, kv_idx)
    (g,) = vjp(_sum_to_shape(dlogits, out.shape).astype(out.dtype))
    return jax.tree.map(jnp.add, grad, g)


def _sum_to_shape(x, shape):
  """Sum ``x`` over the leading and size-1 axes so that it has ``shape``."""
  lead = x.ndim - len(shape)
  x = x.sum(tuple(range(lead))) if lead else x
  axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
  return x.sum(axes, keepdims=True) if axes else x


@_data_dataclass(data=("slopes",))
class Alibi(ScoreMod):
  """ALiBi (Press et al. 2022): ``bias[n, i, j] = -slopes[n] * |i - j|``; ``slopes [N]``."""

  slopes: Any

  def check(self, batch, num_heads, q_len, kv_len):
    shape = tuple(np.shape(self.slopes))
    if shape != (num_heads,):
      raise ValueError(f"bias Alibi.slopes must have shape [N]=({num_heads},), got {shape}")
    if not jnp.issubdtype(jnp.asarray(self.slopes).dtype, jnp.floating):
      raise ValueError(f"bias Alibi.slopes must be floating point, got "
                       f"{jnp.asarray(self.slopes).dtype}")

  def bias(self, q_idx, kv_idx):
    dist = jnp.abs(q_idx - kv_idx).astype(self.slopes.dtype)
    return -self.slopes[:, None, None] * dist[None]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi head slopes of Press et al. 2022 (§3), float64 ``[N]``.

  For ``N`` a power of two, ``2 ** (-8 h / N)`` for h = 1..N. Otherwise the slopes of
  the largest power of two ``P < N``, then every other slope of ``2P`` for the rest.
  """
  if num_heads < 1:
    raise ValueError(f"num_heads must be positive, got {num_heads}")

  def geometric(n):
    return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

  p = 2 ** int(np.floor(np.log2(num_heads)))
  if p == num_heads:
    return geometric(p)
  return np.concatenate([geometric(p), geometric(2 * p)[0::2][: num_heads - p]])


@_data_dataclass(data=("table",))
class RelativePositionBias(ScoreMod):
  """Learned bias by clipped relative position: ``bias[n, i, j] = table[n, clip(j - i,
  -M, M) + M]`` with ``table [N, 2M + 1]`` (Shaw et al. 2018 / T5, without buckets)."""

  table: Any

  def check(self, batch, num_heads, q_len, kv_len):
    shape = tuple(np.shape(self.table))
    if len(shape) != 2 or shape[0] != num_heads or shape[1] % 2 != 1:
      raise ValueError("bias RelativePositionBias.table must have shape [N, 2M + 1] with "
                       f"N={num_heads}, got {shape}")
    if not jnp.issubdtype(jnp.asarray(self.table).dtype, jnp.floating):
      raise ValueError(f"bias RelativePositionBias.table must be floating point, got "
                       f"{jnp.asarray(self.table).dtype}")

  def bias(self, q_idx, kv_idx):
    m = (self.table.shape[1] - 1) // 2
    rel = jnp.clip(kv_idx - q_idx, -m, m) + m
    return jnp.take(self.table, rel, axis=1)


@_data_dataclass(data=("bias_array",))
class ArrayBias(ScoreMod):
  """A user's additive bias array, broadcastable to ``[B, N, T, S]``."""

  bias_array: Any

  def check(self, batch, num_heads, q_len, kv_len):
    _check_broadcast("bias ArrayBias", "bias_array", self.bias_array,
                     (batch, num_heads, q_len, kv_len), want_bool=False)

  def bias(self, q_idx, kv_idx):
    return _take_block(self.bias_array, q_idx, kv_idx)

  def dense(self, q_len, kv_len):
    return self.bias_array

  def accumulate_grad(self, grad, dlogits, q_idx, kv_idx):
    arr = self.bias_array
    lead = dlogits.ndim - arr.ndim
    d = dlogits.sum(tuple(range(lead))) if lead > 0 else dlogits
    axes = tuple(i for i in range(arr.ndim - 2) if arr.shape[i] == 1 and d.shape[i] != 1)
    d = d.sum(axes, keepdims=True) if axes else d
    rows = q_idx[:, 0]
    cols = kv_idx[0, :]
    if arr.shape[-2] == 1:
      d, rows = d.sum(-2, keepdims=True), jnp.zeros((1,), jnp.int32)
    if arr.shape[-1] == 1:
      d, cols = d.sum(-1, keepdims=True), jnp.zeros((1,), jnp.int32)
    g = grad.bias_array.at[..., rows[:, None], cols[None, :]].add(d.astype(grad.bias_array.dtype))
    return ArrayBias(g)
