"""Selective and multi-token attention against the float64 oracle
(``tests/oracle_score_mixing.py``).

Both tiers: the output and every gradient (q, k, v; multi-token's kernel and head mixing)
at odd lengths (T = 13 causal, 21 non-causal, blocks of 8 keys) with packed documents, in
float32 and bfloat16, as the relative error ``||x - ref|| / ||ref||``. Then: decoding
token by token (from empty, and after a padded prefill) == the causal forward, the
selection changes the output, multi-token attention with identity kernels is softmax
attention, selective attention's xla memory grows linearly in T, and every ValueError
names its argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from tests import oracle_feature_maps as common
from tests import oracle_score_mixing as oracle

B, H, K, V = 2, 4, 8, 8
BLOCK = 8
SCALE = 0.7
SELECTION_HEAD = 1
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
DTYPE_TIER = [(jnp.float32, "reference"), (jnp.float32, "xla"), (jnp.bfloat16, "xla")]
DTYPE_TIER_IDS = [f"{jnp.dtype(d).name}-{t}" for d, t in DTYPE_TIER]


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _packed_ids(length):
  """Row 0: documents of 5, 1 and the rest; row 1: one document."""
  ids = np.zeros((B, length), np.int32)
  ids[0, 5:6], ids[0, 6:] = 1, 2
  return ids


def _inputs(rng, length, dtype, spread=1.5):
  shapes = {"q": (B, length, H, K), "k": (B, length, H, K), "v": (B, length, H, V)}
  return {n: jnp.asarray(spread * rng.standard_normal(s), dtype) for n, s in shapes.items()}


def _check(out, got, want_out, want, dtype):
  assert out.dtype == dtype
  errors = {"out": rel_err(out, want_out)}
  errors.update({f"d{n}": rel_err(got[n], want[n]) for n in got})
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
  assert not bad, (bad, errors)


def _run(fn, diff, dout):
  @jax.jit
  def run(diff, dout):
    out, vjp = jax.vjp(fn, diff)
    return out, vjp(dout.astype(out.dtype))[0]
  return run(diff, dout)


def _oracle(fn, diff, dout, **static):
  return common.grads(fn, {n: np.asarray(a.astype(jnp.float32)) for n, a in diff.items()},
                      np.asarray(dout), **static)


# ------------------------------------------------------------------------- selective


@pytest.mark.parametrize("dtype, tier", DTYPE_TIER, ids=DTYPE_TIER_IDS)
def test_selective_matches_oracle_forward_and_gradients(dtype, tier, rng):
  length = 13
  x = _inputs(rng, length, dtype)
  dout = jnp.asarray(rng.standard_normal((B, length, H, V)), jnp.float32)
  ids = _packed_ids(length)
  out, got = _run(lambda d: ops.selective_attn(
      **d, selection_head=SELECTION_HEAD, scale=SCALE, segment_ids=ids, block_size=BLOCK,
      implementation=tier)[0], x, dout)
  docs = oracle.documents(ids, B, length)
  bos = np.concatenate([np.ones((B, 1)), docs[:, 1:] != docs[:, :-1]], axis=1)
  want_out, want = _oracle(oracle.selective_attention, x, dout,
                           m=common.mask(length, True, ids, B), bos=bos.astype(np.float64),
                           scale=SCALE, selection_head=SELECTION_HEAD)
  _check(out, got, want_out, want, dtype)


def test_selection_changes_the_output(rng):
  """F is not silently zero: the output differs from causal softmax attention."""
  x = _inputs(rng, 13, jnp.float32)
  o, _ = ops.selective_attn(**x, scale=SCALE, block_size=BLOCK)
  plain = ops.dot_product_attention(x["q"], x["k"], x["v"], scale=SCALE, is_causal=True)
  assert rel_err(o, plain) > 0.05


def test_selective_decode_equals_causal_forward(rng):
  """From an empty cache, and from each tier's prefill of padded prompts (6 and 8 tokens,
  F_next over the valid rows only), the steps reproduce the forward."""
  length, prompt = 13, (6, 8)
  x = _inputs(rng, length, jnp.float32)
  full, _ = ops.selective_attn(**x, scale=SCALE, block_size=BLOCK)
  step = jax.jit(lambda q, k, v, c, p: ops.selective_attn_step(q, k, v, c, p, scale=SCALE))

  def decode(cache, positions):
    while int(positions.min()) < length:
      t = jnp.minimum(positions, length - 1)
      take = lambda a: jnp.take_along_axis(a, t[:, None, None, None], axis=1)[:, 0]
      o_t, cache = step(take(x["q"]), take(x["k"]), take(x["v"]), cache, t)
      for b in range(B):
        if int(positions[b]) < length:
          assert rel_err(o_t[b], full[b, int(positions[b])]) < 1e-5, (b, positions)
      positions = positions + 1

  decode(ops.selective_attn_cache(B, length, H, K, V), jnp.zeros((B,), jnp.int32))
  lengths = jnp.array(prompt)
  for tier in ("reference", "xla"):
    first = {n: a[:, :max(prompt)] for n, a in x.items()}
    _, f = ops.selective_attn(**first, scale=SCALE, lengths=lengths, output_final_state=True,
                              block_size=BLOCK, implementation=tier)
    keep = (jnp.arange(max(prompt))[None] < lengths[:, None])[..., None, None]
    pad = lambda a: jnp.pad(jnp.where(keep, a, 0), [(0, 0), (0, length - max(prompt)),
                                                    (0, 0), (0, 0)])
    cache = {"k": pad(first["k"]), "v": pad(first["v"]),
             "f": jnp.pad(f, [(0, 0), (0, length - max(prompt))])}
    decode(cache, lengths)


def _selective_temp_bytes(length):
  q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

  def forward_backward(q, k, v, do):
    o, vjp = jax.vjp(lambda q, k, v: ops.selective_attn(
        q, k, v, block_size=64, implementation="xla")[0], q, k, v)
    return (o,) + vjp(do)

  return jax.jit(forward_backward).lower(q, q, q, q).compile().memory_analysis(
  ).temp_size_in_bytes


def test_selective_xla_temp_memory_grows_linearly():
  """4x the length: a [T, T] buffer would grow 16x; key blocks and row statistics 4x.
  At T = 4096 the temporaries stay below one [T, T] float32 score matrix of one head."""
  small, large = _selective_temp_bytes(1024), _selective_temp_bytes(4096)
  assert large <= 4.5 * small, (small, large)
  assert large < 4096 * 4096 * 4, large


# ---------------------------------------------------------------------- multi-token


def _mta_params(rng, c_q, c_k):
  return {"kernel": jnp.asarray(0.5 * rng.standard_normal((H, c_q, c_k)), jnp.float32),
          "head_mix": jnp.asarray(rng.standard_normal((H // 2, 2, 2)), jnp.float32)}


# (dtype, tier, head mixing): the full matrix with the paper's post-softmax mixing, and
# pre-softmax mixing on the float32 xla tier (the tiers share the mixing code).
MTA_CASES = [(d, t, "post") for d, t in DTYPE_TIER] + [(jnp.float32, "xla", "pre")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("dtype, tier, position", MTA_CASES,
                         ids=[f"{jnp.dtype(d).name}-{t}-{p}" for d, t, p in MTA_CASES])
def test_multi_token_matches_oracle_forward_and_gradients(dtype, tier, position, causal,
                                                          rng):
  # Causal: an odd key kernel (centred); non-causal: an even one (one more later key).
  length, c_q, c_k = (13, 3, 5) if causal else (21, 2, 4)
  diff = _inputs(rng, length, dtype)
  diff.update(_mta_params(rng, c_q, c_k))
  dout = jnp.asarray(rng.standard_normal((B, length, H, V)), jnp.float32)
  ids = _packed_ids(length)
  out, got = _run(lambda d: ops.multi_token_attn(
      **d, head_mix_position=position, causal=causal, scale=SCALE, segment_ids=ids,
      implementation=tier), diff, dout)
  want_out, want = _oracle(oracle.multi_token_attention, diff, dout,
                           m=common.mask(length, causal, ids, B),
                           docs=oracle.documents(ids, B, length).astype(np.float64),
                           scale=SCALE, position=position)
  _check(out, got, want_out, want, dtype)


def test_identity_kernels_give_softmax_attention(rng):
  """theta = delta at (0, 0) and w = I: causal softmax attention, packed documents too."""
  length, causal = 13, True
  x = _inputs(rng, length, jnp.float32)
  kernel = jnp.zeros((H, 4, 7)).at[:, 0, 3].set(1.0)
  mix = jnp.broadcast_to(jnp.eye(2), (H // 2, 2, 2))
  ids = _packed_ids(length)
  o = ops.multi_token_attn(**x, kernel=kernel, head_mix=mix, causal=causal, scale=SCALE,
                           segment_ids=ids)
  want = ops.dot_product_attention(x["q"], x["k"], x["v"], scale=SCALE, is_causal=causal,
                                   segment_ids=jnp.asarray(ids))
  assert rel_err(o, want) < 1e-5


def test_multi_token_decode_equals_causal_forward(rng):
  length, c_q, c_k = 13, 3, 5
  x = _inputs(rng, length, jnp.float32)
  p = _mta_params(rng, c_q, c_k)
  full = ops.multi_token_attn(**x, **p, scale=SCALE)
  cache = ops.multi_token_attn_cache(B, length, H, K, V, c_q)
  step = jax.jit(lambda q, k, v, c, t: ops.multi_token_attn_step(q, k, v, c, t, **p,
                                                                 scale=SCALE))
  for t in range(length):
    o_t, cache = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], cache,
                      jnp.full((B,), t, jnp.int32))
    assert rel_err(o_t, full[:, t]) < 1e-5, t


# ----------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(selection_head=H), r"selection_head must be an int in \[0, H=4\)"),
    (dict(selection_head=1.0), "selection_head must be an int"),
    (dict(output_final_state=1), "output_final_state must be a bool"),
    (dict(lengths=jnp.zeros((B + 1,), jnp.int32)), r"lengths must be \[B\]"),
])
def test_selective_bad_input_raises(kwargs, message, rng):
  with pytest.raises(ValueError, match=message):
    ops.selective_attn(**_inputs(rng, 5, jnp.float32), **kwargs)


def test_selective_step_needs_the_selection_row(rng):
  x = _inputs(rng, 5, jnp.float32)
  cache = ops.selective_attn_cache(B, 5, H, K, V)
  for bad, message in (({"k": cache["k"], "v": cache["v"]}, "keys"),
                       (dict(cache, f=cache["f"][:, :3]), r"cache\['f'\] must be")):
    with pytest.raises(ValueError, match=message):
      ops.selective_attn_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], bad,
                              jnp.zeros((B,), jnp.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel=jnp.ones((H + 1, 3, 5))), r"kernel must be \[H=4, c_q, c_k\]"),
    (dict(kernel=jnp.ones((H, 0, 5))), "c_q, c_k >= 1"),
    (dict(kernel=jnp.ones((H, 3, 5), jnp.int32)), "kernel must be floating point"),
    (dict(head_mix=jnp.ones((3, 2, 2))), r"head_mix must be \[H / c_h, c_h, c_h\]"),
    (dict(head_mix=jnp.ones((2, 2, 3))), r"head_mix must be \[H / c_h, c_h, c_h\]"),
    (dict(head_mix_position="mid"), "head_mix_position must be one of"),
    (dict(causal="yes"), "causal must be a bool"),
])
def test_multi_token_bad_input_raises(kwargs, message, rng):
  args = dict(_inputs(rng, 5, jnp.float32), kernel=jnp.ones((H, 3, 5)))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    ops.multi_token_attn(**args)


def test_multi_token_step_cache_must_hold_c_q_minus_1_queries(rng):
  x = _inputs(rng, 5, jnp.float32)
  cache = ops.multi_token_attn_cache(B, 5, H, K, V, query_kernel_size=2)
  with pytest.raises(ValueError, match=r"cache\['q'\] must be \[B, c_q - 1, H, K\]"):
    ops.multi_token_attn_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], cache,
                              jnp.zeros((B,), jnp.int32), jnp.ones((H, 3, 5)))
