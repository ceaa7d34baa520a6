"""MQAR (multi-query associative recall) with one model.

Launch from the repository root:

  # CPU, seconds:
  python -m experiments.main --config=configs/mqar.py:smoke --workdir=/tmp/mqar_smoke
  # The default size (a 2-layer model, 64 tokens, 8 pairs):
  python -m experiments.main --config=configs/mqar.py --workdir=/tmp/mqar \\
      --config.model.pattern='("gated_deltanet",)'

Any field can be overridden, e.g. ``--config.data.num_kv_pairs=16``.
"""

import ml_collections

VARIANTS = ("default", "smoke")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown mqar variant {variant!r}; choose one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"
  config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices

  config.model = ml_collections.ConfigDict()
  config.model.width = 64
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.pattern = ("softmax",)
  config.model.layers = ml_collections.ConfigDict()
  config.model.chunk_size = 16
  config.model.tie_embeddings = True

  config.data = ml_collections.ConfigDict()
  config.data.name = "mqar"
  config.data.vocab_size = 128
  config.data.seq_len = 64
  config.data.num_kv_pairs = 8
  config.data.power_a = 0.01
  config.data.batch_size = 64

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1500
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 0.1
  config.train.clip_norm = 1.0
  config.train.grad_accum_steps = 1
  config.train.log_every = 100
  config.train.eval_every = 500
  config.train.eval_batches = 4
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2

  if variant == "smoke":
    config.model.width = 32
    config.data.seq_len = 32
    config.data.num_kv_pairs = 4
    config.data.batch_size = 8
    config.train.steps = 20
    config.train.warmup_steps = 2
    config.train.log_every = 10
    config.train.eval_every = 10
    config.train.eval_batches = 1
    config.train.checkpoint_every = 10
  return config
