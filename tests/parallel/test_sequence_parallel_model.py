"""The model-level switch: under a mesh with a ``sequence`` axis of more than one device
the mixers run ring attention and state passing, and a DecoderLM equals one device.

The device count is fixed when JAX starts, and tests/conftest.py has started it with one
device, so ``sp_model_check.py`` runs on 8 simulated CPU devices in its own process and
prints the relative errors ``||x - ref|| / ||ref||`` of the loss and of every parameter
gradient against one device, the collectives of the compiled program, the losses of two
train steps of ``attnlab.train.run`` and the messages of unsupported options.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The same float32 work in another association order (sums split over devices, the
# ring's merges, the state passing): a few ulps.
SINGLE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def results():
  # XLA's LLVM optimizations only speed up the (tiny) run at the cost of compile time.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(ROOT / "tests/parallel/sp_model_check.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout)


def test_loss_and_every_gradient_equal_one_device(results):
  model = results["model"]
  assert model["finite"]
  assert model["loss"] <= SINGLE_TOLERANCE, model["loss"]
  grads = model["grads"]
  # Both mixers' own parameters are among them: the ring's q/k/v, the delta rule's gates
  # and its short convolution (whose taps cross shard edges).
  for name in ("q_proj", "a_log", "dt_bias", "beta_proj", "['conv']['weight']"):
    assert any(name in key for key in grads), (name, sorted(grads))
  bad = {k: e for k, e in grads.items() if not e <= SINGLE_TOLERANCE}
  assert not bad, f"{bad} > {SINGLE_TOLERANCE}"


def test_mixers_run_their_sequence_parallel_forms(results):
  counts = results["model"]["collectives"]
  # Ring attention over 4 devices: the packed [k | v] block [B/2, T/4, K, 2H] is
  # permuted P - 1 times forward, P - 1 + P times backward.
  assert counts.get("collective-permute f32[2,8,2,32]") == 3 * 4 - 2, counts
  # State passing: one all-gather of the 4 spans' [K, K] transitions and [K, V] states
  # (2 rows x 2 heads x 16 x 16 each) and their edge segment ids (2 + 2).
  assert counts.get("all-gather f32[4,2052]") == 1, counts
  # Nothing else is gathered but the ring's [B, T, 2] segment ids: no activation is
  # assembled whole (the convolution's boundary tokens move by permutes).
  gathers = {key for key in counts if key.startswith("all-gather")}
  assert gathers == {"all-gather f32[4,2052]", "all-gather s32[2,32,2]"}, counts


def test_train_step_with_a_sequence_axis_equals_without(results):
  with_axis, without = results["train"]["sequence2"], results["train"]["sequence1"]
  # Two train losses and the final eval loss of mesh_shape (4, 1, 1, 2) and (8, 1, 1).
  assert len(with_axis) == len(without) == 3
  for a, b in zip(with_axis, without):
    assert abs(a - b) <= SINGLE_TOLERANCE * abs(b), (with_axis, without)


def test_options_ring_attention_lacks_raise(results):
  errors = results["errors"]
  prefix = ("sequence parallelism (mesh axis 'sequence' of 4 devices) runs softmax "
            "attention as ring attention, which does not support ")
  assert errors["alibi"] == prefix + "MixerConfig.position='alibi'"
  assert errors["sinks"] == prefix + "MixerConfig.sinks=True"
  assert errors["implementation"].startswith(prefix + "MixerConfig.implementation='reference'")
  assert errors["lengths"].startswith(prefix + "lengths (right padding")
