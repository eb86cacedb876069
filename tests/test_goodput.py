"""mm1_jax/goodput.py: the ledger's buckets across attempts, lost steps, bad ledgers, and
the hang watchdog (deadline, warm-up, the thread that dumps stacks and exits)."""

import json
import threading

import pytest

from mm1_jax import goodput


class Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


def _attempt(tmp_path, clock, restored, steps, *, step_s=1.0, compile_s=5.0, startup_s=10.0,
             checkpoint_every=4, finish=None):
  """One process: starts at clock.t, restores `restored`, runs to step `steps`."""
  ledger = goodput.Ledger(tmp_path, clock=clock, started=clock.t)
  ledger.begin(restored)
  clock.t += startup_s
  ledger.loop_started()
  for step in range(restored + 1, steps + 1):
    first = step == restored + 1
    iteration = compile_s if first else step_s
    clock.t += iteration
    if step % checkpoint_every == 0:  # inside the iteration, taken off the step's time
      clock.t += 0.5
      iteration += 0.5
      ledger.add("checkpoint", 0.5)
      ledger.checkpoint(step)
      ledger.flush()
    ledger.step(step, iteration, compile=first)
  ledger.flush()
  if finish is not None:
    ledger.finish(*finish)
  return ledger


def test_an_uninterrupted_run_splits_its_wall_time(tmp_path):
  clock = Clock()
  ledger = _attempt(tmp_path, clock, 0, 12, finish=(0, "done"))
  s = json.loads((tmp_path / "goodput.json").read_text())["summary"]
  # 10 s startup, 5 s compile, 11 steps of 1 s, 3 checkpoints of 0.5 s: 27.5 s.
  assert s["wall_s"] == pytest.approx(27.5)
  assert s["goodput"] == pytest.approx(11 / 27.5)
  assert s["badput"]["startup"] == pytest.approx(10 / 27.5)
  assert s["badput"]["compile"] == pytest.approx(5 / 27.5)
  assert s["badput"]["checkpoint"] == pytest.approx(1.5 / 27.5)
  assert s["goodput"] + sum(s["badput"].values()) == pytest.approx(1)
  assert s["lost_steps"] == 0 and s["attempts"] == 1
  m = ledger.metrics()
  assert m["goodput"] == pytest.approx(s["goodput"]) and set(m) == {"goodput"} | {
      f"badput_{b}" for b in goodput.BADPUT}


def test_steps_after_the_restored_checkpoint_are_lost_and_downtime_counted(tmp_path):
  clock = Clock()
  # Attempt 1 reaches step 11, its newest checkpoint is 8, then it is killed (no finish).
  _attempt(tmp_path, clock, 0, 11)
  end1 = clock.t
  clock.t += 100  # capacity recreated
  second = _attempt(tmp_path, clock, 8, 12, finish=(0, "done"))
  data = json.loads((tmp_path / "goodput.json").read_text())
  first, last = data["attempts"]
  # Steps 9..11 (1 s each) are redone: lost, no longer productive.
  assert first["lost_steps"] == 3 and first["buckets"]["lost"] == pytest.approx(3.0)
  assert first["buckets"]["productive"] == pytest.approx(10 - 3)
  assert first["kept_step"] == 8 and "without a record" in first["exit"]["reason"]
  assert last["exit"] == {"code": 0, "reason": "done"}
  s = data["summary"]
  wall = clock.t - 1000.0
  assert s["wall_s"] == pytest.approx(wall)
  assert s["badput"]["downtime"] == pytest.approx(100 / wall)
  assert s["badput"]["lost"] == pytest.approx(3 / wall)
  assert s["goodput"] == pytest.approx((7 + 3) / wall)  # attempt 2: steps 10..12 after its compile
  assert s["goodput"] + sum(s["badput"].values()) == pytest.approx(1)
  assert clock.t - end1 > 100
  # A third attempt from the same checkpoint 12 loses nothing; from an older one (4) it loses
  # what both kept after it, each counted once.
  third = goodput.Ledger(tmp_path, clock=clock)
  third.begin(12)
  assert [a["lost_steps"] for a in third.previous] == [3, 0]
  fourth = goodput.Ledger(tmp_path, clock=clock)
  fourth.begin(4)
  assert [a["lost_steps"] for a in fourth.previous] == [3 + 4, 4, 0]
  assert second.summary()["lost_steps"] == 3  # its view: the ledger as it started


def test_a_bad_ledger_never_stops_the_run(tmp_path, capsys):
  (tmp_path / "goodput.json").write_text("{not json")
  ledger = _attempt(tmp_path, Clock(), 0, 3)
  assert "not a goodput ledger" in capsys.readouterr().err
  assert list(tmp_path.glob("goodput.json.unreadable-*"))
  assert json.loads((tmp_path / "goodput.json").read_text())["summary"]["step"] == 3
  # Malformed entries are skipped, the good ones kept.
  data = json.loads((tmp_path / "goodput.json").read_text())
  data["attempts"] += [7, {"started": "yesterday"}, {"started": 1.0, "updated": 2.0, "buckets": "x"}]
  (tmp_path / "goodput.json").write_text(json.dumps(data))
  again = goodput.Ledger(tmp_path, clock=Clock(2000.0))
  assert len(again.previous) == 1
  again.begin(3)
  assert ledger.summary()["attempts"] == 1
  # A ledger that cannot be written: a warning, the metrics still come.
  blocked = tmp_path / "file"
  blocked.write_text("")
  nowhere = goodput.Ledger(blocked / "sub", clock=Clock())
  nowhere.begin(0)
  nowhere.flush()
  assert "cannot write" in capsys.readouterr().err
  assert 0 <= nowhere.metrics()["goodput"] <= 1
  assert goodput.read_summary(blocked) is None
  assert goodput.describe({"goodput": "x"}) == "goodput: unreadable summary"


