#!/usr/bin/env bash
# Runs on each TPU worker (setup_workers.py calls it over ssh, from the unpacked commit):
# makes a Python 3.11 virtual environment in the commit's folder and installs mm1_jax
# with the `tpu` extra into it; with --bucket, checks that this worker can write to the
# bucket (nothing is mounted); with --nfs or --gcs_bucket, mounts that shared folder.
# Safe to run again: a finished install and a mounted folder are kept.
#
#   bash tpu_scripts/remote_setup.sh [--python 3.11] [--bucket gs://BUCKET/PREFIX]
#        [--shared_dir /mnt/mm1] [--nfs SERVER:/EXPORT | --gcs_bucket BUCKET] [--reinstall]
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

python_version=3.11
shared_dir=/mnt/mm1
nfs=""
gcs_bucket=""
bucket=""
reinstall=0
while (($#)); do
  case "$1" in
    --python) python_version="$2"; shift 2 ;;
    --shared_dir) shared_dir="$2"; shift 2 ;;
    --nfs) nfs="$2"; shift 2 ;;
    --gcs_bucket) gcs_bucket="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --reinstall) reinstall=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "remote_setup.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "$0")/.." && pwd)"
host="$(hostname)"

# 1. A shared folder, when one is asked for (a bucket workdir needs none): checkpoints
#    and logs must outlive a preempted worker.
if [[ -n "$nfs" ]]; then
  if ! mountpoint -q "$shared_dir"; then
    command -v mount.nfs >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq nfs-common; }
    sudo mkdir -p "$shared_dir"
    sudo mount -t nfs -o rw,hard,timeo=600,retrans=3 "$nfs" "$shared_dir"
  fi
elif [[ -n "$gcs_bucket" ]]; then
  if ! mountpoint -q "$shared_dir"; then
    if ! command -v gcsfuse >/dev/null; then
      repo="gcsfuse-$(lsb_release -c -s)"
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p "$shared_dir" && sudo chown "$(id -u):$(id -g)" "$shared_dir"
    gcsfuse --implicit-dirs "$gcs_bucket" "$shared_dir"
  fi
fi

# 2. Python 3.11 (the TPU images ship 3.10) through uv, and the package with libtpu.
if [[ $reinstall == 0 && -x "$here/.venv/bin/mm1-train" && -f "$here/.venv/.mm1_installed" ]]; then
  echo "MM1_SETUP $host: already installed in $here"
else
  uv="$(command -v uv || true)"
  if [[ -z "$uv" ]]; then
    python3 -m pip install --user --quiet --upgrade uv
    uv="$HOME/.local/bin/uv"
  fi
  "$uv" venv --quiet --allow-existing --python "$python_version" "$here/.venv"
  "$uv" pip install --quiet --python "$here/.venv/bin/python" -e "$here[tpu]"
  "$here/.venv/bin/python" -c "import jax, mm1_jax; print('MM1_SETUP', '$host', 'jax', jax.__version__)"
  touch "$here/.venv/.mm1_installed"
fi

# 3. A bucket workdir: this worker must reach it with write access (one small object is
#    written, read back and deleted), or every run would fail at its first write.
if [[ -n "$bucket" ]]; then
  "$here/.venv/bin/python" "$here/tpu_scripts/worker.py" probe --workdir "$bucket"
fi
