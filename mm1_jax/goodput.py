"""Goodput accounting and the hang watchdog of a training run.

Goodput is the share of a run's wall time spent on training steps whose results were kept.
The rest (badput) is split into buckets:

  startup     process start to the first step, less the evaluation in between
  compile     the first step of each attempt (tracing and XLA compilation)
  checkpoint  blocking checkpoint time (starting saves, waiting for them at the end)
  eval        evaluations during training
  data        waiting for the next batch
  lost        steps done after the newest checkpoint of an attempt that then ended
              (preemption, crash, hang): redone by the next attempt
  downtime    between attempts: from the last record of one to the start of the next
              (capacity recreated, workers set up, or a killed process's last seconds)
  other       the remainder: logging, metrics, the host's share of each step not above

Process 0 keeps the ledger in <workdir>/goodput.json, one entry per attempt (process
start), rewritten atomically at every metrics record, checkpoint and exit. A new attempt
reads the previous ones: the steps they did beyond the checkpoint it restored become
`lost`. The file's "summary" holds the totals as of the last write, so tools
(tpu_scripts/worker.py, watch.py, supervise.py) read it without this module.

`HangWatchdog` is a thread that ends the process with EXIT_HANG when a step runs far
longer than the recent median (a collective waiting on a dead host): it dumps every
thread's stack to stderr and to <workdir>/hang_host<i>.txt first.

Only the standard library: tpu_scripts import it without jax.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from mm1_jax import paths  # standard library only until a path is used

# mm1-train's exit code after the hang watchdog fired (EX_TEMPFAIL: try again).
EXIT_HANG = 75

LEDGER = "goodput.json"
BUCKETS = ("startup", "compile", "productive", "checkpoint", "eval", "data", "lost")
BADPUT = ("startup", "compile", "checkpoint", "eval", "data", "lost", "downtime", "other")


def process_start_time() -> float:
  """When this process started (wall clock), from /proc; now where /proc is missing."""
  now = time.time()
  try:  # the process's start in clock ticks after boot, against the uptime (both to 10 ms)
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    if age >= 0:
      return now - age
  except (OSError, ValueError, IndexError):
    pass
  return now


def _num(x, default=0.0) -> float:
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x else default


def _valid_attempt(a) -> bool:
  return (isinstance(a, dict) and all(isinstance(a.get(k), (int, float)) for k in ("started", "updated"))
          and isinstance(a.get("buckets"), dict))


def summarize(attempts: list[dict]) -> dict:
  """Goodput and badput fractions of wall time over `attempts` (ledger entries)."""
  attempts = sorted((a for a in attempts if _valid_attempt(a)), key=lambda a: a["started"])
  totals = {b: 0.0 for b in BUCKETS}
  downtime, previous_end = 0.0, None
  for a in attempts:
    for b in BUCKETS:
      totals[b] += max(0.0, _num(a["buckets"].get(b)))
    if previous_end is not None:
      downtime += max(0.0, a["started"] - previous_end)
    previous_end = a["updated"] if previous_end is None else max(previous_end, a["updated"])
  wall = (max(a["updated"] for a in attempts) - attempts[0]["started"]) if attempts else 0.0
  accounted = sum(totals.values()) + downtime
  badput = {b: totals[b] for b in BUCKETS if b != "productive"}
  badput.update(downtime=downtime, other=max(0.0, wall - accounted))
  wall = max(wall, accounted)  # clocks of several hosts may disagree a little
  frac = (lambda s: s / wall) if wall > 0 else (lambda s: 0.0)
  last = attempts[-1] if attempts else {}
  return {"goodput": frac(totals["productive"]), "badput": {b: frac(badput[b]) for b in BADPUT},
          "wall_s": wall, "productive_s": totals["productive"], "attempts": len(attempts),
          "lost_steps": sum(int(_num(a.get("lost_steps"))) for a in attempts),
          "hangs": sum(1 for a in attempts if isinstance(a.get("exit"), dict) and a["exit"].get("reason") == "hang"),
          "step": int(_num(last.get("step"))), "updated": last.get("updated")}


def describe(summary: dict) -> str:
  """One line: 'goodput 81.3 % of 5.20 h over 3 attempts (lost 6.1 %, ...)'."""
  try:
    wall = float(summary["wall_s"])
    badput = sorted(((float(v), k) for k, v in summary.get("badput", {}).items() if float(v) >= 0.0005),
                    reverse=True)
    span = f"{wall / 3600:.2f} h" if wall >= 3600 else f"{wall:.0f} s"
    n = int(summary.get("attempts", 0))
    text = (f"goodput {100 * float(summary['goodput']):.1f} % of {span} over {n} attempt{'s' * (n != 1)}"
            f" (badput: " + (", ".join(f"{k} {100 * v:.1f} %" for v, k in badput) or "none") + ")")
    if summary.get("lost_steps"):
      text += f"; {int(summary['lost_steps'])} steps redone"
    if summary.get("hangs"):
      text += f"; {int(summary['hangs'])} hang{'s' * (int(summary['hangs']) != 1)}"
    return text
  except (KeyError, TypeError, ValueError, AttributeError):
    return "goodput: unreadable summary"


def read_summary(workdir: str | Path) -> dict | None:
  """The summary a run's ledger holds, or None (no ledger, or unreadable)."""
  try:
    summary = json.loads((paths.path(workdir) / LEDGER).read_text()).get("summary")
  except Exception:  # noqa: BLE001  (missing, unreadable, or a bucket client's error)
    return None
  return summary if isinstance(summary, dict) else None


