"""Files a run appends to, kept in a bucket through a local mirror (`paths.Mirror`), and
what a storage outage does to them: the run goes on, nothing logged is lost.

A bucket client's errors are not OSError (gcsfs raises its HttpError, TensorFlow's gfile
its tf.errors), so the outage here raises a plain Exception subclass. The "bucket" is a
local folder standing in for the remote one: the mirror logic is what is tested; the
emulator tests (test_buckets.py) cover the real client."""

import json

import pytest

from mm1_jax import goodput, paths
from mm1_jax.metrics_writer import METRICS_FILE, MetricWriter


class HttpError(Exception):
  """What gcsfs raises once its retries are spent."""


@pytest.fixture
def outage(monkeypatch):
  """outage["on"] = True makes every upload fail; counts the attempts."""
  state = {"on": False, "attempts": 0}
  real = paths.upload

  def upload(source, target):
    state["attempts"] += 1
    if state["on"]:
      raise HttpError("503 Service Unavailable")
    real(source, target)

  monkeypatch.setattr(paths, "upload", upload)
  return state


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in paths.path(path).read_text().splitlines()]


def test_a_mirror_uploads_what_changed_retries_what_failed_and_keeps_it_until_uploaded(tmp_path, outage):
  remote = tmp_path / "bucket" / "run"
  (remote).mkdir(parents=True)
  (remote / "log.txt").write_text("old\n")
  mirror = paths.Mirror(remote, fetch=("log.txt", "missing.txt"))
  assert (mirror.local / "log.txt").read_text() == "old\n" and not (mirror.local / "missing.txt").exists()
  with (mirror.local / "log.txt").open("a") as f:
    f.write("new\n")
  (mirror.local / "sub").mkdir()
  (mirror.local / "sub" / "events").write_bytes(b"\x00\x01")
  assert mirror.sync() == []
  assert (remote / "log.txt").read_text() == "old\nnew\n" and (remote / "sub" / "events").read_bytes() == b"\x00\x01"
  attempts = outage["attempts"]
  assert mirror.sync() == [] and outage["attempts"] == attempts  # nothing changed: nothing sent

  with (mirror.local / "log.txt").open("a") as f:
    f.write("during the outage\n")
  outage["on"] = True
  failed = mirror.sync()
  assert len(failed) == 1 and failed[0].startswith("log.txt (HttpError: 503")
  failed = mirror.close()  # still down at the end: the local copy is kept, and named
  assert f"the local copy stays in {mirror.local}" in failed[-1]
  assert (mirror.local / "log.txt").read_text().endswith("during the outage\n")
  outage["on"] = False
  assert mirror.close() == [] and not mirror.local.exists()  # back up: uploaded, then removed
  assert (remote / "log.txt").read_text() == "old\nnew\nduring the outage\n"


def test_metrics_of_a_bucket_run_survive_an_outage_and_a_resume_appends_to_them(tmp_path, monkeypatch, outage,
                                                                                 capsys):
  workdir = tmp_path / "bucket" / "run"
  workdir.mkdir(parents=True)
  monkeypatch.setattr(paths, "is_remote", lambda p: str(p).startswith(str(tmp_path / "bucket")))
  writer = MetricWriter(workdir, tensorboard=False, echo=None, sync_every_s=0)
  writer.write(1, {"loss": 2.0})
  assert [r["step"] for r in _lines(workdir / METRICS_FILE)] == [1]  # sync_every_s=0: uploaded at once
  outage["on"] = True
  writer.write(2, {"loss": 1.5})  # the upload fails; training goes on
  writer.sync()
  assert "could not upload" in capsys.readouterr().out
  outage["on"] = False
  writer.write(3, {"loss": 1.25})
  writer.close()
  assert [r["step"] for r in _lines(workdir / METRICS_FILE)] == [1, 2, 3]

  again = MetricWriter(workdir, tensorboard=False, echo=None, sync_every_s=3600)  # a resumed run
  again.write(4, {"loss": 1.0})
  again.close()  # the hourly sync never came: close uploads
  assert [(r["step"], r["loss"]) for r in _lines(workdir / METRICS_FILE)] == [(1, 2.0), (2, 1.5), (3, 1.25),
                                                                              (4, 1.0)]


def test_only_the_first_process_writes_metric_files(tmp_path):
  printed = []
  writer = MetricWriter(tmp_path, echo=printed.append, files=False)
  writer.write(1, {"loss": 2.0})
  writer.close()
  assert printed and "loss 2" in printed[0]
  assert list(tmp_path.iterdir()) == []  # no metrics.jsonl, no tensorboard/


def test_a_ledger_that_cannot_be_written_warns_once_and_never_stops_the_run(tmp_path, monkeypatch, capsys):
  def fail(target, text):
    raise HttpError("429 Too Many Requests")

  monkeypatch.setattr(paths, "write_text_atomic", fail)
  ledger = goodput.Ledger(tmp_path)
  ledger.begin(0)
  ledger.flush()
  ledger.finish(0, "done", step=3)
  err = capsys.readouterr().err
  assert err.count("cannot write") == 1 and "429" in err
  assert ledger.summary()["attempts"] == 1
