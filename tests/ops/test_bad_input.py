"""Bad arguments raise ValueError naming the argument, before any computation.

Each case is checked twice: on concrete arrays, and under ``jax.eval_shape`` on abstract
ones, so the error comes from the argument checks and not from deep inside a tier.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import masks

B, T, S, N, K, H = 2, 8, 12, 4, 2, 16


def _f32(*shape):
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _args(**override):
  """A valid call's arguments (T != S, GQA), with some replaced."""
  args = dict(query=_f32(B, T, N, H), key=_f32(B, S, K, H), value=_f32(B, S, K, H))
  args.update(override)
  return args


def _ids(*shape):
  return np.zeros(shape, np.int32)


BAD = [
    # (id, arguments, the name the message must contain)
    ("query_rank_2", _args(query=_f32(T, N * H)), "query"),
    ("key_rank_3", _args(key=_f32(S, K, H)), "key"),
    ("value_rank_5", _args(value=_f32(1, B, S, K, H)), "value"),
    ("key_dtype", _args(key=_f32(B, S, K, H).astype(jnp.bfloat16)), "key"),
    ("value_dtype", _args(value=_f32(B, S, K, H).astype(np.float16)), "value"),
    ("query_integer", _args(query=np.ones((B, T, N, H), np.int32)), "query"),
    ("value_length", _args(value=_f32(B, S + 1, K, H)), "value"),
    ("value_head_dim", _args(value=_f32(B, S, K, H + 1)), "value"),
    ("heads_not_multiple", _args(key=_f32(B, S, 3, H), value=_f32(B, S, 3, H)), "key"),
    ("key_batch", _args(key=_f32(B + 1, S, K, H), value=_f32(B + 1, S, K, H)), "key"),
    ("key_head_dim", _args(key=_f32(B, S, K, 8), value=_f32(B, S, K, 8)), "key"),
    ("window_negative", _args(local_window_size=-1), "local_window_size"),
    ("window_pair_negative", _args(local_window_size=(2, -1)), "local_window_size"),
    ("window_triple", _args(local_window_size=(1, 2, 3)), "local_window_size"),
    ("window_float", _args(local_window_size=2.5), "local_window_size"),
    ("segment_ids_one_array_T_ne_S", _args(segment_ids=_ids(B, T)), "segment_ids"),
    ("segment_ids_query_shape", _args(segment_ids=(_ids(B, T + 1), _ids(B, S))),
     "segment_ids"),
    ("segment_ids_kv_shape", _args(segment_ids=(_ids(B, T), _ids(B, T))), "segment_ids"),
    ("segment_ids_batch", _args(segment_ids=(_ids(B + 1, T), _ids(B + 1, S))),
     "segment_ids"),
    ("segment_ids_float", _args(segment_ids=(_ids(B, T) + 0.5, _ids(B, S) + 0.5)),
     "segment_ids"),
    ("segment_ids_triple", _args(segment_ids=(_ids(B, T), _ids(B, S), _ids(B, S))),
     "segment_ids"),
    ("mask_not_broadcastable", _args(mask=np.ones((B, N, T, S + 1), bool)), "mask"),
    ("mask_batch", _args(mask=np.ones((B + 1, 1, T, S), bool)), "mask"),
    ("mask_heads", _args(mask=np.ones((1, K, T, S), bool)), "mask"),
    ("mask_rank_2", _args(mask=np.ones((T, S), bool)), "mask"),
    ("mask_float", _args(mask=np.ones((B, N, T, S), np.float32)), "mask"),
    ("mask_int", _args(mask=np.ones((B, N, T, S), np.int32)), "mask"),
    ("mask_object_wrong_shape", _args(mask=masks.ArrayMask(jnp.ones((B, N, T + 1, S), bool))),
     "mask"),
    ("bias_not_broadcastable", _args(bias=_f32(B, N, T, S + 1)), "bias"),
    ("bias_heads", _args(bias=_f32(1, K, T, S)), "bias"),
    ("bias_rank_2", _args(bias=_f32(T, S)), "bias"),
    ("bias_int", _args(bias=np.ones((B, N, T, S), np.int32)), "bias"),
    ("bias_alibi_wrong_heads", _args(bias=masks.Alibi(jnp.ones(N + 1))), "bias"),
    ("sinks_length", _args(sinks=_f32(N + 1)), "sinks"),
    ("sinks_kv_heads", _args(sinks=_f32(K)), "sinks"),
    ("sinks_rank_2", _args(sinks=_f32(1, N)), "sinks"),
    ("soft_cap_zero", _args(logits_soft_cap=0.0), "logits_soft_cap"),
    ("soft_cap_negative", _args(logits_soft_cap=-1.0), "logits_soft_cap"),
    ("soft_cap_nan", _args(logits_soft_cap=float("nan")), "logits_soft_cap"),
    ("query_lengths_shape", _args(query_seq_lengths=_ids(B + 1)), "query_seq_lengths"),
    ("query_lengths_rank", _args(query_seq_lengths=_ids(B, 1)), "query_seq_lengths"),
    ("query_lengths_float", _args(query_seq_lengths=np.ones(B, np.float32)),
     "query_seq_lengths"),
    ("kv_lengths_shape", _args(key_value_seq_lengths=_ids(B - 1)), "key_value_seq_lengths"),
    ("kv_lengths_float", _args(key_value_seq_lengths=np.ones(B, np.float32)),
     "key_value_seq_lengths"),
]


def _abstract(x):
  if isinstance(x, np.ndarray) or isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


@pytest.mark.parametrize("implementation", [None, "reference", "xla"])
def test_valid_call_runs(implementation):
  """The base of every bad case is valid, concrete and abstract."""
  out = ops.dot_product_attention(**_args(), implementation=implementation)
  assert out.shape == (B, T, N, H)
  shape = jax.eval_shape(lambda a: ops.dot_product_attention(
      **a, implementation=implementation), jax.tree.map(_abstract, _args()))
  assert shape.shape == (B, T, N, H)


@pytest.mark.parametrize("implementation", [None, "reference", "xla"])
@pytest.mark.parametrize("name,args,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, args, argument, implementation):
  match = re.escape(argument)
  with pytest.raises(ValueError, match=match):
    ops.dot_product_attention(**args, implementation=implementation)
  arrays = {k: v for k, v in args.items() if isinstance(v, (np.ndarray, jax.Array))}
  others = {k: v for k, v in args.items() if k not in arrays}
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda a: ops.dot_product_attention(
        **a, **others, implementation=implementation), jax.tree.map(_abstract, arrays))
