"""The MQAR study, attnlab's main job (``make run``): a 2-layer model per core mixer on
MQAR at two difficulties, a table of recall accuracy and a plot in the workdir.

  python -m experiments.mqar_study --config=configs/mqar_study.py --workdir=runs/mqar_study
  # seconds, for tests and notebooks:
  python -m experiments.mqar_study --config=configs/mqar_study.py:smoke --workdir=/tmp/s
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
  config.settings = ml_collections.ConfigDict()
  if variant == "smoke":
    config.settings.easy = {"data": {"num_kv_pairs": 2}}
    config.settings.hard = {"data": {"num_kv_pairs": 4}}
    config.mixers = ("softmax", "gated_deltanet")
  else:
    config.settings.easy = {"data": {"seq_len": 64, "num_kv_pairs": 4}}
    config.settings.hard = {"data": {"seq_len": 128, "num_kv_pairs": 16}}
  return config
