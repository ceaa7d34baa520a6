"""Softmax-family variants against the float64 oracle (``tests/oracle_softmax_variants.py``).

Sigmoid, ReLU, ReLA, softplus (LSSA / LSSAR) and Cog attention, both tiers, both forms:
the output and every gradient (q, k, v and ReLA's norm gain and gate) at odd lengths
(T = 13 causal, 21 non-causal) with packed documents and grouped queries (N = 4 query
heads over K = 2 key/value heads), in float32 and bfloat16, as the relative error
``||x - ref|| / ||ref||``; the xla tier with small blocks so that ragged and skipped blocks
occur; row 1 is right-padded (``lengths``). Then: decoding token by token == the causal
forward, strong scores and a row that sees nothing (zeros, finite gradients), linear
temporary memory of the blockwise tier, and every ValueError naming its argument. Aaren
(``aaren``): the same oracle checks, step == forward, a split run through
``initial_state`` == one run, and memory linear in T.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_softmax_variants as oracle

B, N, K, H, V = 2, 4, 2, 8, 6
BLOCKS = ops.BlockSizes(block_q=4, block_k=8)
EPS = 1e-6
POWER = 15.0  # LSSAR's re-weighting power in the paper's extrapolation results

# bfloat16 inputs are compared with the oracle on the bf16-rounded inputs; the ops compute
# in float32 and round the output and the input gradients to bf16 (2^-9 relative each).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Spec:
  """One op: attnlab function, oracle, extra differentiable inputs, static options of
  each side, and its decode step with the step's options."""

  name: str
  op: Callable
  oracle: Callable
  params: Callable[[np.random.Generator], dict]
  static: Callable[[int], dict]
  oracle_static: Callable[[int], dict]
  step: Callable
  step_static: Callable[[int, dict], dict]

  def __str__(self):
    return self.name


def _none(*args):
  del args
  return {}


def _rela_params(rng):
  return {"norm_scale": rng.uniform(0.5, 1.5, (N, V)), "norm_gate": rng.standard_normal((N, V))}


SPECS = [
    Spec("sigmoid", ops.sigmoid_attention, oracle.sigmoid_attention, _none, _none,
         lambda t: {"bias": -np.log(t)}, ops.sigmoid_attention_step,
         lambda t, p: {"bias": -float(np.log(t))}),
    Spec("relu", ops.relu_attention, oracle.relu_attention, _none, _none, _none,
         ops.relu_attention_step, _none),
    Spec("rela", ops.rela, oracle.rela, _rela_params, lambda t: {"eps": EPS},
         lambda t: {"eps": EPS}, ops.rela_step, lambda t, p: dict(p, eps=EPS)),
    Spec("lssar", ops.softplus_attention, oracle.softplus_attention, _none,
         lambda t: {"power": POWER}, lambda t: {"power": POWER},
         ops.softplus_attention_step, lambda t, p: {"power": POWER}),
    Spec("cog", ops.cog_attention, oracle.cog_attention, _none, _none, _none,
         ops.cog_attention_step, _none),
]
# LSSA (p = 1, the form the paper trains): the reference against the oracle, the xla
# tier through the decode test.
LSSA = Spec("lssa", ops.softplus_attention, oracle.softplus_attention, _none,
            lambda t: {"power": 1.0}, lambda t: {"power": 1.0}, ops.softplus_attention_step,
            lambda t, p: {"power": 1.0})


def _packed_ids(length):
  """Row 0: documents of 5, 1 and the rest; row 1: one document."""
  ids = np.zeros((B, length), np.int32)
  ids[0, 5:6], ids[0, 6:] = 1, 2
  return ids


def _inputs(rng, length, dtype, scale_qk=1.0):
  shapes = {"q": (B, length, N, H), "k": (B, length, K, H), "v": (B, length, K, V)}
  x = {n: rng.standard_normal(s) for n, s in shapes.items()}
  x["q"], x["k"] = x["q"] * scale_qk, x["k"] * scale_qk
  return {n: jnp.asarray(a, dtype) for n, a in x.items()}


@functools.lru_cache(maxsize=None)
def _compiled_vjp(spec, static):
  """One compiled forward + vjp per op and static options: tests that share them (the
  float32 non-causal oracle case and the strong-scores case) share the program."""
  static = dict(static)

  def run(diff, dout, segment_ids, lengths):
    out, vjp = jax.vjp(lambda d: spec.op(**d, segment_ids=segment_ids, lengths=lengths,
                                         **static), diff)
    return out, vjp(dout.astype(out.dtype))[0]

  return jax.jit(run)


