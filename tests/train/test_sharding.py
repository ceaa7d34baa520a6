"""Sharded training on 8 simulated CPU devices equals one device, with the parameters
sharded as the logical rules say."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

from attnlab.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eight_devices():
  # The device count is fixed when JAX starts, so the check runs in its own process.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(ROOT / "tests/train/sharded_step_check.py")],
                       env=env, capture_output=True, text=True, timeout=900, check=True)
  return json.loads(out.stdout)


def test_2x2x2_mesh_step_equals_one_device(eight_devices):
  r = eight_devices
  assert abs(r["loss8"] - r["loss1"]) <= 1e-6 * abs(r["loss1"])
  # float32 sums split over devices reorder: a few ulps per reduction.
  assert r["grad_err"] < 1e-5 and r["state_err"] < 1e-5
  assert not r["skipped"]


def test_parameters_are_sharded_as_the_rules_say(eight_devices):
  specs = {k: tuple(v) for k, v in eight_devices["specs"].items()}
  emb = "['model']['embedder']['embed']['embedding'].value"
  assert specs[emb] == ("tensor", "fsdp")  # (vocab, embed)
  q = [k for k in specs if k.startswith("['model']") and "q_proj" in k]
  down = [k for k in specs if k.startswith("['model']") and "['down']" in k]
  assert q and all(specs[k] == ("fsdp", "tensor") for k in q)  # (embed, heads)
  assert down and all(specs[k] == ("tensor", "fsdp") for k in down)  # (mlp, embed)
  moments = [k for k in specs if "['mu']" in k and "q_proj" in k]
  assert moments and all(specs[k] == ("fsdp", "tensor") for k in moments)


def test_spec_for_never_uses_a_mesh_axis_twice():
  rules = dict(sharding.DEFAULT_RULES)
  assert sharding.spec_for(("heads", "mlp"), rules) == PartitionSpec("tensor", None)
  assert sharding.spec_for((None, "embed"), rules) == PartitionSpec(None, "fsdp")


def test_mesh_has_a_sequence_axis_of_one_unless_given():
  names = ("data", "fsdp", "tensor", "sequence")
  three = sharding.make_mesh((1, 1, 1), devices=["cpu0"])
  four = sharding.make_mesh((1, 1, 1, 1), devices=["cpu0"])
  assert three.axis_names == four.axis_names == names
  assert three.devices.shape == four.devices.shape == (1, 1, 1, 1)
  # A batch [B, T]: B over the batch axes, T over the sequence axis.
  assert sharding.batch_sharding(four).spec == PartitionSpec(("data", "fsdp"), "sequence")
  with pytest.raises(ValueError, match=r"3 or 4 positive ints .* got \(1, 1\)"):
    sharding.make_mesh((1, 1), devices=["cpu0"])


def test_mesh_must_match_the_device_count():
  with pytest.raises(ValueError, match=r"mesh shape \(2, 2, 2\) holds 8 devices but 1"):
    sharding.make_mesh((2, 2, 2), devices=["cpu0"])
