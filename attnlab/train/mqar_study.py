"""The MQAR study: one small model per mixer, trained on MQAR at several difficulties,
reported as a table of query recall accuracy and a plot."""

from __future__ import annotations

import copy
import json
import pathlib
import time

from attnlab.train.run import run

CORE_MIXERS = ("softmax", "linear_attention", "retention", "simple_gla", "gla", "deltanet",
               "gated_deltanet")


def mixer_layers(mixer: str, options) -> dict:
  """``model.layers`` for a one-mixer model: ``options["all"]`` then ``options[mixer]``
  (MixerConfig fields), or no entry when neither says anything."""
  options = dict(options or {})
  fields = {**dict(options.get("all", {})), **dict(options.get(mixer, {}))}
  return {mixer: {"mixer": mixer, **fields}} if fields else {}


def study(base, settings: dict, mixers, workdir, *, mixer_options=None,
          log=print) -> list[dict]:
  """Train ``base`` with ``model.pattern = (mixer,)`` for each mixer and each setting
  (``name -> {"data": {"<field>": value}, ...}``); ``mixer_options`` (see
  :func:`mixer_layers`) adds MixerConfig fields per mixer. Returns one result dict per
  run."""
  workdir = pathlib.Path(workdir)
  results = []
  for setting, overrides in settings.items():
    for mixer in mixers:
      config = copy.deepcopy(base)
      config.unlock()
      for block, fields in overrides.items():
        for field, value in dict(fields).items():
          config[block][field] = value
      config.model.pattern = (mixer,)
      layers = mixer_layers(mixer, mixer_options)
      if layers:
        config.model.layers = layers
      start = time.perf_counter()
      out = run(config, workdir / setting / mixer, quiet=True)
      result = {"setting": setting, "mixer": mixer, "accuracy": out["eval_accuracy"],
                "loss": out["eval_loss"], "seconds": time.perf_counter() - start}
      log(f"{setting:>8} {mixer:>16}: accuracy {result['accuracy']:.3f}, loss "
          f"{result['loss']:.3f} ({result['seconds']:.0f} s)")
      results.append(result)
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def table(results) -> str:
  """Markdown: one row per mixer, one accuracy column per setting."""
  settings = list(dict.fromkeys(r["setting"] for r in results))
  mixers = list(dict.fromkeys(r["mixer"] for r in results))
  acc = {(r["setting"], r["mixer"]): r["accuracy"] for r in results}
  lines = ["| mixer | " + " | ".join(settings) + " |",
           "|---|" + "---|" * len(settings)]
  for m in mixers:
    lines.append(f"| {m} | " + " | ".join(f"{acc[(s, m)]:.3f}" for s in settings) + " |")
  return "\n".join(lines)


def plot(results, path) -> None:
  """Grouped bars of accuracy per mixer and setting, saved as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings = list(dict.fromkeys(r["setting"] for r in results))
  mixers = list(dict.fromkeys(r["mixer"] for r in results))
  acc = {(r["setting"], r["mixer"]): r["accuracy"] for r in results}
  width = 0.8 / len(settings)
  fig, ax = plt.subplots(figsize=(8, 3.5))
  for i, s in enumerate(settings):
    xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(mixers))]
    ax.bar(xs, [acc[(s, m)] for m in mixers], width, label=s)
  ax.set_xticks(range(len(mixers)), mixers, rotation=20)
  ax.set_ylabel("MQAR query accuracy")
  ax.set_ylim(0, 1)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
