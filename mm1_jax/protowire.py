"""Protocol-buffer wire encoding for the few messages this package writes itself
(tf.train.Example records, TensorBoard events), so that writing them needs neither
TensorFlow nor the message classes. Fields are written in the order given."""

from __future__ import annotations

import struct


def varint(n: int) -> bytes:
  """A non-negative integer as a base-128 varint."""
  if n < 0:
    raise ValueError(f"varint of a negative number: {n}")
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def field(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2): bytes, a string or an embedded message."""
  return varint(number << 3 | 2) + varint(len(payload)) + payload


def int_field(number: int, value: int) -> bytes:
  """A non-negative int32/int64/uint field (wire type 0)."""
  return varint(number << 3) + varint(value)


def double_field(number: int, value: float) -> bytes:
  """A double field (wire type 1, little-endian)."""
  return varint(number << 3 | 1) + struct.pack("<d", value)


def float_field(number: int, value: float) -> bytes:
  """A float field (wire type 5, little-endian)."""
  return varint(number << 3 | 5) + struct.pack("<f", value)
