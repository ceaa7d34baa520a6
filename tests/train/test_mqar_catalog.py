"""configs/mqar_catalog.py: every causal catalog-breadth mixer trains on MQAR by name."""

import math

from attnlab import layers
from attnlab.train import mqar_study
from configs import mqar_catalog


def test_catalog_config_lists_every_causal_catalog_mixer():
  config = mqar_catalog.get_config("smoke")
  registered = set(layers.mixer_names())
  causal = mqar_catalog.catalog_causal_mixers()
  assert causal, "the catalog modules register no causal mixer"
  assert set(causal) <= set(config.mixers) <= registered
  for module in mqar_catalog.CATALOG_MODULES:
    for name, cls in module.MIXERS.items():
      assert (name in causal) == ("causal" in layers.mixer_forms(cls)), name


def test_catalog_mixers_train_by_name_at_the_smoke_size(tmp_path):
  """The study runs catalog mixers by name (two of them here, to keep CI short; every
  mixer's forward, gradients and decoding are tested in tests/layers/test_mixers.py)."""
  config = mqar_catalog.get_config("smoke")
  config.mixers = ("performer", "hedgehog")
  config.train.steps = 3
  config.train.log_every = 1
  config.train.eval_every = 0
  easy = {"easy": config.settings.easy.to_dict()}
  results = mqar_study.study(config, easy, config.mixers, tmp_path,
                             mixer_options=config.mixer_options.to_dict(), log=lambda _: None)
  assert [r["mixer"] for r in results] == list(config.mixers)
  for r in results:
    assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]), r
