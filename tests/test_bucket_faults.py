"""Checkpoints in a Cloud Storage bucket that misbehaves: a fault-injecting proxy
(helpers/faulty_gcs.py) sits between the clients (gcsfs for orbax's files, tensorstore for
the arrays) and the storage emulator of tests/test_buckets.py, and fails, drops or delays the
requests a test names.

What orbax relies on in a bucket, where nothing can be renamed: the step folder is written
under its final name and `<step>/commit_success.txt` is uploaded last; a step is listed only
when that object exists. A failed save must therefore leave no marker, and whatever it left
must never be listed or restored."""

import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.faulty_gcs import FaultyGCS, Rule
from test_buckets import BUCKET, emulator, objects  # noqa: F401 (emulator: a fixture)

from mm1_jax.checkpoint import Checkpointer

pytestmark = pytest.mark.slow  # starts an emulator process

MARKER = "commit_success.txt"


@pytest.fixture(scope="module")
def proxy(emulator):  # noqa: F811
  proxy = FaultyGCS(emulator).start()
  yield proxy
  proxy.stop()


@pytest.fixture
def run(proxy, monkeypatch, request, tmp_path):
  """A run folder in the bucket, reached by both clients through the proxy: (gs:// URL,
  object-name prefix)."""
  monkeypatch.chdir(tmp_path)  # a relative "gs:" folder, were one made, lands here and is checked
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test")
  proxy.clear()
  yield f"gs://{BUCKET}/{request.node.name}", f"{request.node.name}/"
  proxy.clear()
  assert not (tmp_path / "gs:").exists()


def make_state(seed: int) -> dict:
  """Values whose bits a lossy round trip would change: -0.0, a subnormal, bfloat16, ints."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((16, 24)).astype(np.float32)
  w[0, :2] = (-0.0, np.float32(1e-45))
  return {"params": {"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(24), jnp.bfloat16)},
          "step": jnp.int32(seed)}


def assert_bitwise_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def step_objects(emulator, prefix: str, step: int) -> set[str]:  # noqa: F811
  return {n for n in objects(emulator, f"{prefix}checkpoints/{step}/")}


def writes(proxy: FaultyGCS, prefix: str, step: int) -> list[tuple[str, str, str]]:
  """The uploads and deletes of step `step`'s objects the proxy saw, in order."""
  names = rf"(name=|/o/){prefix}checkpoints/{step}/"
  return [r for r in proxy.requests(names) if r[0] in ("POST", "PUT", "DELETE")]


def test_a_step_is_listed_only_once_its_commit_marker_is_uploaded_last(run, proxy, emulator):  # noqa: F811
  """The property orbax's listing relies on in a bucket. Catches: the marker uploaded before
  some object of the step (a reader could list a step still being written), or a step
  listed without the marker."""
  url, prefix = run
  state = make_state(1)
  ckpt = Checkpointer(f"{url}/checkpoints", save_every=1)
  assert ckpt.save(1, state, {"batches_consumed": 1}, force=True)
  ckpt.close()
  seen = writes(proxy, prefix, 1)
  assert any("/state/" in target for _, target, _ in seen) and any("/data/" in t for _, t, _ in seen)
  method, target, _ = seen[-1]
  assert method == "POST" and f"name={prefix}checkpoints/1/{MARKER}" in target, seen[-3:]
  assert f"{prefix}checkpoints/1/{MARKER}" in step_objects(emulator, prefix, 1)

  # Without the marker (and everything else in place), the step is not a checkpoint.
  name = urllib.parse.quote(f"{prefix}checkpoints/1/{MARKER}", safe="")
  urllib.request.urlopen(urllib.request.Request(f"{emulator}/storage/v1/b/{BUCKET}/o/{name}", method="DELETE"))
  assert Checkpointer(f"{url}/checkpoints").all_steps() == []


def test_array_uploads_failing_mid_save_leave_the_previous_checkpoint(run, proxy, emulator):  # noqa: F811
  """Every array upload of the newer step fails (HTTP 403, which no client retries) after the
  first. Catches: the failure not reported; the partial step listed or restored; the older
  step deleted (max_to_keep=1) although the newer never completed; the writing process
  listing no step at all afterwards (orbax's own list drops the older step when the save
  starts: fixed in Checkpointer by re-reading the bucket)."""
  url, prefix = run
  old, new = make_state(1), make_state(2)
  ckpt = Checkpointer(f"{url}/checkpoints", save_every=1, max_to_keep=1)
  assert ckpt.save(1, old, {"batches_consumed": 1}, force=True)
  ckpt.wait()
  rule = proxy.add_rule(Rule(method="POST", pattern=rf"name={prefix}checkpoints/2/state/.*/d/", status=403,
                             after=1))
  assert ckpt.save(2, new, {"batches_consumed": 2}, force=True)
  with pytest.raises(Exception, match="injected fault"):
    ckpt.wait()
  assert rule.acted >= 1
  assert f"{prefix}checkpoints/2/{MARKER}" not in step_objects(emulator, prefix, 2)
  assert step_objects(emulator, prefix, 2)  # a partial step really was left
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  restored, data = ckpt.restore(1, abstract(old))
  assert_bitwise_equal(restored, old) and data == {"batches_consumed": 1}
  ckpt.close()

  reader = Checkpointer(f"{url}/checkpoints")
  assert reader.latest_step() == 1 and reader.all_steps() == [1]
  assert_bitwise_equal(reader.restore(1, abstract(old))[0], old)
  reader.close()


