"""Every mixer: prefill + decode == full forward, causality through gradients, packed
documents == documents one by one, padding invariance, named parameters, bad configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import layers
from attnlab.ops import masks

WIDTH, HEADS = 32, 4
MIXERS = layers.mixer_names()
CAUSAL = [n for n in MIXERS if "causal" in layers.mixer_forms(layers.mixer_class(n))]
NON_CAUSAL = [n for n in MIXERS
              if "non_causal" in layers.mixer_forms(layers.mixer_class(n))]

# (mixer, extra MixerConfig fields): each mixer with its defaults, plus the softmax
# options that change the decode path.
CASES = [(name, {}) for name in CAUSAL] + [
    ("softmax", {"num_kv_heads": 2, "qk_norm": True, "output_gate": True}),
    ("softmax", {"position": "alibi", "sinks": True, "logits_soft_cap": 5.0}),
    ("softmax", {"sliding_window": 4}),
    ("softmax", {"mask": masks.ChunkedCausal(5), "position": "none"}),
    ("softmax", {"mask": masks.StridedSparse(3)}),
    ("deltanet", {"output_gate": True, "expand_v": 2}),
    # Blocks / windows shorter than the test sequences.
    ("based", {"sliding_window": 4}),
    ("transnormer_diag", {"sliding_window": 5}),
    ("gated_deltanet", {"output_gate": False, "a_init_range": (1.0, 1.0), "dt_min": 1e-4,
                        "dt_max": 1e-3}),
    ("gla", {"conv_size": 0, "expand_k": 1}),
] + [
    # The optional short convolution of mixers whose paper has none.
    ("softmax", {"conv_size": 4}),
    ("softmax", {"conv_size": 3, "num_kv_heads": 2, "qk_norm": True}),
    ("linear_attention", {"conv_size": 4}),
    ("retention", {"conv_size": 3}),
    ("simple_gla", {"conv_size": 4}),
    ("gla", {"conv_size": 2}),
]
# Each mixer as it is, then with a short convolution where that is an option.
PLAIN_AND_CONV = [(name, {}) for name in CAUSAL] + [
    (name, {"conv_size": 4}) for name in ("softmax", "linear_attention", "retention",
                                          "simple_gla", "gla")]


def _ids(case):
  name, extra = case
  return name + ("-" + "-".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


def _mixer(name, seed=0, **extra):
  config = layers.MixerConfig(width=WIDTH, num_heads=HEADS, chunk_size=8, state_size=8,
                              **extra)
  return layers.make_mixer(name, config, rngs=nnx.Rngs(seed))


# Mixers run jitted: op-by-op dispatch of a chunked scan costs 3-5x its compile.
@nnx.jit
def _apply(mixer, x, lengths=None, segment_ids=None):
  return mixer(x, lengths=lengths, segment_ids=segment_ids)


@functools.partial(nnx.jit, static_argnums=(2,))
def _grad_at(mixer, x, t):
  """d sum(mixer(x)[:, t]^2) / dx."""
  return jax.grad(lambda x: jnp.sum(mixer(x)[:, t] ** 2))(x)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_prefill_then_decode_matches_forward(case, rng):
  """Right-padded prompts of different lengths (odd, across chunk and window edges), then
  decoding one token per row, reproduce the full forward at every position."""
  name, extra = case
  mixer = _mixer(name, **extra)
  x = jnp.asarray(rng.standard_normal((2, 23, WIDTH)), jnp.float32)
  full = _apply(mixer, x)
  lengths = jnp.array([9, 13])
  y, cache = nnx.jit(lambda mixer, x, n: mixer.prefill(x, n, max_len=23))(mixer, x[:, :13],
                                                                            lengths)
  for b, n in enumerate((9, 13)):
    assert _rel(y[b, :n], full[b, :n]) < 1e-5
  decode = nnx.jit(lambda mixer, *args: mixer.decode(*args))
  positions = lengths
  for _ in range(10):
    x_t = jnp.take_along_axis(x, positions[:, None, None], axis=1)
    y_t, cache = decode(mixer, x_t, cache, positions)
    want = jnp.take_along_axis(full, positions[:, None, None], axis=1)
    assert _rel(y_t, want) < 1e-5, positions
    positions = positions + 1


SPARSE_WEIGHTS = ("sparsemax_attention", "entmax15_attention")


@pytest.mark.parametrize("case", PLAIN_AND_CONV, ids=_ids)
def test_causal_through_gradients(case, rng):
  """The output at t has zero gradient with respect to every input after t."""
  name, extra = case
  mixer = _mixer(name, **extra)
  x = jnp.asarray(rng.standard_normal((1, 19, WIDTH)), jnp.float32)
  t = 10
  grad = _grad_at(mixer, x, t)
  assert np.all(np.asarray(grad[:, t + 1:]) == 0.0)
  reach = np.abs(np.asarray(grad[:, : t + 1])).sum(-1) > 0
  if name in SPARSE_WEIGHTS:
    # Sparsemax / entmax give keys outside the support exactly zero weight, and so
    # exactly zero gradient: only the token itself is sure to be reached.
    assert reach[:, t].all()
  else:
    assert reach.all()


@pytest.mark.parametrize("case", PLAIN_AND_CONV, ids=_ids)
def test_packed_documents_equal_documents_alone(case, rng):
  name, extra = case
  mixer = _mixer(name, **extra)
  sizes = (7, 1, 12)
  x = jnp.asarray(rng.standard_normal((1, sum(sizes), WIDTH)), jnp.float32)
  ids = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes)[None], jnp.int32)
  packed = _apply(mixer, x, segment_ids=ids)
  start = 0
  for n in sizes:
    alone = _apply(mixer, x[:, start:start + n])
    assert _rel(packed[:, start:start + n], alone) < 1e-5
    start += n


@pytest.mark.parametrize("name", NON_CAUSAL)
def test_non_causal_form_sees_both_sides_and_ignores_padding(name, rng):
  mixer = _mixer(name, causal=False, position="none" if name == "softmax" else "rope")
  x = jnp.asarray(rng.standard_normal((2, 17, WIDTH)), jnp.float32)
  t = 5
  grad = _grad_at(mixer, x[:1], t)
  assert np.abs(np.asarray(grad[0, t + 1:])).sum() > 0  # the future matters
  lengths = jnp.array([11, 17])
  padded = _apply(mixer, x, lengths=lengths)
  assert _rel(padded[0, :11], _apply(mixer, x[:1, :11])[0]) < 1e-5
  assert _rel(padded[1], _apply(mixer, x[1:])[0]) < 1e-5


def _default_form(name):
  return {} if name in CAUSAL else {"causal": False}


@pytest.mark.parametrize("name", MIXERS)
def test_bfloat16_compute_tracks_float32(name, rng):
  mixer32 = _mixer(name, **_default_form(name))
  mixer16 = _mixer(name, dtype=jnp.bfloat16, **_default_form(name))
  x = jnp.asarray(rng.standard_normal((2, 19, WIDTH)), jnp.float32)
  y16 = _apply(mixer16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  # bf16 rounds the input and every projection (2^-8 relative each): measured 0.5-1e-2.
  assert _rel(y16, _apply(mixer32, x)) < 2e-2


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_has_logical_axis_names(name):
  mixer = _mixer(name, qk_norm=True, output_gate=True, sinks=True, **_default_form(name))
  params = nnx.state(mixer, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves
  for var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, var
    assert all(n is None or n in layers.LOGICAL_AXES for n in names), names


def test_make_mixer_unknown_name_lists_the_mixers():
  config = layers.MixerConfig(width=WIDTH, num_heads=HEADS)
  with pytest.raises(ValueError, match="unknown mixer 'flash'.*gated_deltanet"):
    layers.make_mixer("flash", config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields, message", [
    (dict(width=30, num_heads=4), "num_heads=4 must divide width=30"),
    (dict(width=32, num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide"),
    (dict(width=32, num_heads=4, position="xpos"), "position must be one of"),
    (dict(width=32, num_heads=4, sliding_window=0), "sliding_window must be >= 1"),
    (dict(width=32, num_heads=4, mask="causal"), "mask must be a static mask"),
    (dict(width=32, num_heads=4, dt_min=0.1, dt_max=0.01), "dt_min, dt_max"),
    (dict(width=32, num_heads=4, a_init_range=(0.0, 1.0)), "a_init_range"),
])
def test_bad_mixer_config_raises(fields, message):
  with pytest.raises(ValueError, match=message):
    layers.MixerConfig(**fields)


MISSING_FORMS = [(n, form) for n in MIXERS for form in ("causal", "non_causal")
                 if form not in layers.mixer_forms(layers.mixer_class(n))]


@pytest.mark.parametrize("name, form", MISSING_FORMS)
def test_a_missing_form_raises(name, form):
  config = layers.MixerConfig(width=WIDTH, num_heads=HEADS, causal=form == "causal")
  with pytest.raises(ValueError, match=f"no {form} form"):
    layers.make_mixer(name, config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet"])
def test_gate_init_ranges(name):
  """``softplus(dt_bias)`` lies in [dt_min, dt_max] and ``exp(A_log)`` in a_init_range."""
  config = layers.MixerConfig(width=WIDTH, num_heads=8, state_size=8, dt_min=1e-4,
                              dt_max=1e-3, a_init_range=(2.0, 3.0))
  mixer = layers.make_mixer(name, config, rngs=nnx.Rngs(0))
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  a = np.exp(np.asarray(mixer.a_log[...]))
  assert np.all((dt >= 1e-4 * (1 - 1e-5)) & (dt <= 1e-3 * (1 + 1e-5))), dt
  assert np.all((a >= 2.0 - 1e-6) & (a <= 3.0 + 1e-6)), a
  assert np.ptp(dt) > 0 and np.ptp(a) > 0  # drawn, not constant


def test_gated_deltanet_output_gate_switch():
  assert _mixer("gated_deltanet").g_proj is not None          # the paper's default
  assert _mixer("gated_deltanet", output_gate=False).g_proj is None
  assert _mixer("deltanet").g_proj is None
  assert _mixer("deltanet", output_gate=True).g_proj is not None


def test_decoding_a_non_causal_mixer_raises(rng):
  mixer = _mixer("gla", causal=False)
  x = jnp.asarray(rng.standard_normal((1, 5, WIDTH)), jnp.float32)
  with pytest.raises(ValueError, match="causal=False"):
    mixer.prefill(x, jnp.array([5]), 8)
