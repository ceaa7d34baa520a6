"""The MQAR study: ``python -m experiments.mqar_study --config=configs/mqar_study.py
--workdir=DIR`` trains every mixer of the config at every setting, prints the accuracy
table and writes ``results.json`` and ``mqar.png`` into the workdir."""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from attnlab.train import mqar_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where results, plot and runs go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  settings = {name: value.to_dict() for name, value in config.settings.items()}
  options = config.get("mixer_options")
  results = mqar_study.study(config, settings, config.mixers, _WORKDIR.value,
                             mixer_options=None if options is None else options.to_dict())
  print(mqar_study.table(results))
  png = pathlib.Path(_WORKDIR.value) / "mqar.png"
  mqar_study.plot(results, png)
  print(f"plot: {png}")


if __name__ == "__main__":
  app.run(main)
