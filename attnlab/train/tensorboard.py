"""Scalar metrics as TensorBoard event files, without TensorFlow.

An event file is a sequence of records ``len (uint64) | masked crc32c(len) | data |
masked crc32c(data)`` whose data are ``Event`` protocol buffers (tensorboard's
``event.proto``): ``wall_time = 1 (double)``, ``step = 2 (int64)``, ``file_version = 3
(string)``, ``summary = 5 (Summary)``; ``Summary.value = 1 (repeated Value)`` with
``Value.tag = 1 (string)`` and ``Value.simple_value = 2 (float)``. The few fields needed
are encoded here by hand, so writing metrics adds no dependency.
"""

from __future__ import annotations

import pathlib
import socket
import struct
import time


def _crc32c_table():
  poly = 0x82F63B78  # Castagnoli, reflected
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict | None = None) -> bytes:
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                     + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


class SummaryWriter:
  """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>`` (a new file
  per writer, as TensorBoard expects; a resumed run adds a file beside the old one)."""

  def __init__(self, logdir):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{now:.6f}.{socket.gethostname()}"
    with self.path.open("wb") as f:
      f.write(_record(_event(now, 0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict):
    """One event at ``step`` holding a scalar per ``values`` item (numbers only)."""
    with self.path.open("ab") as f:
      f.write(_record(_event(time.time(), int(step), scalars=values)))
