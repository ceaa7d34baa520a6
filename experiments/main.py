"""Train an experiment: ``python -m experiments.main --config=configs/<exp>.py[:variant]
--workdir=DIR`` (each config's docstring has its launch command)."""

from absl import app, flags, logging
from ml_collections import config_flags

from attnlab.train.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where metrics and checkpoints go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  result = run(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))


if __name__ == "__main__":
  app.run(main)