def _vjp(spec, diff, dout, segment_ids, lengths, **static):
  return _compiled_vjp(spec, tuple(sorted(static.items())))(diff, dout, segment_ids, lengths)


def _check_against_oracle(spec, dtype, tier, causal, rng):
  """Packed documents in row 0, right padding (4 keys) in row 1."""
  length = 13 if causal else 21
  diff = _inputs(rng, length, dtype)
  diff.update({n: jnp.asarray(a, jnp.float32) for n, a in spec.params(rng).items()})
  dout = jnp.asarray(rng.standard_normal((B, length, N, V)), jnp.float32)
  ids, lengths = _packed_ids(length), np.array([length, length - 4])
  out, got = _vjp(spec, diff, dout, jnp.asarray(ids), jnp.asarray(lengths), causal=causal,
                  implementation=tier, block_sizes=BLOCKS, **spec.static(length))
  want_out, want = oracle.grads(
      spec.oracle, {n: np.asarray(x.astype(jnp.float32)) for n, x in diff.items()},
      np.asarray(dout), m=oracle.mask(length, causal, ids, B, lengths), scale=H ** -0.5,
      **spec.oracle_static(length))
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want_out)}
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in diff})
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
  assert not bad, (bad, errors)


# The reference and the xla tier in float32 in both forms; bfloat16 on the xla tier in
# the causal form (the reference computes in float32 from its first line, so its bf16 case
# would repeat the f32 one after one rounding).
CASES = [(jnp.float32, "reference", True), (jnp.float32, "reference", False),
         (jnp.float32, "xla", True), (jnp.float32, "xla", False), (jnp.bfloat16, "xla", True)]
# relu_attention's xla path is rela's before the norm, which runs every case: relu runs
# its reference in both forms and its xla tier in float32, causal.
SPEC_CASES = ([(spec, case) for spec in SPECS if spec.name != "relu" for case in CASES]
              + [(SPECS[1], case) for case in CASES[:3]])


@pytest.mark.parametrize("spec, case", SPEC_CASES, ids=[
    f"{spec}-{jnp.dtype(d).name}-{t}-{'causal' if c else 'non_causal'}"
    for spec, (d, t, c) in SPEC_CASES])
def test_matches_oracle_forward_and_gradients(spec, case, rng):
  _check_against_oracle(spec, *case, rng)


def test_lssa_matches_oracle(rng):
  """LSSA (p = 1, the form the paper trains) on the reference tier; the xla tier runs the
  same code with p as a constant (checked at p = 15 above, at p = 1 by the decode test)."""
  _check_against_oracle(LSSA, jnp.float32, "reference", True, rng)


@pytest.mark.parametrize("spec", SPECS + [LSSA], ids=str)
def test_decode_steps_equal_causal_forward(spec, rng):
  """Token-by-token decoding from an empty cache reproduces the causal forward."""
  length = 13
  x = _inputs(rng, length, jnp.float32)
  params = {n: jnp.asarray(a, jnp.float32) for n, a in spec.params(rng).items()}
  full = spec.op(**x, **params, causal=True, implementation="xla", **spec.static(length))
  cache = ops.variant_attention_cache(B, 16, K, H, V)
  step = jax.jit(lambda q, k, v, cache, pos: spec.step(
      q, k, v, cache, pos, **spec.step_static(length, params)))
  for t in range(length):
    o_t, cache = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], cache,
                      jnp.full((B,), t, jnp.int32))
    assert rel_err(o_t, full[:, t]) < 1e-5, t


# relu_attention is rela's core and is covered by it.
@pytest.mark.parametrize("spec", [s for s in SPECS if s.name != "relu"], ids=str)
def test_strong_scores_and_a_row_that_sees_nothing(spec, rng):
  """The float32 non-causal xla program of the oracle test, with q and k scaled by 6
  (scores in the tens) and ``lengths = [T, 0]``: everything is finite, and the row that
  sees no key gives zeros and zero gradients."""
  length = 21
  x = _inputs(rng, length, jnp.float32, scale_qk=6.0)
  x.update({n: jnp.asarray(a, jnp.float32) for n, a in spec.params(rng).items()})
  dout = jnp.asarray(rng.standard_normal((B, length, N, V)), jnp.float32)
  out, grads = _vjp(spec, x, dout, jnp.zeros((B, length), jnp.int32),
                    jnp.array([length, 0]), causal=False, implementation="xla",
                    block_sizes=BLOCKS, **spec.static(length))
  assert np.all(np.isfinite(np.asarray(out)))
  assert np.all(np.asarray(out[1]) == 0.0)
  for name, g in grads.items():
    assert np.all(np.isfinite(np.asarray(g))), name
  for name in ("q", "k", "v"):
    assert np.all(np.asarray(grads[name][1]) == 0.0), name


