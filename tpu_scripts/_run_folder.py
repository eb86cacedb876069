"""The run folder of a pod job: where its workdir is (a bucket with --bucket, or a mounted
folder), the checks on bucket URLs, and reading its newest metrics and goodput from this
machine. Part of the tpu_scripts' shared layer (`_pod` re-exports it)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from mm1_jax import goodput as goodput_lib
from mm1_jax.paths import is_remote


class UsageError(Exception):
  """A bad value on the command line; the script prints it and exits 2."""


# Cloud Storage bucket names: lower-case letters, digits, '-', '_' and '.', starting and ending
# with a letter or digit; 3-63 characters, or up to 222 with dots, 63 between two dots.
_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_BUCKET_PART = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?")
_IPV4 = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
# Object-name folders under the bucket: plain characters only (no spaces, wildcards or '#').
_PREFIX_PART = re.compile(r"[A-Za-z0-9._=+@,~-]+")



def bucket_name_problem(name: str) -> str | None:
  """Why `name` is not a valid Cloud Storage bucket name, or None when it is."""
  if not 3 <= len(name) <= (222 if "." in name else 63):
    return "a bucket name has 3 to 63 characters (up to 222 with dots)"
  if not _BUCKET_CHARS.fullmatch(name):
    return ("a bucket name holds lower-case letters, digits, '-', '_' and '.', and starts and ends with a "
            "letter or digit")
  if any(not _BUCKET_PART.fullmatch(part) or len(part) > 63 for part in name.split(".")):
    return "each dot-separated part of a bucket name has 1 to 63 characters and starts and ends with a letter or digit"
  if _IPV4.fullmatch(name):
    return "a bucket name cannot be an IP address"
  if name.startswith("goog") or re.search(r"g[o0]{2}g[l1]e", name):
    return "a bucket name cannot start with 'goog' or contain 'google'"
  return None


def parse_bucket_url(value: str, flag: str = "--bucket") -> str:
  """`gs://BUCKET[/PREFIX]` checked against Cloud Storage's naming rules; returned without a
  trailing '/'. Raises UsageError on anything else."""
  if not value.startswith("gs://"):
    raise UsageError(f"{flag}={value!r}: expected a Cloud Storage URL, gs://BUCKET[/PREFIX]")
  rest = value[len("gs://"):]
  if rest.endswith("/"):
    rest = rest[:-1]
  bucket, _, prefix = rest.partition("/")
  problem = bucket_name_problem(bucket)
  if problem:
    raise UsageError(f"{flag}={value!r}: {problem}")
  for part in prefix.split("/") if prefix else []:
    if not _PREFIX_PART.fullmatch(part) or part in (".", ".."):
      raise UsageError(f"{flag}={value!r}: the folders after the bucket name are non-empty, neither '.' nor "
                       f"'..', and hold letters, digits and . _ = + @ , ~ - only (not {part!r})")
  return f"gs://{bucket}" + (f"/{prefix}" if prefix else "")


def check_workdir(workdir: str) -> str:
  """A workdir as the workers get it: a gs:// URL (checked) or an absolute path."""
  if is_remote(workdir):
    return parse_bucket_url(workdir, "--workdir")
  if not workdir.startswith("/"):
    raise UsageError(f"--workdir={workdir!r} must be an absolute path on the workers, or gs://BUCKET/...")
  return workdir


BUCKET_HELP = ("where runs live (the lead option): a Cloud Storage bucket, and a folder in it. A run's workdir "
               "is then gs://BUCKET/PREFIX/runs/RUN_NAME, which mm1-train writes directly: nothing is mounted, "
               "setup_workers.py checks each worker can write there, worker logs are uploaded there, watch.py "
               "and supervise.py read metrics and goodput from there")


def add_run_folder_flags(p: argparse.ArgumentParser) -> None:
  """--workdir for the commands that read a run's folder from this machine (besides --bucket)."""
  g = p.add_argument_group("the run folder (read from this machine: the goodput ledger, metrics.jsonl)")
  g.add_argument("--workdir", default=None,
                 help="the run folder itself: a gs:// URL, or a path where this machine sees it (by default "
                      "the --bucket's run folder, else the bucket workdir the workers report)")


def run_folder(args: argparse.Namespace, statuses: list[dict] | None = None) -> str | None:
  """The run folder this machine can read: --workdir, --bucket's run folder, or a bucket
  workdir the workers report (a mounted one is only seen by the workers); else None."""
  if getattr(args, "workdir", None):
    return args.workdir
  if getattr(args, "bucket", None):
    return f"{args.bucket}/runs/{args.run_name}"
  reported = sorted({s["workdir"] for s in statuses or [] if isinstance(s.get("workdir"), str)
                     and is_remote(s["workdir"])})
  return reported[0] if len(reported) == 1 else None


def check_run_folder_args(args: argparse.Namespace) -> None:
  if getattr(args, "workdir", None):
    args.workdir = parse_bucket_url(args.workdir, "--workdir") if is_remote(args.workdir) else args.workdir


def _tail_bytes(path, size: int = 1 << 16) -> bytes:
  """The last `size` bytes of a file or object (all of it where it cannot seek)."""
  with path.open("rb") as f:
    try:
      f.seek(0, os.SEEK_END)
      end = f.tell()
      f.seek(max(0, end - size))
      return f.read()
    except (OSError, ValueError, AttributeError, NotImplementedError):
      pass
  return path.read_bytes()[-size:]


def read_run_folder(workdir: str) -> dict:
  """What a run folder says about the run, read with mm1_jax.paths (a bucket or a local
  folder alike): {"goodput": the ledger's summary, "metrics": the last record of
  metrics.jsonl, "errors": [...]}; a missing file is None, not an error."""
  from mm1_jax import paths  # noqa: PLC0415  (etils, and for buckets gcsfs or TensorFlow: only when read)

  out: dict = {"workdir": workdir, "goodput": None, "metrics": None, "errors": []}
  root = paths.path(workdir)

  def missing(e: Exception) -> bool:
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"  # tf.errors.NotFoundError

  try:
    summary = json.loads((root / goodput_lib.LEDGER).read_text()).get("summary")
    out["goodput"] = summary if isinstance(summary, dict) else None
  except Exception as e:  # noqa: BLE001  (a bucket client's errors are its own classes)
    if not missing(e):
      out["errors"].append(f"{goodput_lib.LEDGER}: {type(e).__name__}: {str(e)[:200]}")
  try:
    data = _tail_bytes(root / "metrics.jsonl")
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
      try:
        record = json.loads(line)
      except ValueError:
        continue  # the cut first line of the tail, or a line being written
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        out["metrics"] = record
        break
  except Exception as e:  # noqa: BLE001
    if not missing(e):
      out["errors"].append(f"metrics.jsonl: {type(e).__name__}: {str(e)[:200]}")
  return out


def metrics_line(record: dict) -> str:
  """'step 1200: loss 2.3456, as of 40 s ago' from a metrics.jsonl record."""
  shown = [f"{k} {record[k]:.4g}" for k in ("loss", "goodput") if isinstance(record.get(k), (int, float))]
  line = f"step {record['step']}" + (": " + ", ".join(shown) if shown else "")
  if isinstance(record.get("time"), (int, float)):
    line += f", as of {max(0, time.time() - record['time']):.0f} s ago"
  return line


