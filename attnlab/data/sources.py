"""Data sources by name, from the ``data`` block of an experiment config."""

from __future__ import annotations

from attnlab.data.mqar import MQARConfig, mqar_batch
from attnlab.data.text import TextFile

SOURCES = ("mqar", "text_file", "tfds_lm", "tfds_classification")


class MQAR:
  """MQAR batches; the validation stream uses a different seed offset."""

  def __init__(self, config: MQARConfig):
    self.config = config
    self.vocab_size = config.vocab_size

  def batch(self, split: str, batch_size: int, seed: int, index: int) -> dict:
    offset = 0 if split == "train" else 1_000_003
    return mqar_batch(self.config, batch_size, seed + offset, index)


def make_source(data):
  """``data``: a ConfigDict/dict with ``name`` and the source's fields."""
  name = data["name"]
  if name == "mqar":
    return MQAR(MQARConfig(vocab_size=data["vocab_size"], seq_len=data["seq_len"],
                           num_kv_pairs=data["num_kv_pairs"], power_a=data["power_a"]))
  if name == "text_file":
    return TextFile(data["path"], data["seq_len"])
  if name in ("tfds_lm", "tfds_classification"):
    from attnlab.data import tfds_sources  # tensorflow-datasets only when asked for

    data = dict(data)
    common = dict(text_feature=data.get("text_feature", "text"),
                  train_split=data.get("train_split", "train"),
                  data_dir=data.get("data_dir"))
    if name == "tfds_lm":
      return tfds_sources.TFDSLanguageModel(
          data.get("dataset"), data["seq_len"],
          eval_split=data.get("eval_split", "validation"), **common)
    return tfds_sources.TFDSClassification(
        data.get("dataset"), data["seq_len"], label_feature=data.get("label_feature", "label"),
        eval_split=data.get("eval_split", "test"), **common)
  raise ValueError(f"unknown data.name={name!r}; choose one of {SOURCES}")
