"""Mosaic TPU chunked linear attention (``pallas_kernels/tpu/chunked_linear.py``: simple
GLA, GLA, delta rule, gated delta rule) in TPU interpret mode on CPU.

Each case runs forward and backward under ``jit`` and compares the output, the final
state and every gradient (q, k, v, g, beta, initial_state) with the float64 oracle
``tests/oracle_linear.py`` as the relative error ``||x - ref|| / ||ref||`` (bfloat16
against the oracle on the bf16-rounded inputs). The loss is ``<o, dout> + <S_T, dfinal>``,
so gradients also flow in through the final state. Lengths 13, 21, 37 and 100 with
chunks of 16 and 32 and blocks of one or two chunks give padded last chunks, several
chunks per grid step and several grid steps; random packed documents put starts inside
chunks and on their edges. Classic interpret mode (``interpret=True``) runs most cases;
one runs under ``pltpu.InterpretParams()``. The kernels are also lowered to Mosaic for
TPU on CPU, which checks block shapes and every primitive against Pallas's TPU rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import chunked_linear as cl
from tests import oracle_linear as oracle

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
OPS = ("simple_gla", "gla", "gated_delta_rule", "delta_rule")
DELTA_OPS = ("gated_delta_rule", "delta_rule")


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def to_f64(x):
  return None if x is None else np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@dataclasses.dataclass(frozen=True)
class Case:
  """One call. Gates are ``-strength * uniform(0.5, 1)`` per token (and channel), or
  exactly ``-strength`` when ``exact_gates``; beta is ``uniform(0.1, 1)`` and the delta
  rules get unit-norm q and k (as their ops' ``use_qk_l2norm`` gives); ``documents``
  packs random documents."""

  name: str
  op: str
  dtype: Any
  length: int
  chunk: int
  block: int | None
  key_dim: int = 8
  value_dim: int = 16
  strength: float = 1.0
  exact_gates: bool = False
  documents: bool = False
  initial_state: bool = True
  final_state: bool = True
  interpret: Any = True
  batch: int = 2
  heads: int = 2

  def __str__(self):
    return self.name


def _inputs(case: Case, rng):
  b, t, h, kd, vd = case.batch, case.length, case.heads, case.key_dim, case.value_dim

  def normal(shape, dtype=case.dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  def unit(shape):
    x = rng.standard_normal(shape)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), case.dtype)

  key = unit if case.op in DELTA_OPS else normal
  diff = {"q": key((b, t, h, kd)), "k": key((b, t, h, kd)), "v": normal((b, t, h, vd))}
  if case.op != "delta_rule":
    gate_shape = (b, t, h, kd) if case.op == "gla" else (b, t, h)
    gates = (np.full(gate_shape, -case.strength) if case.exact_gates
             else -case.strength * rng.uniform(0.5, 1.0, gate_shape))
    diff["g"] = jnp.asarray(gates, case.dtype)
  if case.op in DELTA_OPS:
    diff["beta"] = jnp.asarray(rng.uniform(0.1, 1.0, (b, t, h)), case.dtype)
  if case.initial_state:
    diff["initial_state"] = normal((b, h, kd, vd), jnp.float32)
  segment_ids = None
  if case.documents:
    segment_ids = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
  cotangents = (normal((b, t, h, vd)), normal((b, h, kd, vd), jnp.float32))
  return diff, segment_ids, cotangents


def _run(op, diff, segment_ids, cotangents, *, chunk, block, interpret, final=True):
  """Output, final state and the gradients of ``<o, dout> + <S_T, dfinal>``."""
  def forward_backward(diff, segment_ids, cotangents):
    def call(diff):
      return getattr(cl, op)(**diff, scale=0.3, output_final_state=final,
                         segment_ids=segment_ids, chunk_size=chunk, block_size=block,
                         interpret=interpret)
    (o, state), vjp = jax.vjp(call, diff)
    return o, state, vjp(cotangents)[0]

  return jax.jit(forward_backward)(diff, segment_ids, cotangents)


def _oracle(op, diff, segment_ids, cotangents):
  return getattr(oracle, op)(
      **{n: to_f64(x) for n, x in diff.items()}, scale=0.3,
      segment_ids=None if segment_ids is None else np.asarray(segment_ids),
      dout=to_f64(cotangents[0]), dfinal=to_f64(cotangents[1]))


CASES = [
    # Documents, initial state, K != V, two chunks per block and two blocks.
    Case("simple_gla_f32_T37_c16_b32_docs", "simple_gla", jnp.float32, 37, 16, 32,
         documents=True),
    Case("gla_f32_T37_c16_b32_docs", "gla", jnp.float32, 37, 16, 32, key_dim=16,
         value_dim=8, documents=True),
    # Gates of exactly -20 per token: the decay gradients are ~e^-20 and must survive.
    Case("simple_gla_f32_T100_c32_b64_g-20_docs", "simple_gla", jnp.float32, 100, 32, 64,
         strength=20.0, exact_gates=True, documents=True),
    Case("gla_f32_T100_c32_b64_g-20_docs", "gla", jnp.float32, 100, 32, 64, strength=20.0,
         exact_gates=True, documents=True),
    # Weak gates over one padded chunk, no initial or final state, bf16.
    Case("simple_gla_bf16_T13_c16_no_states", "simple_gla", jnp.bfloat16, 13, 16, None,
         strength=0.1, initial_state=False, final_state=False),
    Case("gla_bf16_T37_c32_b32_docs", "gla", jnp.bfloat16, 37, 32, 32, strength=0.5,
         documents=True),
    # Head dims of 128 (the lane view [B, T, H * D] instead of the transpose); two blocks
    # without an initial state.
    Case("simple_gla_f32_T21_c16_h128", "simple_gla", jnp.float32, 21, 16, 16, key_dim=128,
         value_dim=128, batch=1, documents=True, initial_state=False),
    # The newer interpreter (DMA and pipeline semantics) once.
    Case("simple_gla_f32_T21_c16_b16_interpret_params", "simple_gla", jnp.float32, 21, 16, 16,
         batch=1, interpret=pltpu.InterpretParams()),
    # The delta rules: the same structure, plus beta and the chunk's triangular solve.
    Case("gated_delta_f32_T37_c16_b32_docs", "gated_delta_rule", jnp.float32, 37, 16, 32,
         documents=True),
    Case("gated_delta_f32_T100_c32_b64_g-20_docs", "gated_delta_rule", jnp.float32, 100, 32,
         64, key_dim=16, value_dim=8, strength=20.0, exact_gates=True, documents=True),
    Case("delta_f32_T21_c16_b16_docs", "delta_rule", jnp.float32, 21, 16, 16, key_dim=16,
         value_dim=8, documents=True),
    Case("gated_delta_bf16_T37_c32_b32_docs", "gated_delta_rule", jnp.bfloat16, 37, 32, 32,
         strength=0.5, documents=True, initial_state=False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle(case, rng):
  diff, segment_ids, cotangents = _inputs(case, rng)
  if not case.final_state:
    cotangents = (cotangents[0], None)   # the oracle's dfinal defaults to zero
  out, final, grads = _run(case.op, diff, segment_ids, cotangents, chunk=case.chunk,
                           block=case.block, interpret=case.interpret,
                           final=case.final_state)
  ref = _oracle(case.op, diff, segment_ids, cotangents)
  assert out.dtype == case.dtype and out.shape == diff["v"].shape
  assert {n: g.dtype for n, g in grads.items()} == {n: x.dtype for n, x in diff.items()}
  errors = {"out": rel_err(to_f64(out), ref.out)}
  if case.final_state:
    assert final.dtype == jnp.float32
    errors["final_state"] = rel_err(to_f64(final), ref.final_state)
  else:
    assert final is None
  errors.update({f"d{n}": rel_err(to_f64(grads[n]), ref.grads[n]) for n in diff})
  assert all(errors[n] <= TOLERANCE[case.dtype] for n in errors), errors


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_packed_documents_equal_documents_one_by_one(op, rng):
  """One packed row (starts inside a chunk, on chunk edges, a one-token document) == the
  documents as a batch of rows, right-padded with random tokens that get no cotangent.
  ``initial_state`` reaches the first document only; the final state is the last one's
  (the longest, unpadded)."""
  lengths = (9, 1, 6, 16, 21)              # starts at 9, 10, 16 and 32 (chunk edges)
  longest, num = max(lengths), len(lengths)
  assert lengths[-1] == longest
  case = Case("docs", op, jnp.float32, longest, 16, 32, batch=num, heads=1)
  diff, _, (dout, dfinal) = _inputs(case, rng)
  live = np.arange(longest)[None, :] < np.asarray(lengths)[:, None]
  first, last = np.arange(num) == 0, np.arange(num) == num - 1
  diff["initial_state"] = diff["initial_state"] * first[:, None, None, None]
  dout = dout * jnp.asarray(live[:, :, None, None], jnp.float32)
  dfinal = dfinal * last[:, None, None, None]

  def pack(x):
    return jnp.concatenate([x[d, :n] for d, n in enumerate(lengths)])[None]

  packed = {n: x[:1] if n == "initial_state" else pack(x) for n, x in diff.items()}
  ids = jnp.asarray(np.repeat(np.arange(num) % 2, lengths)[None], jnp.int32)
  run = dict(chunk=16, block=32, interpret=True)
  out, final, grads = _run(op, packed, ids, (pack(dout), dfinal[-1:]), **run)
  out_docs, final_docs, grads_docs = _run(op, diff, None, (dout, dfinal), **run)
  errors = {"out": rel_err(out, pack(out_docs)),
            "final_state": rel_err(final, final_docs[-1:]),
            "dinitial_state": rel_err(grads["initial_state"], grads_docs["initial_state"][:1])}
  errors.update({f"d{n}": rel_err(grads[n], pack(grads_docs[n]))
                 for n in diff if n != "initial_state"})
  assert all(e <= TOLERANCE[jnp.float32] for e in errors.values()), errors


# ------------------------------------------------------------------ Mosaic lowering


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_to_mosaic_tpu(op, head_dim):
  """Forward and backward (bf16, documents, initial state, several blocks of 4 chunks of
  64) lower to two Mosaic TPU custom calls, through the lane view at 128 and the
  transpose at 64."""
  b, t, h = 2, 1000, 2
  spec = jax.ShapeDtypeStruct
  gates = {"simple_gla": [(b, t, h)], "gla": [(b, t, h, head_dim)],
           "gated_delta_rule": [(b, t, h)] * 2, "delta_rule": [(b, t, h)]}[op]
  args = ([spec((b, t, h, head_dim), jnp.bfloat16)] * 3
          + [spec(shape, jnp.float32) for shape in gates]
          + [spec((b, h, head_dim, head_dim), jnp.float32), spec((b, t), jnp.int32)])

  def forward_backward(*args):
    *diff, ids = args

    def call(*diff):
      *inputs, s0 = diff
      return getattr(cl, op)(*inputs, scale=0.1, initial_state=s0, output_final_state=True,
                             segment_ids=ids, chunk_size=64, block_size=256)
    out, vjp = jax.vjp(call, *diff)
    return vjp(out)

  lowered = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 2


# ------------------------------------------------------------------------ bad input


def _args(t=20, k=8, v=8, gate=None, dtype=jnp.float32):
  shape = (2, t, 2, k)
  return (jnp.ones(shape, dtype), jnp.ones(shape, dtype), jnp.ones((2, t, 2, v), dtype),
          jnp.ones(gate or shape[:3], jnp.float32))


@pytest.mark.parametrize("change, message", [
    (lambda a: {"args": (a[0][0],) + a[1:]}, r"q must be \[B, T, H, D\]"),
    (lambda a: {"args": (a[0], a[1], jnp.ones((2, 21, 2, 8)), a[3])}, "same B, T, H"),
    (lambda a: {"args": (a[0], a[1].astype(jnp.bfloat16)) + a[2:]}, "share dtype"),
    (lambda a: {"args": a[:3] + (jnp.ones((2, 20, 2, 8)),)}, r"g must be .* \(2, 20, 2\)"),
    (lambda a: {"scale": None}, "scale must be a finite"),
    (lambda a: {"initial_state": jnp.ones((2, 2, 8, 9))}, "initial_state must be"),
    (lambda a: {"segment_ids": jnp.ones((2, 20))}, "segment_ids must be an int"),
    (lambda a: {"chunk_size": 24}, "chunk_size must be a positive multiple of 16"),
    (lambda a: {"block_size": 40}, "block_size must be a positive multiple of chunk_size"),
    (lambda a: {"op": cl.gated_delta_rule, "args": a + (jnp.ones((2, 20, 2), jnp.int32),)},
     r"beta must be a float array of shape \(2, 20, 2\)"),
])
def test_bad_input_raises(change, message):
  kwargs = {"scale": 0.5, **change(_args())}
  args = kwargs.pop("args", _args())
  op = kwargs.pop("op", cl.simple_gla)
  with pytest.raises(ValueError, match=message):
    op(*args, chunk_size=kwargs.pop("chunk_size", 16), interpret=True, **kwargs)
