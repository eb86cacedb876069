"""gcp-storage-emulator (PyPI), with the object's generation on media downloads.

  python gcs_emulator.py start --host=127.0.0.1 --port=PORT --default-bucket=NAME --in-memory

Cloud Storage answers every object download with `x-goog-generation` (and
`x-goog-metageneration`); the emulator leaves them out. tensorstore keeps that
generation as the read's stamp and sends it back in conditional reads (OCDBT's manifest,
which orbax writes), so without it a second read of the same object fails with
"Malformed StorageGeneration". This wrapper adds the headers and runs the emulator's own
command line.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001  (not found: the emulator's own answer stands)
    return
  response["x-goog-generation"] = str(obj.get("generation", ""))
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routes from it

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch above)

if __name__ == "__main__":
  sys.exit(main())
