"""The MQAR study, attnlab's main job (``make run``): a 2-layer model per core mixer on
MQAR at two difficulties, a table of recall accuracy and a plot in the workdir.

  python -m experiments.mqar_study --config=configs/mqar_study.py --workdir=runs/mqar_study
  # seconds, for tests and notebooks:
  python -m experiments.mqar_study --config=configs/mqar_study.py:smoke --workdir=/tmp/s

Every mixer gets a short convolution of width 4 on q, k, v (the delta rules' own
default, given to all so that no mixer needs its second layer to form an induction head)
and softmax gets qk-norm; the budget (600 steps of 16 sequences at lr 1e-2) fits the
14 runs in a few minutes on two CPU cores. GLA runs with 32-token chunks (faster on CPU,
the same function).
"""

import ml_collections

from configs import mqar

VARIANTS = ("default", "smoke")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown mqar_study variant {variant!r}; choose one of {VARIANTS}")
  config = mqar.get_config("smoke" if variant == "smoke" else None)
  config.mixers = ("softmax", "linear_attention", "retention", "simple_gla", "gla",
                   "deltanet", "gated_deltanet")
  config.mixer_options = ml_collections.ConfigDict({
      "all": {"conv_size": 4},
      "softmax": {"qk_norm": True},
      "gla": {"chunk_size": 32},
  })
  config.settings = ml_collections.ConfigDict()
  if variant == "smoke":
    config.settings.easy = {"data": {"num_kv_pairs": 2}}
    config.settings.hard = {"data": {"num_kv_pairs": 4}}
    config.mixers = ("softmax", "gated_deltanet")
    return config
  config.data.seq_len = 64
  config.data.batch_size = 16
  config.train.steps = 600
  config.train.learning_rate = 1e-2
  config.train.warmup_steps = 30
  config.train.log_every = 150
  config.train.eval_every = 0       # one evaluation, at the end
  config.train.eval_batches = 16    # 256 sequences
  config.train.checkpoint_every = 600
  config.settings.easy = {"data": {"num_kv_pairs": 4}}
  config.settings.hard = {"data": {"num_kv_pairs": 12}}
  return config
