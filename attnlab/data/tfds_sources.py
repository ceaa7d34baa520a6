"""TensorFlow Datasets as byte-level sources, read by random access.

``tfds.data_source`` (ArrayRecord files, no TensorFlow needed) gives indexable splits, so
a batch is a pure function of ``(seed, index)`` like every other attnlab source: a
restarted run sees the same batches. Text is UTF-8 bytes (vocabulary 256), so no
tokenizer is needed and models are comparable across datasets.

- ``TFDSLanguageModel``: next-byte prediction (``tiny_shakespeare``, ``lm1b``, any dataset
  with a text feature). A row is one random window of a long record, or short records
  packed one after another with ``segment_ids`` so attention never crosses a record;
  the prediction across a record boundary carries no weight.
- ``TFDSClassification``: a text then a separator byte; the target at the separator is the
  class, a token after the 256 bytes (``imdb_reviews``, ``ag_news_subset``, ...). The same
  decoder LM and loss train it; accuracy is measured at the separator only.

Datasets must be prepared in ``data_dir`` (``tfds build``) before a run; tests use
``tfds.testing.mock_data``.
"""

from __future__ import annotations

import numpy as np

BYTES = 256


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("the tfds sources need tensorflow-datasets and array_record: "
                      "pip install -e '.[data]'") from e
  return tfds


def _as_bytes(value) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  return bytes(np.asarray(value).item() if np.ndim(value) == 0 else value)


class _Splits:
  """The train and eval splits of one dataset, opened lazily."""

  def __init__(self, dataset, train_split, eval_split, data_dir):
    if not isinstance(dataset, str) or not dataset:
      raise ValueError(f"data.dataset must name a TFDS dataset, got {dataset!r}")
    tfds = _tfds()
    self.splits = {}
    for role, split in (("train", train_split), ("validation", eval_split)):
      try:
        self.splits[role] = tfds.data_source(dataset, split=split, data_dir=data_dir)
      except Exception as e:
        raise ValueError(f"cannot open TFDS data.dataset={dataset!r} split={split!r} "
                         f"(data_dir={data_dir!r}): {e}") from e
      if len(self.splits[role]) == 0:
        raise ValueError(f"TFDS data.dataset={dataset!r} split={split!r} is empty")
    self.info = self.splits["train"].dataset_info

  def rng(self, split, seed, index):
    if split not in self.splits:
      raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    return self.splits[split], np.random.default_rng([seed, index, split == "validation"])


def _check_feature(info, name, field, kind):
  features = info.features
  if name not in features:
    raise ValueError(f"data.{field}={name!r} is not a feature of {info.name}; it has "
                     f"{sorted(features)}")
  if kind is not None and type(features[name]).__name__ != kind:
    raise ValueError(f"data.{field}={name!r} of {info.name} is a "
                     f"{type(features[name]).__name__}, not a {kind}")


class TFDSLanguageModel:
  """Byte-level next-token prediction on a TFDS text feature."""

  def __init__(self, dataset: str, seq_len: int, *, text_feature: str = "text",
               train_split: str = "train", eval_split: str = "validation",
               data_dir: str | None = None):
    if seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    self.data = _Splits(dataset, train_split, eval_split, data_dir)
    _check_feature(self.data.info, text_feature, "text_feature", "Text")
    self.text_feature, self.seq_len, self.vocab_size = text_feature, seq_len, BYTES

  def _row(self, source, rng):
    need = self.seq_len + 1
    tokens = np.zeros(need, np.int32)
    segments = np.zeros(need, np.int32)
    filled, segment = 0, 0
    for _ in range(64 * need):  # every record may be empty; stop eventually
      if filled == need:
        break
      record = _as_bytes(source[int(rng.integers(len(source)))][self.text_feature])
      if not record:
        continue
      if filled == 0 and len(record) > need:  # a long record: one random window
        start = int(rng.integers(len(record) - need + 1))
        record = record[start:start + need]
      piece = np.frombuffer(record[:need - filled], np.uint8)
      segment += 1
      tokens[filled:filled + len(piece)] = piece
      segments[filled:filled + len(piece)] = segment
      filled += len(piece)
    if filled < need:
      raise ValueError("the dataset's records are empty: no text to model")
    return tokens, segments

  def batch(self, split: str, batch_size: int, seed: int, index: int) -> dict:
    source, rng = self.data.rng(split, seed, index)
    rows = [self._row(source, rng) for _ in range(batch_size)]
    tokens = np.stack([r[0] for r in rows])
    segments = np.stack([r[1] for r in rows])
    same = segments[:, :-1] == segments[:, 1:]  # no credit for guessing the next record
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": segments[:, :-1], "weights": same.astype(np.float32)}


class TFDSClassification:
  """Text classification as next-token prediction at a separator byte."""

  def __init__(self, dataset: str, seq_len: int, *, text_feature: str = "text",
               label_feature: str = "label", train_split: str = "train",
               eval_split: str = "test", data_dir: str | None = None):
    if seq_len < 2:
      raise ValueError(f"data.seq_len must be >= 2 (text and separator), got {seq_len}")
    self.data = _Splits(dataset, train_split, eval_split, data_dir)
    _check_feature(self.data.info, text_feature, "text_feature", "Text")
    _check_feature(self.data.info, label_feature, "label_feature", "ClassLabel")
    self.num_classes = self.data.info.features[label_feature].num_classes
    self.separator = BYTES
    self.vocab_size = BYTES + 1 + self.num_classes
    self.text_feature, self.label_feature, self.seq_len = text_feature, label_feature, seq_len

  def batch(self, split: str, batch_size: int, seed: int, index: int) -> dict:
    source, rng = self.data.rng(split, seed, index)
    inputs = np.zeros((batch_size, self.seq_len), np.int32)
    targets = np.zeros((batch_size, self.seq_len), np.int32)
    weights = np.zeros((batch_size, self.seq_len), np.float32)
    for row in range(batch_size):
      record = source[int(rng.integers(len(source)))]
      text = np.frombuffer(_as_bytes(record[self.text_feature])[:self.seq_len - 1], np.uint8)
      n = len(text)
      inputs[row, :n] = text
      inputs[row, n] = self.separator
      targets[row, :n] = inputs[row, 1:n + 1]
      targets[row, n] = BYTES + 1 + int(record[self.label_feature])
      weights[row, n] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}
