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

Two choices make the comparison the one the MQAR papers draw (Zoology compares
mixers at equal state size):
- retention with value heads of ``head_dim`` (``expand_v=1``, RetNet's layer has 2x), so
  every recurrent mixer has the same ``K x V`` state;
- Gated DeltaNet starts with a long memory (``-A = 1``, ``dt`` in [1e-4, 1e-3], a decay
  per token >= 0.999) and without the swish gate on its output norm. With the paper's
  init (decay as low as 0.2 per token) and gate it stayed at chance at 12 pairs after
  600 and 1200 steps; with the long-memory init and the gate it reached 0.77 after 1200
  (measured, see README).
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
      "retention": {"expand_v": 1},
      "gated_deltanet": {"output_gate": False, "a_init_range": (1.0, 1.0),
                         "dt_min": 1e-4, "dt_max": 1e-3},
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
  config.settings.hard = {"data": {"num_kv_pairs": 8}}
  return config
