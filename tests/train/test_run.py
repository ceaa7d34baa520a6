"""The train loop: MQAR data, resume after a stop, metrics, bad configs."""

import csv

import jax
import numpy as np
import pytest

from attnlab.data.mqar import MQARConfig, mqar_batch
from attnlab.train import run as run_module
from attnlab.train.run import run
from configs import mqar as mqar_config


def _smoke():
  config = mqar_config.get_config("smoke")
  config.train.checkpoint_every = 5
  return config


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_mqar_batches_are_deterministic_and_well_formed():
  config = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=6)
  a = mqar_batch(config, 5, seed=3, index=7)
  b = mqar_batch(config, 5, seed=3, index=7)
  c = mqar_batch(config, 5, seed=3, index=8)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], c["inputs"])
  inputs, targets, weights = a["inputs"], a["targets"], a["weights"]
  assert np.array_equal(inputs[:, 1:], targets[:, :-1])
  for row in range(5):
    keys, values = inputs[row, 0:12:2], inputs[row, 1:12:2]
    assert len(set(keys)) == 6 and np.all(keys < 32) and np.all(values >= 32)
    pos = np.flatnonzero(weights[row])
    assert len(pos) == 6 and np.all(pos >= 12)
    # Each query is one of the keys, and its target is that key's value.
    lookup = dict(zip(keys, values))
    assert sorted(inputs[row, pos]) == sorted(keys)
    assert all(targets[row, p] == lookup[inputs[row, p]] for p in pos)


def test_mqar_gaps_follow_a_power_law():
  config = MQARConfig(vocab_size=128, seq_len=512, num_kv_pairs=4, power_a=0.01)
  pos = np.flatnonzero(mqar_batch(config, 64, 0, 0)["weights"]) % 512
  short = np.mean(pos < 8 + 2 * 25)  # the first 25 of 252 slots
  assert short > 0.5  # p(g) ~ g^-0.99 puts most queries close to the context


def test_resumed_run_continues_bit_for_bit(tmp_path):
  config = _smoke()
  full = run(config, tmp_path / "full", quiet=True)
  first = run(config, tmp_path / "resumed", quiet=True, stop_after=10)
  assert len(first["train_losses"]) == 1
  second = run(config, tmp_path / "resumed", quiet=True)
  rows_full = _rows(tmp_path / "full/metrics.csv")
  rows_resumed = _rows(tmp_path / "resumed/metrics.csv")
  assert [r["step"] for r in rows_resumed] == [r["step"] for r in rows_full]
  assert [r["loss"] for r in rows_resumed] == [r["loss"] for r in rows_full]
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(second["state"])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert full["eval_loss"] == second["eval_loss"]


def test_training_lowers_the_loss(tmp_path):
  config = _smoke()
  config.train.steps = 60
  config.train.log_every = 5
  config.train.learning_rate = 1e-2
  result = run(config, tmp_path, quiet=True)
  losses = result["train_losses"]
  assert losses[-1] < losses[0] - 0.5, losses  # measured: 4.88 at step 5 -> 4.07 at 60


@pytest.mark.parametrize("field, value, message", [
    ("data.name", "lm1b_typo", "unknown data.name='lm1b_typo'"),
    ("mesh_shape", (2, 1, 1), r"mesh shape \(2, 1, 1\) holds 2 devices but 1"),
    ("dtype", "float16", "dtype must be one of"),
    ("model.pattern", ("softmax", "nope"), "unknown layer 'nope'"),
])
def test_bad_config_fails_at_start_naming_the_field(tmp_path, field, value, message):
  config = _smoke()
  target, _, leaf = field.rpartition(".")
  (config if not target else config[target])[leaf] = value
  with pytest.raises(ValueError, match=message):
    run(config, tmp_path, quiet=True)


def test_batch_must_divide_the_data_axes():
  """A 2x2x2 mesh stand-in (CI has one CPU device; tests/train/test_sharding.py runs the
  real 8-device mesh)."""
  class Mesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    devices = np.zeros((2, 2, 2))
  config = _smoke()
  config.data.batch_size = 6
  with pytest.raises(ValueError, match=r"data.batch_size=6 is not divisible .*\(4 shards"):
    run_module._check_batch(config, Mesh())
