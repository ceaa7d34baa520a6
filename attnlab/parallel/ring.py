"""Sequence parallelism for softmax attention: ring attention and all-to-all (Ulysses).

Both shard q, k and v along T over one mesh axis of ``P`` devices and return what
:func:`attnlab.ops.dot_product_attention` returns on one device, up to float32 rounding.

**Ring attention** (Liu et al. 2023, "Ring Attention with Blockwise Transformers").
Device ``p`` keeps its queries and passes the key/value blocks around the ring
``p -> p + 1``: at step ``s = 0 .. P-1`` it holds the block of device ``src = p - s
(mod P)`` and computes that block's partial attention with the blockwise xla tier
(:mod:`attnlab.ops.softmax_xla`), an output ``o_s`` normalised over the block's keys and
its log-sum-exp ``l_s`` per query row. The partials merge by the online softmax::

    l   = log(exp(l_a) + exp(l_b))
    o   = exp(l_a - l) o_a + exp(l_b - l) o_b

(a row that has seen no key yet has ``l = -inf`` and weight 0; a row that sees no key at
all ends as ``o = 0``, never NaN). ``P - 1`` collective-permutes of the packed
``[k | v]`` block per forward; the permute of the next block is issued before the
current block's compute, so XLA's asynchronous collective-permute (start / done on
GPU and TPU) overlaps the transfer with the block's attention.

The backward is a ``custom_vjp`` (the ring form of FlashAttention's backward). The
forward saves only the merged output ``O`` and log-sum-exp ``L``. The k/v blocks go
around the ring again; for each block the probabilities are recomputed as
``p_ij = exp(s_ij - L_i)`` and, with ``D_i = dO_i . O_i``::

    dS = p (dO v^T - D),   dq += scale dS k,   dk_blk += scale dS^T q,   dv_blk += p^T dO

``dq`` accumulates on the query's device; ``[dk | dv]`` of a block travels with it
(``dkv <- ppermute(dkv) + dkv_blk``: the incoming partial sum is issued before the local
block's compute, so it overlaps too) and one last permute sends it home. Per backward:
``P - 1`` permutes of ``[k | v]`` and ``P`` of ``[dk | dv]``.

**Causal load balance.** With the contiguous layout (device ``p`` holds tokens
``[pL, (p+1)L)``) causal work is uneven: device ``P-1`` sees ``P`` blocks, device 0 one.
The zig-zag layout cuts T into ``2P`` chunks of ``c = T / 2P`` and gives device ``p``
chunks ``p`` and ``2P-1-p``. For ``src < p`` both local query chunks see the source's
first chunk and neither its second; for ``src > p`` only the second query chunk sees
the source, both chunks of it. Either way every device computes exactly half of each
off-diagonal block (plus an equal diagonal), and the xla tier's block lists skip the
future half outright: the masked sub-blocks are never visited. This block skipping is
general: a static table of live ``[block_q, block_k]`` blocks, computed from the mask's
row intervals for every (query device, key device) pair, joins the segment ids' own
block summary, so local windows and packed documents skip dead blocks and whole dead
ring steps too (the permute still runs; the compute does not).

By default the public function takes arrays in natural token order and moves them to
the layout and back inside ``shard_map`` (two collective-permutes each way: every
device's even and odd natural chunk go to their zig-zag owners). A model that keeps
its activations in the zig-zag order throughout (the mixers are per token) passes
``reorder=False`` and permutes its tokens once at the input with
:func:`layout_positions`.

Collectives per call, as the compiled HLO executes them (loops counted by trip count):
forward ``P - 1`` permutes of ``[k | v]``; forward + backward ``3P - 2`` (XLA may merge
the backward's first ``[k | v]`` permute with the forward's when both sit outside the
ring loop, as at ``P = 2``); ``reorder`` with the zig-zag layout adds 4 permutes to
the forward and 4 to the backward; segment ids add one all-gather of ``[B, T, 2]``
int32.

**Ulysses** (Jacobs et al. 2023, "DeepSpeed Ulysses"). One ``all_to_all`` turns the
sequence-sharded ``[B, T/P, N, H]`` q, k, v (packed into one buffer) into
head-sharded ``[B, T, N/P, H]``; every device runs the ordinary op on the full sequence
for its ``N/P`` heads (every option of the op works), and a second ``all_to_all`` turns
the output back. It needs ``N % P == 0`` and, for the key/value heads, ``K % P == 0``
or ``P % K == 0`` (then the K/V heads are repeated to ``P`` before the exchange, one per
device: MQA and small-``K`` GQA).

Usage::

    mesh = jax.make_mesh((8,), ("sequence",))
    attention = ring_attention(mesh)                 # or ulysses_attention(mesh)
    out = attention(q, k, v, is_causal=True, segment_ids=ids)

Arrays are global ``[B, T, N, H]`` values (under ``jit`` or not); the output comes back
sharded along T over ``axis_name``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.ops import masks as masks_lib
from attnlab.ops import softmax
from attnlab.ops import softmax_xla
from attnlab.parallel.linear_state_passing import _has_explicit_axes, shard_map

__all__ = ["layout_positions", "ring_attention", "ulysses_attention"]

LAYOUTS = ("zigzag", "contiguous")


def layout_positions(length: int, devices: int, layout: str = "zigzag") -> np.ndarray:
  """The natural position of every token of the ``layout`` order, int ``[T]``.

  ``x_layout = x[:, positions]`` puts a natural-order ``[B, T, ...]`` array into the
  layout (device ``p`` holds ``x_layout[:, p * T/P : (p+1) * T/P]``);
  ``x = x_layout[:, np.argsort(positions)]`` undoes it. Zig-zag: chunk ``p`` and chunk
  ``2P-1-p`` of ``2P`` equal chunks on device ``p``; contiguous: the identity.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "contiguous":
    return np.arange(length)
  if length % (2 * devices):
    raise ValueError(f"the zig-zag layout needs T a multiple of 2P={2 * devices}, "
                     f"got T={length}")
  chunks = np.arange(length).reshape(2 * devices, -1)
  order = [c for p in range(devices) for c in (p, 2 * devices - 1 - p)]
  return chunks[order].reshape(-1)


