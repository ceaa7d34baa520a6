"""Mosaic GPU chunked simple GLA (``pallas_kernels/gpu/chunked_linear.py``).

Each case runs forward and backward and compares the output, the final state and every
gradient (q, k, v, g, initial_state) with the float64 oracle ``tests/oracle_linear.py``
(on the inputs rounded to the kernel's dtype) as the relative error
``||x - ref|| / ||ref||``. The loss is ``<o, dout> + <S_T, dfinal>``, so gradients also
flow in through the final state. Lengths that are not multiples of the 64-token chunk,
several chunks, two value blocks (V = 128), packed documents with starts inside chunks
and on their edges, and gates of exactly -20 per token (decay gradients of ~e^-20).

On CPU the kernels run in the Mosaic GPU interpreter of jax 0.10.2, op by op (the
interpreter deadlocks on a jitted program holding several kernels); ``*_on_gpu`` cases
run the compiled kernels under ``jit`` on an H100 and are skipped elsewhere, by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import _interpret
from pallas_kernels.gpu import chunked_linear as cl
from tests import oracle_linear as oracle
from tests.ops.test_linear_attention import rel_err, to_f64

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled Mosaic GPU kernels need an H100")
interpreted = pytest.mark.skipif(not _interpret.available(),
                                 reason="this jax has no Mosaic GPU interpreter")

# bfloat16 operands (8 significant bits), float32 accumulation and state: ~3e-3 typical.
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}


@dataclasses.dataclass(frozen=True)
class Case:
  """Gates ``-strength * uniform(0.5, 1)`` per token, or exactly ``-strength``."""

  name: str
  length: int
  key_dim: int = 64
  value_dim: int = 64
  strength: float = 1.0
  exact_gates: bool = False
  documents: bool = False
  initial_state: bool = True
  dtype: object = jnp.bfloat16
  batch: int = 1
  heads: int = 1

  def __str__(self):
    return self.name


def _inputs(case: Case, rng):
  b, t, h, kd, vd = case.batch, case.length, case.heads, case.key_dim, case.value_dim

  def normal(shape, dtype=case.dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  gates = (np.full((b, t, h), -case.strength) if case.exact_gates
           else -case.strength * rng.uniform(0.5, 1.0, (b, t, h)))
  diff = {"q": normal((b, t, h, kd)), "k": normal((b, t, h, kd)),
          "v": normal((b, t, h, vd)), "g": jnp.asarray(gates, jnp.float32)}
  if case.initial_state:
    diff["initial_state"] = normal((b, h, kd, vd), jnp.float32)
  segment_ids = None
  if case.documents:
    ids = np.cumsum(rng.random((b, t)) < 0.03, axis=1)
    ids[:, 64:] += 1                    # a start on a chunk edge
    segment_ids = jnp.asarray(ids, jnp.int32)
  cotangents = (normal((b, t, h, vd)), normal((b, h, kd, vd), jnp.float32))
  return diff, segment_ids, cotangents


def run(diff, segment_ids, cotangents, *, interpret, op=cl.simple_gla, scale=0.3):
  def forward_backward(diff, segment_ids, cotangents):
    def call(diff):
      return op(**diff, scale=scale, output_final_state=True, segment_ids=segment_ids,
                interpret=interpret)
    (o, state), vjp = jax.vjp(call, diff)
    return o, state, vjp(cotangents)[0]

  fn = forward_backward if interpret else jax.jit(forward_backward)
  return fn(diff, segment_ids, cotangents)


def check(case, rng, interpret, *, inputs=_inputs, op=cl.simple_gla,
          reference=oracle.simple_gla, tolerances=None):
  """``op`` on ``inputs(case, rng)`` against the oracle ``reference`` (same argument
  names); returns the relative errors. ``tolerances``: per-quantity bounds replacing the
  dtype's (each with its measured reason where it is given)."""
  diff, segment_ids, cotangents = inputs(case, rng)
  out, final, grads = run(diff, segment_ids, cotangents, interpret=interpret, op=op)
  ref = reference(**{n: to_f64(x) for n, x in diff.items()}, scale=0.3,
                  segment_ids=None if segment_ids is None else np.asarray(segment_ids),
                  dout=to_f64(cotangents[0]), dfinal=to_f64(cotangents[1]))
  assert out.dtype == case.dtype and out.shape == diff["v"].shape
  assert {n: g.dtype for n, g in grads.items()} == {n: x.dtype for n, x in diff.items()}
  errors = {"out": rel_err(to_f64(out), ref.out),
            "final_state": rel_err(to_f64(final), ref.final_state)}
  errors.update({f"d{n}": rel_err(to_f64(grads[n]), ref.grads[n]) for n in diff})
  bound = {n: TOLERANCE[case.dtype] for n in errors} | (tolerances or {})
  assert all(np.isfinite(v) and v <= bound[n] for n, v in errors.items()), f"{errors}"
  return errors


INTERPRETED_CASES = [
    # Two chunks, padding, two value blocks, documents (one start on the chunk edge).
    Case("T100_V128_docs_init", 100, value_dim=128, documents=True),
    # Gates of exactly -20: e^{G} underflows, the decay gradients are ~e^-20.
    Case("T70_g-20_exact", 70, strength=20.0, exact_gates=True),
]


@interpreted
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=str)
def test_interpreted_kernel_matches_oracle(case, rng):
  check(case, rng, interpret=True)


GPU_CASES = INTERPRETED_CASES + [
    Case("T1000_K128_V128_docs_init_on_gpu", 1000, key_dim=128, value_dim=128,
         documents=True, batch=2, heads=3),
    Case("T257_K128_V64_weak_on_gpu", 257, key_dim=128, strength=0.01, initial_state=False),
    Case("T130_g-10_f16_on_gpu", 130, strength=10.0, documents=True, dtype=jnp.float16,
         heads=2),
]


@gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernel_matches_oracle_on_gpu(case, rng):
  check(case, rng, interpret=False)


@pytest.mark.parametrize("change, message", [
    (dict(q=jnp.zeros((1, 8, 1, 64), jnp.float32)), "bfloat16 or all float16"),
    (dict(q=jnp.zeros((1, 8, 1, 32), jnp.bfloat16), k=jnp.zeros((1, 8, 1, 32), jnp.bfloat16)),
     "key head dim"),
    (dict(v=jnp.zeros((1, 8, 1, 96), jnp.bfloat16)), "value head dim must be one of"),
    (dict(g=jnp.zeros((1, 8, 2), jnp.float32)), "g must be"),
    (dict(chunk_size=32), "chunk_size must be 64"),
])
def test_arguments_are_checked(change, message):
  args = dict(q=jnp.ones((1, 8, 1, 64), jnp.bfloat16), k=jnp.ones((1, 8, 1, 64), jnp.bfloat16),
              v=jnp.ones((1, 8, 1, 64), jnp.bfloat16), g=jnp.zeros((1, 8, 1), jnp.float32))
  args.update(change)
  with pytest.raises(ValueError, match=message):
    cl.simple_gla(**args, scale=1.0)
