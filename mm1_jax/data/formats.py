"""Readers for the formats real pre-training corpora ship in, with record checks.

Every reader yields `Example`s (one normalised record of one of three kinds) or
`Skip`s (a record that cannot be used, with its reason); nothing in a source stops
a build. `check` then validates what a reader could not: that images decode, are
large enough, and that there is text.

  kind         fields                                   from
  caption      image (encoded bytes), caption           webdataset tar shards, COCO annotations
  interleaved  images (list), text with <image> marks   OBELICS rows (JSONL/Parquet), MMC4 JSONL
  text         text                                     JSONL with a "text" field, plain .txt files
  chat         images (list), conversations (JSON)      LLaVA instruction JSON / JSONL (SFT)

Skip reasons (`REASONS`) are the keys of the counts that `mm1-data build` prints.

A source's own text never carries the image marker: a literal `<image>` in it (HTML
dumps have them) is written as `<img>`, so the only markers are those of real images.
LLaVA conversations are the exception: there `<image>` is the format's own marker, and
their count must equal the record's images.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from mm1_jax.data import chat
from mm1_jax.data.tokenizer import IMAGE_TOKEN

FORMATS = ("webdataset", "coco", "obelics", "mmc4", "text", "llava")
LITERAL_IMAGE_TOKEN = "<img>"  # what a literal IMAGE_TOKEN in source text becomes
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

REASONS = {
    "bad_record": "a row or file that does not parse (malformed JSON, unreadable tar member)",
    "missing_image": "a record with no image where one is required",
    "missing_file": "an image path that does not exist under --image_root",
    "remote_image": "an image given only as a URL (nothing is downloaded)",
    "corrupt_image": "image bytes that do not decode (corrupt or truncated)",
    "image_too_small": "an image whose shorter side is under --min_image_size",
    "bad_utf8": "text that is not valid UTF-8",
    "empty_text": "a caption or text document that is empty or whitespace",
    "no_text": "an interleaved document with images but no text",
    "no_images": "an interleaved document whose images were all dropped",
}


@dataclasses.dataclass
class Example:
  kind: str  # "caption" | "interleaved" | "text" | "chat"
  id: str
  text: str = ""  # caption for "caption"; for "interleaved" one IMAGE_TOKEN per image, in order;
  #                 for "chat" the conversation turns as JSON
  images: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Skip:
  reason: str
  id: str
  detail: str = ""
  image_only: bool = False  # one image dropped from a document that is kept


Record = Example | Skip


def _decode_text(raw: bytes | str | None) -> str | None:
  if raw is None:
    return None
  if isinstance(raw, str):
    return raw
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return None


# ----------------------------------------------------------------------------- caption pairs


def read_webdataset(paths: Iterable[Path]) -> Iterator[Record]:
  """Tar shards of `key.{jpg,png,...}` + `key.txt` or `key.json` ("caption" or "text").

  Members are grouped by key (the name up to its first dot), as webdataset does;
  a key's members must be adjacent in the tar, which every webdataset writer ensures.
  """
  for path in paths:
    try:
      tar = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
      yield Skip("bad_record", str(path), f"unreadable tar: {e}")
      continue
    with tar:
      key, group = None, {}
      try:
        for member in tar:
          if not member.isfile():
            continue
          name = Path(member.name)
          k, _, ext = name.name.partition(".")
          k = str(name.parent / k)
          if k != key and group:
            yield _webdataset_example(f"{path.name}/{key}", group)
            group = {}
          key = k
          group["." + ext.lower()] = tar.extractfile(member).read()
      except (tarfile.TarError, OSError) as e:  # a truncated shard: keep what came before
        yield Skip("bad_record", f"{path.name}/{key}", f"tar read error: {e}")
        group = {}
      if group:
        yield _webdataset_example(f"{path.name}/{key}", group)


def _webdataset_example(key: str, group: dict[str, bytes]) -> Record:
  image = next((group[e] for e in IMAGE_EXTS if e in group), None)
  if image is None:
    return Skip("missing_image", key)
  if ".txt" in group:
    caption = _decode_text(group[".txt"])
  elif ".json" in group:
    try:
      meta = json.loads(group[".json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      return Skip("bad_record", key, "malformed .json")
    caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    if caption is None:
      return Skip("empty_text", key, ".json has no caption")
  else:
    return Skip("empty_text", key, "no .txt or .json")
  if caption is None:
    return Skip("bad_utf8", key)
  return Example("caption", key, caption, [image])


def read_coco(annotations: Path, image_root: Path) -> Iterator[Record]:
  """COCO captions JSON ("images": id + file_name, "annotations": image_id + caption).

  One example per annotation: each of an image's captions is its own pair.
  """
  try:
    coco = json.loads(Path(annotations).read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    anns = coco["annotations"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    yield Skip("bad_record", str(annotations), f"not a COCO captions file: {e}")
    return
  cache: dict[str, bytes | Skip] = {}
  for ann in anns:
    ann_id = str(ann.get("id", len(cache)))
    name = files.get(ann.get("image_id"))
    if name is None:
      yield Skip("missing_image", ann_id, f"image_id {ann.get('image_id')} not in images")
      continue
    if name not in cache:
      cache.clear()  # annotations are grouped by image in practice; keep one image in memory
      cache[name] = _read_local(image_root, name, ann_id)
    image = cache[name]
    if isinstance(image, Skip):
      yield dataclasses.replace(image, id=ann_id)
      continue
    yield Example("caption", ann_id, ann.get("caption") or "", [image])


def _read_local(root: Path, ref: str, rec_id: str) -> bytes | Skip:
  if ref.startswith(("http://", "https://")):
    return Skip("remote_image", rec_id, ref)
  path = Path(root) / ref
  try:
    return path.read_bytes()
  except OSError:
    return Skip("missing_file", rec_id, str(path))


# ----------------------------------------------------------------------------- interleaved


def _rows(path: Path) -> Iterator[tuple[str, dict | Skip]]:
  """(row id, row) from JSONL or Parquet; malformed rows become Skips."""
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # noqa: PLC0415  (pyarrow: only for Parquet files)

    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
      for i, row in enumerate(batch.to_pylist()):
        yield f"{path.name}:{offset + i}", row
      offset += batch.num_rows
    return
  with open(path, "rb") as f:
    for i, line in enumerate(f):
      rid = f"{path.name}:{i}"
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield rid, Skip("bad_record", rid, f"malformed JSON: {e}")
        continue
      yield rid, row if isinstance(row, dict) else Skip("bad_record", rid, "row is not an object")


def _image_ref(value: Any, root: Path, rid: str) -> bytes | Skip:
  """An image given as bytes, base64, {"bytes": ..., "path": ...} (HF datasets), a path or a URL."""
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, dict):
    if value.get("bytes"):
      return _image_ref(value["bytes"], root, rid)
    if value.get("path"):
      return _read_local(root, value["path"], rid)
    return Skip("missing_image", rid, "image entry with neither bytes nor path")
  if isinstance(value, str):
    if value.startswith("data:image") and "," in value:
      try:
        return base64.b64decode(value.split(",", 1)[1])
      except ValueError:
        return Skip("corrupt_image", rid, "bad base64")
    return _read_local(root, value, rid)
  return Skip("bad_record", rid, f"unexpected image entry {type(value).__name__}")


def _interleaved(rid: str, pieces: list[tuple[str, Any]], root: Path) -> Iterator[Record]:
  """pieces: ("text", str) or ("image", ref) in document order -> one Example, plus
  a Skip for each image that could not be read (the document keeps the rest)."""
  parts, images = [], []
  for what, value in pieces:
    if what == "text":
      text = _decode_text(value)
      if text is None:
        yield Skip("bad_utf8", rid, "a text piece is not UTF-8")
        continue
      if text.strip():
        parts.append(text.strip().replace(IMAGE_TOKEN, LITERAL_IMAGE_TOKEN))
    else:
      image = _image_ref(value, root, rid)
      if isinstance(image, Skip):
        yield dataclasses.replace(image, image_only=True)
        continue
      parts.append(IMAGE_TOKEN)
      images.append(image)
  yield Example("interleaved", rid, "\n".join(parts), images)


def read_obelics(path: Path, image_root: Path) -> Iterator[Record]:
  """OBELICS rows: `texts` and `images` lists of equal length, exactly one non-null per slot."""
  for rid, row in _rows(Path(path)):
    if isinstance(row, Skip):
      yield row
      continue
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
      yield Skip("bad_record", rid, "texts and images must be lists of equal length")
      continue
    pieces = [("image", im) if im is not None else ("text", tx) for tx, im in zip(texts, images, strict=True)
              if im is not None or tx is not None]
    yield from _interleaved(rid, pieces, Path(image_root))


def read_mmc4(path: Path, image_root: Path) -> Iterator[Record]:
  """MMC4 documents: `text_list` sentences and `image_info` entries, each placed before
  the sentence of its `matched_text_index` (file from `image_name`, else `raw_url`)."""
  for rid, row in _rows(Path(path)):
    if isinstance(row, Skip):
      yield row
      continue
    sentences, infos = row.get("text_list"), row.get("image_info") or []
    if not isinstance(sentences, list) or not isinstance(infos, list):
      yield Skip("bad_record", rid, "text_list and image_info must be lists")
      continue
    before: dict[int, list[Any]] = {}
    for info in infos:
      if not isinstance(info, dict) or not isinstance(info.get("matched_text_index"), int):
        yield Skip("bad_record", rid, "image_info entry without matched_text_index")
        continue
      ref = info.get("image_name") or info.get("raw_url")
      before.setdefault(info["matched_text_index"], []).append(ref)
    pieces: list[tuple[str, Any]] = []
    for i, sentence in enumerate(sentences):
      pieces += [("image", ref) for ref in before.pop(i, [])]
      pieces.append(("text", sentence))
    for refs in before.values():  # indices past the last sentence: at the end
      pieces += [("image", ref) for ref in refs]
    yield from _interleaved(rid, pieces, Path(image_root))


# ----------------------------------------------------------------------------- text


def read_text(paths: Iterable[Path]) -> Iterator[Record]:
  """`.jsonl` files (one document per line, its "text" field) and plain text files (one document each)."""
  for path in paths:
    if path.suffix == ".jsonl":
      for rid, row in _rows(path):
        if isinstance(row, Skip):
          yield row
          continue
        text = row.get("text")
        if not isinstance(text, str):
          yield Skip("empty_text", rid, "no string 'text' field")
          continue
        yield Example("text", rid, text)
    else:
      text = _decode_text(path.read_bytes())
      yield Example("text", path.name, text) if text is not None else Skip("bad_utf8", path.name)


# ----------------------------------------------------------------------------- conversations (SFT)


def read_llava(path: Path, image_root: Path) -> Iterator[Record]:
  """LLaVA instruction data: a JSON list (or JSONL) of {"id", "image": path | [paths] (optional),
  "conversations": [{"from", "value"}, ...]}. The turns are checked here (roles, an
  assistant reply, one `<image>` marker per image); images are read from image_root."""
  if path.suffix == ".json":
    try:
      rows = json.loads(path.read_text())
      if not isinstance(rows, list):
        raise ValueError("not a list of records")
    except (OSError, ValueError) as e:
      yield Skip("bad_record", str(path), f"not a LLaVA JSON list: {e}")
      return
    pairs = ((str(r.get("id", f"{path.name}:{i}")) if isinstance(r, dict) else f"{path.name}:{i}", r)
             for i, r in enumerate(rows))
  else:
    pairs = _rows(path)
  for rid, row in pairs:
    if isinstance(row, Skip):
      yield row
      continue
    if not isinstance(row, dict):
      yield Skip("bad_record", rid, "a record is not an object")
      continue
    try:
      turns = chat.parse(row.get("conversations"))
      chat.ChatTemplate().render(turns)
    except chat.BadConversation as e:
      yield Skip("bad_record", rid, str(e))
      continue
    refs = row.get("image") or []
    refs = [refs] if isinstance(refs, str) else refs
    if chat.count_images(turns) != len(refs):
      yield Skip("bad_record", rid, f"{chat.count_images(turns)} image markers for {len(refs)} images")
      continue
    images = [_read_local(image_root, str(ref), rid) for ref in refs]
    bad = next((im for im in images if isinstance(im, Skip)), None)
    if bad is not None:
      yield bad
      continue
    yield Example("chat", rid, json.dumps(turns), images)


# ----------------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True)
class Checks:
  min_image_size: int = 32  # shorter side, pixels
  max_images: int = 16  # per interleaved document; later images are cut with the text after them
  max_image_side: int = 1024  # longer images are downscaled (aspect kept) and re-encoded as JPEG


def normalize_image(data: bytes, checks: Checks) -> bytes | str:
  """Checked, storable image bytes, or the reason they are unusable.

  Decodes every pixel (truncated files fail here, not in training). JPEG and PNG in
  RGB or grey within max_image_side are kept byte for byte; anything else (WebP,
  CMYK, alpha, palette, too large) is converted to RGB, downscaled and re-encoded as
  JPEG, so the training pipeline only ever decodes JPEG/PNG.
  """
  from PIL import Image  # noqa: PLC0415  (PIL: only when checking images)

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, mode, size = im.format, im.mode, im.size
      if min(size) < checks.min_image_size:
        return "image_too_small"
      if fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and max(size) <= checks.max_image_side:
        return data
      rgb = im.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return "corrupt_image"
  rgb.thumbnail((checks.max_image_side, checks.max_image_side), Image.Resampling.BICUBIC)
  if min(rgb.size) < checks.min_image_size:
    return "image_too_small"
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=95)
  return out.getvalue()


def check(ex: Example, checks: Checks) -> tuple[Record, list[Skip], bool]:
  """Validates one example: (the example or a Skip, images dropped from it, truncated?)."""
  if not isinstance(ex.text, str):
    return Skip("bad_record", ex.id, f"text is {type(ex.text).__name__}, not a string"), [], False
  if ex.kind == "chat":  # an image cannot leave a conversation that refers to it: all or nothing
    images = [normalize_image(raw, checks) for raw in ex.images]
    bad = next((im for im in images if isinstance(im, str)), None)
    if bad is not None:
      return Skip(bad, ex.id), [], False
    return dataclasses.replace(ex, images=images), [], False
  if ex.kind in ("text", "caption"):
    ex = dataclasses.replace(ex, text=ex.text.replace(IMAGE_TOKEN, LITERAL_IMAGE_TOKEN))
    if not ex.text.strip():
      return Skip("empty_text", ex.id), [], False
    if ex.kind == "caption":
      image = normalize_image(ex.images[0], checks)
      if isinstance(image, str):
        return Skip(image, ex.id), [], False
      return dataclasses.replace(ex, images=[image]), [], False
    return ex, [], False

  # Interleaved: drop bad images (with their marker), then cut at max_images.
  pieces = ex.text.split(IMAGE_TOKEN)  # len(images) + 1 text runs around the markers
  if len(pieces) != len(ex.images) + 1:
    return Skip("bad_record", ex.id, f"{len(pieces) - 1} image markers for {len(ex.images)} images"), [], False
  kept_text, kept_images, dropped = [pieces[0]], [], []
  for raw, after in zip(ex.images, pieces[1:], strict=True):
    image = normalize_image(raw, checks)
    if isinstance(image, str):
      dropped.append(Skip(image, ex.id, image_only=True))
      kept_text[-1] += after
      continue
    kept_images.append(image)
    kept_text.append(after)
  truncated = len(kept_images) > checks.max_images
  if truncated:  # the document ends where its (max_images + 1)-th image was
    kept_images, kept_text = kept_images[:checks.max_images], kept_text[:checks.max_images + 1]
  text = IMAGE_TOKEN.join(kept_text)
  if not text.replace(IMAGE_TOKEN, "").strip():
    return Skip("no_text", ex.id), dropped, truncated
  if not kept_images:
    return Skip("no_images", ex.id), dropped, truncated
  return Example("interleaved", ex.id, text, kept_images), dropped, truncated


def read(fmt: str, src: Path, image_root: Path | None = None) -> Iterator[Record]:
  """All records of `src` (a file, or a folder of files) in format `fmt`."""
  src = Path(src)
  root = Path(image_root) if image_root else (src.parent if src.is_file() else src)
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
  if not src.exists():
    raise FileNotFoundError(f"--src {src} does not exist")
  files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
  if fmt == "webdataset":
    return read_webdataset(p for p in files if p.suffix == ".tar")
  if fmt == "coco":
    jsons = [p for p in files if p.suffix == ".json"]
    if len(jsons) != 1:
      raise ValueError(f"--format=coco wants one annotation JSON as --src (found {len(jsons)})")
    return read_coco(jsons[0], root)
  if fmt == "text":
    return read_text(p for p in files if p.suffix in (".jsonl", ".txt", ".md", ""))
  if fmt == "llava":
    return (r for p in files if p.suffix in (".json", ".jsonl") for r in read_llava(p, root))
  reader = read_obelics if fmt == "obelics" else read_mmc4
  data = [p for p in files if p.suffix in (".jsonl", ".parquet")]
  return (r for p in data for r in reader(p, root))
