"""A byte-level (character) language model on a local text file, e.g. Tiny Shakespeare.

Launch from the repository root (the text defaults to ``../shared/data/tinyshakespeare.txt``
beside the repository; point ``--config.data.path`` at any UTF-8 or ASCII file):

  # One GPU, a few minutes: a Gated DeltaNet / softmax hybrid (2:1), 6 layers, width 384
  python -m experiments.main --config=configs/char_lm.py --workdir=/tmp/char_lm
  # The same model with softmax attention in every layer
  python -m experiments.main --config=configs/char_lm.py --workdir=/tmp/char_lm_softmax \\
      --config.model.pattern='("softmax",)'
  # CPU, seconds:
  python -m experiments.main --config=configs/char_lm.py:smoke --workdir=/tmp/char_smoke
  # The same model on TFDS tiny_shakespeare (``tfds build tiny_shakespeare`` first; any
  # TFDS text dataset works: --config.data.dataset=lm1b --config.data.eval_split=test)
  python -m experiments.main --config=configs/char_lm.py:tfds --workdir=/tmp/char_tfds

The first 90% of the file trains, the last 10% validates (``eval_loss`` in nats per byte).
"""

import pathlib

import ml_collections

VARIANTS = ("default", "smoke", "tfds")
DEFAULT_TEXT = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown char_lm variant {variant!r}; choose one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "bfloat16"   # compute; parameters and optimizer state stay float32
  config.mesh_shape = (-1, 1, 1)

  config.model = ml_collections.ConfigDict()
  config.model.width = 384
  config.model.num_layers = 6
  config.model.num_heads = 6
  config.model.pattern = ("gated_deltanet", "gated_deltanet", "softmax")
  config.model.layers = ml_collections.ConfigDict()
  config.model.chunk_size = 64
  config.model.tie_embeddings = True
  config.model.remat = False
  config.model.scan_layers = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "text_file"
  config.data.path = str(DEFAULT_TEXT)
  config.data.seq_len = 256
  config.data.batch_size = 64

  config.train = ml_collections.ConfigDict()
  config.train.steps = 600
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 0.1
  config.train.clip_norm = 1.0
  config.train.grad_accum_steps = 1
  config.train.log_every = 100
  config.train.eval_every = 100
  config.train.eval_batches = 64
  config.train.checkpoint_every = 300
  config.train.keep_checkpoints = 2

  if variant == "tfds":
    config.data = ml_collections.ConfigDict(dict(
        name="tfds_lm", dataset="tiny_shakespeare", text_feature="text",
        train_split="train", eval_split="validation", data_dir=None,
        seq_len=config.data.seq_len, batch_size=config.data.batch_size))

  if variant == "smoke":
    config.dtype = "float32"
    config.model.width = 32
    config.model.num_layers = 3
    config.model.num_heads = 2
    config.model.chunk_size = 16
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.train.steps = 10
    config.train.warmup_steps = 2
    config.train.log_every = 5
    config.train.eval_every = 5
    config.train.eval_batches = 1
    config.train.checkpoint_every = 5
  return config