class Ledger:
  """This attempt's time buckets, and the run's earlier attempts read from the workdir.

  Every method is safe to call from the watchdog thread too; file trouble (a full disk, a
  hand-edited ledger) is reported once and never stops the run.
  """

  def __init__(self, workdir: str | Path, *, write: bool = True, clock: Callable[[], float] = time.time,
               started: float | None = None, echo: Callable[[str], None] = print):
    self.path = paths.path(workdir) / LEDGER
    self.write, self.clock, self.echo = write, clock, echo
    self._lock = threading.Lock()
    self._warned: set[str] = set()
    self.previous: list[dict] = self._read() if write else []
    now = clock()
    self.attempt = {"started": started if started is not None else now, "updated": now,
                    "host": socket.gethostname(), "pid": os.getpid(), "start_step": 0, "step": 0,
                    "kept_step": 0, "checkpoint_step": None, "productive_steps": 0, "lost_steps": 0,
                    "buckets": {b: 0.0 for b in BUCKETS}, "exit": None}
    self._loop_started = False
    self._since_step = 0.0  # seconds put in other buckets since the last step()

  def _read(self) -> list[dict]:
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return []
    except Exception as e:  # noqa: BLE001  (OSError, or a bucket client's own error)
      self._warn(f"cannot read {self.path} ({e}); goodput counts this attempt on")
      return []
    try:
      attempts = json.loads(text)["attempts"]
      if not isinstance(attempts, list):
        raise TypeError
    except (ValueError, KeyError, TypeError):
      keep = self.path.with_name(f"{LEDGER}.unreadable-{int(time.time())}")
      with contextlib.suppress(Exception):
        self.path.rename(keep)
      self._warn(f"{self.path} is not a goodput ledger; kept as {keep.name}, starting a new one")
      return []
    bad = [a for a in attempts if not _valid_attempt(a)]
    if bad:
      self._warn(f"{self.path}: ignoring {len(bad)} malformed attempt record(s)")
    return [a for a in attempts if _valid_attempt(a)]

  def _warn(self, msg: str) -> None:
    kind = " ".join(msg.split(" ", 2)[:2])  # each kind of trouble once: cannot read / cannot write / ...
    if kind not in self._warned:
      self._warned.add(kind)
      print(f"warning: goodput: {msg}", file=sys.stderr, flush=True)

  # ------------------------------------------------------------------ recording

  def begin(self, start_step: int) -> None:
    """This attempt starts from checkpoint `start_step` (0: from scratch): steps earlier
    attempts did after it are lost."""
    with self._lock:
      a = self.attempt
      a.update(start_step=int(start_step), step=int(start_step), kept_step=int(start_step))
      for p in self.previous:
        if not isinstance(p.get("exit"), dict):
          p["exit"] = {"code": None, "reason": "ended without a record (killed, preempted or lost)"}
        kept = int(_num(p.get("kept_step"), _num(p.get("step"))))
        first = int(_num(p.get("start_step")))
        if kept <= start_step:
          continue
        lost_steps = kept - max(int(start_step), first)
        b = p["buckets"]
        productive = _num(b.get("productive"))
        done = max(1, int(_num(p.get("productive_steps"))))
        seconds = min(productive, lost_steps * (productive + _num(b.get("lost"))) / done)
        b["productive"], b["lost"] = productive - seconds, _num(b.get("lost")) + seconds
        p["lost_steps"] = int(_num(p.get("lost_steps"))) + lost_steps
        p["kept_step"] = max(int(start_step), first)
      self._persist()

  def add(self, bucket: str, seconds: float) -> None:
    with self._lock:
      self.attempt["buckets"][bucket] += max(0.0, float(seconds))
      self._since_step += max(0.0, float(seconds))

  @contextlib.contextmanager
  def timed(self, bucket: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.add(bucket, time.perf_counter() - t)

  def loop_started(self) -> None:
    """The step loop begins: everything since the process started, but the buckets already
    counted (an evaluation at step 0), was start-up."""
    with self._lock:
      if self._loop_started:
        return
      self._loop_started = True
      a = self.attempt
      a["buckets"]["startup"] += max(0.0, self.clock() - a["started"] - sum(a["buckets"].values()))
      self._since_step = 0.0

  def step(self, step: int, seconds: float, compile: bool = False) -> None:
    """Step `step` is done; `seconds` is its iteration of the loop, of which the time put
    in other buckets since the last call (data, checkpoint, eval) is taken off. The first
    step of an attempt compiles (`compile`)."""
    with self._lock:
      a = self.attempt
      seconds, self._since_step = seconds - self._since_step, 0.0
      if compile:
        a["buckets"]["compile"] += max(0.0, seconds)
      else:
        a["buckets"]["productive"] += max(0.0, seconds)
        a["productive_steps"] += 1
      a["step"] = a["kept_step"] = int(step)

  def checkpoint(self, step: int) -> None:
    with self._lock:
      self.attempt["checkpoint_step"] = int(step)

  def flush(self) -> None:
    with self._lock:
      self._persist()

  def finish(self, code: int | None, reason: str, lock_timeout: float = -1, **detail) -> None:
    """Records how this attempt ended and writes the ledger."""
    locked = self._lock.acquire(timeout=lock_timeout)
    if not locked:
      self._warn("the ledger is busy; recording the exit anyway")
    try:
      self.attempt["exit"] = {"code": code, "reason": reason, **detail}
      self._persist()
    finally:
      if locked:
        self._lock.release()

  # ------------------------------------------------------------------ reading

  def summary(self) -> dict:
    with self._lock:
      self.attempt["updated"] = self.clock()
      return summarize(self.previous + [self.attempt])

  def metrics(self) -> dict[str, float]:
    """goodput and badput_<bucket>, fractions of the run's wall time so far."""
    s = self.summary()
    return {"goodput": s["goodput"], **{f"badput_{k}": v for k, v in s["badput"].items()}}

  def _persist(self) -> None:
    self.attempt["updated"] = self.clock()
    if not self.write:
      return
    attempts = self.previous + [self.attempt]
    data = {"version": 1, "summary": summarize(attempts), "attempts": attempts}
    try:
      paths.write_text_atomic(self.path, json.dumps(data, indent=1))
    except Exception as e:  # noqa: BLE001  (a bucket's client raises its own errors, not OSError)
      self._warn(f"cannot write {self.path} ({e}); goodput is still logged to metrics")


class HangWatchdog:
  """Ends the process when one step runs past its deadline.

  The loop calls begin() when a step starts and end() when it is done; the time between
  them is the step's. After `warmup` steps (the first compiles) the deadline of each step
  is max(min_seconds, factor x median of the last `window` steps). A thread checks every
  `poll_s`; on expiry it calls `on_hang(info)` (dumps, ledger) and then `exit(EXIT_HANG)`.
  `factor` 0 disables it. `check()` does one check, for tests and the thread.
  """

  def __init__(self, factor: float, min_seconds: float, *, warmup: int = 5, window: int = 50,
               on_hang: Callable[[dict], None] | None = None, exit: Callable[[int], None] = os._exit,
               clock: Callable[[], float] = time.monotonic, poll_s: float = 1.0):
    self.factor, self.min_seconds, self.warmup = float(factor), float(min_seconds), int(warmup)
    self.times: collections.deque[float] = collections.deque(maxlen=max(1, int(window)))
    self.on_hang, self._exit, self.clock, self.poll_s = on_hang, exit, clock, poll_s
    self.done = 0
    self._running: tuple[int, float] | None = None  # (step, start)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.fired: dict | None = None

  @property
  def enabled(self) -> bool:
    return self.factor > 0

  def deadline(self) -> float | None:
    """Seconds the next step may take; None while warming up (or disabled)."""
    if not self.enabled or self.done < self.warmup or not self.times:
      return None
    return max(self.min_seconds, self.factor * statistics.median(self.times))

  def begin(self, step: int) -> None:
    self._running = (int(step), self.clock())

  def end(self) -> None:
    running, self._running = self._running, None
    if running is None:
      return
    self.done += 1
    if self.done > 1:  # the first step of a process compiles: not a step time
      self.times.append(self.clock() - running[1])

  def check(self) -> dict | None:
    """The hang's description if the running step is past its deadline, else None."""
    running, deadline = self._running, self.deadline()
    if running is None or deadline is None:
      return None
    elapsed = self.clock() - running[1]
    if elapsed <= deadline:
      return None
    return {"step": running[0], "elapsed_s": round(elapsed, 1), "deadline_s": round(deadline, 1),
            "median_s": round(statistics.median(self.times), 3), "window": len(self.times)}

  def start(self) -> "HangWatchdog":
    if self.enabled and self._thread is None:
      self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def _watch(self) -> None:
    while not self._stop.wait(self.poll_s):
      info = self.check()
      if info is None or self._stop.is_set():
        continue
      self.fired = info
      if self.on_hang is not None:
        # Dumps and ledger writes on a stuck filesystem must not keep the process alive.
        t = threading.Thread(target=self.on_hang, args=(info,), name="hang-report", daemon=True)
        t.start()
        t.join(timeout=60)
      self._exit(EXIT_HANG)
      return


def dump_stacks(info: dict, path: str | Path, process_index: int = 0) -> None:
  """Every thread's stack, with a line saying why, to stderr and to `path`."""
  msg = (f"hang: step {info['step']} has run {info['elapsed_s']} s, past its deadline of "
         f"{info['deadline_s']} s (median step {info['median_s']} s over the last {info['window']}); "
         f"process {process_index} on {socket.gethostname()} dumps every thread's stack and exits "
         f"{EXIT_HANG} so that the run is restarted from its newest checkpoint")
  print(f"\n{msg}", file=sys.stderr, flush=True)
  _dump(sys.stderr)
  try:  # to a local file first (faulthandler writes to a file descriptor), then where asked
    with tempfile.TemporaryFile("w+") as f:
      f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n\n")
      _dump(f)
      f.seek(0)
      paths.write_text_atomic(path, f.read())
  except Exception as e:  # noqa: BLE001  (as in Ledger._persist: a dump never masks the hang)
    print(f"warning: could not write {path}: {e}", file=sys.stderr, flush=True)


def _dump(f) -> None:
  """faulthandler's dump of every thread; Python's own where `f` has no file descriptor."""
  f.flush()
  try:
    faulthandler.dump_traceback(file=f, all_threads=True)
  except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
      f.write(f"Thread 0x{ident:016x} ({names.get(ident, '?')}), most recent call first:\n")
      for summary in reversed(traceback.extract_stack(frame)):
        f.write(f'  File "{summary.filename}", line {summary.lineno} in {summary.name}\n')
      f.write("\n")
  f.flush()
