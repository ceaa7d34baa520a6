"""The pallas tier of ``dot_product_attention`` against the float64 oracle.

The GPU kernel (``pallas_kernels/gpu/flash_attention.py``) runs here two ways:

* on CPU through the Mosaic GPU interpreter (``interpret_kernels("gpu")``): the same
  block lists, TMA copies, barriers, warpgroups and masking code, with the interpreter's
  ``jnp.dot`` in place of ``wgmma`` (it takes no transposed operand), run op by op (not
  under ``jit``: the interpreter deadlocks on a jitted program holding several kernels).
  Interpretation is slow, so CI runs a handful of cases that between them use every
  feature;
* compiled on an H100 (``*_on_gpu`` tests, skipped elsewhere with that reason): every
  case of the shared softmax suite (``tests/ops/test_softmax.py``) whose features the
  kernel takes, at head dims 64 and 128, in bfloat16 and float16.

Each check compares the output and every gradient (q, k, v, sinks) with the oracle as a
relative error, at the bfloat16 tolerance of the shared suite. Calls the GPU kernel does not
take (float32, head dims other than 64 / 128) must raise a ValueError that says why, and
automatic dispatch must then pick another tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import masks, softmax, softmax_pallas
from pallas_kernels.gpu import _interpret
from pallas_kernels.gpu import flash_attention as gpu_kernel
from pallas_kernels.tpu import flash_attention as tpu_kernel
from tests.ops import test_softmax as suite

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled Mosaic GPU kernels need an H100")
interpreted = pytest.mark.skipif(not _interpret.available(),
                                 reason="this jax has no Mosaic GPU interpreter")

# The shared suite's features, combined so that a few interpreted cases cover them all
# (causal, window, documents, sinks, soft cap, MQA; padding with empty rows; a static Or
# mask, prefix, odd S, a scale; bias and mask arrays; ALiBi with GQA). Two heads where
# the case allows: the interpreter's time grows with the grid.
INTERPRETED_CASES = [
    suite.Case("window_docs_sinks_cap_T130", 130, 130,
               (suite.is_causal, suite.window((40, 0)), suite.segment_ids(), suite.sinks,
                suite.soft_cap(4.0)), batch=1, num_heads=2, num_kv=1),
    suite.Case("lengths_empty_rows_mqa_T63_S65", 63, 65, (suite.seq_lengths(zero=True),),
               batch=3, num_heads=2, num_kv=1),
    suite.Case("strided_prefix_or_T33_S200", 33, 200,
               (suite.mask(masks.StridedSparse(8) | masks.PrefixLM(70),
                           lambda t, s: suite.O.strided_sparse(t, s, 8)
                           | suite.O.prefix_lm(t, s, 70)), suite.scale(0.3)), batch=1,
               num_heads=2),
    # A bias array (streamed tiles, its gradient from the dS launch) and a boolean mask
    # array (a -inf bias) with a causal mask; ALiBi (in registers, the slope gradient)
    # with GQA and a soft cap.
    suite.Case("bias_bool_mask_causal_T65", 65, 65,
               (suite.bias_array("B1TS"), suite.bool_mask("B11S"), suite.is_causal),
               num_heads=2),
    suite.Case("alibi_gqa_cap_T33_S65", 33, 65, (suite.alibi, suite.soft_cap(5.0)),
               num_heads=2, num_kv=1),
]


def _as_kernel_case(case, head_dim):
  return dataclasses.replace(case, head_dim=head_dim)


def _supported(case, head_dim=64, dtype=jnp.bfloat16):
  """The pallas tier's verdict on a case (None = it runs it)."""
  problem = _as_kernel_case(case, head_dim).problem(np.random.default_rng(0), dtype)
  kwargs = dict(problem.diff, **problem.call_kwargs(), **problem.static)
  call, _ = softmax.canonicalize(**kwargs)
  with softmax_pallas.interpret_kernels("gpu"):
    return softmax_pallas.pallas_supports(call)


# float16 keeps 11 significant bits against bfloat16's 8: outputs and gradients rounded to
# it land near 1e-3 relative.
FLOAT16_TOLERANCE = {"out": 3e-3, "grad": 3e-3}


def check_case(case, rng, head_dim=64, dtype=jnp.bfloat16, block_sizes=None):
  problem = _as_kernel_case(case, head_dim).problem(rng, dtype)
  # Interpreted kernels run op by op: inside one jitted program that holds the forward
  # and the backward kernels, jax 0.10.2's Mosaic GPU interpreter deadlocks on CPU.
  out, grads = suite.run(problem, "pallas", block_sizes, jit=ON_GPU)
  expected, _ = problem.expected()
  tolerance = FLOAT16_TOLERANCE if dtype == jnp.float16 else None
  return suite.assert_matches(problem, out, grads, expected, tolerance)


# ------------------------------------------------------------------------ interpreted