def _shard_map(fn, mesh, in_specs, out_specs):
  # The xla tier's loops start their carries from constants, which shard_map's
  # replication typing (check_vma / check_rep) would reject as loop carries that change
  # type; the collectives here are all explicit, so the check adds nothing.
  params = inspect.signature(shard_map).parameters
  check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


def _reshard(mesh, operands, specs):
  if not _has_explicit_axes(mesh):
    return operands
  # Under explicit sharding shard_map takes operands only in its in_specs' layout.
  return [None if x is None else jax.sharding.reshard(x, NamedSharding(mesh, spec))
          for x, spec in zip(operands, specs)]


def _split_mask(mask):
  """The canonical mask as (static position mask or None, (q_ids, kv_ids) or None)."""
  static, documents = [], []
  for leaf in masks_lib.components(mask):
    if isinstance(leaf, masks_lib.Documents):
      documents.append(leaf)
    elif leaf.is_static:
      static.append(leaf)
    else:
      raise ValueError(f"sequence-parallel attention supports masks that depend on "
                       f"positions only (and segment_ids), got {type(leaf).__name__}")
  if len(documents) > 1:
    raise ValueError("pass packed documents once (segment_ids), got several Documents")
  ids = (documents[0].q_segment_ids, documents[0].kv_segment_ids) if documents else None
  return masks_lib.combine_masks(*static), ids


