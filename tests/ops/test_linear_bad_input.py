"""Bad arguments to the linear-attention ops raise ValueError naming the argument.

Each case is checked twice: on concrete arrays, and under ``jax.eval_shape`` on abstract
ones, so the error comes from the argument checks (shapes, dtypes, options) and not from
values or from deep inside a tier. The message must name the argument as a word and,
for a shape error, show the bad shape.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops

B, T, H, K, V = 2, 8, 2, 4, 6


def _f32(*shape):
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _log_gate(*shape):
  return -np.random.default_rng(1).uniform(0.5, 1.0, shape).astype(np.float32)


def _beta(*shape):
  return np.random.default_rng(2).uniform(0.1, 0.9, shape).astype(np.float32)


def _ids(*shape):
  return np.zeros(shape, np.int32)


GATES = {
    "linear_attn": {},
    "retention": {"g_gamma": _log_gate(H)},
    "simple_gla": {"g": _log_gate(B, T, H)},
    "gla": {"g": _log_gate(B, T, H, K)},
    "delta_rule": {"beta": _beta(B, T, H)},
    "gated_delta_rule": {"g": _log_gate(B, T, H), "beta": _beta(B, T, H)},
}
OPS = tuple(GATES)


def _args(op, **override):
  """A valid call's arguments (K != V), with some replaced."""
  args = dict(q=_f32(B, T, H, K), k=_f32(B, T, H, K), v=_f32(B, T, H, V), **GATES[op])
  args.update(override)
  return args


def _evidence(args, name):
  """What the message must show of the bad argument: its shape, or its dtype where the
  shape is right and the dtype is not; None for non-array options."""
  value = args[name]
  if not isinstance(value, (np.ndarray, jax.Array)):
    return None
  if np.issubdtype(value.dtype, np.integer) != (name == "segment_ids"):
    return str(value.dtype)
  return str(tuple(value.shape))


