"""Ring and Ulysses attention on 8 simulated CPU devices equal one device.

The device count is fixed when JAX starts, and tests/conftest.py has started it with one
device, so ``sp_ring_check.py`` runs every case in its own process and prints the
relative errors ``||x - ref|| / ||ref||`` against ``dot_product_attention`` on one
device and the collectives the compiled HLO executes; the tests assert on that. Each
case: B=2, T=64, H=8, N=4 query heads and K=4, 2 or 1 key/value heads; the ring runs
over 8 devices of 8 tokens (zig-zag chunks of 4, blocks of 4) unless named otherwise,
Ulysses over a ``data 2 x sequence 4`` mesh (N must divide over the sequence axis).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from attnlab.ops import masks
from attnlab.parallel import ring as ring_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The same float32 work as the single-device op, in another association order (the
# ring's log-sum-exp merges, the gradients summed over the ring): a few ulps.
SINGLE_TOLERANCE = 1e-5
DEVICES = 8
KV_SHAPES = {  # the packed [k | v] block per device of each ring case: [B, T/P, K, 2H]
    "ring_full_contiguous": "f32[2,8,4,16]",
    "ring_causal_zigzag_gqa": "f32[2,8,2,16]",
    "ring_causal_documents_zigzag_gqa": "f32[2,8,2,16]",
    "ring_causal_window_prelaid_zigzag": "f32[2,8,4,16]",
}


@pytest.fixture(scope="module")
def results():
  # XLA's LLVM optimizations only speed up the (tiny) run at the cost of compile time;
  # the HLO, its collectives and the float32 arithmetic are the same without them.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(ROOT / "tests/parallel/sp_ring_check.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout)


def test_sharded_equals_single_device(results):
  for name, case in results["cases"].items():
    errors = case["single"]
    assert set(errors) == {"out", "grad_query", "grad_key", "grad_value"}, errors
    bad = {k: e for k, e in errors.items() if not e <= SINGLE_TOLERANCE}
    assert not bad, f"{name}: {bad} > {SINGLE_TOLERANCE}"
    assert case["finite"], name


def test_every_feature_is_covered(results):
  names = set(results["cases"])
  for feature in ("full", "causal_zigzag", "causal_contiguous", "window", "documents",
                  "gqa", "mqa", "prelaid", "heads2"):
    assert any(feature in n and n.startswith("ring") for n in names), feature
  assert any(n.startswith("ulysses_full") for n in names)
  assert any(n.startswith("ulysses_causal") for n in names)


def test_queries_without_keys_give_zeros(results):
  case = results["cases"]["ring_window_empty_rows_zigzag_mqa"]
  assert case["empty_rows_zero"] and case["finite"]


def test_outputs_keep_the_sequence_sharding(results):
  for name, case in results["cases"].items():
    if case["out_sharding"] is None:
      continue
    expected = {"ring_causal_zigzag_data2_seq2_heads2": ["data", "sequence", "heads"],
                "ulysses_full_data2_seq4": ["data", "sequence"],
                "ulysses_causal_documents_gqa_data2_seq4": ["data", "sequence"]}
    axes = [a for a in case["out_sharding"] if a != "None"]
    assert axes == expected.get(name, ["sequence"]), (name, case["out_sharding"])


def _kinds(counts, kind):
  return {key.split(" ")[1]: n for key, n in counts.items() if key.startswith(kind)}


@pytest.mark.parametrize("name", sorted(KV_SHAPES))
def test_ring_permutes_each_block_once_per_step(results, name):
  case = results["cases"][name]
  forward, both = case["hlo_forward"], case["hlo_backward"]
  print(f"{name}: forward {forward}, forward+backward {both}")
  kv = KV_SHAPES[name]
  permutes, both_permutes = (_kinds(c, "collective-permute") for c in (forward, both))
  # Forward: P - 1 permutes of [k | v]. Backward: P - 1 more of [k | v] and P of
  # [dk | dv] (same shape): the block's gradient travels with it and goes home.
  assert permutes[kv] == DEVICES - 1, forward
  assert both_permutes[kv] == 3 * DEVICES - 2, both
  # Natural <-> zig-zag inside: two permutes for [q | k | v] in, two for the output
  # out; the backward adds their transposes. Nothing else moves but the ids (one gather).
  reorder = "zigzag" in name and "prelaid" not in name
  assert sum(permutes.values()) == DEVICES - 1 + 4 * reorder, forward
  assert sum(both_permutes.values()) == 3 * DEVICES - 2 + 8 * reorder, both
  has_ids = "documents" in name or "prelaid" in name
  for counts in (forward, both):
    assert sum(_kinds(counts, "all-gather").values()) == has_ids, counts
    assert not _kinds(counts, "all-to-all") and not _kinds(counts, "all-reduce"), counts


def test_ring_over_two_devices(results):
  # P = 2: one permute forward; backward one of [k | v] (XLA merges it with the
  # forward's, the same permute of the same block) and two of [dk | dv].
  both = results["cases"]["ring_causal_zigzag_data2_seq2_heads2"]["hlo_backward"]
  assert _kinds(both, "collective-permute")["f32[1,32,1,16]"] == 3, both


def test_ulysses_two_all_to_alls_no_permutes(results):
  for name in ("ulysses_full_data2_seq4", "ulysses_causal_documents_gqa_data2_seq4"):
    case = results["cases"][name]
    both = case["hlo_backward"]
    assert sum(_kinds(both, "all-to-all").values()) == 4, both   # 2 forward, 2 backward
    assert not _kinds(both, "collective-permute"), both
  forward = results["cases"]["ulysses_full_data2_seq4"]["hlo_forward"]
  assert forward == {"all-to-all f32[1,16,1,3,8]": 1, "all-to-all f32[1,16,1,8]": 1}, forward


def test_bad_calls_raise_value_errors(results):
  errors = results["errors"]
  assert "needs N % 8 == 0" in errors["ulysses_heads"]
  assert "or 4 % K == 0, got N=12, K=3" in errors["ulysses_kv_heads"]
  assert "must be a multiple of 16 (zigzag layout" in errors["ring_length"]
  assert "bias is not supported" in errors["ring_bias"]
  assert "sinks is not supported" in errors["ring_sinks"]
  assert "S must equal T" in errors["ring_cross"]
  assert "layout must be one of" in errors["ring_layout"]
  assert "is not an axis of the mesh" in errors["ring_axis"]


# ------------------------------------------------------------ layout (no devices needed)


def test_layout_positions_zigzag():
  pos = ring_lib.layout_positions(16, 4)
  np.testing.assert_array_equal(pos.reshape(4, 2, 2),
                                [[[0, 1], [14, 15]], [[2, 3], [12, 13]],
                                 [[4, 5], [10, 11]], [[6, 7], [8, 9]]])
  np.testing.assert_array_equal(np.sort(pos), np.arange(16))
  np.testing.assert_array_equal(ring_lib.layout_positions(16, 4, "contiguous"),
                                np.arange(16))


def _work(layout, mask):
  """Live ``[4, 4]`` blocks per device over the ring, T=64 over 8 devices."""
  live = ring_lib._live_blocks(mask, 64, DEVICES, layout, 4, 4)
  return live.sum((1, 2, 3))


def test_zigzag_balances_causal_work_and_skips_future_blocks():
  zigzag = _work("zigzag", masks.Causal())
  contiguous = _work("contiguous", masks.Causal())
  # Zig-zag: 3 of the 4 diagonal blocks and 2 of 4 in each of the 7 other steps.
  np.testing.assert_array_equal(zigzag, np.full(DEVICES, 3 + 2 * 7))
  # Contiguous: device p sees its diagonal and p full blocks before it.
  np.testing.assert_array_equal(contiguous, 3 + 4 * np.arange(DEVICES))
  assert zigzag.sum() == contiguous.sum()   # the same causal work, spread evenly
  # A window of 5 keeps only blocks near the diagonal: far ring steps cost nothing.
  window = _work("contiguous", masks.Causal() & masks.LocalWindow(5, 0))
  np.testing.assert_array_equal(window, [3] + [6] * (DEVICES - 1))
