"""Linformer and Nystromformer against the float64 oracle of ``tests/oracle_low_rank.py``.

Each case runs both tiers (``reference`` and ``xla``) in float32 (the last, padded case
in bfloat16 too) at odd lengths (13, 21), and compares the output and the
gradient of every differentiable input (q, k, v and Linformer's E, F) with the oracle,
as the relative error ``||x - ref|| / ||ref||``. Oracle gradients are float64 central
differences. bfloat16 is compared with the oracle run on the bf16-rounded inputs, so only
the computation's own rounding counts. Nystromformer's ``reference`` tier (exact
pseudo-inverse) meets the exact oracle, its ``xla`` tier (the paper's 6 iterations) the
iterated one; a separate test checks that the iteration converges to the exact
pseudo-inverse. The oracle cuts each row to its valid length, so the padded cases also
check that padding never leaks into valid rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_low_rank as oracle

# Relative error bounds. float32: the ops compute in float32; measured <= 1.4e-6 for
# outputs and <= 2.2e-5 for gradients (the exact pseudo-inverse's backward amplifies
# rounding by up to cond(A~)^2, here < 100^2), ~1e-7 without a pseudo-inverse.
# bfloat16: inputs are exact bf16 numbers; the output (and, in the xla tier, the projected
# keys / values fed to the softmax attention) is rounded to bf16, 2^-9 relative each.
TOLERANCE = {
    jnp.float32: {"out": 1e-5, "grad": 5e-5},
    jnp.bfloat16: {"out": 1e-2, "grad": 1e-2},
}
TIERS = ("reference", "xla")


def combos(cases):
  """Every case on both tiers in float32; the last (padded) case in bfloat16 too."""
  return ([(c, t, jnp.float32) for c in cases for t in TIERS]
          + [(cases[-1], t, jnp.bfloat16) for t in TIERS])


def combo_ids(case_id):
  return lambda c: (case_id(c) if isinstance(c, tuple) else
                    c if isinstance(c, str) else jnp.dtype(c).name)


def rel_err(x, ref) -> float:
  x, ref = np.asarray(jnp.asarray(x, jnp.float32), np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _dtype_id(dtype):
  return jnp.dtype(dtype).name


def _round(x, dtype):
  """``x`` as ``dtype`` and the float64 copy of exactly those values."""
  xd = jnp.asarray(x, jnp.float32).astype(dtype)
  return xd, np.asarray(xd.astype(jnp.float32), np.float64)


def compare(fn, oracle_fn, arrays, static, names, dtype, rng):
  """Output and gradients of ``fn(**arrays, **static)`` vs the oracle's: the relative
  errors, keyed ``out`` and ``d<name>``."""
  rounded = {n: _round(x, dtype) for n, x in arrays.items()}
  inputs = {n: r[0] for n, r in rounded.items()}
  exact = {n: r[1] for n, r in rounded.items()}
  dout = rng.standard_normal(rounded["v"][1].shape)
  want, want_grads = oracle_fn(**exact, **static, dout=dout)

  @jax.jit
  def grad_and_out(diff):
    def loss(diff):
      o = fn(**{**inputs, **diff}, **static)
      return jnp.sum(o.astype(jnp.float32) * jnp.asarray(dout, jnp.float32)), o
    return jax.grad(loss, has_aux=True)(diff)

  grads, out = grad_and_out({n: inputs[n] for n in names})
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want)}
  errors.update({f"d{n}": rel_err(grads[n], want_grads[n]) for n in names})
  return errors


def check_errors(errors, dtype):
  tol = TOLERANCE[dtype]
  for key, err in errors.items():
    bound = tol["out"] if key == "out" else tol["grad"]
    assert err <= bound, (key, err, errors)


# ---------------------------------------------------------------------------- Linformer

# (T, projected k, per-head E/F, separate F, lengths)
LINFORMER_CASES = [
    (13, 5, False, False, None),          # headwise + key-value sharing (one E)
    (21, 6, True, True, (15, 21)),        # one E_h, F_h per head, right padding
]


@pytest.mark.parametrize("case, tier, dtype", combos(LINFORMER_CASES),
                         ids=combo_ids(lambda c: f"T{c[0]}-k{c[1]}"))
def test_linformer_eq7_matches_oracle(case, tier, dtype, rng):
  length, proj, per_head, separate_f, lengths = case
  heads, dim = 2, 4
  shape = (2, length, heads, dim)
  e_shape = (heads, proj, length) if per_head else (proj, length)
  arrays = {n: rng.standard_normal(shape) for n in ("q", "k", "v")}
  arrays["e"] = rng.standard_normal(e_shape) / np.sqrt(length)
  names = ["q", "k", "v", "e"]
  if separate_f:
    arrays["f"] = rng.standard_normal(e_shape) / np.sqrt(length)
    names.append("f")
  static = {"lengths": None if lengths is None else np.asarray(lengths)}
  fn = functools.partial(ops.linformer, implementation=tier)
  errors = compare(fn, oracle.linformer, arrays, static, names, dtype, rng)
  print("linformer", case, tier, _dtype_id(dtype), errors)
  check_errors(errors, dtype)


# ------------------------------------------------------------------------ Nystromformer

# (T, landmarks, lengths): m divides neither T nor the lengths; a row shorter than m
# (empty landmarks) beside one of full length, and two padded rows.
NYSTROM_CASES = [(21, 4, (3, 21)), (21, 5, (17, 9))]
SIGMA = 2.0   # q, k scale: landmark logits of O(1)
# A~ can be nearly singular (a draw in ~20 had cond(A~) ~ 1e5): its exact pseudo-inverse
# then amplifies float32 rounding by that much (and float32 pinv drops singular values
# below ~5e-6 sigma_max), so the oracle cases draw inputs with cond(A~) < MAX_CONDITION.
# The iteration (a fixed polynomial in A~) needs no such care.
MAX_CONDITION = 100.0


def _well_conditioned_qk(rng, shape, landmarks, lengths):
  while True:
    q, k = SIGMA * rng.standard_normal(shape), SIGMA * rng.standard_normal(shape)
    if oracle.landmark_condition(q, k, landmarks, lengths) < MAX_CONDITION:
      return q, k


@pytest.mark.parametrize("case, tier, dtype", combos(NYSTROM_CASES),
                         ids=combo_ids(lambda c: f"T{c[0]}-m{c[1]}-{c[2]}"))
def test_nystromformer_matches_oracle(case, tier, dtype, rng):
  """F~ A~^+ (B~ V) (Xiong et al. 2021, section 3): the reference tier with the exact
  pseudo-inverse, the xla tier with the paper's 6 iterations."""
  length, landmarks, lengths = case
  shape = (2, length, 2, 4)
  q, k = _well_conditioned_qk(rng, shape, landmarks, lengths)
  arrays = {"q": q, "k": k, "v": rng.standard_normal(shape)}
  static = {"num_landmarks": landmarks,
            "lengths": None if lengths is None else np.asarray(lengths)}
  iterations = None if tier == "reference" else 6
  oracle_fn = functools.partial(oracle.nystromformer, num_iterations=iterations)
  fn = functools.partial(ops.nystromformer, implementation=tier)
  errors = compare(fn, oracle_fn, arrays, static, ["q", "k", "v"], dtype, rng)
  print("nystromformer", case, tier, _dtype_id(dtype), errors)
  check_errors(errors, dtype)