BAD = [
    # (id, op, arguments, the argument the message must name)
    ("q_rank_3", "simple_gla", _args("simple_gla", q=_f32(B, T, H * K)), "q"),
    ("k_key_dim", "linear_attn", _args("linear_attn", k=_f32(B, T, H, K + 1)), "k"),
    ("k_key_dim_gla", "gla", _args("gla", k=_f32(B, T, H, K + 1)), "k"),
    ("k_key_dim_delta", "delta_rule", _args("delta_rule", k=_f32(B, T, H, K + 1)), "k"),
    ("k_length", "retention", _args("retention", k=_f32(B, T + 1, H, K)), "k"),
    ("v_length", "gated_delta_rule", _args("gated_delta_rule", v=_f32(B, T + 1, H, V)),
     "v"),
    ("v_heads", "simple_gla", _args("simple_gla", v=_f32(B, T, H + 1, V)), "v"),
    ("v_integer", "linear_attn", _args("linear_attn", v=np.ones((B, T, H, V), np.int32)),
     "v"),
    # Gates of the wrong shape: another op's shape, a missing or extra axis, a wrong size.
    ("simple_gla_g_per_channel", "simple_gla",
     _args("simple_gla", g=_log_gate(B, T, H, K)), "g"),
    ("simple_gla_g_no_heads", "simple_gla", _args("simple_gla", g=_log_gate(B, T)), "g"),
    ("gla_g_per_head", "gla", _args("gla", g=_log_gate(B, T, H)), "g"),
    ("gla_g_value_dim", "gla", _args("gla", g=_log_gate(B, T, H, V)), "g"),
    ("gla_g_length", "gla", _args("gla", g=_log_gate(B, T - 1, H, K)), "g"),
    ("gla_g_integer", "gla", _args("gla", g=np.ones((B, T, H, K), np.int32)), "g"),
    ("retention_g_gamma_heads", "retention",
     _args("retention", g_gamma=_log_gate(H + 1)), "g_gamma"),
    ("retention_g_gamma_per_token", "retention",
     _args("retention", g_gamma=_log_gate(B, T, H)), "g_gamma"),
    ("delta_beta_trailing_axis", "delta_rule", _args("delta_rule", beta=_beta(B, T, H, 1)),
     "beta"),
    ("delta_beta_no_heads", "delta_rule", _args("delta_rule", beta=_beta(B, T)), "beta"),
    ("gated_delta_g_per_channel", "gated_delta_rule",
     _args("gated_delta_rule", g=_log_gate(B, T, H, K)), "g"),
    ("gated_delta_beta_length", "gated_delta_rule",
     _args("gated_delta_rule", beta=_beta(B, T + 1, H)), "beta"),
    ("gated_delta_beta_batch", "gated_delta_rule",
     _args("gated_delta_rule", beta=_beta(B + 1, T, H)), "beta"),
    # initial_state against q/k (K) and v (V).
    ("initial_state_key_dim", "simple_gla",
     _args("simple_gla", initial_state=_f32(B, H, K + 1, V)), "initial_state"),
    ("initial_state_value_dim", "gated_delta_rule",
     _args("gated_delta_rule", initial_state=_f32(B, H, K, V + 1)), "initial_state"),
    ("initial_state_transposed", "gla", _args("gla", initial_state=_f32(B, H, V, K)),
     "initial_state"),
    ("initial_state_batch", "delta_rule", _args("delta_rule", initial_state=_f32(1, H, K, V)),
     "initial_state"),
    ("initial_state_rank_3", "retention", _args("retention", initial_state=_f32(H, K, V)),
     "initial_state"),
    ("initial_state_normalize_without_z", "linear_attn",
     _args("linear_attn", normalize=True, initial_state=_f32(B, H, K, V)), "initial_state"),
    ("initial_state_z_without_normalize", "linear_attn",
     _args("linear_attn", initial_state=_f32(B, H, K, V + 1)), "initial_state"),
    # segment_ids.
    ("segment_ids_float", "simple_gla",
     _args("simple_gla", segment_ids=_ids(B, T).astype(np.float32)), "segment_ids"),
    ("segment_ids_float_delta", "delta_rule",
     _args("delta_rule", segment_ids=(_ids(B, T) + 0.5).astype(np.float32)), "segment_ids"),
    ("segment_ids_length", "gla", _args("gla", segment_ids=_ids(B, T + 1)), "segment_ids"),
    ("segment_ids_batch", "gated_delta_rule",
     _args("gated_delta_rule", segment_ids=_ids(B + 1, T)), "segment_ids"),
    ("segment_ids_unbatched", "linear_attn", _args("linear_attn", segment_ids=_ids(T)),
     "segment_ids"),
    ("segment_ids_per_head", "retention", _args("retention", segment_ids=_ids(B, T, H)),
     "segment_ids"),
    # chunk_size: a positive int, for every tier (the reference ignores its value only).
    ("chunk_size_zero", "simple_gla", _args("simple_gla", chunk_size=0), "chunk_size"),
    ("chunk_size_negative", "gla", _args("gla", chunk_size=-16), "chunk_size"),
    ("chunk_size_float", "gated_delta_rule", _args("gated_delta_rule", chunk_size=16.0),
     "chunk_size"),
    ("chunk_size_string", "linear_attn", _args("linear_attn", chunk_size="64"),
     "chunk_size"),
    ("chunk_size_none", "delta_rule", _args("delta_rule", chunk_size=None), "chunk_size"),
    # feature_map.
    ("feature_map_unknown", "linear_attn", _args("linear_attn", feature_map="softmax"),
     "feature_map"),
    ("feature_map_empty", "linear_attn", _args("linear_attn", feature_map=""),
     "feature_map"),
    ("feature_map_not_callable", "linear_attn", _args("linear_attn", feature_map=3),
     "feature_map"),
]


def _abstract(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _assert_names(message, argument, evidence):
  assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", message), (
      f"the message does not name {argument!r}: {message}")
  if evidence is not None:
    assert evidence in message, f"the message does not show {argument}'s {evidence}: {message}"


@pytest.mark.parametrize("implementation", [None, "reference", "xla"])
@pytest.mark.parametrize("op", OPS)
def test_valid_call_runs(op, implementation):
  """The base of every bad case is valid: abstract for every tier, concrete for the
  reference (the tiers' values are the suite's business)."""
  fn = getattr(ops, op)
  if implementation == "reference":
    out, final = fn(**_args(op), output_final_state=True, implementation=implementation)
    assert out.shape == (B, T, H, V) and final.shape == (B, H, K, V)
  out, final = jax.eval_shape(
      lambda a: fn(**a, output_final_state=True, implementation=implementation),
      jax.tree.map(_abstract, _args(op)))
  assert out.shape == (B, T, H, V) and final.shape == (B, H, K, V)


