"""Byte-level text classification on a TFDS dataset (IMDB reviews by default).

The text, a separator, then the class as one more token: the decoder LM and its loss
train it unchanged, and ``eval_accuracy`` is the classification accuracy. Prepare the
dataset first (``tfds build imdb_reviews``), then from the repository root:

  python -m experiments.main --config=configs/text_classification.py --workdir=/tmp/imdb
  # AG News (4 classes; the text is its "description" feature):
  python -m experiments.main --config=configs/text_classification.py --workdir=/tmp/ag \\
      --config.data.dataset=ag_news_subset --config.data.text_feature=description
  # CPU, seconds (needs the dataset or tfds.testing.mock_data):
  python -m experiments.main --config=configs/text_classification.py:smoke --workdir=/tmp/c
"""

import ml_collections

VARIANTS = ("default", "smoke")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown text_classification variant {variant!r}; choose one of "
                     f"{VARIANTS}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "bfloat16"
  config.mesh_shape = (-1, 1, 1)

  config.model = ml_collections.ConfigDict()
  config.model.width = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.pattern = ("gated_deltanet", "softmax")
  config.model.layers = ml_collections.ConfigDict()
  config.model.chunk_size = 64
  config.model.tie_embeddings = True

  config.data = ml_collections.ConfigDict()
  config.data.name = "tfds_classification"
  config.data.dataset = "imdb_reviews"
  config.data.text_feature = "text"
  config.data.label_feature = "label"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.data_dir = None
  config.data.seq_len = 1024
  config.data.batch_size = 32

  config.train = ml_collections.ConfigDict()
  config.train.steps = 3000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.train.weight_decay = 0.1
  config.train.clip_norm = 1.0
  config.train.grad_accum_steps = 1
  config.train.log_every = 100
  config.train.eval_every = 500
  config.train.eval_batches = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2

  if variant == "smoke":
    config.dtype = "float32"
    config.model.width = 32
    config.model.num_layers = 2
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
