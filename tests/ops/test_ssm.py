"""Diagonal recurrences (Mamba's selective scan, Griffin's RG-LRU, Mega's EMA) against the
float64 oracle (``tests/oracle_ssm.py``).

Every op, both tiers, each form: the output, the final state and the gradient of every
input (the sequences, the parameters and the initial state) at odd lengths (T = 13
causal, 21 non-causal; chunks of 8) with packed documents, in float32 and bfloat16, as the
relative error ``||x - ref|| / ||ref||``. Then: decoding token by token == the causal
forward, a split run through ``initial_state`` == one run, right padding ignored, no NaN
from closed or saturated gates, the xla tier's compiled memory linear in T (and below one expanded
``[T, D, N]`` state), and every ValueError naming its argument.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_ssm as oracle

B, D, N = 2, 8, 4
CHUNK = 8

# bfloat16 sequences are compared with the oracle on the bf16-rounded inputs; the ops
# compute in float32 and round the output and the sequence gradients to bf16 (2^-9 each).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Case:
  """One op and form: how to draw its sequences (cast to the test dtype) and parameters
  (float32), its oracle, its decode step and its state shape (per batch row)."""

  name: str
  op: Callable
  oracle: Callable
  sequences: Callable  # (rng, length) -> {name: array}
  params: Callable     # rng -> {name: array}
  causal: bool
  step: Callable | None
  state: tuple

  def __str__(self):
    return self.name


def _normal(rng, *shape):
  return rng.standard_normal(shape)


def _mamba_seq(groups):
  def draw(rng, length):
    bc = (B, length, N) if groups is None else (B, length, groups, N)
    return {"x": _normal(rng, B, length, D), "delta": rng.uniform(0.05, 1.0, (B, length, D)),
            "B": _normal(rng, *bc), "C": _normal(rng, *bc)}
  return draw


def _mamba_params(rng):
  return {"A": -rng.uniform(0.5, 2.0, (D, N)), "D": _normal(rng, D)}


def _rg_lru_seq(rng, length):
  return {"x": _normal(rng, B, length, D), "gate_r": rng.uniform(0.05, 0.95, (B, length, D)),
          "gate_i": rng.uniform(0.05, 0.95, (B, length, D))}


def _ema_params(lead):
  def draw(rng):
    shape = lead + (D, N)
    return {"alpha": rng.uniform(0.1, 0.9, shape), "delta": rng.uniform(0.1, 0.9, shape),
            "beta": _normal(rng, *shape), "eta": _normal(rng, *shape)}
  return draw


def _x_only(rng, length):
  return {"x": _normal(rng, B, length, D)}


def _mamba_oracle(x, delta, A, B, C, D, initial_state, *, segment_ids):
  as_groups = lambda a: a[:, :, None] if a.ndim == 3 else a
  return oracle.mamba(x, delta, A, as_groups(B), as_groups(C), D, initial_state,
                      segment_ids=segment_ids)


CASES = [
    Case("selective_scan", ops.selective_scan, _mamba_oracle, _mamba_seq(None),
         _mamba_params, True, ops.selective_scan_step, (D, N)),
    Case("selective_scan_2_groups", ops.selective_scan, _mamba_oracle, _mamba_seq(2),
         _mamba_params, True, ops.selective_scan_step, (D, N)),
    Case("rg_lru", ops.rg_lru, oracle.rg_lru, _rg_lru_seq,
         lambda rng: {"lam": rng.uniform(0.0, 4.0, D)}, True, ops.rg_lru_step, (D,)),
    Case("mega_ema", ops.mega_ema, oracle.mega_ema, _x_only, _ema_params(()), True,
         ops.mega_ema_step, (D, N)),
    Case("mega_ema_bidirectional", ops.mega_ema, oracle.mega_ema_bidirectional, _x_only,
         _ema_params((2,)), False, None, ()),
]
CAUSAL = [c for c in CASES if c.causal]


def _packed_ids(length):
  """Row 0: documents of 5, 1 and the rest; row 1: one document."""
  ids = np.zeros((B, length), np.int32)
  ids[0, 5:6], ids[0, 6:] = 1, 2
  return ids


def _draw(case, rng, length, dtype):
  seq = {n: jnp.asarray(a, dtype) for n, a in case.sequences(rng, length).items()}
  params = {n: jnp.asarray(a, jnp.float32) for n, a in case.params(rng).items()}
  if case.causal:
    params["initial_state"] = jnp.asarray(_normal(rng, B, *case.state), jnp.float32)
  return seq, params


DTYPE_TIER = [(jnp.float32, "reference"), (jnp.float32, "xla"), (jnp.bfloat16, "xla")]


@pytest.mark.parametrize("dtype, tier", DTYPE_TIER,
                         ids=[f"{jnp.dtype(d).name}-{t}" for d, t in DTYPE_TIER])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle_forward_and_gradients(case, dtype, tier, rng):
  length = 13 if case.causal else 21
  seq, params = _draw(case, rng, length, dtype)
  diff = {**seq, **params}
  ids = _packed_ids(length)
  extra = {} if case.causal else {"causal": False}

  def forward(d):
    y, final = case.op(**d, segment_ids=jnp.asarray(ids), chunk_size=CHUNK,
                       output_final_state=case.causal, implementation=tier, **extra)
    return (y, final) if case.causal else y

  @jax.jit  # one compilation instead of one per primitive of the scans
  def out_and_grads(diff, dout):
    out, vjp = jax.vjp(forward, diff)
    return out, vjp(dout)[0]

  # The cotangent of y in y's dtype; the oracle sees the same (rounded) values.
  dy = jnp.asarray(_normal(rng, B, length, D), dtype)
  dout = (dy, jnp.asarray(_normal(rng, B, *case.state), jnp.float32)) if case.causal else dy
  out, got = out_and_grads(diff, dout)
  want_out, want = oracle.grads(
      case.oracle, {n: np.asarray(a.astype(jnp.float32)) for n, a in diff.items()},
      jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)), dout), segment_ids=ids)
  y = out[0] if case.causal else out
  assert y.dtype == dtype
  errors = {"y": rel_err(y, want_out[0] if case.causal else want_out)}
  if case.causal:
    errors["final_state"] = rel_err(out[1], want_out[1])
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in diff})
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
  assert not bad, (bad, errors)


def _step_args(case, seq, params, t):
  """The decode step's positional arguments at token t."""
  token = [seq[n][:, t] for n in seq]
  if case.op is ops.selective_scan:
    x_t, delta_t, b_t, c_t = token
    return (x_t, delta_t, params["A"], b_t, c_t, params["D"])
  if case.op is ops.rg_lru:
    return tuple(token) + (params["lam"],)
  return tuple(token) + tuple(params[n] for n in ("alpha", "delta", "beta", "eta"))


