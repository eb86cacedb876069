"""TensorBoard scalar event files, written without TensorFlow, tensorboardX or torch.

An event file is a TFRecord file of serialised `Event` messages: first one naming the
format version ("brain.Event:2"), then one per logged step whose `Summary` holds that
step's scalars (`Value.simple_value`). Each record is framed as TFRecord frames it: the
payload's length (uint64, little-endian), a masked CRC-32C of those 8 bytes, the payload,
a masked CRC-32C of the payload. TensorBoard, `tf.compat.v1.train.summary_iterator` and
tensorboardX read these files; tests/test_tb_events.py reads them back with TensorFlow's
reader, which checks both checksums.

The writer imports nothing heavy: a training process no longer imports torch, which
tensorboardX does wherever torch is installed (the cost is not measured by a record here).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

from mm1_jax import protowire

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # the Castagnoli polynomial, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: the CRC-32C rotated right by 15 bits plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None) -> bytes:
  """A serialised Event: wall_time = 1, step = 2, file_version = 3, summary = 5;
  Summary.value = 1; Value.tag = 1, Value.simple_value = 2."""
  out = protowire.double_field(1, wall_time)
  if step:
    out += protowire.int_field(2, step)
  if file_version is not None:
    out += protowire.field(3, file_version.encode())
  if scalars:
    values = b"".join(protowire.field(1, protowire.field(1, tag.encode()) + protowire.float_field(2, float(v)))
                      for tag, v in scalars.items())
    out += protowire.field(5, values)
  return out


class ScalarWriter:
  """Appends scalars to a new event file in `folder` (made if missing), named as TensorBoard
  expects: events.out.tfevents.<seconds>.<host>.<pid>.<n>, so that two writers of one
  process or two processes never share a file."""

  _count = 0

  def __init__(self, folder: str | os.PathLike):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ScalarWriter._count += 1
    now = time.time()
    self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{ScalarWriter._count}"
    self._file = self.path.open("ab")
    self._file.write(tfrecord(event(now, file_version=FILE_VERSION)))
    self._file.flush()

  def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event for the step with every scalar in it; written through to the file."""
    if scalars:
      self._file.write(tfrecord(event(time.time(), int(step), scalars=scalars)))
      self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
