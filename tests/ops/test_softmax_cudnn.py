"""The cudnn tier against the float64 oracle, for exactly the calls it accepts.

GPU only: the tier delegates to cuDNN, which exists on NVIDIA GPUs alone. On other
backends the tests are skipped with that reason, and one test checks that naming the
tier raises instead of falling back. These are the tests behind the tier's place in
automatic dispatch (bfloat16 / float16, head dim <= 128, causal or no mask, padding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_softmax as oracle

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on NVIDIA GPUs only")


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on backends without cuDNN")
def test_cudnn_refused_off_gpu():
  q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="cudnn"):
    ops.dot_product_attention(q, q, q, implementation="cudnn")


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("q_len,num_heads,num_kv,head_dim,causal,padded", [
    (256, 4, 4, 128, True, False),
    (1024, 8, 2, 64, False, False),
    (512, 4, 1, 128, True, True),
])
def test_cudnn_matches_oracle(dtype, q_len, num_heads, num_kv, head_dim, causal, padded):
  rng = np.random.default_rng(q_len + num_kv)
  batch = 2
  q = rng.standard_normal((batch, q_len, num_heads, head_dim))
  k = rng.standard_normal((batch, q_len, num_kv, head_dim))
  v = rng.standard_normal((batch, q_len, num_kv, head_dim))
  do = rng.standard_normal((batch, q_len, num_heads, head_dim))
  q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
  kwargs = {"is_causal": causal}
  allowed = oracle.causal(q_len, q_len) if causal else None
  if padded:
    lengths = np.array([q_len, q_len // 2 + 3], np.int32)
    kwargs.update(query_seq_lengths=jnp.asarray(lengths),
                  key_value_seq_lengths=jnp.asarray(lengths))
    pad = oracle.padding(q_len, q_len, lengths, lengths)
    allowed = pad if allowed is None else allowed & pad

  def loss(q, k, v):
    o = ops.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  ref = oracle.attention(q, k, v, allowed=allowed, dout=do)
  rows = slice(None)
  if padded:  # cuDNN leaves padded query rows unspecified; compare the real rows only.
    rows = np.zeros((batch, q_len), bool)
    for b, n in enumerate(lengths):
      rows[b, :n] = True
  tol = 2e-2
  got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
  want = {"out": ref.out, "dq": ref.dq, "dk": ref.dk, "dv": ref.dv}
  for name in got:
    x, r = np.asarray(got[name], np.float64), want[name]
    if padded and name in ("out", "dq"):
      x, r = x[rows], r[rows]
    assert np.isfinite(x).all(), name
    assert _rel(x, r) < tol, (name, _rel(x, r))


@gpu_only
def test_automatic_dispatch_picks_cudnn_only_for_supported_calls():
  from attnlab.ops import registry, softmax
  q = jnp.ones((1, 128, 4, 64), jnp.bfloat16)
  call, _ = softmax.canonicalize(q, q, q, is_causal=True)
  assert registry.select(softmax.MECHANISM, None, call).name == "cudnn"
  call, _ = softmax.canonicalize(q, q, q, is_causal=True, logits_soft_cap=30.0)
  assert registry.select(softmax.MECHANISM, None, call).name == "xla"
  odd = jnp.ones((1, 257, 4, 64), jnp.bfloat16)
  call, _ = softmax.canonicalize(odd, odd, odd, is_causal=True)
  assert registry.select(softmax.MECHANISM, None, call).name == "xla"