@pytest.mark.parametrize("case", CAUSAL, ids=str)
def test_decode_steps_equal_causal_forward(case, rng):
  """Token-by-token decoding from the initial state reproduces the causal forward and
  its final state; the forward split in two through ``initial_state`` reproduces one run
  (both tiers)."""
  length, split = 13, 6
  seq, params = _draw(case, rng, length, jnp.float32)
  h0 = params.pop("initial_state")
  full, final = case.op(**seq, **params, initial_state=h0, output_final_state=True,
                        chunk_size=CHUNK)
  state = h0
  step = jax.jit(case.step)
  for t in range(length):
    y_t, state = step(*_step_args(case, seq, params, t), state)
    assert rel_err(y_t, full[:, t]) < 1e-5, t
  assert rel_err(state, final) < 1e-5
  for tier in ("reference", "xla"):
    run = jax.jit(lambda s, h: case.op(**s, **params, initial_state=h,
                                       output_final_state=True, chunk_size=CHUNK,
                                       implementation=tier))
    _, mid = run({n: a[:, :split] for n, a in seq.items()}, h0)
    second, last = run({n: a[:, split:] for n, a in seq.items()}, mid)
    assert rel_err(second, full[:, split:]) < 1e-5, tier
    assert rel_err(last, final) < 1e-5, tier


