"""TensorBoard event files: TFRecord framing with masked CRC-32C, the tags and values."""

import struct

from attnlab.train.tensorboard import SummaryWriter


def _crc32c_bitwise(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of
  the writer's table-driven version."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
  assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the published check value


def test_events_are_framed_records_holding_the_scalars(tmp_path):
  writer = SummaryWriter(tmp_path)
  writer.scalars(7, {"loss": 2.5, "eval_accuracy": 0.625})
  writer.scalars(8, {"loss": 1.75})
  files = list(tmp_path.iterdir())
  assert len(files) == 1 and "tfevents" in files[0].name
  data = files[0].read_bytes()
  records, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert length_crc == _masked(_crc32c_bitwise(header))
    body = data[offset + 12:offset + 12 + length]
    (body_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert body_crc == _masked(_crc32c_bitwise(body))
    records.append(body)
    offset += 16 + length
  assert offset == len(data)
  assert b"brain.Event:2" in records[0]  # the file-version event comes first
  scalars = b"".join(records[1:])
  for tag, value in (("loss", 2.5), ("eval_accuracy", 0.625), ("loss", 1.75)):
    assert tag.encode() in scalars and struct.pack("<f", value) in scalars