# ------------------------------------------------------------------------------ ring


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring call (hashable: the custom_vjp's static argument)."""

  axis_name: str
  devices: int
  length: int          # global T
  layout: str
  static: softmax_xla._Static
  mask: masks_lib.Mask | None   # static position mask, on global positions
  has_ids: bool


@functools.lru_cache(maxsize=64)
def _positions_table(length, devices, layout):
  """``[P, T/P]`` int32: the global positions each device holds."""
  return layout_positions(length, devices, layout).reshape(devices, -1).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _live_blocks(mask, length, devices, layout, block_q, block_k):
  """``[P, P, nq, nk]`` bool: may block ``(i, j)`` of (query device, key device) attend.

  From the mask's row intervals ``lo(i) <= j < hi(i)`` on global positions; a key block
  is summarised by its position range, a superset where a block straddles two zig-zag
  chunks, so the table is conservative and never drops a live block. Masks without
  row intervals (or no mask) keep every block.
  """
  pos = _positions_table(length, devices, layout)
  local = pos.shape[1]
  nq, nk = -(-local // block_q), -(-local // block_k)
  bounds = getattr(mask, "row_bounds", None)
  if mask is None or bounds is None or bounds(np.zeros(1, np.int64)) is None:
    return np.ones((devices, devices, nq, nk), bool)
  pad_k = nk * block_k - local
  kpos = np.pad(pos, ((0, 0), (0, pad_k)), mode="edge").reshape(devices, nk, block_k)
  kmin, kmax = kpos.min(-1), kpos.max(-1)                            # [P, nk]
  live = np.empty((devices, devices, nq, nk), bool)
  rows_valid = (np.arange(nq * block_q) < local).reshape(nq, block_q)
  for p in range(devices):
    lo, hi = (np.broadcast_to(b, pos[p].shape).astype(np.int64)
              for b in bounds(pos[p].astype(np.int64)))
    hit = (np.maximum(lo[:, None, None], kmin[None]) <=
           np.minimum(hi[:, None, None] - 1, kmax[None]))           # [L, P, nk]
    hit = np.pad(hit, ((0, nq * block_q - local), (0, 0), (0, 0)))
    hit = hit.reshape(nq, block_q, devices, nk) & rows_valid[:, :, None, None]
    live[p] = hit.any(1).transpose(1, 0, 2)
  return live


class _BlockMask(masks_lib.Mask):
  """The mask between this device's queries and one ring block, in local indices.

  Wraps the static position mask (read at global positions) and the segment ids, and
  summarises its blocks from the static live table and the ids' ranges.
  """

  is_static = False

  def __init__(self, mask, q_pos, kv_pos, live, q_ids, kv_ids):
    self.mask, self.q_pos, self.kv_pos, self.live = mask, q_pos, kv_pos, live
    self.q_ids, self.kv_ids = q_ids, kv_ids

  def predicate(self, q_idx, kv_idx):
    qp = jnp.take(self.q_pos, q_idx[:, 0])[:, None]
    kp = jnp.take(self.kv_pos, kv_idx[0, :])[None, :]
    allowed = (qp >= 0) & (kp >= 0) if self.mask is None else self.mask.predicate(qp, kp)
    if self.q_ids is not None:
      q = jnp.take(self.q_ids, q_idx[:, 0], axis=1)
      k = jnp.take(self.kv_ids, kv_idx[0, :], axis=1)
      allowed = allowed[None, None] & (q[:, :, None] == k[:, None, :])[:, None]
    return allowed

  def block_summary(self, q_len, kv_len, block_q, block_k):
    codes = jnp.where(self.live, masks_lib.PARTIAL, masks_lib.EMPTY).astype(jnp.int8)
    if self.q_ids is not None:
      documents = masks_lib.Documents(self.q_ids, self.kv_ids)
      codes = jnp.minimum(codes, documents.block_summary(q_len, kv_len, block_q, block_k))
    return codes


def _block_masks(cfg: _Ring, ids):
  """A function ``src -> _BlockMask`` for this device's queries (None: no mask at all)."""
  if cfg.mask is None and not cfg.has_ids:
    return lambda src: None
  me = lax.axis_index(cfg.axis_name)
  pos = jnp.asarray(_positions_table(cfg.length, cfg.devices, cfg.layout))
  live = jnp.asarray(_live_blocks(cfg.mask, cfg.length, cfg.devices, cfg.layout,
                                  cfg.static.block_q, cfg.static.block_k))
  local = pos.shape[1]
  q_ids = None
  if cfg.has_ids:
    q_ids = lax.dynamic_slice_in_dim(ids[..., 0], me * local, local, axis=1)

  def block_mask(src):
    kv_ids = None
    if cfg.has_ids:
      kv_ids = lax.dynamic_slice_in_dim(ids[..., 1], src * local, local, axis=1)
    return _BlockMask(cfg.mask, pos[me], pos[src], live[me, src], q_ids, kv_ids)

  return block_mask


def _ring_step(cfg: _Ring, shift: int):
  return [(i, (i + shift) % cfg.devices) for i in range(cfg.devices)]


def _split_kv(kv):
  head_dim = kv.shape[-1] // 2
  return kv[..., :head_dim], kv[..., head_dim:]


def _rows(x, num_heads):
  """``[B, K, G, L]`` per-row statistics -> ``[B, L, N, 1]``, to scale an output."""
  return x.transpose(0, 3, 1, 2).reshape(x.shape[0], x.shape[3], num_heads)[..., None]


def _ring_forward(cfg: _Ring, q, kv, ids):
  """Merged output ``[B, L, N, H]`` float32 and log-sum-exp ``[B, K, G, L]`` (-inf: no key).

  A loop over the first ``P - 1`` ring steps (permute the block on, attend to the one
  held), then the last block: ``P - 1`` permutes, and one copy of the step in the
  program whatever ``P`` is.
  """
  me = lax.axis_index(cfg.axis_name)
  block_mask = _block_masks(cfg, ids)
  num_heads = q.shape[2]

  def attend(step, kv, out, lse):
    k, v = _split_kv(kv)
    src = (me - step) % cfg.devices
    o_b, lse_b = softmax_xla._forward(cfg.static, q, k, v, None, block_mask(src), None)
    lse_b = jnp.where(lse_b == jnp.inf, -jnp.inf, lse_b)   # the tier marks unseen rows +inf
    merged = jnp.logaddexp(lse, lse_b)
    safe = jnp.where(jnp.isfinite(merged), merged, 0.0)
    out = (_rows(jnp.exp(lse - safe), num_heads) * out
           + _rows(jnp.exp(lse_b - safe), num_heads) * o_b.astype(jnp.float32))
    return out, merged

  def step(s, carry):
    kv, out, lse = carry
    # Issued before the compute it does not depend on: the transfer overlaps it.
    kv_next = lax.ppermute(kv, cfg.axis_name, _ring_step(cfg, 1))
    return (kv_next, *attend(s, kv, out, lse))

  batch, local, _, head_dim = q.shape
  out = jnp.zeros((batch, local, num_heads, head_dim), jnp.float32)
  lse = jnp.full((batch, kv.shape[2], num_heads // kv.shape[2], local), -jnp.inf,
                 jnp.float32)
  kv, out, lse = lax.fori_loop(0, cfg.devices - 1, step, (kv, out, lse))
  return attend(cfg.devices - 1, kv, out, lse)


def _ring_backward(cfg: _Ring, q, kv, ids, out, lse, dout):
  """``dq`` and ``[dk | dv]`` float32; the step-0 and last steps are peeled off the loop
  so that no permute is wasted (``P - 1`` of ``[k | v]``, ``P`` of ``[dk | dv]``)."""
  me = lax.axis_index(cfg.axis_name)
  block_mask = _block_masks(cfg, ids)
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)   # the tier's mark: p = exp(s - inf) = 0
  ring = functools.partial(lax.ppermute, axis_name=cfg.axis_name, perm=_ring_step(cfg, 1))

  def grads(step, kv):
    k, v = _split_kv(kv)
    src = (me - step) % cfg.devices
    dq_b, dk_b, dv_b, _, _ = softmax_xla._backward(cfg.static, q, k, v, None,
                                                   block_mask(src), None, out, lse, dout)
    return dq_b.astype(jnp.float32), jnp.concatenate([dk_b, dv_b], -1).astype(jnp.float32)

  def step(s, carry):
    kv, dkv, dq = carry
    kv_next = ring(kv)
    dkv_in = ring(dkv)   # the block's partial sum arrives while this step computes
    dq_b, dkv_b = grads(s, kv)
    return kv_next, dkv_in + dkv_b, dq + dq_b

  if cfg.devices == 1:
    return grads(0, kv)
  kv_next = ring(kv)
  dq, dkv = grads(0, kv)
  kv, dkv, dq = lax.fori_loop(1, cfg.devices - 1, step, (kv_next, dkv, dq))
  dkv_in = ring(dkv)
  dq_b, dkv_b = grads(cfg.devices - 1, kv)
  # The last block held here is device (me + 1)'s own: send its gradient home.
  return dq + dq_b, ring(dkv_in + dkv_b)


def _ring_plain(cfg, q, kv, ids):
  return _ring_forward(cfg, q, kv, ids)[0].astype(q.dtype)


def _ring_fwd(cfg, q, kv, ids):
  out, lse = _ring_forward(cfg, q, kv, ids)
  return out.astype(q.dtype), (q, kv, ids, out, lse)


def _ring_bwd(cfg, residuals, dout):
  q, kv, ids, out, lse = residuals
  dq, dkv = _ring_backward(cfg, q, kv, ids, out, lse, dout)
  return dq.astype(q.dtype), dkv.astype(kv.dtype), softmax_xla._zero_cotangent(ids)


_ring = jax.custom_vjp(_ring_plain, nondiff_argnums=(0,))
_ring.defvjp(_ring_fwd, _ring_bwd)


def _zigzag_routes(devices):
  """Where each natural chunk ``c`` of ``2P`` lives in the zig-zag layout."""
  owner = lambda c: c if c < devices else 2 * devices - 1 - c
  even = [(p, owner(2 * p)) for p in range(devices)]
  odd = [(p, owner(2 * p + 1)) for p in range(devices)]
  return even, odd


def _to_zigzag(x, axis_name, devices):
  """Natural chunks ``(2p, 2p+1)`` of device ``p`` -> zig-zag chunks ``(p, 2P-1-p)``.

  The even natural chunks go to distinct owners, as do the odd ones: two permutes. The
  owner of zig-zag chunk ``p`` got it by the permute of ``p``'s parity.
  """
  half = x.shape[1] // 2
  even_route, odd_route = _zigzag_routes(devices)
  even = lax.ppermute(x[:, :half], axis_name, even_route)
  odd = lax.ppermute(x[:, half:], axis_name, odd_route)
  me_even = lax.axis_index(axis_name) % 2 == 0
  return jnp.concatenate([jnp.where(me_even, even, odd), jnp.where(me_even, odd, even)], 1)


def _from_zigzag(x, axis_name, devices):
  """The inverse of :func:`_to_zigzag`."""
  half = x.shape[1] // 2
  me_even = lax.axis_index(axis_name) % 2 == 0
  first, second = x[:, :half], x[:, half:]
  even_route, odd_route = _zigzag_routes(devices)
  back = lambda route: [(dst, src) for src, dst in route]
  even = lax.ppermute(jnp.where(me_even, first, second), axis_name, back(even_route))
  odd = lax.ppermute(jnp.where(me_even, second, first), axis_name, back(odd_route))
  return jnp.concatenate([even, odd], 1)


def _ring_local(q, k, v, ids, *, cfg: _Ring, reorder: bool):
  """One device: ``[B, L, N|K, H]`` local arrays, ``ids [B, L, 2]`` (q, kv) or None."""
  num_heads, num_kv = q.shape[2], k.shape[2]
  zigzag = reorder and cfg.layout == "zigzag"
  if zigzag:
    packed = _to_zigzag(jnp.concatenate([q, k, v], 2), cfg.axis_name, cfg.devices)
    q, k, v = jnp.split(packed, [num_heads, num_heads + num_kv], axis=2)
  if ids is not None:
    # Ids are small: one gather, then every ring block's ids are a local slice.
    ids = lax.all_gather(ids, cfg.axis_name, axis=1, tiled=True)       # [B, T, 2]
    if zigzag:
      ids = ids[:, layout_positions(cfg.length, cfg.devices, cfg.layout)]
  out = _ring(cfg, q, jnp.concatenate([k, v], -1), ids)
  return _from_zigzag(out, cfg.axis_name, cfg.devices) if zigzag else out


def _unsupported(name, value):
  if value is not None:
    got = f"shape {np.shape(value)}" if hasattr(value, "shape") else type(value).__name__
    raise ValueError(f"{name} is not supported by this sequence-parallel attention, "
                     f"got a {name} of {got}")


def ring_attention(mesh: Mesh, axis_name: str = "sequence", *, layout: str = "zigzag",
                   reorder: bool = True, batch_axis=None, head_axis=None):
  """``dot_product_attention`` with q, k, v sharded along T over ``axis_name``, by ring.

  Args:
    mesh: the device mesh.
    axis_name: the mesh axis that shards T (``P`` devices).
    layout: ``"zigzag"`` (device ``p`` holds chunks ``p`` and ``2P-1-p`` of ``2P``:
      balanced causal work; T a multiple of ``2P``) or ``"contiguous"`` (chunk ``p`` of
      ``P``).
    reorder: True: the arrays (and segment ids) come in natural token order and the
      output goes back to it; the move to the layout is done inside (two
      collective-permutes each way). False: they are already in the layout order
      (``x[:, layout_positions(T, P, layout)]``) and the output stays in it.
    batch_axis, head_axis: None, or mesh axis name(s) that shard B, respectively N and
      K (heads are independent: no extra communication).

  Returns:
    A function with ``dot_product_attention``'s signature, for self-attention (``S ==
    T``). Supported: ``scale``, ``is_causal``, ``local_window_size``, ``segment_ids``
    (``[B, T]`` or a ``(q_ids, kv_ids)`` pair; documents may cross shard edges),
    ``mask`` as a position mask of :mod:`attnlab.ops.masks` (``Causal()``,
    ``ChunkedCausal(c)``, ...), ``logits_soft_cap``, ``block_sizes`` (capped at the
    layout's chunk), GQA/MQA (K/V are never repeated), ``implementation`` None or
    ``"xla"``. Bias, sinks, sequence lengths and array masks raise ValueError. The
    output ``[B, T, N, H]`` is in the query dtype, sharded
    ``(batch_axis, axis_name, head_axis)``. Partials merge in float32; the per-block
    outputs and gradients of the xla tier are in the input dtype.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh "
                     f"{mesh.axis_names}")
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  devices = mesh.shape[axis_name]

  def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                local_window_size=None, segment_ids=None, logits_soft_cap=None, sinks=None,
                query_seq_lengths=None, key_value_seq_lengths=None, implementation=None,
                block_sizes=None):
    _unsupported("bias", bias)
    _unsupported("sinks", sinks)
    _unsupported("query_seq_lengths", query_seq_lengths)
    _unsupported("key_value_seq_lengths", key_value_seq_lengths)
    if implementation not in (None, "xla"):
      raise ValueError("ring attention runs the xla tier per block; implementation must "
                       f"be None or 'xla', got {implementation!r}")
    call, unbatched = softmax.canonicalize(
        query, key, value, mask=mask, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size, segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap, block_sizes=block_sizes)
    q, k, v = call.query, call.key, call.value
    length = q.shape[1]
    if k.shape[1] != length:
      raise ValueError(f"ring attention is self-attention: S must equal T, got "
                       f"{q.shape=}, {k.shape=}")
    chunks = 2 * devices if layout == "zigzag" else devices
    if length % chunks:
      raise ValueError(f"sequence length {length} must be a multiple of {chunks} "
                       f"({layout} layout over the {devices} devices of mesh axis "
                       f"{axis_name!r}), got {q.shape=}")
    static_mask, ids = _split_mask(call.mask)
    sizes = call.block_sizes or softmax_xla.BlockSizes()
    chunk = length // chunks
    static = softmax_xla._Static(call.scale, call.logits_soft_cap,
                                 min(sizes.block_q, chunk), min(sizes.block_k, chunk))
    cfg = _Ring(axis_name, devices, length, layout, static, static_mask, ids is not None)
    if ids is not None:
      ids = jnp.stack([jnp.asarray(x, jnp.int32) for x in ids], -1)     # [B, T, 2]
    tokens = PartitionSpec(batch_axis, axis_name, head_axis)
    id_spec = PartitionSpec(batch_axis, axis_name)
    operands = _reshard(mesh, [q, k, v, ids], [tokens, tokens, tokens, id_spec])
    local = functools.partial(_ring_local, cfg=cfg, reorder=reorder)
    out = _shard_map(local, mesh, (tokens, tokens, tokens, id_spec), tokens)(*operands)
    return out[0] if unbatched else out

  attention.__name__ = f"ring_attention_{axis_name}"
  return attention


# --------------------------------------------------------------------------- ulysses


def ulysses_attention(mesh: Mesh, axis_name: str = "sequence", *, batch_axis=None):
  """``dot_product_attention`` with q, k, v sharded along T, by all-to-all over heads.

  Args:
    mesh: the device mesh.
    axis_name: the mesh axis that shards T (``P`` devices).
    batch_axis: None, or mesh axis name(s) that shard B.

  Returns:
    A function with ``dot_product_attention``'s signature, for self-attention (``S ==
    T``), ``T % P == 0``, ``N % P == 0`` and ``K % P == 0`` or ``P % K == 0``. Every
    option of the op works except an additive ``bias`` and array masks (``mask`` may be
    a position mask of :mod:`attnlab.ops.masks`); ``sinks [N]`` are sharded with their
    heads. Output ``[B, T, N, H]`` sharded ``(batch_axis, axis_name)``.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh "
                     f"{mesh.axis_names}")
  devices = mesh.shape[axis_name]

  def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                local_window_size=None, segment_ids=None, logits_soft_cap=None, sinks=None,
                query_seq_lengths=None, key_value_seq_lengths=None, implementation=None,
                block_sizes=None):
    _unsupported("bias", bias)
    call, unbatched = softmax.canonicalize(
        query, key, value, mask=mask, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size, segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap, sinks=sinks, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, block_sizes=block_sizes)
    q, k, v = call.query, call.key, call.value
    _, length, num_heads, _ = q.shape
    num_kv = k.shape[2]
    if k.shape[1] != length:
      raise ValueError(f"Ulysses attention is self-attention: S must equal T, got "
                       f"{q.shape=}, {k.shape=}")
    if length % devices:
      raise ValueError(f"sequence length {length} must be a multiple of the {devices} "
                       f"devices of mesh axis {axis_name!r}, got {q.shape=}")
    if num_heads % devices or (num_kv % devices and devices % num_kv):
      raise ValueError(f"Ulysses splits heads over the {devices} devices of mesh axis "
                       f"{axis_name!r}: it needs N % {devices} == 0 and K % {devices} == 0 "
                       f"or {devices} % K == 0, got N={num_heads}, K={num_kv}")
    if mask is not None and not (isinstance(mask, masks_lib.Mask) and mask.is_static):
      raise ValueError("Ulysses attention takes position masks of attnlab.ops.masks only, "
                       f"got mask of type {type(mask).__name__}")
    _, ids = _split_mask(call.mask)
    if ids is not None:
      ids = jnp.stack([jnp.asarray(x, jnp.int32) for x in ids], -1)     # [B, T, 2]
    lengths = [None if x is None else jnp.asarray(x)
               for x in (query_seq_lengths, key_value_seq_lengths)]
    options = dict(mask=mask, scale=call.scale, is_causal=is_causal,
                   local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                   implementation=implementation, block_sizes=block_sizes)
    tokens = PartitionSpec(batch_axis, axis_name)
    specs = (tokens, tokens, tokens, tokens, PartitionSpec(axis_name),
             PartitionSpec(batch_axis), PartitionSpec(batch_axis))
    operands = _reshard(mesh, [q, k, v, ids, call.sinks, *lengths], specs)
    local = functools.partial(_ulysses_local, axis_name=axis_name, devices=devices,
                              options=options)
    out = _shard_map(local, mesh, specs, tokens)(*operands)
    return out[0] if unbatched else out

  attention.__name__ = f"ulysses_attention_{axis_name}"
  return attention


