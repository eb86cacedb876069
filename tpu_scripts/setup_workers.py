#!/usr/bin/env python3
"""Set up every worker of every slice: this repository at one commit, installed with the `tpu` extra.

The commit is packed here (git archive), copied to all workers, unpacked into
~/mm1_jax/<commit>/ and installed into a Python 3.11 virtual environment there
(tpu_scripts/remote_setup.sh).

With --bucket=gs://BUCKET/PREFIX (the runs go to gs://BUCKET/PREFIX/runs/RUN_NAME, as
launch.py --bucket puts them) nothing is mounted: each worker checks that it can write
there. Alternatively, --nfs (Filestore) or --gcs_bucket (gcsfuse) mounts a shared folder
for workdirs at --shared_dir on every worker.

  python tpu_scripts/setup_workers.py @pod.flags --bucket=gs://my-bucket/mm1 [--commit=HEAD] [--dry_run]
  python tpu_scripts/setup_workers.py @pod.flags --nfs=10.0.0.2:/mm1
"""

import _pod


def build_parser():
  p = _pod.parser("setup_workers.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--commit", default="HEAD", help="the commit to install (default HEAD)")
  p.add_argument("--shared_dir", default=_pod.DEFAULT_SHARED_DIR,
                 help="mount point of the --nfs / --gcs_bucket shared folder")
  _pod.add_setup_flags(p)
  return p


def run(args, _gin_flags):
  pod = _pod.pod_from_args(args)
  _pod.check_setup_args(args)
  sha = _pod.resolve_commit(args.commit)
  runner = _pod.Runner(args.dry_run)
  _pod.setup_workers(pod, sha, args, runner)
  if not args.dry_run:
    print(f"set up {sha[:12]} on {pod.describe()}")
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser()))