@interpreted
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=str)
def test_interpreted_gpu_kernel_matches_oracle(case, rng):
  assert _supported(case) is None
  with softmax_pallas.interpret_kernels("gpu"):
    check_case(case, rng)


@interpreted
def test_interpreted_empty_blocks_are_never_used(rng):
  """Keys past the last query are EMPTY blocks under a causal mask: poisoned with NaN,
  they would turn every output NaN if the kernel multiplied them (0 * NaN = NaN)."""
  q_len, kv_len = 70, 400
  q = jnp.asarray(rng.standard_normal((1, q_len, 2, 64)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((1, kv_len, 1, 64)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((1, kv_len, 1, 64)), jnp.bfloat16)
  seen = gpu_kernel.BlockSizes().block_k  # the first key block holds every visible key
  k_bad = k.at[:, seen:].set(jnp.nan)
  v_bad = v.at[:, seen:].set(jnp.nan)
  with softmax_pallas.interpret_kernels("gpu"):
    out = ops.dot_product_attention(q, k_bad, v_bad, is_causal=True, implementation="pallas")
  ref = ops.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
  assert bool(jnp.all(jnp.isfinite(out)))
  assert suite.rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_empty_blocks_of_a_mask_array_are_never_used(backend, rng):
  """A boolean mask array reaches the kernels as a -inf bias, and its EMPTY blocks (from
  its block summary, on the device) are skipped: keys past 128, which it never allows,
  are NaN-poisoned and would turn the output and dq NaN if any pass loaded them."""
  if backend == "gpu" and ON_GPU:
    context = contextlib.nullcontext()  # the compiled kernel
  elif backend == "gpu" and not _interpret.available():
    pytest.skip("this jax has no Mosaic GPU interpreter")
  else:
    context = softmax_pallas.interpret_kernels(backend)
  q_len, kv_len = 70, 400
  q = jnp.asarray(rng.standard_normal((1, q_len, 2, 64)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((1, kv_len, 1, 64)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((1, kv_len, 1, 64)), jnp.bfloat16)
  allowed = rng.random((1, 1, q_len, kv_len)) < 0.5
  allowed[..., 100:] = False
  allowed[..., 0] = True
  mask = jnp.asarray(allowed)
  k_bad, v_bad = k.at[:, 128:].set(jnp.nan), v.at[:, 128:].set(jnp.nan)

  # 64-key blocks for the TPU kernel too (its default 512 would hold every key).
  sizes = tpu_kernel.BlockSizes(*(64,) * 6) if backend == "tpu" else None

  def loss(q, k, v, implementation):
    out = ops.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                    block_sizes=sizes if implementation == "pallas" else None)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  with context:
    (_, out), dq = jax.value_and_grad(loss, has_aux=True)(q, k_bad, v_bad, "pallas")
  (_, ref), dq_ref = jax.value_and_grad(loss, has_aux=True)(q, k, v, "reference")
  assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(dq)))
  assert suite.rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2
  assert suite.rel_err(dq.astype(jnp.float32), dq_ref.astype(jnp.float32)) < 1e-2


# ----------------------------------------------------------------- what it refuses


def test_float32_and_small_heads_are_refused_and_dispatch_falls_back(rng):
  q = jnp.asarray(rng.standard_normal((1, 16, 2, 64)), jnp.float32)
  with softmax_pallas.interpret_kernels("gpu"):
    with pytest.raises(ValueError, match="bfloat16 / float16"):
      ops.dot_product_attention(q, q, q, implementation="pallas")
    small = jnp.asarray(rng.standard_normal((1, 16, 2, 16)), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims"):
      ops.dot_product_attention(small, small, small, implementation="pallas")
    out = ops.dot_product_attention(q, q, q)  # automatic: the xla tier takes float32
  ref = ops.dot_product_attention(q, q, q, implementation="reference")
  assert suite.rel_err(out, ref) < 1e-5


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on backends without the kernels")
def test_pallas_refused_on_cpu_without_interpretation():
  q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="Pallas kernels run on GPU"):
    ops.dot_product_attention(q, q, q, implementation="pallas")


def test_gpu_kernel_checks_its_own_arguments(rng):
  q = jnp.asarray(rng.standard_normal((2, 16, 4, 64)), jnp.bfloat16)
  k = q[:, :, :2]
  ids = jnp.zeros((2, 16), jnp.int32)
  call = functools.partial(gpu_kernel.flash_attention, q, k, k, scale=0.1, interpret=True)
  with pytest.raises(ValueError, match="sinks must be float"):
    call(sinks=jnp.zeros((2,)))
  with pytest.raises(ValueError, match="kv_segment_ids must be int"):
    call(q_segment_ids=ids, kv_segment_ids=ids[:, :8])
  with pytest.raises(ValueError, match="bias must be"):
    call(bias=jnp.zeros((2, 4, 16, 8)))
  with pytest.raises(ValueError, match="alibi_slopes must be"):
    call(alibi_slopes=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="shared memory"):
    call(bias=jnp.zeros((2, 4, 16, 16)), block_sizes=gpu_kernel.BlockSizes(block_k=256))


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="block_k"):
    gpu_kernel.BlockSizes(block_k=96)
  with pytest.raises(ValueError, match="stages"):
    gpu_kernel.BlockSizes(stages=1)