def test_iterative_pinv_converges_to_the_pseudo_inverse(rng):
  """The paper's iteration reaches np.linalg.pinv on a well-conditioned row-stochastic
  matrix (as A~ is), on a general one, and on a rank-deficient one (a zero block: an
  empty landmark), and its error falls with the iterations."""
  stochastic = oracle.softmax(2.0 * rng.standard_normal((6, 6)))
  general = rng.standard_normal((5, 5)) + 4.0 * np.eye(5)
  deficient = np.zeros((5, 5))
  deficient[:3, :3] = oracle.softmax(2.0 * rng.standard_normal((3, 3)))
  for a in (stochastic, general, deficient):
    assert np.linalg.cond(a[:3, :3]) < 50
    exact = np.linalg.pinv(a)
    errs = [rel_err(ops.iterative_pinv(jnp.asarray(a, jnp.float32), n), exact)
            for n in (2, 4, 6, 20)]
    assert errs[-1] < 1e-5, errs
    assert errs[0] > errs[1] > errs[2] or errs[2] < 1e-5, errs
    # float32 iteration vs the float64 oracle iteration at the paper's 6 steps
    it6 = oracle.pinv_iterative(a, 6)
    assert rel_err(ops.iterative_pinv(jnp.asarray(a, jnp.float32), 6), it6) < 1e-5


def test_nystromformer_with_a_landmark_per_token_is_softmax_attention(rng):
  """m = T: the landmarks are the tokens, A~ = S is invertible and F~ A~^-1 B~ = S."""
  q, k, v = (jnp.asarray(rng.standard_normal((1, 7, 2, 4)), jnp.float32) for _ in range(3))
  want = ops.dot_product_attention(q, k, v, implementation="reference")
  got = jax.jit(functools.partial(ops.nystromformer, num_landmarks=7,
                                  implementation="reference"))(q, k, v)
  assert rel_err(got, want) < 1e-4


# ---------------------------------------------------------------------------- bad input


def _qkv(shape=(1, 6, 2, 4)):
  return tuple(jnp.ones(shape) for _ in range(3))


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 5))), r"e projects .* n=5"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 3, 6))), r"e must be \[k, n\]"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6)), jnp.ones((2, 6))),
     r"e and f must have the same shape"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6), jnp.int32)), "e must be float"),
    (lambda q, k, v: ops.linformer(q, k, v[..., :3], jnp.ones((3, 6))), "v must have k's"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6)), lengths=jnp.ones(2, int)),
     r"lengths must be \[B\]"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6)), lengths=jnp.ones(1)),
     "lengths must be integers"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6)), scale="x"), "scale must be"),
    (lambda q, k, v: ops.linformer(q[0], k, v, jnp.ones((3, 6))), r"q must be \[B, T, H, D\]"),
    (lambda q, k, v: ops.linformer(q, k, v, jnp.ones((3, 6)), implementation="pallas"),
     "implementation='pallas' is not a tier"),
    (lambda q, k, v: ops.nystromformer(q, k, v, num_landmarks=0), "num_landmarks must be"),
    (lambda q, k, v: ops.nystromformer(q, k, v, num_landmarks=2, num_iterations=0),
     "num_iterations must be"),
    (lambda q, k, v: ops.nystromformer(q, k[:, :5], v, num_landmarks=2),
     "q and k must have the same shape"),
    (lambda q, k, v: ops.nystromformer(q, k, v.astype(jnp.int32), num_landmarks=2),
     "v must be floating point"),
])
def test_bad_input_names_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call(*_qkv())
