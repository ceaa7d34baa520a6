"""Decoder LM, hybrids, encoder and generation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import layers, models

HYBRID = dict(vocab_size=61, width=32, num_layers=4, num_heads=4, chunk_size=8,
              pattern=("gated_deltanet", "local", "gated_deltanet", "global"),
              layers={"local": {"mixer": "softmax", "sliding_window": 6},
                      "global": {"mixer": "softmax", "num_kv_heads": 2}})


# Model-level float32 bound: eight layers of chunked (prefill) against token-by-token
# (decode) summation orders; single mixers agree to 1e-5 (tests/layers).
MODEL_F32 = 3e-5


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _tokens(rng, shape, vocab=61):
  return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


def _count(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@nnx.jit
def _forward(model, tokens, segment_ids=None, positions=None):
  """The model's logits, jitted (op-by-op dispatch of eight layers costs more than their
  compile)."""
  return model(tokens, segment_ids=segment_ids, positions=positions)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_hybrid_prefill_then_decode_matches_forward(scan, rng):
  config = models.ModelConfig(**{**HYBRID, "num_layers": 8, "scan_layers": scan})
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (3, 21))
  full = _forward(model, tokens)
  lengths = jnp.array([5, 11, 1])
  logits, cache = nnx.jit(lambda model, x, n: model.prefill(x, n, max_len=21))(
      model, tokens[:, :11], lengths)
  for b, n in enumerate((5, 11, 1)):
    assert _rel(logits[b, :n], full[b, :n]) < MODEL_F32
  decode = nnx.jit(lambda model, *args: model.decode(*args))
  positions = lengths
  for _ in range(9):
    step, cache = decode(model, jnp.take_along_axis(tokens, positions[:, None], 1)[:, 0],
                         cache, positions)
    want = jnp.take_along_axis(full, positions[:, None, None], 1)[:, 0]
    assert _rel(step, want) < MODEL_F32
    positions = positions + 1


def test_scan_and_remat_compute_the_unrolled_model(rng):
  """Same weights, stacked for nnx.scan and rematerialized: same loss and gradients."""
  config = models.ModelConfig(**{**HYBRID, "num_layers": 8})  # two pattern repeats
  unrolled = models.DecoderLM(config, rngs=nnx.Rngs(0))
  scanned = models.DecoderLM(config.replace(scan_layers=True, remat=True), rngs=nnx.Rngs(1))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[nnx.state(r) for r in unrolled.stack.repeats])
  nnx.update(scanned.stack.repeats, stacked)
  nnx.update(scanned.embedder, nnx.state(unrolled.embedder))
  nnx.update(scanned.final_norm, nnx.state(unrolled.final_norm))
  tokens = _tokens(rng, (2, 13))

  def loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens)[:, :-1],
                                                           tokens[:, 1:]).mean()

  l_u, g_u = nnx.jit(nnx.value_and_grad(loss))(unrolled)
  l_s, g_s = nnx.jit(nnx.value_and_grad(loss))(scanned)
  assert abs(float(l_u) - float(l_s)) < 1e-6 * abs(float(l_u))
  g_stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[g_u.stack.repeats[i] for i in range(config.num_repeats)])
  for a, b in zip(jax.tree.leaves(g_stacked), jax.tree.leaves(g_s.stack.repeats)):
    assert _rel(b, a) < MODEL_F32
  assert _rel(g_s.embedder.embed.embedding[...],
              g_u.embedder.embed.embedding[...]) < MODEL_F32


# The model's cache plumbing for each kind of decoder cache: KV (softmax), recurrent state
# + convolution (the core linear mixers), a composite cache (based) and a block cache
# (transnormer_diag). Every mixer's own prefill + decode is checked in
# tests/layers/test_mixers.py.
CAUSAL_MIXERS = ["softmax", "linear_attention", "retention", "simple_gla", "gla", "hgrn2",
                 "mamba2", "deltanet", "gated_deltanet", "based", "transnormer_diag"]


@pytest.mark.parametrize("mixer", CAUSAL_MIXERS)
def test_every_mixer_model_prefill_then_decode_matches_forward(mixer, rng):
  config = models.ModelConfig(vocab_size=61, width=32, num_layers=1, num_heads=4,
                              chunk_size=8, pattern=(mixer,))
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (2, 17))
  full = model(tokens)
  lengths = jnp.array([3, 9])
  logits, cache = model.prefill(tokens[:, :9], lengths, max_len=17)
  for b, n in enumerate((3, 9)):
    assert _rel(logits[b, :n], full[b, :n]) < 1e-5
  decode = nnx.jit(lambda model, *args: model.decode(*args))
  positions = lengths
  for _ in range(8):
    step, cache = decode(model, jnp.take_along_axis(tokens, positions[:, None], 1)[:, 0],
                         cache, positions)
    assert _rel(step, jnp.take_along_axis(full, positions[:, None, None], 1)[:, 0]) < 1e-5
    positions = positions + 1


def test_every_model_parameter_has_logical_axis_names():
  config = models.ModelConfig(**{**HYBRID, "tie_embeddings": False})
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  names = {n for var in leaves for n in var.get_metadata()["out_sharding"]}
  assert {"vocab", "embed", "heads", "kv_heads", "mlp", "head_dim"} <= names
  assert names <= set(layers.LOGICAL_AXES) | {None}
  for var in leaves:
    assert len(var.get_metadata()["out_sharding"]) == var[...].ndim


def test_jit_with_split_merge_equals_eager(rng):
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (2, 17))
  graph, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graph, state)(tokens)

  # XLA may fuse and reorder float32 sums under jit: a few ulps.
  assert _rel(forward(state, tokens), model(tokens)) < 5e-6


def test_causal_through_gradients_of_the_model(rng):
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (1, 15))
  emb = model.embedder(tokens)
  t = 8

  def out(x):
    h = model.stack(x)
    return jnp.sum(model.embedder.logits(model.final_norm(h))[:, t] ** 2)

  grad = jax.jit(jax.grad(out))(emb)
  assert np.all(np.asarray(grad[:, t + 1:]) == 0.0)
  assert np.abs(np.asarray(grad[:, :t + 1])).sum() > 0


def test_packed_documents_do_not_interact(rng):
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (1, 20))
  ids = jnp.asarray([[0] * 9 + [1] * 11], jnp.int32)
  positions = jnp.asarray([list(range(9)) + list(range(11))], jnp.int32)
  packed = _forward(model, tokens, segment_ids=ids, positions=positions)
  assert _rel(packed[:, :9], _forward(model, tokens[:, :9])) < 1e-5
  assert _rel(packed[:, 9:], _forward(model, tokens[:, 9:])) < 1e-5


# GPT-3 (Brown et al. 2020, Table 2.1) reports 125M, 350M and 1.3B parameters for these
# shapes; attnlab's presets use RoPE instead of a learned position table.
@pytest.mark.parametrize("name", ["125M", "350M", "1.3B"])
def test_preset_parameter_counts_match_the_paper(name):
  config = models.preset(name)
  abstract = nnx.eval_shape(lambda: models.DecoderLM(config, rngs=nnx.Rngs(0)))
  count = _count(nnx.state(abstract, nnx.Param))
  assert abs(count / models.PAPER_PARAMS[name] - 1) < 0.02, count


def test_hybrid_trains_on_random_tokens(rng):
  """A fixed batch of random tokens is memorized: the loss falls well below log(V)."""
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (4, 24))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens)[:, :-1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(50)]
  assert abs(losses[0] - np.log(61)) < 0.3  # starts near uniform
  assert losses[-1] < 0.5 * losses[0], losses


def test_encoder_classifies_padded_rows_like_unpadded(rng):
  config = models.ModelConfig(**{**HYBRID, "pattern": ("gla", "softmax"),
                                 "layers": {}, "num_layers": 2}, num_classes=3)
  encoder = models.Encoder(config, rngs=nnx.Rngs(0))
  tokens = _tokens(rng, (2, 16))
  run = nnx.jit(lambda encoder, tokens, lengths=None: encoder(tokens, lengths))
  out = run(encoder, tokens, jnp.array([9, 16]))
  assert out.shape == (2, 3)
  assert _rel(out[0], run(encoder, tokens[:1, :9])[0]) < 1e-5
  assert _rel(out[1], run(encoder, tokens[1:])[0]) < 1e-5


def _reference_greedy(model, prompt, steps):
  """Argmax of the full forward, one token at a time. The sequence is padded to a fixed
  length (the model is causal, so the padding never reaches earlier logits) to compile
  the forward once."""
  forward = nnx.jit(lambda model, tokens: model(tokens))
  seq = list(prompt)
  for _ in range(steps):
    padded = jnp.asarray([seq + [0] * (len(prompt) + steps - len(seq))], jnp.int32)
    seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_generation_matches_full_forward_argmax(rng):
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  prompts = _tokens(rng, (2, 9))
  lengths = jnp.array([9, 4])
  out = models.generate(model, prompts, lengths, 6)
  assert out.shape == (2, 6) and out.dtype == jnp.int32
  for b, n in enumerate((9, 4)):
    assert list(np.asarray(out[b])) == _reference_greedy(model, np.asarray(prompts[b, :n]), 6)


def test_sampling_filters(rng):
  logits = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
  top3 = models.filter_logits(logits, models.Sampling(temperature=1.0, top_k=3))
  assert np.all(np.isfinite(np.asarray(top3)).sum(-1) == 3)
  kept = np.isfinite(np.asarray(top3))
  assert np.all(np.asarray(logits)[kept].reshape(3, 3).min(-1)
                >= np.sort(np.asarray(logits), -1)[:, -3])
  p = 0.7
  nucleus = np.isfinite(np.asarray(models.filter_logits(
      logits, models.Sampling(temperature=0.5, top_p=p))))
  probs = np.asarray(jax.nn.softmax(logits / 0.5, -1), np.float64)
  for row, keep in zip(probs, nucleus):
    order = np.argsort(-row)
    mass = np.cumsum(row[order])
    need = int(np.searchsorted(mass, p) + 1)  # the smallest prefix reaching p
    assert set(order[:need]) == set(np.flatnonzero(keep))
  # top_k=1 sampling is greedy whatever the key.
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  prompts = _tokens(rng, (2, 7))
  lengths = jnp.array([7, 3])
  greedy = models.generate(model, prompts, lengths, 5)
  top1 = models.generate(model, prompts, lengths, 5, key=jax.random.key(4),
                         sampling=models.Sampling(temperature=1.3, top_k=1))
  assert np.array_equal(np.asarray(greedy), np.asarray(top1))
  sampled = models.generate(model, prompts, lengths, 5, key=jax.random.key(4),
                            sampling=models.Sampling(temperature=1.0))
  again = models.generate(model, prompts, lengths, 5, key=jax.random.key(4),
                          sampling=models.Sampling(temperature=1.0))
  assert np.array_equal(np.asarray(sampled), np.asarray(again))


def test_generation_stops_at_eos(rng):
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  prompts = _tokens(rng, (1, 5))
  free = np.asarray(models.generate(model, prompts, jnp.array([5]), 6))[0]
  eos = int(free[1])
  out = np.asarray(models.generate(model, prompts, jnp.array([5]), 6, eos_id=eos))[0]
  assert list(out[:2]) == list(free[:2]) and np.all(out[2:] == eos)


@pytest.mark.parametrize("fields, message", [
    (dict(pattern=("softmax", "flash")), r"unknown layer 'flash'; allowed: .*gated_deltanet"),
    (dict(pattern=("softmax",) * 3), "num_layers=4 must be a multiple of len\\(pattern\\)=3"),
    (dict(width=30), "num_heads=4 must divide width=30"),
    (dict(layers={"local": {"mixer": "attention"}}), "must name a mixer, one of"),
    (dict(layers={"local": {"mixer": "softmax", "window": 3}}), r"fields \['window'\]"),
    (dict(layers={"g": {"mixer": "softmax", "num_kv_heads": 3}}), "num_kv_heads=3"),
])
def test_bad_model_config_raises(fields, message):
  base = dict(vocab_size=61, width=32, num_layers=4, num_heads=4)
  with pytest.raises(ValueError, match=message):
    models.ModelConfig(**{**base, **fields})


def test_unknown_preset_and_bad_generation_arguments(rng):
  with pytest.raises(ValueError, match="unknown preset '7B'"):
    models.preset("7B")
  model = models.DecoderLM(models.ModelConfig(**HYBRID), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    models.generate(model, _tokens(rng, (1, 4)), jnp.array([4]), 2,
                    sampling=models.Sampling(temperature=1.0))
  with pytest.raises(ValueError, match="tokens must be an integer array"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="top_p must be in"):
    models.Sampling(temperature=1.0, top_p=0.0)
