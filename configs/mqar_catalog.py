"""The MQAR study over the catalog's wider mechanisms: every causal mixer of the
feature-map, learned-map and low-rank families (``attnlab.layers.feature_map_mixers``,
``learned_map_mixers``, ``low_rank_mixers``), beside softmax and linear attention.

  # smoke size, a minute or two on CPU:
  python -m experiments.mqar_study --config=configs/mqar_catalog.py:smoke --workdir=/tmp/mc
  # the study's size (configs/mqar_study.py: 600 steps, 4 and 8 pairs):
  python -m experiments.mqar_study --config=configs/mqar_catalog.py --workdir=runs/mqar_cat

Any registered mixer runs by name in any study: ``--config.mixers='("performer",
"based")'``.
"""

from attnlab import layers
from attnlab.layers import (feature_map_mixers, learned_map_mixers, low_rank_mixers,
                            recurrence_mixers, score_variant_mixers, softmax_variant_mixers,
                            ssm_mixers)
from configs import mqar_study

VARIANTS = ("default", "smoke")
CATALOG_MODULES = (feature_map_mixers, learned_map_mixers, low_rank_mixers,
                   softmax_variant_mixers, score_variant_mixers, ssm_mixers, recurrence_mixers)


def catalog_causal_mixers() -> tuple[str, ...]:
  """The causal mixers the catalog-breadth modules register, in registration order."""
  names = []
  for module in CATALOG_MODULES:
    for name, cls in module.MIXERS.items():
      if "causal" in layers.mixer_forms(cls):
        names.append(name)
  return tuple(names)


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown mqar_catalog variant {variant!r}; choose one of {VARIANTS}")
  config = mqar_study.get_config(None if variant == "default" else "smoke")
  config.mixers = ("softmax", "linear_attention") + catalog_causal_mixers()
  return config