@pytest.mark.parametrize("case", CASES, ids=str)
def test_right_padding_is_ignored(case, rng):
  """With ``lengths`` the valid outputs (and the causal final state) equal the run on the
  unpadded rows, in both tiers; the padded tokens hold large values that would show."""
  length, valid = 13, 9
  seq, params = _draw(case, rng, length, jnp.float32)
  seq = {n: a.at[0, valid:].multiply(5.0) for n, a in seq.items()}
  extra = {"output_final_state": True} if case.causal else {"causal": False}
  for tier in ("reference", "xla"):
    run = jax.jit(lambda s, lengths: case.op(**s, **params, lengths=lengths, chunk_size=CHUNK,
                                              implementation=tier, **extra))
    padded, padded_state = run(seq, jnp.array([valid, length]))
    alone, alone_state = run({n: a[:, :valid] for n, a in seq.items()}, None)
    assert rel_err(padded[0, :valid], alone[0]) < 1e-5, tier
    if case.causal:
      assert rel_err(padded_state[0], alone_state[0]) < 1e-5, tier


@pytest.mark.parametrize("tier", ["reference", "xla"])
def test_closed_and_saturated_gates_stay_finite(tier, rng):
  """RG-LRU with r_t = 0 (a_t = 1, no input: the state passes unchanged), r_t = 1 with
  a -> 1 (sqrt(1 - a_t^2) -> 0) and a -> 0; Mamba with exp(delta A) underflowing to 0 and
  delta = 0: outputs and every gradient are finite, and a closed gate holds the state."""
  length = 9
  x = jnp.asarray(_normal(rng, B, length, D), jnp.float32)
  r = jnp.asarray(rng.uniform(0.1, 0.9, (B, length, D)), jnp.float32)
  r = r.at[:, 4].set(0.0).at[:, 6].set(1.0)
  lam = jnp.asarray(np.r_[[30.0, 20.0], [-30.0, -20.0], rng.uniform(-2, 2, D - 4)],
                    jnp.float32)
  i = jnp.asarray(rng.uniform(0.1, 0.9, (B, length, D)), jnp.float32)

  def lru(x, r, i, lam):
    y, _ = ops.rg_lru(x, r, i, lam, chunk_size=4, implementation=tier)
    return jnp.sum(y ** 2), y

  grads, y = jax.jit(jax.grad(lru, argnums=(0, 1, 2, 3), has_aux=True))(x, r, i, lam)
  assert np.array_equal(np.asarray(y[:, 4]), np.asarray(y[:, 3]))  # closed gate: h held
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert np.all(np.isfinite(np.asarray(y)))

  delta = jnp.asarray(rng.uniform(0.1, 1.0, (B, length, D)), jnp.float32)
  delta = delta.at[:, 2].set(1e4).at[:, 5].set(0.0)
  a_mat = -jnp.asarray(rng.uniform(0.5, 2.0, (D, N)), jnp.float32)
  bc = jnp.asarray(_normal(rng, B, length, N), jnp.float32)

  def mamba(x, delta, a_mat, bc):
    y, _ = ops.selective_scan(x, delta, a_mat, bc, bc, None, chunk_size=4,
                              implementation=tier)
    return jnp.sum(y ** 2)

  grads = jax.jit(jax.grad(mamba, argnums=(0, 1, 2, 3)))(x, delta, a_mat, bc)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _forward_backward_temp_bytes(name, length):
  """Compiled temporary memory of forward + backward of the xla tier (B = 1, D = 16,
  N = 32, chunks of 64): every input, output and gradient is an argument or a result."""
  d, n = 16, 32
  seq = jax.ShapeDtypeStruct((1, length, d), jnp.float32)
  bc = jax.ShapeDtypeStruct((1, length, n), jnp.float32)
  per_channel = jax.ShapeDtypeStruct((d, n), jnp.float32)
  if name == "selective_scan":
    fn = lambda x, delta, b, c, a: ops.selective_scan(x, delta, a, b, c, None)[0]
    args = (seq, seq, bc, bc, per_channel)
  elif name == "rg_lru":
    fn = lambda x, r, i, lam: ops.rg_lru(x, r, i, lam)[0]
    args = (seq, seq, seq, jax.ShapeDtypeStruct((d,), jnp.float32))
  else:
    fn = lambda x, *p: ops.mega_ema(x, *p)[0]
    args = (seq,) + (per_channel,) * 4

  def forward_backward(dy, *args):
    y, vjp = jax.vjp(lambda *a: fn(*a), *args)
    return (y,) + vjp(dy)

  compiled = jax.jit(forward_backward).lower(seq, *args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["selective_scan", "rg_lru", "mega_ema"])