def test_describe_names_the_largest_badput_first():
  s = goodput.summarize([{"started": 0.0, "updated": 100.0, "lost_steps": 2, "exit": {"reason": "hang"},
                          "buckets": {"productive": 60.0, "startup": 10.0, "lost": 25.0}}])
  line = goodput.describe(s)
  assert line.startswith("goodput 60.0 % of 100 s over 1 attempt (badput: lost 25.0 %, startup 10.0 %, "
                         "other 5.0 %)"), line
  assert line.endswith("; 2 steps redone; 1 hang")


# --- the hang watchdog --------------------------------------------------------------------

def _warm(wd, clock, steps, step_s=1.0):
  for i in range(steps):
    wd.begin(i + 1)
    clock.t += 60.0 if i == 0 else step_s  # the first step compiles
    wd.end()


def test_the_watchdog_arms_after_warmup_and_fires_past_the_deadline():
  clock = Clock(0.0)
  wd = goodput.HangWatchdog(10, 30, warmup=3, clock=clock)
  # The first steps (a compile far above any deadline) never trip it.
  wd.begin(1)
  clock.t += 1000
  assert wd.check() is None
  wd.end()
  for step in (2, 3):
    assert wd.deadline() is None
    wd.begin(step)
    clock.t += 2
    wd.end()
  assert wd.deadline() == pytest.approx(30)  # max(30, 10 x 2 s)
  wd.begin(4)
  clock.t += 29
  assert wd.check() is None
  clock.t += 2
  info = wd.check()
  assert info == {"step": 4, "elapsed_s": 31.0, "deadline_s": 30.0, "median_s": 2.0, "window": 2}
  # Between end() and the next begin() (checkpoints, evaluations) nothing is timed.
  wd.end()
  clock.t += 10_000
  assert wd.check() is None
  # Slow steps raise the deadline: factor x median.
  for _ in range(5):
    wd.begin(0)
    clock.t += 20
    wd.end()
  assert wd.deadline() == pytest.approx(200)


def test_a_factor_of_zero_disables_the_watchdog():
  clock = Clock(0.0)
  wd = goodput.HangWatchdog(0, 1, warmup=1, clock=clock)
  _warm(wd, clock, 5)
  wd.begin(6)
  clock.t += 1e6
  assert wd.check() is None and not wd.enabled
  wd.start()
  assert wd._thread is None


def test_the_watchdog_thread_dumps_every_stack_and_exits(tmp_path):
  exited, seen = [], threading.Event()

  def exit_(code):
    exited.append(code)
    seen.set()

  ledger = goodput.Ledger(tmp_path)
  ledger.begin(0)

  def on_hang(info):
    goodput.dump_stacks(info, tmp_path / "hang_host0.txt", 0)
    ledger.finish(goodput.EXIT_HANG, "hang", lock_timeout=10, **info)

  wd = goodput.HangWatchdog(2, 0.5, warmup=2, on_hang=on_hang, exit=exit_, poll_s=0.05)
  for i in range(3):
    wd.begin(i + 1)
    wd.end()
  wd.start()
  try:
    wd.begin(4)  # and never end it: the main thread waits here, as on a dead collective
    assert seen.wait(60), "the watchdog did not fire"
  finally:
    wd.stop()
  assert exited == [goodput.EXIT_HANG] == [75]
  dump = (tmp_path / "hang_host0.txt").read_text()
  assert "hang: step 4 has run" in dump and "exits 75" in dump
  assert "test_the_watchdog_thread_dumps_every_stack_and_exits" in dump  # the main thread's stack
  assert "hang-watchdog" in dump or "_watch" in dump  # and the others'
  record = json.loads((tmp_path / "goodput.json").read_text())
  assert record["attempts"][-1]["exit"]["reason"] == "hang" and record["attempts"][-1]["exit"]["step"] == 4
  assert record["summary"]["hangs"] == 1


def test_stacks_are_dumped_even_where_stderr_is_no_file(tmp_path, monkeypatch):
  import io
  fake = io.StringIO()  # no file descriptor: faulthandler cannot write to it
  monkeypatch.setattr("sys.stderr", fake)
  info = {"step": 9, "elapsed_s": 70.0, "deadline_s": 60.0, "median_s": 3.0, "window": 20}
  goodput.dump_stacks(info, tmp_path / "hang_host3.txt", 3)
  for text in (fake.getvalue(), (tmp_path / "hang_host3.txt").read_text()):
    assert "hang: step 9 has run 70.0 s, past its deadline of 60.0 s" in text and "process 3" in text
    assert "in test_stacks_are_dumped_even_where_stderr_is_no_file" in text


def test_the_process_start_is_before_now():
  import time
  start = goodput.process_start_time()
  assert start <= time.time() and time.time() - start < 24 * 3600
