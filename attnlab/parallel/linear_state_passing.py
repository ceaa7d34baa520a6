"""Sequence parallelism for linear attention by state passing (LASP-2 style).

Every core op of :mod:`attnlab.ops.linear_attention` is an affine recurrence in its state,
``S_t = A_t S_{t-1} + B_t`` per head, with ``A_t`` acting on the K axis (LASP-2: Sun et
al. 2025, "Rethinking Sequence Parallelism for Linear Attention"). Cut the sequence
into ``P`` spans, one per device along a mesh axis. For span ``p`` the recurrence
composes to one affine map of the state entering it::

    S_out^p = M^p S_in^p + S_loc^p          M^p = A_last ... A_first      [K, K]

    linear_attn           M = I
    retention, simple_gla M = exp(sum g) I          (a scalar per head)
    gla                   M = diag(exp(sum g))      (a diagonal per head)
    (gated_)delta_rule    M = prod_t exp(g_t)(I - beta_t k_t k_t^T)

and every output is affine in ``S_in`` too: ``o_t = o_t^loc + Q~_t S_in`` with
``Q~_t = scale q_t^T A_t ... A_first`` (``[K]`` per token and head). A reset of a packed
document inside the span zeroes ``M`` and ``Q~`` from the reset on.

Algorithm, per device (inside ``shard_map``):

1. One local pass of the op itself on the span, with the values widened to
   ``[v | 0_K]`` and the initial state ``[0_{K x V} | I_K]``. The state's columns evolve
   independently (``A_t`` acts on rows), so the first ``V`` columns are the zero-state run
   (``o^loc``, ``S_loc``) and the last ``K`` the identity run (``Q~``, ``M``): both come
   out of the op's own chunked kernel, for every op, tier and option, with no closed form
   to keep in sync. The extra work is ``K`` more value columns; the key-side work
   (scores, the delta rule's UT transform) is shared.
2. ONE ``all_gather`` over the sequence axis of ``(M, S_loc)`` and the span's first and
   last segment ids (their int32 bits), packed into one float32 buffer per device. For the decay ops
   ``M`` is diagonal and only its diagonal ``[K]`` is sent: ``P (K + K V)`` floats per
   head for decay ops, ``P (K^2 + K V)`` for the delta rules.
3. Every device runs the short prefix recurrence over the ``P`` gathered maps,
   ``S_in^0 = initial_state``, ``S_in^{p+1} = c_p (M^p S_in^p + S_loc^p)`` with
   ``c_p = 0`` where span ``p + 1`` starts a new document (its first id differs from span
   ``p``'s last id), and picks its own ``S_in``. The global final state is the last
   span's ``S_out``, computed (identically) on every device.
4. The cheap correction ``o = o^loc + Q~ S_in``, one ``[T/P, K] x [K, V]`` product per head
   (rather than a second pass of the op with ``initial_state = S_in``, which would redo
   all the chunked work).

Cost per device: one local chunked pass with ``V + K`` value columns, one all-gather of
``P`` transitions and local states, ``P`` small state updates, the correction. There is
no ring of ``P - 1`` permutes, so latency does not grow with ``P`` beyond the gather. The
backward pass is JAX's autodiff through ``shard_map``: the gather's transpose is one
reduce-scatter (XLA:CPU writes it as one all-reduce), again no permutes.

Usage::

    mesh = jax.make_mesh((8,), ("sequence",))
    sp_gla = sequence_parallel("gla", mesh)            # signature of ops.gla
    o, final = sp_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                      segment_ids=ids, chunk_size=64)

Arrays are global ``[B, T, H, D]`` values (under ``jit`` or not); T must divide evenly
over the sequence axis. ``batch_axis`` / ``head_axis`` shard B / H over further mesh axes
(the recurrence is independent per batch row and head, so they add no communication).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.ops import linear_attention

# Compatibility shim, the one place that picks shard_map: `jax.shard_map` is public from
# jax 0.7 on; older releases have only `jax.experimental.shard_map.shard_map`. Both take
# `mesh`, `in_specs` and `out_specs` by keyword, the only arguments used here.
if hasattr(jax, "shard_map"):
  shard_map = jax.shard_map
else:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]



def all_gather_invariant(x, axis_name):
  """``lax.all_gather`` typed as the same on every device of ``axis_name``.

  With shard_map's varying-axes checks (jax >= 0.7) the plain gather is typed "varying",
  which a replicated output cannot be; ``to="invarying"`` says what it is. Older
  releases infer the replication of a gather on their own and have no ``to``.
  """
  if "to" in inspect.signature(lax.all_gather).parameters:
    return lax.all_gather(x, axis_name, to="invarying")
  return lax.all_gather(x, axis_name)  # pragma: no cover - older jax


def _varying(x, axes):
  """``x`` typed as differing across the manual ``axes``: a loop carry started from a
  constant must have the type of what the loop makes of the sharded inputs."""
  if not axes:
    return x
  if hasattr(lax, "pcast"):
    return lax.pcast(x, tuple(axes), to="varying")
  if hasattr(lax, "pvary"):  # pragma: no cover - jax 0.6 to 0.7
    return lax.pvary(x, tuple(axes))
  return x  # pragma: no cover - older jax does not type replication this way


OPS: dict[str, Callable] = {name: getattr(linear_attention, name)
                            for name in linear_attention.MECHANISMS}
# Ops whose span transition M is a full [K, K] matrix; the others' is diagonal.
MATRIX_TRANSITION = ("delta_rule", "gated_delta_rule")


def sequence_parallel(op: str | Callable, mesh: Mesh, axis_name: str = "sequence", *,
                      batch_axis=None, head_axis=None) -> Callable:
  """``op`` run with its sequence sharded over ``mesh`` axis ``axis_name``.

  Args:
    op: one of ``linear_attn``, ``retention``, ``simple_gla``, ``gla``, ``delta_rule``,
      ``gated_delta_rule`` (its name or the function from ``attnlab.ops``).
    mesh: the device mesh.
    axis_name: the mesh axis that shards T.
    batch_axis, head_axis: None, or mesh axis name(s) that shard B, respectively H.

  Returns:
    A function with ``op``'s signature and result: ``(o [B, T, H, V] in v's dtype,
    final_state [B, H, K, V] float32 or None)``, equal to ``op`` on one device up to
    float32 rounding. Its arguments are global arrays; ``T`` must be a multiple of the
    axis size. ``o`` comes back sharded ``(batch_axis, axis_name, head_axis)``, the final
    state ``(batch_axis, head_axis)`` and replicated over ``axis_name``.
  """
  name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
  if name not in OPS:
    raise ValueError(f"op must be one of {sorted(OPS)} or the function of one, got {op!r}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh "
                     f"{mesh.axis_names}")
  op_fn = OPS[name]
  signature = inspect.signature(op_fn)
  gate_names = [p.name for p in signature.parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("q", "k", "v")]
  devices = mesh.shape[axis_name]

  def run(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    q, k, v = (jnp.asarray(call.pop(n)) for n in ("q", "k", "v"))
    if q.ndim != 4:
      raise ValueError(f"q must be [B, T, H, K], got {q.shape=}")
    batch, length, heads, key_dim = q.shape
    if length % devices:
      raise ValueError(f"sequence length {length} must be a multiple of the {devices} "
                       f"devices of mesh axis {axis_name!r}, got {q.shape=}")
    gates = [call.pop(n) for n in gate_names]
    if name == "retention" and gates[0] is None:
      gates[0] = jnp.asarray(linear_attention.retention_gammas(heads), jnp.float32)
    gates = [jnp.asarray(x) for x in gates]
    initial_state = call.pop("initial_state")
    output_final_state = call.pop("output_final_state")
    segment_ids = call.pop("segment_ids")
    # normalize=True is a division after the recurrence: carry [v | 1] through the state
    # passing (linear in v) and divide at the end, as the op does.
    normalize = call.pop("normalize", False)
    values = (jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], -1)
              if normalize else v)
    state_shape = (batch, heads, key_dim, values.shape[-1])
    if initial_state is None:
      initial_state = jnp.zeros(state_shape, jnp.float32)
    initial_state = jnp.asarray(initial_state)
    if initial_state.shape != state_shape:
      raise ValueError(f"initial_state must be [B, H, K, V]={state_shape}, got "
                       f"initial_state.shape={initial_state.shape}")
    initial_state = initial_state.astype(jnp.float32)

    tokens = PartitionSpec(batch_axis, axis_name, head_axis)
    gate_spec = {1: PartitionSpec(head_axis), 3: tokens,
                 4: PartitionSpec(batch_axis, axis_name, head_axis, None)}
    for gate_name, x in zip(gate_names, gates):
      if x.ndim not in gate_spec:
        raise ValueError(f"{gate_name} must be [H], [B, T, H] or [B, T, H, K], got "
                         f"{gate_name}.shape={x.shape}")
    state_spec = PartitionSpec(batch_axis, head_axis)
    operands = [q, k, values, initial_state, *gates]
    in_specs = [tokens, tokens, tokens, state_spec, *(gate_spec[x.ndim] for x in gates)]
    if segment_ids is not None:
      operands.append(jnp.asarray(segment_ids))
      in_specs.append(PartitionSpec(batch_axis, axis_name))
    local = functools.partial(
        _span, op_fn=op_fn, options=call, axis_name=axis_name, devices=devices,
        num_gates=len(gates), matrix=name in MATRIX_TRANSITION,
        has_segments=segment_ids is not None,
        manual_axes=tuple(a for entry in tokens for a in _axis_names(entry)))
    if _has_explicit_axes(mesh):
      # Under explicit sharding shard_map takes operands only in its in_specs' layout.
      operands = [jax.sharding.reshard(x, NamedSharding(mesh, spec))
                  for x, spec in zip(operands, in_specs)]
    o, final = shard_map(local, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=(tokens, state_spec))(*operands)
    if normalize:
      o = o[..., :-1] / (o[..., -1:] + linear_attention.NORMALIZE_EPS)
    return o.astype(v.dtype), (final if output_final_state else None)

  run.__name__ = f"sequence_parallel_{name}"
  run.__doc__ = (f"``{name}`` sharded over mesh axis {axis_name!r}; see "
                 f":func:`sequence_parallel`.\n\n{op_fn.__doc__}")
  return run


def _axis_names(entry):
  """The mesh axis names in one PartitionSpec entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _has_explicit_axes(mesh):
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  return any(t == explicit for t in getattr(mesh, "axis_types", ()))