def _ulysses_local(q, k, v, ids, sinks, q_lengths, kv_lengths, *, axis_name, devices,
                   options):
  """One device: sequence-sharded ``[B, L, N, H]`` in, sequence-sharded out."""
  batch, local, num_heads, head_dim = q.shape
  if k.shape[2] < devices:   # P % K == 0: one (repeated) K/V head per device
    k, v = (jnp.repeat(x, devices // k.shape[2], axis=2) for x in (k, v))
  num_kv = k.shape[2]
  # One exchange for q, k and v: split every head axis into P groups, pack per group.
  per_device = lambda x: x.reshape(batch, local, devices, x.shape[2] // devices, head_dim)
  packed = jnp.concatenate([per_device(q), per_device(k), per_device(v)], 3)
  packed = lax.all_to_all(packed, axis_name, 2, 1, tiled=True)[:, :, 0]  # [B, T, n, H]
  heads, kv_heads = num_heads // devices, num_kv // devices
  q, k, v = jnp.split(packed, [heads, heads + kv_heads], axis=2)
  segment_ids = None
  if ids is not None:
    ids = lax.all_gather(ids, axis_name, axis=1, tiled=True)
    segment_ids = (ids[..., 0], ids[..., 1])
  out = softmax.dot_product_attention(q, k, v, segment_ids=segment_ids, sinks=sinks,
                                      query_seq_lengths=q_lengths,
                                      key_value_seq_lengths=kv_lengths, **options)
  return lax.all_to_all(out, axis_name, 1, 2, tiled=True)               # [B, L, N, H]
