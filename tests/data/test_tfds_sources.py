"""TFDS sources on ``tfds.testing.mock_data`` (generated records, no download): batches
come from the records, are deterministic, pack records with segment ids, and train."""

import numpy as np
import pytest

import tensorflow_datasets as tfds  # the [dev] extra installs it (with array_record)

from attnlab.data.sources import make_source
from attnlab.train.run import run
from configs import char_lm, text_classification


@pytest.fixture
def mock():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _records(source, split, feature):
  data = source.data.splits[split]
  return [data[i][feature].encode() if isinstance(data[i][feature], str)
          else bytes(data[i][feature]) for i in range(len(data))]


@pytest.mark.parametrize("dataset", ["tiny_shakespeare", "lm1b"])
@pytest.mark.parametrize("seq_len", [5, 40])  # shorter than the records, then longer
def test_lm_rows_are_pieces_of_records(mock, dataset, seq_len):
  source = make_source({"name": "tfds_lm", "dataset": dataset, "seq_len": seq_len,
                        "eval_split": "test" if dataset == "lm1b" else "validation"})
  assert source.vocab_size == 256
  batch = source.batch("train", 6, seed=1, index=2)
  records = _records(source, "train", "text")
  inputs, targets = batch["inputs"], batch["targets"]
  assert inputs.shape == targets.shape == batch["segment_ids"].shape == (6, seq_len)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  for row in range(6):
    tokens = np.append(inputs[row], targets[row, -1])
    segments = np.append(batch["segment_ids"][row], -1)
    assert segments[0] == 1 and np.all(np.diff(segments[:-1]) >= 0)
    for seg in np.unique(segments[:-1]):
      piece = bytes(tokens[:-1][segments[:-1] == seg].astype(np.uint8))
      if seg == segments[-2]:  # the last piece also owns the final target
        piece = bytes(tokens[np.flatnonzero(segments[:-1] == seg).min():].astype(np.uint8))
      assert any(piece in r for r in records), (piece, records)
    # Weight 1 exactly where input and target belong to the same record.
    same = batch["segment_ids"][row][1:] == batch["segment_ids"][row][:-1]
    np.testing.assert_array_equal(batch["weights"][row][:-1], same.astype(np.float32))
  again = make_source({"name": "tfds_lm", "dataset": dataset, "seq_len": seq_len,
                       "eval_split": "test" if dataset == "lm1b" else "validation"})
  for key, value in again.batch("train", 6, seed=1, index=2).items():
    np.testing.assert_array_equal(value, batch[key])
  other = source.batch("train", 6, seed=1, index=3)["inputs"]
  assert not np.array_equal(other, inputs)


def test_short_records_are_packed(mock):
  source = make_source({"name": "tfds_lm", "dataset": "tiny_shakespeare", "seq_len": 64})
  longest = max(len(r) for r in _records(source, "train", "text"))
  assert longest < 64  # mock records are short, so every row packs several
  batch = source.batch("validation", 4, seed=0, index=0)
  assert np.all(batch["segment_ids"].max(axis=1) >= 2)
  assert 0 < batch["weights"].mean() < 1


def test_classification_puts_the_label_after_the_separator(mock):
  source = make_source({"name": "tfds_classification", "dataset": "imdb_reviews",
                        "seq_len": 24})
  assert source.num_classes == 2 and source.vocab_size == 256 + 1 + 2
  batch = source.batch("train", 8, seed=4, index=0)
  records = source.data.splits["train"]
  labels = {}
  for i in range(len(records)):
    text = records[i]["text"]
    labels.setdefault((text.encode() if isinstance(text, str) else text)[:23], set()).add(
        int(records[i]["label"]))
  for row in range(8):
    where = np.flatnonzero(batch["weights"][row])
    assert len(where) == 1
    n = int(where[0])
    assert batch["inputs"][row, n] == 256
    text = bytes(batch["inputs"][row, :n].astype(np.uint8))
    assert batch["targets"][row, n] - 257 in labels[text]
    np.testing.assert_array_equal(batch["targets"][row, :n - 1], batch["inputs"][row, 1:n])


@pytest.mark.parametrize("data, message", [
    ({"dataset": "no_such_dataset_xyz"}, "data.dataset='no_such_dataset_xyz'"),
    ({"dataset": ""}, "data.dataset must name a TFDS dataset"),
    ({"dataset": "tiny_shakespeare", "text_feature": "body"},
     r"data.text_feature='body' is not a feature"),
])
def test_bad_dataset_fields_are_named(mock, data, message):
  with pytest.raises(ValueError, match=message):
    make_source({"name": "tfds_lm", "seq_len": 16, **data})


def test_char_lm_trains_on_mock_tiny_shakespeare(mock, tmp_path):
  config = char_lm.get_config("smoke")
  config.data = {"name": "tfds_lm", "dataset": "tiny_shakespeare", "seq_len": 32,
                 "batch_size": 4}
  config.train.steps = 30
  config.train.log_every = 10
  config.train.learning_rate = 1e-2
  result = run(config, tmp_path, quiet=True)
  losses = result["train_losses"]
  assert np.isfinite(result["eval_loss"])
  assert losses[-1] < losses[0] - 0.5, losses


def test_text_classification_smoke_runs_on_mock_imdb(mock, tmp_path):
  result = run(text_classification.get_config("smoke"), tmp_path, quiet=True)
  assert np.isfinite(result["eval_loss"]) and 0 <= result["eval_accuracy"] <= 1


def test_char_lm_tfds_variant_reads_tiny_shakespeare(mock):
  config = char_lm.get_config("tfds")
  source = make_source(config.data)
  batch = source.batch("train", 2, seed=0, index=0)
  assert batch["inputs"].shape == (2, config.data.seq_len)
