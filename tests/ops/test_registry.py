"""The registry and the dispatcher: names, tiers, automatic choice, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import masks

MECHANISM = "dot_product_attention"


def _inputs(rng, t=33, s=65):
  q = jnp.asarray(rng.standard_normal((2, t, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, s, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, s, 2, 16)), jnp.float32)
  return q, k, v


def test_softmax_attention_is_registered():
  names = ops.mechanisms()
  assert MECHANISM in names
  assert all(isinstance(n, str) for n in names)


def test_softmax_attention_tiers():
  tiers = ops.implementations(MECHANISM)
  assert {"reference", "xla", "cudnn"} <= set(tiers)
  assert len(set(tiers)) == len(tiers)


def test_unknown_mechanism_raises():
  with pytest.raises(ValueError, match="no_such_mechanism"):
    ops.implementations("no_such_mechanism")


@pytest.mark.parametrize("name", ["flash", "Reference", ""])
def test_unknown_tier_raises(name, rng):
  with pytest.raises(ValueError, match="implementation"):
    ops.dot_product_attention(*_inputs(rng), implementation=name)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on GPU")
def test_cudnn_off_gpu_raises(rng):
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(rng))
  with pytest.raises(ValueError, match="cudnn"):
    ops.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@pytest.mark.parametrize("kwargs", [
    {},
    {"is_causal": True},
    {"mask": masks.ChunkedCausal(16), "sinks": np.ones(4, np.float32)},
], ids=["plain", "causal", "chunked_sinks"])
def test_automatic_dispatch_runs_the_fastest_supporting_tier(kwargs, rng):
  """On CPU, ``implementation=None`` is the xla tier (never the reference)."""
  q, k, v = _inputs(rng)
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU choice")
  auto = jax.jit(lambda q, k, v: ops.dot_product_attention(q, k, v, **kwargs))(q, k, v)
  xla = jax.jit(lambda q, k, v: ops.dot_product_attention(
      q, k, v, implementation="xla", **kwargs))(q, k, v)
  np.testing.assert_array_equal(auto, xla)


def test_reference_ignores_block_sizes(rng):
  q, k, v = _inputs(rng)
  plain = ops.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
  blocked = ops.dot_product_attention(q, k, v, is_causal=True, implementation="reference",
                                      block_sizes=ops.BlockSizes(block_q=16, block_k=32))
  np.testing.assert_array_equal(plain, blocked)


def test_block_sizes_do_not_change_the_xla_result_beyond_rounding(rng):
  q, k, v = _inputs(rng)
  outs = [ops.dot_product_attention(q, k, v, is_causal=True, implementation="xla",
                                    block_sizes=ops.BlockSizes(block_q=bq, block_k=bk))
          for bq, bk in ((16, 32), (32, 16), (512, 512))]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-6)


def test_automatic_supports_only_gates_automatic_dispatch():
  from attnlab.ops import registry
  name = "_test_automatic_supports"
  registry.register(name, registry.Implementation("slow", lambda x: x + 1, priority=1))
  registry.register(name, registry.Implementation(
      "untrusted", lambda x: x + 2, priority=2,
      automatic_supports=lambda call: "not yet run on its hardware"))
  try:
    assert registry.select(name, None, 0).name == "slow"
    assert registry.select(name, "untrusted", 0).fn(0) == 2
  finally:
    registry._REGISTRY.pop(name)  # keep the registry as the library defines it


def test_pallas_tier_stays_out_of_automatic_dispatch_off_hopper_and_on_tpu():
  from attnlab.ops import softmax_pallas
  q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
  call, _ = ops.softmax.canonicalize(q, q, q)
  if jax.default_backend() == "gpu":
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    assert (softmax_pallas.pallas_automatic(call) is None) == capability.startswith("9")
  elif jax.default_backend() == "tpu":
    assert "interpret mode only" in softmax_pallas.pallas_automatic(call)
  else:
    assert "Pallas kernels run on GPU" in softmax_pallas.pallas_supports(call)