# ----------------------------------------------------------------------- on the GPU

GPU_CASES = [c for c in suite.CASES if _supported(c) is None]


def test_the_gpu_case_list_covers_the_kernels_features():
  names = {c.name for c in GPU_CASES}
  for needed in ("causal_obj_T257", "sliding_window_T257", "fixed_sparse_16_1_T257",
                 "segment_ids_causal_T257", "seq_lengths_zero_T63_S65", "soft_cap_T65",
                 "sinks_causal_T63", "and_or_nested_T65", "plain_T257_mqa_H32"):
    assert needed in names
  assert len(GPU_CASES) >= 35, len(GPU_CASES)


@gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernel_head_dim_128_on_gpu(case, rng):
  # Head dim 64 runs through the whole shared suite below (TestPallasGpu).
  check_case(case, rng, 128)


@gpu_only
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=str)
def test_gpu_kernel_float16_on_gpu(case, rng):
  check_case(case, rng, 128, jnp.float16)


@gpu_only
@pytest.mark.parametrize("sizes", [
    gpu_kernel.BlockSizes(block_k=64), gpu_kernel.BlockSizes(stages_bwd=1),
    gpu_kernel.BlockSizes(stages=3, block_k=64, stages_bwd=3)], ids=str)
def test_gpu_kernel_block_sizes_on_gpu(sizes, rng):
  check_case(INTERPRETED_CASES[0], rng, 128, block_sizes=sizes)


# ------------------------------------------------------- the TPU kernel, whole suite


def _call(problem):
  kwargs = dict(problem.diff, **problem.call_kwargs(), **problem.static)
  return softmax.canonicalize(**kwargs)[0]


class TestPallasTpuInterpret(suite.SoftmaxSuite):
  """The shared softmax suite on the TPU kernel in (fast, classic) TPU interpret mode.

  Small blocks, none dividing 63, 65 or 257, so that every case spans several blocks of
  each kernel with ragged ends. Bias arrays, relative position bias and boolean mask
  arrays reach the kernel as one dense bias (``softmax_pallas._dense_bias``)."""

  implementation = "pallas"
  block_sizes = (tpu_kernel.BlockSizes(16, 32, 16, 32, 32, 16),
                 tpu_kernel.BlockSizes(32, 16, 32, 16, 16, 32),
                 tpu_kernel.BlockSizes(24, 40, 40, 24, 24, 40))
  # One extra size on the sweep cases (CI time): the smallest, so that every block is
  # ragged or partial; the defaults run in the kernel's own tests.
  sweep_block_sizes = (tpu_kernel.BlockSizes(8, 8, 8, 8, 8, 8),)

  @pytest.fixture(autouse=True)
  def _tpu_interpreter(self):
    with softmax_pallas.interpret_kernels("tpu"):
      yield

  def refusal(self, problem):
    return softmax_pallas.pallas_supports(_call(problem))


def test_tpu_kernel_refuses_float16_with_a_reason(rng):
  q = jnp.asarray(rng.standard_normal((1, 16, 2, 64)), jnp.float16)
  with softmax_pallas.interpret_kernels("tpu"):
    call, _ = softmax.canonicalize(q, q, q)
    assert "bfloat16 / float32" in softmax_pallas.pallas_supports(call)
    with pytest.raises(ValueError, match="cannot run"):
      ops.dot_product_attention(q, q, q, implementation="pallas")


class TestPallasGpu(suite.SoftmaxSuite):
  """The shared softmax suite on the compiled GPU kernel (H100 only): its "float32"
  checks run in bfloat16 (the kernel's wgmma operands) at head dim 64; cases with
  options the kernel refuses are skipped with its reason."""

  implementation = "pallas"
  dtype = jnp.bfloat16
  head_dim = 64
  block_sizes = (gpu_kernel.BlockSizes(), gpu_kernel.BlockSizes(block_k=64))
  sweep_block_sizes = (gpu_kernel.BlockSizes(stages_bwd=1),
                       gpu_kernel.BlockSizes(block_k=64, stages=3, stages_bwd=3))

  @pytest.fixture(autouse=True)
  def _on_gpu(self):
    if not ON_GPU:
      pytest.skip("compiled Mosaic GPU kernels need an H100")

  def refusal(self, problem):
    return softmax_pallas.pallas_supports(_call(problem))


def test_another_backends_block_sizes_are_refused(rng):
  q = jnp.asarray(rng.standard_normal((1, 16, 2, 64)), jnp.bfloat16)
  with softmax_pallas.interpret_kernels("tpu"):
    with pytest.raises(ValueError, match="another backend"):
      ops.dot_product_attention(q, q, q, implementation="pallas",
                                block_sizes=gpu_kernel.BlockSizes())