@pytest.mark.parametrize("implementation", [None, "reference", "xla"])
@pytest.mark.parametrize("name,op,args,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, op, args, argument, implementation):
  del name
  fn = getattr(ops, op)
  evidence = _evidence(args, argument)
  with pytest.raises(ValueError) as concrete:
    fn(**args, implementation=implementation)
  _assert_names(str(concrete.value), argument, evidence)
  arrays = {k: v for k, v in args.items() if isinstance(v, (np.ndarray, jax.Array))}
  others = {k: v for k, v in args.items() if k not in arrays}
  with pytest.raises(ValueError) as abstract:
    jax.eval_shape(lambda a: fn(**a, **others, implementation=implementation),
                   jax.tree.map(_abstract, arrays))
  _assert_names(str(abstract.value), argument, evidence)


# ------------------------------------------------------------------------------ steps


def _step_args(op, **override):
  """A valid decode step's arguments, with some replaced (``state`` by keyword)."""
  gates = {"linear_attn": {}, "retention": {"g_gamma": _log_gate(H)},
           "simple_gla": {"g_t": _log_gate(B, H)}, "gla": {"g_t": _log_gate(B, H, K)},
           "delta_rule": {"beta_t": _beta(B, H)},
           "gated_delta_rule": {"g_t": _log_gate(B, H), "beta_t": _beta(B, H)}}[op]
  args = dict(q_t=_f32(B, H, K), k_t=_f32(B, H, K), v_t=_f32(B, H, V), **gates,
              state=_f32(B, H, K, V))
  args.update(override)
  return args


def _call_step(op, args):
  """Positional per-token arguments (q_t, k_t, v_t, gates), the rest by keyword."""
  args = dict(args)
  positional = [args.pop(n) for n in ("q_t", "k_t", "v_t", "g_t", "beta_t") if n in args]
  return getattr(ops, f"{op}_step")(*positional, **args)


BAD_STEPS = [
    ("state_value_dim", "simple_gla", _step_args("simple_gla", state=_f32(B, H, K, V + 1)),
     "state"),
    ("state_key_dim", "gated_delta_rule",
     _step_args("gated_delta_rule", state=_f32(B, H, K + 1, V)), "state"),
    ("state_rank_3", "linear_attn", _step_args("linear_attn", state=_f32(H, K, V)), "state"),
    ("state_normalize_without_z", "linear_attn",
     _step_args("linear_attn", normalize=True), "state"),
    ("k_t_key_dim", "delta_rule", _step_args("delta_rule", k_t=_f32(B, H, K + 1)), "k_t"),
    ("q_t_with_time_axis", "gla", _step_args("gla", q_t=_f32(B, 1, H, K)), "q_t"),
    ("g_t_per_token_sequence", "simple_gla", _step_args("simple_gla", g_t=_log_gate(B, T, H)),
     "g_t"),
    ("g_t_per_head_for_gla", "gla", _step_args("gla", g_t=_log_gate(B, H)), "g_t"),
    ("beta_t_shape", "gated_delta_rule",
     _step_args("gated_delta_rule", beta_t=_beta(B, H, 1)), "beta_t"),
    ("g_gamma_heads", "retention", _step_args("retention", g_gamma=_log_gate(H + 1)),
     "g_gamma"),
    ("feature_map_unknown", "linear_attn", _step_args("linear_attn", feature_map="exp"),
     "feature_map"),
]


@pytest.mark.parametrize("op", OPS)
def test_valid_step_runs(op):
  o_t, state = _call_step(op, _step_args(op))
  assert o_t.shape == (B, H, V) and state.shape == (B, H, K, V)
  assert state.dtype == jnp.float32


@pytest.mark.parametrize("name,op,args,argument", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_step_input_raises_value_error(name, op, args, argument):
  del name
  with pytest.raises(ValueError) as error:
    _call_step(op, args)
  _assert_names(str(error.value), argument, _evidence(args, argument))
