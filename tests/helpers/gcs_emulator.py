"""gcp-storage-emulator (PyPI), with the object's generation on media downloads.

  python gcs_emulator.py start --host=127.0.0.1 --port=PORT --default-bucket=NAME --in-memory

or, in a test, `with running("my-bucket") as url:` (skips the test when the emulator is
not installed).

Cloud Storage answers every object download with `x-goog-generation` (and
`x-goog-metageneration`); the emulator leaves them out. tensorstore keeps that
generation as the read's stamp and sends it back in conditional reads (OCDBT's manifest,
which orbax writes), so without it a second read of the same object fails with
"Malformed StorageGeneration". Run as a script, this adds the headers and runs the
emulator's own command line.
"""

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request


@contextlib.contextmanager
def running(bucket: str):
  """Starts the emulator on a free 127.0.0.1 port with `bucket`; yields its URL."""
  import pytest  # noqa: PLC0415  (only tests use this)

  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (test extra)")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, __file__, "start", "--host=127.0.0.1", f"--port={port}",
                           f"--default-bucket={bucket}", "--in-memory"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  try:
    for _ in range(100):
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1)
        break
      except OSError:
        time.sleep(0.1)
    else:
      pytest.fail("the storage emulator did not start")
    _check_generation_header(url, bucket)
    yield url
  finally:
    proc.kill()
    proc.wait()


def _check_generation_header(url: str, bucket: str) -> None:
  """Fails at once, and clearly, if the download patch did not take (the emulator changed)."""
  import pytest  # noqa: PLC0415

  name = ".generation-probe"
  urllib.request.urlopen(urllib.request.Request(
      f"{url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", data=b"x", method="POST"), timeout=10)
  with urllib.request.urlopen(f"{url}/download/storage/v1/b/{bucket}/o/{name}?alt=media", timeout=10) as r:
    generation = r.headers.get("x-goog-generation")
  urllib.request.urlopen(urllib.request.Request(f"{url}/storage/v1/b/{bucket}/o/{name}", method="DELETE"),
                         timeout=10)
  if not (generation or "").isdigit():
    pytest.fail(f"the storage emulator sends no x-goog-generation on downloads ({generation!r}): "
                "tests/helpers/gcs_emulator.py's patch no longer applies to this gcp-storage-emulator")


def object_names(url: str, bucket: str, prefix: str) -> list[str]:
  """Names of the objects under `prefix` as the emulator's JSON API lists them (every
  page): what really reached the bucket."""
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
    page = json.load(urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}", timeout=10))
    names += [o["name"] for o in page.get("items", [])]
    token = page.get("nextPageToken")
    if not token:
      return names


def object_bytes(url: str, bucket: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  return urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10).read()


def _serve() -> int:
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415  (the emulator's process only)

  real_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    real_download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001  (not found: the emulator's own answer stands)
      return
    response["x-goog-generation"] = str(obj.get("generation", ""))
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  objects.download = download  # before the server module builds its routes from it
  from gcp_storage_emulator.__main__ import main  # noqa: PLC0415  (after the patch above)

  return main()


if __name__ == "__main__":
  sys.exit(_serve())
