"""A local text file as a byte-level language-modelling source."""

from __future__ import annotations

import pathlib

import numpy as np

VOCAB_SIZE = 256  # bytes


class TextFile:
  """Random windows of ``seq_len + 1`` bytes: the first 90% of the file trains, the rest
  validates. Batches are deterministic in ``(seed, index)``."""

  def __init__(self, path, seq_len: int, val_fraction: float = 0.1):
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f"data.path={str(path)!r} is not a file")
    data = np.frombuffer(path.read_bytes(), np.uint8)
    split = int(len(data) * (1 - val_fraction))
    self.splits = {"train": data[:split], "validation": data[split:]}
    for name, part in self.splits.items():
      if len(part) <= seq_len + 1:
        raise ValueError(f"the {name} split of {str(path)!r} has {len(part)} bytes, fewer "
                         f"than data.seq_len + 1 = {seq_len + 1}")
    self.seq_len = seq_len
    self.vocab_size = VOCAB_SIZE

  def batch(self, split: str, batch_size: int, seed: int, index: int) -> dict:
    data = self.splits[split]
    rng = np.random.default_rng([seed, index, split == "validation"])
    starts = rng.integers(0, len(data) - self.seq_len - 1, batch_size)
    windows = np.stack([data[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
            "weights": np.ones((batch_size, self.seq_len), np.float32)}
