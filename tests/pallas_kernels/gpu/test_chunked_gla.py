"""Mosaic GPU chunked GLA (``pallas_kernels/gpu/chunked_gla.py`` and ``gla_scores.py``).

As ``test_chunked_linear.py``: forward and backward against the float64 oracle
``tests/oracle_linear.py`` (the output, the final state and the gradients of q, k, v, the
per-channel gates and the initial state), at lengths that are not multiples of the chunk,
with packed documents, and with gates of exactly -20 per token on every channel (pairs
two tokens apart decay by e^-40: the scores' split factors would overflow without their
per-pair exponentials). Gates vary across channels, so a kernel that mixed channels up
fails. Each case names the scores' mode its gates select (one reference per chunk, per
16-token block, or pair by pair inside the blocks), and the test checks that it does.
Interpreted on CPU; ``*_on_gpu`` cases compiled on an H100.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import chunked_gla
from pallas_kernels.gpu import gla_scores
from tests import oracle_linear as oracle
from tests.pallas_kernels.gpu import test_chunked_linear as base

Case = base.Case


def _inputs(case, rng):
  diff, segment_ids, cotangents = base._inputs(case, rng)
  b, t, h = diff["g"].shape
  kd = case.key_dim
  gates = (np.full((b, t, h, kd), -case.strength) if case.exact_gates
           else -case.strength * rng.uniform(0.05, 1.0, (b, t, h, kd)))
  diff["g"] = jnp.asarray(gates, jnp.float32)
  return diff, segment_ids, cotangents


def check(case, rng, interpret):
  """The oracle comparison, after checking which of the scores' modes the gates select."""
  problem = _inputs(case, rng)
  padded = -(-case.length // chunked_gla.CHUNK) * chunked_gla.CHUNK
  g = jnp.pad(problem[0]["g"], ((0, 0), (0, padded - case.length), (0, 0), (0, 0)))
  assert int(gla_scores.mode(g, case.dtype)) == case.mode, case
  return base.check(case, rng, interpret, inputs=lambda *_: problem, op=chunked_gla.gla,
                    reference=oracle.gla)


@dataclasses.dataclass(frozen=True)
class GlaCase(Case):
  mode: int = gla_scores.PAIRS


W, B, P = gla_scores.WHOLE, gla_scores.BLOCKS, gla_scores.PAIRS
INTERPRETED_CASES = [
    # Weak gates: one reference per chunk (the WHOLE mode).
    GlaCase("T100_K128_docs_init_whole", 100, key_dim=128, documents=True, strength=0.1,
            mode=W),
    # -1.5 per token: chunks span more than the range, 16-token blocks do not.
    GlaCase("T100_V128_docs_blocks", 100, value_dim=128, documents=True, strength=1.5,
            mode=B),
    # Gates of exactly -20: the diagonal blocks pair by pair.
    GlaCase("T70_g-20_exact_pairs", 70, strength=20.0, exact_gates=True, mode=P),
]


@base.interpreted
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=str)
def test_interpreted_kernel_matches_oracle(case, rng):
  check(case, rng, interpret=True)


GPU_CASES = INTERPRETED_CASES + [
    GlaCase("T1000_K128_V128_docs_init_pairs_on_gpu", 1000, key_dim=128, value_dim=128,
            documents=True, batch=2, heads=3, strength=8.0, mode=P),
    GlaCase("T1000_K128_V128_init_whole_on_gpu", 1000, key_dim=128, value_dim=128, batch=2,
            heads=3, strength=0.05, mode=W),
    GlaCase("T257_K64_V128_weak_on_gpu", 257, value_dim=128, strength=0.01,
            initial_state=False, mode=W),
    GlaCase("T130_g-5_f16_on_gpu", 130, strength=5.0, documents=True, dtype=jnp.float16,
            heads=2, mode=P),
    GlaCase("T130_f16_blocks_on_gpu", 130, strength=0.15, dtype=jnp.float16, heads=2,
            mode=B),
]


@base.gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernel_matches_oracle_on_gpu(case, rng):
  check(case, rng, interpret=False)


def test_gate_shape_is_checked():
  x = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"g must be \[B, T, H, K\]"):
    chunked_gla.gla(x, x, x, jnp.zeros((1, 8, 1), jnp.float32), scale=1.0)
