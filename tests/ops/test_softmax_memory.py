"""The xla tier never builds a [T, S] matrix: compiled temporary memory of forward+backward.

At T = 16384, N = 16, H = 128 one float32 [T, T] matrix is 1.07 GB. The compiled
forward+backward of the xla tier must need under a tenth of that in temporaries. The
function returns o, dq, dk and dv, so every [B, T, N, H] array is an argument or a
result and what remains is what the algorithm itself allocates.
"""

import jax
import jax.numpy as jnp
import pytest

from attnlab import ops


def _forward_backward_temp_bytes(q_len, is_causal, **kwargs):
  spec = jax.ShapeDtypeStruct((1, q_len, 16, 128), jnp.float32)

  def forward_backward(q, k, v, do):
    o, vjp = jax.vjp(lambda q, k, v: ops.dot_product_attention(
        q, k, v, is_causal=is_causal, implementation="xla", **kwargs), q, k, v)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(spec, spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("is_causal", [True, False])
def test_temp_memory_under_a_tenth_of_one_score_matrix(is_causal):
  q_len = 16384
  temp = _forward_backward_temp_bytes(q_len, is_causal)
  one_matrix = q_len * q_len * 4
  assert temp < one_matrix / 10, (temp, one_matrix)


def test_temp_memory_grows_linearly_not_quadratically():
  small = _forward_backward_temp_bytes(8192, True)
  large = _forward_backward_temp_bytes(32768, True)
  # 4x the length: a [T, T] buffer would grow 16x; blocks and row statistics grow <= 4x.
  assert large <= 4.5 * small, (small, large)
