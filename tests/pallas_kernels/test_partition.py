"""Kernel launches split over batch and heads by XLA's partitioner (8 simulated devices).

``pallas_kernels.partition.batch_head_partitioned`` is what lets a Mosaic kernel run under
a multi-device ``jit``. The check runs a jnp stand-in for a kernel launch (GQA attention
with a replicated table) in a subprocess with 8 CPU devices: sharded over batch and heads
it must see per-device shards and add no collective; sharded over the sequence it must
gather first and still be exact.
"""

import json
import os
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "partition_check.py")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, CHECK], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_and_head_shards_run_locally_without_collectives(results):
  r = results["batch_heads"]
  assert r["err_o"] < 1e-5 and r["err_m"] < 1e-5, r
  assert r["collectives"] == 0, r
  # The launch saw one device's shard: batch 4 / 2, query heads 8 / 4, key heads 4 / 4.
  assert [[2, 16, 2, 8], [2, 16, 1, 8]] in r["shard_shapes"], r["shard_shapes"]
  assert "('data', None, 'model'" in r["o_spec"], r["o_spec"]
  assert "('data', 'model'" in r["m_spec"], r["m_spec"]


def test_sequence_sharded_inputs_are_gathered_and_exact(results):
  r = results["sequence"]
  assert r["err_o"] < 1e-5 and r["err_m"] < 1e-5, r
  assert r["collectives"] > 0, r
