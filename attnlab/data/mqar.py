"""Multi-query associative recall (MQAR), generated on the fly.

The task of Zoology (Arora et al. 2023, §3) and the Based paper: a sequence opens with
``num_kv_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...``; later, each key appears again
as a query, followed by its value, at a gap drawn from a power law (short gaps likely,
long ones possible). The model is scored on predicting the value right after each query
key. Keys and values come from disjoint halves of the vocabulary; every other position
holds a random token of the value half (noise the model must ignore). Noise never
repeats a key, so the answer is never ambiguous even with a small vocabulary (with
noise from the whole vocabulary, a 128-token vocabulary would put some query's key
among the noise of 40% of the rows).

Batches are NumPy dicts, deterministic in ``(seed, index)``:
``inputs [B, T]`` int32, ``targets [B, T]`` int32 (the next token), ``weights [B, T]``
float32 (1 at query positions, where accuracy is measured; 0 elsewhere).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """``vocab_size`` tokens split in halves for keys and values; ``seq_len`` tokens per
  example; ``power_a`` the exponent of the gap distribution ``p(g) ∝ g^(a - 1)``."""

  vocab_size: int = 256
  seq_len: int = 128
  num_kv_pairs: int = 8
  power_a: float = 0.01

  def __post_init__(self):
    if self.num_kv_pairs < 1:
      raise ValueError(f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
    if self.vocab_size // 2 < self.num_kv_pairs:
      raise ValueError(f"vocab_size={self.vocab_size} leaves fewer than num_kv_pairs="
                       f"{self.num_kv_pairs} distinct keys (keys use half the vocabulary)")
    slots = (self.seq_len - 2 * self.num_kv_pairs) // 2
    if slots < self.num_kv_pairs:
      raise ValueError(f"seq_len={self.seq_len} is too short for num_kv_pairs="
                       f"{self.num_kv_pairs}: need at least {4 * self.num_kv_pairs}")
    if not 0 < self.power_a <= 1:
      raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


def _gap_probabilities(num_slots: int, power_a: float) -> np.ndarray:
  gaps = np.arange(1, num_slots + 1, dtype=np.float64)
  p = power_a * gaps ** (power_a - 1)
  return p / p.sum()


def mqar_batch(config: MQARConfig, batch_size: int, seed: int, index: int) -> dict:
  """Batch ``index`` of the stream ``seed`` (the same arrays on every call)."""
  rng = np.random.default_rng([seed, index])
  n, t = config.num_kv_pairs, config.seq_len
  half = config.vocab_size // 2
  context = 2 * n
  num_slots = (t - context) // 2
  probs = _gap_probabilities(num_slots, config.power_a)

  inputs = rng.integers(half, config.vocab_size, (batch_size, t + 1))
  weights = np.zeros((batch_size, t + 1), np.float32)
  rows = np.arange(batch_size)[:, None]
  keys = np.argsort(rng.random((batch_size, half)), axis=1)[:, :n]  # distinct per row
  values = rng.integers(half, config.vocab_size, (batch_size, n))
  inputs[:, 0:context:2] = keys
  inputs[:, 1:context:2] = values
  # Query slot j sits at position context + 2 j; each key takes a distinct slot.
  slots = np.stack([rng.choice(num_slots, n, replace=False, p=probs)
                    for _ in range(batch_size)])
  positions = context + 2 * slots
  inputs[rows, positions] = keys
  inputs[rows, positions + 1] = values
  weights[rows, positions] = 1.0
  return {"inputs": inputs[:, :t].astype(np.int32),
          "targets": inputs[:, 1:].astype(np.int32),
          "weights": weights[:, :t]}