def test_a_failed_commit_marker_upload_leaves_a_step_no_run_lists_and_a_restart_replaces(
    run, proxy, emulator):  # noqa: F811
  """Every object of the newer step is written but its marker upload fails. Catches: a step
  with all its data but no marker listed as complete; a reader deleting it (only the writer
  may); a restarted run (remove_partial=True) keeping objects of the failed attempt, in a
  step it saves again or beside it."""
  url, prefix = run
  old, new, redo = make_state(1), make_state(2), make_state(3)
  ckpt = Checkpointer(f"{url}/checkpoints", save_every=1)
  assert ckpt.save(1, old, {"batches_consumed": 1}, force=True)
  ckpt.wait()
  proxy.add_rule(Rule(method="POST", pattern=rf"name={prefix}checkpoints/2/{MARKER}", status=403))
  assert ckpt.save(2, new, {"batches_consumed": 2}, force=True)
  with pytest.raises(OSError, match="injected fault"):
    ckpt.close()
  partial = step_objects(emulator, prefix, 2)
  assert {f"{prefix}checkpoints/2/state/{MARKER}", f"{prefix}checkpoints/2/data/{MARKER}"} <= partial
  assert f"{prefix}checkpoints/2/{MARKER}" not in partial
  proxy.clear()

  reader = Checkpointer(f"{url}/checkpoints")
  assert reader.all_steps() == [1]
  assert_bitwise_equal(reader.restore(1, abstract(old))[0], old)
  reader.close()
  assert step_objects(emulator, prefix, 2) == partial  # a reader deletes nothing

  # The restarted run resumes from step 1 and saves step 2 again.
  restarted = Checkpointer(f"{url}/checkpoints", save_every=1, remove_partial=True)
  assert restarted.latest_step() == 1
  assert restarted.save(2, redo, {"batches_consumed": 2}, force=True)
  restarted.close()
  fresh = step_objects(emulator, prefix, 2)
  stale = {n for n in partial if "/d/" in n}  # array data files: named by a random hash
  assert stale and not stale & fresh
  again = Checkpointer(f"{url}/checkpoints")
  assert again.all_steps() == [1, 2]
  restored, data = again.restore(2, abstract(redo))
  assert_bitwise_equal(restored, redo) and data == {"batches_consumed": 2}
  assert_bitwise_equal(again.restore(1, abstract(old))[0], old)
  again.close()


def test_a_partial_step_is_deleted_by_a_restarted_run_only(run, proxy, emulator):  # noqa: F811
  """The commit marker upload fails; the run's next save reports it. Catches: the failure
  of an async save lost (the next save starting as if it had succeeded), and a restarted
  run (remove_partial=True) leaving the partial step's objects in the bucket."""
  url, prefix = run
  old, new = make_state(1), make_state(2)
  ckpt = Checkpointer(f"{url}/checkpoints", save_every=1)
  assert ckpt.save(1, old, {}, force=True)
  ckpt.wait()
  proxy.add_rule(Rule(method="POST", pattern=rf"name={prefix}checkpoints/2/{MARKER}", status=403))
  assert ckpt.save(2, new, {}, force=True)
  with pytest.raises(OSError, match="injected fault"):
    ckpt.save(3, new, {}, force=True)
  assert ckpt.all_steps() == [1]
  assert ckpt.save(3, new, {}, force=True)  # the error is reported once; saving goes on
  ckpt.close()
  assert ckpt.all_steps() == [1, 3] and step_objects(emulator, prefix, 2)

  restarted = Checkpointer(f"{url}/checkpoints", save_every=1, remove_partial=True)
  assert restarted.all_steps() == [1, 3]
  assert restarted.save(4, new, {}, force=True)  # waits for the clean-up first
  restarted.close()
  assert not step_objects(emulator, prefix, 2)
  assert_bitwise_equal(Checkpointer(f"{url}/checkpoints").restore(3, abstract(new))[0], new)


def test_transient_faults_that_retries_cover_still_give_a_bitwise_checkpoint(run, proxy, emulator):  # noqa: F811
  """503s, a dropped connection and a delay, on both clients' requests, each a few times.
  Catches: a client giving up on a transient error, or a retried upload leaving a torn or
  duplicated object (the restore would differ or fail)."""
  url, prefix = run
  state = make_state(5)
  step = rf"{prefix}checkpoints/7/"
  rules = [
      proxy.add_rule(Rule(method="POST", pattern=rf"uploadType=media&name={step}", status=503, times=2)),
      proxy.add_rule(Rule(method="POST", pattern=rf"name={step}data/metadata&uploadType=resumable$",
                          status=503, times=1)),
      proxy.add_rule(Rule(method="POST", pattern=rf"name={step}state/_METADATA", drop=True, times=1)),
      proxy.add_rule(Rule(method="POST", pattern=rf"name={step}{MARKER}", delay=1.0, times=1)),
      proxy.add_rule(Rule(method="GET", pattern=rf"/o/{step}", status=503, probability=0.3, seed=0,
                          times=2)),
  ]
  ckpt = Checkpointer(f"{url}/checkpoints", save_every=1)
  assert ckpt.save(7, state, {"batches_consumed": 7}, force=True)
  ckpt.close()
  assert [r.acted for r in rules] == [2, 1, 1, 1, 2], proxy.log
  proxy.clear()
  again = Checkpointer(f"{url}/checkpoints")
  assert again.all_steps() == [7]
  restored, data = again.restore(7, abstract(state))
  again.close()
  assert_bitwise_equal(restored, state) and data == {"batches_consumed": 7}
  assert f"{prefix}checkpoints/7/{MARKER}" in step_objects(emulator, prefix, 7)
