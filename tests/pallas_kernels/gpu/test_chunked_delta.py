"""Mosaic GPU chunked delta rule and gated delta rule (``pallas_kernels/gpu/chunked_delta.py``).

As ``test_chunked_linear.py``: each case runs forward and backward and compares the
output, the final state and every gradient (q, k, v, beta, g, initial_state) with the
float64 oracle ``tests/oracle_linear.py`` on the inputs rounded to the kernel's dtype.
Keys are L2-normalized (DeltaNet's use) and ``beta`` in (0, 1); the loss is
``<o, dout> + <S_T, dfinal>``. Odd lengths, several chunks, two value blocks, packed
documents with starts inside chunks and on their edges, gates of exactly -20 per token.

On CPU the kernels run in the Mosaic GPU interpreter of jax 0.10.2, op by op; ``*_on_gpu``
cases run compiled under ``jit`` on an H100 and are skipped elsewhere, by name.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import chunked_delta as cd
from tests import oracle_linear as oracle
from tests.pallas_kernels.gpu.test_chunked_linear import Case, gpu_only, interpreted
from tests.pallas_kernels.gpu.test_chunked_linear import _inputs as _gla_inputs
from tests.pallas_kernels.gpu.test_chunked_linear import check as base_check


@dataclasses.dataclass(frozen=True)
class DeltaCase(Case):
  gated: bool = True
  wide_walk: bool | None = None   # the forward walk's layout (None: chosen by shape)
  read_n: bool | None = None      # the forward walk reads N or forms N S from P (by shape)
  final_dominates: bool = False   # see BETA_UNDER_STRONG_GATES


def _inputs(case: DeltaCase, rng):
  diff, segment_ids, cotangents = _gla_inputs(case, rng)
  for name in ("q", "k"):   # unit keys keep (I - beta k k^T) a contraction, as in DeltaNet
    x = np.asarray(diff[name], np.float32)
    diff[name] = jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), case.dtype)
  diff["beta"] = jnp.asarray(rng.uniform(0.1, 1.0, diff["g"].shape), jnp.float32)
  if not case.gated:
    del diff["g"]
  return diff, segment_ids, cotangents


# The state gradient crosses from the state-gradient walk to the gradient launch in the
# input dtype. Under gates of -20 per token beta's gradient is dominated by the final
# state's gradient at the last tokens, where it is a sum over values that cancels, so that
# rounding shows: measured 1.5e-2 relative (bfloat16) on the compiled g-20 case's inputs,
# 1.0e-3 with that handover in float32 (interpreter, same inputs). Bound for those cases:
BETA_UNDER_STRONG_GATES = 2e-2


def check(case, rng, interpret):
  def reference(q, k, v, g=None, beta=None, **options):
    return oracle.gated_delta_rule(q, k, v, g, beta, **options)

  saved = cd.WIDE_WALK, cd.READ_N
  cd.WIDE_WALK, cd.READ_N = case.wide_walk, case.read_n
  try:
    return base_check(case, rng, interpret, inputs=_inputs, reference=reference,
                      op=cd.gated_delta_rule if case.gated else cd.delta_rule,
                      tolerances={"dbeta": BETA_UNDER_STRONG_GATES}
                      if case.final_dominates else None)
  finally:
    cd.WIDE_WALK, cd.READ_N = saved


INTERPRETED_CASES = [
    # Two chunks, padding, two value blocks, documents (one start on the chunk edge); the
    # forward walk reads N (few CTAs).
    DeltaCase("T100_V128_docs_init", 100, value_dim=128, documents=True),
    # The same with both value blocks in one forward-walk CTA (two consumer warpgroups;
    # this layout always forms N S from P and the keys).
    DeltaCase("T100_V128_docs_init_wide", 100, value_dim=128, documents=True,
              wide_walk=True),
    # K = 128 != V; gates of exactly -20: e^{G} underflows, decay gradients are ~e^-20;
    # both ways of forming N S.
    DeltaCase("T70_K128_g-20_exact", 70, key_dim=128, strength=20.0, exact_gates=True,
              final_dominates=True),
    DeltaCase("T70_K128_g-20_exact_fromP", 70, key_dim=128, strength=20.0,
              exact_gates=True, read_n=False, final_dominates=True),
]


@interpreted
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=str)
def test_interpreted_kernel_matches_oracle(case, rng):
  check(case, rng, interpret=True)


GPU_CASES = INTERPRETED_CASES + [
    # The delta rule (no gate).
    DeltaCase("T70_K128_delta_on_gpu", 70, key_dim=128, gated=False),
    DeltaCase("T1000_K128_V128_docs_init_on_gpu", 1000, key_dim=128, value_dim=128,
              documents=True, batch=2, heads=3),
    DeltaCase("T1000_K128_V128_docs_init_fromP_on_gpu", 1000, key_dim=128, value_dim=128,
              documents=True, batch=2, heads=3, read_n=False),
    DeltaCase("T1000_K128_V128_docs_init_wide_on_gpu", 1000, key_dim=128, value_dim=128,
              documents=True, batch=2, heads=3, wide_walk=True),
    DeltaCase("T257_K128_V64_delta_on_gpu", 257, key_dim=128, gated=False,
              initial_state=False),
    DeltaCase("T257_K128_V64_delta_fromP_on_gpu", 257, key_dim=128, gated=False,
              initial_state=False, read_n=False),
    DeltaCase("T130_g-10_f16_on_gpu", 130, strength=10.0, documents=True, dtype=jnp.float16,
              heads=2),
]


@gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernel_matches_oracle_on_gpu(case, rng):
  check(case, rng, interpret=False)


def test_beta_is_checked():
  x = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="beta must be"):
    cd.delta_rule(x, x, x, jnp.ones((1, 8, 2), jnp.float32), scale=1.0)


@gpu_only
def test_repeated_calls_give_identical_gradients_on_gpu():
  """The walks and launches hand tiles between warpgroups, copies and products through
  shared memory; a missing wait shows as gradients that change from call to call. At the
  standard benchmark's T = 1024 shapes (B = 16, H = 16, K = V = 128: many CTAs per SM)
  the state-gradient walk once overwrote its state tile while the last step's copy of it
  was still being read (dk, dv and beta's gradient off by up to 5e-2 in 2 of 5 calls).
  Here: five calls, every gradient equal to the first call's, bit for bit."""
  import jax
  rng = np.random.default_rng(5)
  b, t, h, d = 16, 1024, 16, 128
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (jnp.asarray(unit(rng.standard_normal((b, t, h, d))), jnp.bfloat16) for _ in "qk")
  v, d_o = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for _ in "vo")
  beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), jnp.float32)

  def loss(q, k, v, beta):
    o, _ = cd.delta_rule(q, k, v, beta, scale=d ** -0.5)
    return jnp.sum(o.astype(jnp.float32) * d_o.astype(jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  first = [np.asarray(x) for x in grads(q, k, v, beta)]
  assert all(np.isfinite(x.astype(np.float32)).all() and np.abs(x).max() > 0 for x in first)
  for _ in range(4):
    for name, x, y in zip("qkvb", first, grads(q, k, v, beta)):
      np.testing.assert_array_equal(np.asarray(y), x, err_msg=f"d{name} changed between calls")