def _span(q, k, values, initial_state, *rest, op_fn, options, axis_name, devices,
          num_gates, matrix, has_segments, manual_axes):
  """One device's span: ``[B, L, H, *]`` local arrays, ``initial_state`` the global one."""
  f32 = jnp.float32
  gates = rest[:num_gates]
  segment_ids = rest[num_gates] if has_segments else None
  batch, _, heads, key_dim = q.shape
  value_dim = values.shape[-1]

  # Step 1: the zero-state run in columns [:V], the identity run in columns [V:].
  widened = jnp.concatenate([values.astype(f32), jnp.zeros(q.shape, f32)], -1)
  eye = jnp.broadcast_to(jnp.eye(key_dim, dtype=f32), (batch, heads, key_dim, key_dim))
  start = _varying(
      jnp.concatenate([jnp.zeros((batch, heads, key_dim, value_dim), f32), eye], -1),
      manual_axes)
  o_wide, s_wide = op_fn(q, k, widened, *gates, initial_state=start,
                         output_final_state=True, segment_ids=segment_ids, **options)
  o_local, q_carry = o_wide[..., :value_dim], o_wide[..., value_dim:]   # [B, L, H, V | K]
  s_local, transition = s_wide[..., :value_dim], s_wide[..., value_dim:]
  if not matrix:
    transition = jnp.diagonal(transition, axis1=-2, axis2=-1)           # [B, H, K]

  # Step 2: one all-gather of everything the prefix recurrence needs.
  parts = [transition, s_local]
  if has_segments:
    ids = segment_ids.astype(jnp.int32)   # only ever compared for equality
    parts += [lax.bitcast_convert_type(ids[:, 0], f32),
              lax.bitcast_convert_type(ids[:, -1], f32)]
  sizes = [int(np.prod(x.shape)) for x in parts]
  packed = jnp.concatenate([x.reshape(-1) for x in parts])
  gathered = all_gather_invariant(packed, axis_name)                        # [P, n]
  offsets = np.cumsum([0] + sizes)
  unpacked = [gathered[:, a:b].reshape((devices,) + x.shape)
              for a, b, x in zip(offsets[:-1], offsets[1:], parts)]
  transitions, local_states = unpacked[:2]
  if has_segments:
    first_ids, last_ids = (lax.bitcast_convert_type(x, jnp.int32) for x in unpacked[2:])
    # continues[p]: span p + 1 opens with the document span p closes with.
    continues = jnp.concatenate([first_ids[1:] == last_ids[:-1],
                                 jnp.ones((1, batch), bool)], 0)         # [P, B]
  else:
    continues = jnp.ones((devices, batch), bool)

  # Step 3: the state entering each span, by the prefix recurrence over the P spans.
  def apply(m, state):
    if matrix:
      return jnp.einsum("bhkj,bhjv->bhkv", m, state, precision=lax.Precision.HIGHEST)
    return m[..., None] * state

  def step(entering, xs):
    m, s_loc, cont = xs
    leaving = apply(m, entering) + s_loc
    return jnp.where(cont[:, None, None, None], leaving, 0.0), entering

  # continues[-1] is True, so the last carry is the last span's S_out: the final state.
  final, entering = lax.scan(step, initial_state, (transitions, local_states, continues))
  s_in = lax.dynamic_index_in_dim(entering, lax.axis_index(axis_name), 0, keepdims=False)

  # Step 4: o_t = o_t^loc + Q~_t S_in.
  o = o_local + jnp.einsum("blhk,bhkv->blhv", q_carry, s_in,
                           precision=lax.Precision.HIGHEST)
  return o, final
