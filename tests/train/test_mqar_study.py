"""The MQAR study driver: runs each mixer at each setting, tabulates and plots."""

import json

from attnlab.train import mqar_study
from configs import mqar_study as study_config


def test_study_runs_every_mixer_and_setting(tmp_path):
  config = study_config.get_config("smoke")
  config.train.steps = 4
  config.train.log_every = 2
  config.train.eval_every = 0
  settings = {name: value.to_dict() for name, value in config.settings.items()}
  lines = []
  results = mqar_study.study(config, settings, ("deltanet",), tmp_path, log=lines.append)
  assert [(r["setting"], r["mixer"]) for r in results] == [("easy", "deltanet"),
                                                           ("hard", "deltanet")]
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in results)
  assert len(lines) == 2
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert (tmp_path / "hard/deltanet/metrics.csv").exists()


def test_table_and_plot(tmp_path):
  results = [{"setting": s, "mixer": m, "accuracy": a, "loss": 1.0, "seconds": 1.0}
             for s, m, a in [("easy", "softmax", 1.0), ("easy", "retention", 0.25),
                             ("hard", "softmax", 0.975), ("hard", "retention", 0.0625)]]
  assert mqar_study.table(results).splitlines() == [
      "| mixer | easy | hard |", "|---|---|---|",
      "| softmax | 1.000 | 0.975 |", "| retention | 0.250 | 0.062 |"]
  mqar_study.plot(results, tmp_path / "mqar.png")
  assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