def _forward_backward_temp_bytes(fn, shapes):
  specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

  def forward_backward(*args):
    *inputs, do = args
    o, vjp = jax.vjp(fn, *inputs)
    return (o,) + vjp(do)

  compiled = jax.jit(forward_backward).lower(*specs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_temp_memory_is_linear_in_length():
  """Cog attention's xla tier (the normalized path; the unnormalized one keeps fewer
  statistics): 4x the length needs at most ~4.5x the temporaries, far below a [T, T]
  score matrix."""
  def temp(length):
    q = (1, length, 1, 32)
    return _forward_backward_temp_bytes(
        lambda q, k, v: ops.cog_attention(q, k, v, causal=True, implementation="xla"),
        [q, q, q, q])
  small, large = temp(2048), temp(8192)
  assert large <= 4.5 * small, (small, large)
  assert large < 8192 * 8192 * 4 / 10, large


# ------------------------------------------------------------------------ bad input

_Q = jnp.ones((1, 5, 2, 4))
_KV = jnp.ones((1, 5, 1, 4))
_T = (jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4)), jnp.ones((1, 1, 4)))
_CACHE = ops.variant_attention_cache(1, 8, 1, 4)
_POS = jnp.zeros((1,), jnp.int32)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.cog_attention(_Q[0], _KV, _KV), "q must be"),
    (lambda: ops.cog_attention(_Q, _KV[:, :4], _KV), r"k must be \[B, T, K, H\]"),
    (lambda: ops.cog_attention(_Q, _KV, _KV[:, :4]), "v must be"),
    (lambda: ops.cog_attention(_Q, jnp.ones((1, 5, 3, 4)), jnp.ones((1, 5, 3, 4))),
     "multiple of the key/value heads"),
    (lambda: ops.cog_attention(_Q, _KV.astype(jnp.bfloat16), _KV), "share a dtype"),
    (lambda: ops.cog_attention(_Q.astype(jnp.int32), _KV, _KV), "q must be floating"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, causal=1), "causal must be a bool"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, scale=-1.0), "scale must be a positive"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, segment_ids=jnp.zeros((1, 4), jnp.int32)),
     "segment_ids must have shape"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, segment_ids=jnp.zeros((1, 5))),
     "segment_ids must be integers"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, lengths=jnp.array([5, 5])),
     "lengths must have shape"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, block_sizes=(4, 4)), "block_sizes must be"),
    (lambda: ops.cog_attention(_Q, _KV, _KV, implementation="pallas"),
     "implementation='pallas' is not a tier"),
    (lambda: ops.sigmoid_attention(_Q, _KV, _KV, bias=float("nan")), "bias must be"),
    (lambda: ops.softplus_attention(_Q, _KV, _KV, power=0.5), "power must be >= 1"),
    (lambda: ops.softplus_attention(_Q[..., :1], _KV[..., :1], _KV),
     "needs head dim H >= 2"),
    (lambda: ops.rela(_Q, _KV, _KV, jnp.ones((2, 3))), r"norm_scale must be \[N, Hv\]"),
    (lambda: ops.rela(_Q, _KV, _KV, jnp.ones((2, 4)), jnp.ones((2, 4), jnp.int32)),
     "norm_gate must be floating"),
    (lambda: ops.rela(_Q, _KV, _KV, jnp.ones((2, 4)), eps=0.0), "eps must be a positive"),
    (lambda: ops.cog_attention_step(_Q[:, 0, 0], *_T[1:], _CACHE, _POS), "q_t must be"),
    (lambda: ops.cog_attention_step(*_T, {"k": _CACHE["k"]}, _POS), "cache must be"),
    (lambda: ops.cog_attention_step(*_T, ops.variant_attention_cache(1, 8, 1, 3), _POS),
     "cache must be"),
    (lambda: ops.cog_attention_step(*_T, _CACHE, jnp.zeros((2,), jnp.int32)),
     "positions must have shape"),
    (lambda: ops.rela_step(*_T, _CACHE, _POS, jnp.ones((1, 4))), "norm_scale must be"),
    (lambda: ops.aaren(_Q[:, 0, :1], _Q, _Q), r"q must be \[B, H, K\] with k's"),
    (lambda: ops.aaren(_Q[:, 0], _Q[0], _Q), "k must be"),
    (lambda: ops.aaren(_Q[:, 0], _Q, _Q[:, :4]), "v must be"),
    (lambda: ops.aaren(_Q[:, 0], _Q, _Q, initial_state=jnp.zeros((1, 2, 4))),
     r"initial_state must have shape \[B, H, V \+ 2\]"),
    (lambda: ops.aaren(_Q[:, 0], _Q, _Q, lengths=jnp.ones((1,))), "lengths must be integers"),
    (lambda: ops.aaren(_Q[:, 0], _Q, _Q, output_final_state=1), "output_final_state"),
    (lambda: ops.aaren_step(_Q[:, 0], _Q[:, 0], _Q[:, 0], jnp.zeros((1, 2, 5))),
     r"state must have shape"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --------------------------------------------------------------------------- Aaren

AH, AK, AV = 2, 8, 6


def _aaren_inputs(rng, length, dtype):
  return {"q": jnp.asarray(rng.standard_normal((B, AH, AK)), dtype),
          "k": jnp.asarray(rng.standard_normal((B, length, AH, AK)), dtype),
          "v": jnp.asarray(rng.standard_normal((B, length, AH, AV)), dtype)}


AAREN_CASES = [(jnp.float32, "reference"), (jnp.float32, "xla"), (jnp.bfloat16, "xla")]


@pytest.mark.parametrize("dtype, tier", AAREN_CASES,
                         ids=[f"{jnp.dtype(d).name}-{t}" for d, t in AAREN_CASES])
def test_aaren_matches_oracle_forward_and_gradients(dtype, tier, rng):
  length = 13
  diff = _aaren_inputs(rng, length, dtype)
  dout = jnp.asarray(rng.standard_normal((B, length, AH, AV)), jnp.float32)
  ids = _packed_ids(length)

  def run(diff, dout):
    out, vjp = jax.vjp(lambda d: ops.aaren(**d, segment_ids=jnp.asarray(ids),
                                           implementation=tier)[0], diff)
    return out, vjp(dout.astype(out.dtype))[0]

  out, got = jax.jit(run)(diff, dout)
  want_out, want = oracle.grads(
      oracle.aaren, {n: np.asarray(x.astype(jnp.float32)) for n, x in diff.items()},
      np.asarray(dout), m=oracle.mask(length, True, ids, B), scale=AK ** -0.5)
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want_out)}
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in diff})
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
  assert not bad, (bad, errors)


