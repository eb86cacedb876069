"""TensorBoard event files written by mm1_jax.tb_events, read back by TensorFlow's own reader
(`tf.compat.v1.train.summary_iterator`, which checks each record's two checksums and parses
the Event protos with the real message classes)."""

import json

import pytest

from mm1_jax import tb_events
from mm1_jax.metrics_writer import MetricWriter

tf = pytest.importorskip("tensorflow")


def read(path):
  """[(step, {tag: value})] of every event after the version event, and the version."""
  events = list(tf.compat.v1.train.summary_iterator(str(path)))
  return events[0].file_version, [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]


def test_crc32c_check_value():
  # The CRC-32C check value (RFC 3720, iSCSI): the checksum of the ASCII digits 1 to 9.
  assert tb_events.crc32c(b"123456789") == 0xE3069283


def test_metric_writer_events_read_back_by_tensorflow(tmp_path):
  """Catches a wrong field number or wire type (the message would not parse, or the values
  would land in other fields), a wrong checksum or mask (the reader raises DataLossError),
  a step written as 0, and a scalar logged under another step."""
  writer = MetricWriter(tmp_path, echo=None)
  writer.write(0, {"loss": 6.5, "learning_rate": 0.0})
  writer.write(10, {"loss": 2.25, "accuracy": 0.75})
  writer.write(300, {"loss": 1.5})
  writer.close()
  (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  version, events = read(path)
  assert version == "brain.Event:2"
  assert events == [(0, {"loss": 6.5, "learning_rate": 0.0}), (10, {"loss": 2.25, "accuracy": 0.75}),
                    (300, {"loss": 1.5})]
  # metrics.jsonl holds the same steps
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 10, 300]


def test_two_writers_of_one_process_write_separate_files(tmp_path):
  a, b = tb_events.ScalarWriter(tmp_path), tb_events.ScalarWriter(tmp_path)
  a.add_scalars(1, {"x": 1.0})
  b.add_scalars(2, {"x": 2.0})
  a.close()
  b.close()
  assert a.path != b.path
  assert read(a.path)[1] == [(1, {"x": 1.0})] and read(b.path)[1] == [(2, {"x": 2.0})]