def test_xla_tier_memory_is_linear_in_length(name):
  small = _forward_backward_temp_bytes(name, 2048)
  large = _forward_backward_temp_bytes(name, 8192)
  # 4x the length: a [T, T] buffer would grow 16x; the saved inputs and chunk states 4x.
  assert large <= 4.5 * small, (small, large)
  assert large < 8192 * 8192 * 4 / 10, large  # far below one [T, T] float32 matrix
  if name != "rg_lru":
    # The chunks are rematerialized: no [T, D, N] float32 expanded state is kept.
    assert large < 8192 * 16 * 32 * 4, large


# ------------------------------------------------------------------------ bad input

_X = jnp.ones((1, 5, 4))
_BC = jnp.ones((1, 5, 3))
_A = -jnp.ones((4, 3))
_P = jnp.full((4, 3), 0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.selective_scan(_X[0], _X, _A, _BC, _BC), r"x must be a floating \[B, T, D\]"),
    (lambda: ops.selective_scan(_X.astype(jnp.int32), _X, _A, _BC, _BC), "x must be"),
    (lambda: ops.selective_scan(_X, _X[:, :4], _A, _BC, _BC), r"delta must have shape"),
    (lambda: ops.selective_scan(_X, _X, _A[:3], _BC, _BC), r"A must be a floating \[D=4, N\]"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC[:, :4], _BC), "B must be"),
    (lambda: ops.selective_scan(_X, _X, _A, jnp.ones((1, 5, 3, 3)), jnp.ones((1, 5, 3, 3))),
     "G dividing D=4"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, jnp.ones((1, 5, 2, 3))),
     "B and C must have the same shape"),
    (lambda: ops.selective_scan(_X, _X, _A, jnp.ones((1, 5, 2)), jnp.ones((1, 5, 2))),
     "B, C must have N=3"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, jnp.ones(3)), r"D must have shape"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, initial_state=jnp.ones((1, 4, 2))),
     r"initial_state must have shape \(1, 4, 3\)"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, segment_ids=jnp.zeros((1, 5))),
     "segment_ids must be integer"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, lengths=jnp.array([5, 5])),
     r"lengths must have shape \(1,\)"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, chunk_size=0), "chunk_size must be"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, output_final_state=1),
     "output_final_state must be a bool"),
    (lambda: ops.selective_scan(_X, _X, _A, _BC, _BC, implementation="pallas"),
     "implementation='pallas' is not a tier"),
    (lambda: ops.rg_lru(_X, _X, _X[..., :3], jnp.ones(4)), "gate_i must have shape"),
    (lambda: ops.rg_lru(_X, _X, _X, jnp.ones(3)), r"lam must have shape \(4,\)"),
    (lambda: ops.rg_lru(_X, _X, _X, jnp.ones(4), c=0.0), "c must be a positive"),
    (lambda: ops.rg_lru(_X, _X, _X, jnp.ones(4), initial_state=jnp.ones((1, 4, 1))),
     r"initial_state must have shape \(1, 4\)"),
    (lambda: ops.mega_ema(_X, _P[:3], _P, _P, _P), r"alpha must be \[4, N\]"),
    (lambda: ops.mega_ema(_X, _P, _P, _P, _P, causal=False), r"alpha must be \[2, 4, N\]"),
    (lambda: ops.mega_ema(_X, _P, _P[:, :2], _P, _P), r"delta must have shape \(4, 3\)"),
    (lambda: ops.mega_ema(_X, _P, _P, _P, _P, causal=None), "causal must be a bool"),
    (lambda: ops.mega_ema(_X, *[jnp.stack([_P, _P])] * 4, causal=False,
                          output_final_state=True), "output_final_state need causal=True"),
    (lambda: ops.selective_scan_step(_X[:, 0], _X[:, 0], _A, _BC[:, 0], _BC[:, 0], None,
                                     jnp.ones((1, 4, 2))), r"state must be \(1, 4, 3\)"),
    (lambda: ops.rg_lru_step(_X[:, 0], _X[:, 0, :3], _X[:, 0], jnp.ones(4), jnp.ones((1, 4))),
     "gate_r_t must be"),
    (lambda: ops.mega_ema_step(_X, _P, _P, _P, _P, jnp.ones((1, 4, 3))), r"x_t must be \[B, D\]"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
