"""Sequence-parallel linear attention on 8 simulated CPU devices equals one device.

The device count is fixed when JAX starts, and tests/conftest.py has started it with one
device, so ``sp_linear_check.py`` runs every case in its own process and prints the
relative errors ``||x - ref|| / ||ref||`` and the collectives of the compiled HLO; the
tests assert on that. Each case: B=2, T=64 over 8 spans of 8 tokens, H=2, K=V=8,
chunk 4, a random initial state and packed documents whose starts fall on span edges,
inside spans, and whose bodies cross span edges (``sp_linear_check.STARTS``).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.parallel import sp_linear_check as check

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASE_NAMES = [name for name, *_ in check.CASES]
GATES = {"linear_attn": (), "retention": ("g_gamma",), "simple_gla": ("g",), "gla": ("g",),
         "delta_rule": ("beta",), "gated_delta_rule": ("g", "beta")}
# Against the single-device op: the same float32 work in another association order (the
# state passing and correction), so a few ulps of growth.
SINGLE_TOLERANCE = 1e-5
# Against the float64 oracle: the op tests' float32 bound (tests/ops).
ORACLE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def results():
  # XLA's LLVM optimizations only speed up the (tiny) run at the cost of compile time;
  # the HLO, its collectives and the float32 arithmetic are the same without them.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(ROOT / "tests/parallel/sp_linear_check.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout)


def _grad_names(name):
  op = dict((n, o) for n, o, *_ in check.CASES)[name]
  gates = () if name == "retention_default_gamma" else GATES[op]
  return {f"grad_{n}" for n in ("q", "k", "v", "initial_state") + gates}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sharded_equals_single_device(results, name):
  case = results["cases"][name]
  for against, bound in (("single", SINGLE_TOLERANCE), ("oracle", ORACLE_TOLERANCE)):
    errors = case[against]
    # Output, final state and every gradient: q, k, v, each gate, the initial state.
    assert set(errors) == {"out", "final_state"} | _grad_names(name), errors
    bad = {k: e for k, e in errors.items() if not e <= bound}
    assert not bad, f"{name} vs {against}: {bad} > {bound}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_all_gather_of_states_per_forward(results, name):
  case = results["cases"][name]
  forward, backward = case["hlo_forward"], case["hlo_backward"]
  print(f"{name}: forward {forward}, forward+backward {backward}")
  # One all-gather, of exactly the packed transitions, local states and boundary ids.
  assert forward["all-gather"] == 1, forward
  assert len(forward["all-gather shapes"]) == 1
  shape = forward["all-gather shapes"][0]
  assert shape == "f32[{},{}]".format(*case["expected_gather"]), (shape, case)
  assert forward["collective-permute"] == forward["all-to-all"] == 0, forward
  assert forward["all-reduce"] == forward["reduce-scatter"] == 0, forward
  # The backward adds the gather's transpose (a reduce-scatter, which XLA:CPU writes as
  # an all-reduce) and, for retention, the sum of g_gamma's gradient over the spans;
  # never a chain of permutes.
  assert backward["all-gather"] == 1, backward
  assert backward["collective-permute"] == backward["all-to-all"] == 0, backward
  replicated_gate = name == "retention"
  assert backward["all-reduce"] + backward["reduce-scatter"] == 1 + replicated_gate, backward


def test_outputs_keep_the_sequence_sharding(results):
  for name, case in results["cases"].items():
    batch, heads = ("data", "heads") if name.endswith("heads2") else (None, None)
    assert case["o_sharding"] == [batch, "sequence", heads, None], (name, case["o_sharding"])
    assert case["final_sharding"] == [batch, heads, None, None], (name, case["final_sharding"])


def test_bad_calls_raise_value_errors(results):
  errors = results["errors"]
  assert "must be a multiple of the 8 devices" in errors["length"]
  assert "op must be one of" in errors["op"]
  assert "is not an axis of the mesh" in errors["axis"]