def test_aaren_steps_and_split_runs_equal_one_run(rng):
  """Token-by-token steps from the empty (zeros) state reproduce the forward; a run split
  in two through ``initial_state`` reproduces one run in both tiers, also with padding
  (``lengths``) in the first part, whose padded keys must not reach the state."""
  length, split = 13, 6
  x = _aaren_inputs(rng, length, jnp.float32)
  full, _ = ops.aaren(**x, implementation="reference")
  state = jnp.zeros((B, AH, AV + 2), jnp.float32)
  step = jax.jit(ops.aaren_step)
  for t in range(length):
    o_t, state = step(x["q"], x["k"][:, t], x["v"][:, t], state)
    assert rel_err(o_t, full[:, t]) < 1e-5, t
  first = {"q": x["q"], "k": x["k"][:, :split + 2],
           "v": x["v"][:, :split + 2].at[:, split:].multiply(7.0)}
  rest = {"q": x["q"], "k": x["k"][:, split:], "v": x["v"][:, split:]}
  for tier in ("reference", "xla"):
    _, mid = ops.aaren(**first, lengths=jnp.array([split, split]), output_final_state=True,
                       implementation=tier)
    second, _ = ops.aaren(**rest, initial_state=mid, implementation=tier)
    assert rel_err(second, full[:, split:]) < 1e-5, tier
    # A row that sees no key: zeros, and the empty (zeros) state.
    o, empty = ops.aaren(**first, lengths=jnp.array([0, split]), output_final_state=True,
                         implementation=tier)
    assert np.all(np.asarray(o[0]) == 0.0) and np.all(np.asarray(empty[0]) == 0.0), tier


def test_aaren_temp_memory_is_linear_in_length():
  """The associative scan's forward + backward: 4x the length needs at most ~4.5x the
  temporaries, far below one [T, T] matrix."""
  def temp(length):
    return _forward_backward_temp_bytes(
        lambda q, k, v: ops.aaren(q, k, v, implementation="xla")[0],
        [(1, 1, 8), (1, length, 1, 8), (1, length, 1, 8), (1, length, 1, 8)])
  small, large = temp(256), temp(1024)
  assert large <= 4.5 * small, (small, large)
  assert large < 1024 * 1024 * 4 / 10, large
