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
import functools
import hashlib
import io
import json
import struct
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
    "held_out_image": "an image whose SHA-256 is in --held_out (an evaluation image; `mm1_jax.eval.overlap`)",
    "duplicate": "an exact copy (same kind, text and image bytes) of a record that is kept",
    "unreadable_part": "a file or part of one whose reader failed midway (its records before that are kept)",
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


@dataclasses.dataclass(frozen=True)
class Part:
  """A slice of one file, so that a large file is read by several workers (`units`):
  JSONL lines whose first byte is in [start, stop) (start is a line start); Parquet row
  groups [start, stop) (first_row: the rows before them); items [start, stop) of a JSON
  list (COCO annotations, LLaVA records). stop=None reads to the end."""

  start: int = 0
  stop: int | None = None
  first_row: int = 0


def _decode_text(raw: bytes | str | None) -> str | None:
  """The text, or None where it is missing, not UTF-8 or not text at all (a number, a list)."""
  if isinstance(raw, str):
    return raw
  if not isinstance(raw, (bytes, bytearray)):
    return None
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


def _json(path: Path) -> Any:
  """A parsed JSON file. The last two are kept (keyed by path, size and modification
  time), as a worker reads the parts of one file in turn."""
  st = Path(path).stat()
  return _parsed_json(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed_json(path: str, size: int, mtime_ns: int) -> Any:
  del size, mtime_ns  # the cache key
  return json.loads(Path(path).read_bytes())


def read_coco(annotations: Path, image_root: Path, part: Part = Part()) -> Iterator[Record]:
  """COCO captions JSON ("images": id + file_name, "annotations": image_id + caption).

  One example per annotation: each of an image's captions is its own pair.
  """
  try:
    coco = _json(Path(annotations))
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    anns = coco["annotations"][part.start:part.stop]
  except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    if part.start == 0:  # one Skip for the file, from its first part
      yield Skip("bad_record", str(annotations), f"not a COCO captions file: {e}")
    return
  cache: dict[str, bytes | Skip] = {}
  for i, ann in enumerate(anns, start=part.start):
    if not isinstance(ann, dict):
      yield Skip("bad_record", f"{Path(annotations).name}:{i}", "an annotation is not an object")
      continue
    ann_id = str(ann.get("id", f"{Path(annotations).name}:{i}"))
    image_id = ann.get("image_id")
    name = files.get(image_id) if isinstance(image_id, (int, str)) else None
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


def _rows(path: Path, part: Part = Part()) -> Iterator[tuple[str, dict | Skip]]:
  """(row id, row) from JSONL or Parquet; malformed rows become Skips. Row ids do not
  depend on how a file is cut into parts: "<file name>:<row number>" in Parquet,
  "<file name>@<byte offset of the line>" in JSONL (a line number would need a pass over
  everything before the part)."""
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # noqa: PLC0415  (pyarrow: only for Parquet files)

    offset = part.first_row
    try:
      pf = pq.ParquetFile(path)
      groups = list(range(pf.num_row_groups))[part.start:part.stop]
      for batch in pf.iter_batches(batch_size=64, row_groups=groups) if groups else ():
        for i, row in enumerate(batch.to_pylist()):
          yield f"{path.name}:{offset + i}", row
        offset += batch.num_rows
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: a corrupt file or row group
      yield f"{path.name}:{offset}", Skip("bad_record", f"{path.name}:{offset}",
                                          f"unreadable Parquet from row {offset} on: {e}")
    return
  with open(path, "rb") as f:
    f.seek(part.start)
    while part.stop is None or f.tell() < part.stop:
      rid = f"{path.name}@{f.tell()}"
      line = f.readline()
      if not line:
        break
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
        yield Skip("bad_utf8", rid, f"a text piece is not UTF-8 text ({type(value).__name__})")
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


def read_obelics(path: Path, image_root: Path, part: Part = Part()) -> Iterator[Record]:
  """OBELICS rows: `texts` and `images` lists of equal length, exactly one non-null per slot."""
  for rid, row in _rows(Path(path), part):
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


def read_mmc4(path: Path, image_root: Path, part: Part = Part()) -> Iterator[Record]:
  """MMC4 documents: `text_list` sentences and `image_info` entries, each placed before
  the sentence of its `matched_text_index` (file from `image_name`, else `raw_url`)."""
  for rid, row in _rows(Path(path), part):
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
    yield from read_text_file(path)


def read_text_file(path: Path, part: Part = Part()) -> Iterator[Record]:
  if path.suffix != ".jsonl":
    text = _decode_text(path.read_bytes())
    yield Example("text", path.name, text) if text is not None else Skip("bad_utf8", path.name)
    return
  for rid, row in _rows(path, part):
    if isinstance(row, Skip):
      yield row
      continue
    text = row.get("text")
    if not isinstance(text, str):
      yield Skip("empty_text", rid, "no string 'text' field")
      continue
    yield Example("text", rid, text)


# ----------------------------------------------------------------------------- conversations (SFT)


def read_llava(path: Path, image_root: Path, part: Part = Part()) -> Iterator[Record]:
  """LLaVA instruction data: a JSON list (or JSONL) of {"id", "image": path | [paths] (optional),
  "conversations": [{"from", "value"}, ...]}. The turns are checked here (roles, an
  assistant reply, one `<image>` marker per image); images are read from image_root."""
  if path.suffix == ".json":
    try:
      rows = _json(path)
      if not isinstance(rows, list):
        raise ValueError("not a list of records")
    except (OSError, ValueError) as e:
      if part.start == 0:  # one Skip for the file, from its first part
        yield Skip("bad_record", str(path), f"not a LLaVA JSON list: {e}")
      return
    pairs = ((str(r.get("id", f"{path.name}:{i}")) if isinstance(r, dict) else f"{path.name}:{i}", r)
             for i, r in enumerate(rows[part.start:part.stop], start=part.start))
  else:
    pairs = _rows(path, part)
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
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
      yield Skip("bad_record", rid, "'image' is neither a path nor a list of paths")
      continue
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


def normalize_image(data: bytes, checks: Checks, held_out: frozenset[str] = frozenset()) -> bytes | str:
  """Checked, storable image bytes, or the reason they are unusable.

  Decodes every pixel (truncated files fail here, not in training). JPEG and PNG in
  RGB or grey within max_image_side are kept byte for byte; anything else (WebP,
  CMYK, alpha, palette, too large) is converted to RGB, downscaled and re-encoded as
  JPEG, so the training pipeline only ever decodes JPEG/PNG. held_out: SHA-256 hex
  digests of images never to train on (matched as given, and as re-encoded).
  """
  from PIL import Image  # noqa: PLC0415  (PIL: only when checking images)

  if held_out and hashlib.sha256(data).hexdigest() in held_out:
    return "held_out_image"

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, mode, size = im.format, im.mode, im.size
      if min(size) < checks.min_image_size:
        return "image_too_small"
      if fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and max(size) <= checks.max_image_side:
        return data
      rgb = im.convert("RGB")
  except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError):
    return "corrupt_image"
  rgb.thumbnail((checks.max_image_side, checks.max_image_side), Image.Resampling.BICUBIC)
  if min(rgb.size) < checks.min_image_size:
    return "image_too_small"
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=95)
  if held_out and hashlib.sha256(out.getvalue()).hexdigest() in held_out:
    return "held_out_image"
  return out.getvalue()


def check(ex: Example, checks: Checks, held_out: frozenset[str] = frozenset()) -> tuple[Record, list[Skip], bool]:
  """Validates one example: (the example or a Skip, images dropped from it, truncated?).
  held_out: image digests to drop (`normalize_image`)."""
  if not isinstance(ex.text, str):
    return Skip("bad_record", ex.id, f"text is {type(ex.text).__name__}, not a string"), [], False
  if ex.kind == "chat":  # an image cannot leave a conversation that refers to it: all or nothing
    images = [normalize_image(raw, checks, held_out) for raw in ex.images]
    bad = next((im for im in images if isinstance(im, str)), None)
    if bad is not None:
      return Skip(bad, ex.id), [], False
    return dataclasses.replace(ex, images=images), [], False
  if ex.kind in ("text", "caption"):
    ex = dataclasses.replace(ex, text=ex.text.replace(IMAGE_TOKEN, LITERAL_IMAGE_TOKEN))
    if not ex.text.strip():
      return Skip("empty_text", ex.id), [], False
    if ex.kind == "caption":
      image = normalize_image(ex.images[0], checks, held_out)
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
    image = normalize_image(raw, checks, held_out)
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


# ----------------------------------------------------------------------------- read units


@dataclasses.dataclass(frozen=True)
class Unit:
  """One piece of a source that one worker reads: a file, or a `Part` of a large one."""

  fmt: str
  path: str
  root: str  # where relative image paths point
  part: Part = Part()


PART_BYTES = 64 << 20  # JSONL files larger than this are read in parts of about this size
PART_ITEMS = 20_000  # COCO annotations / LLaVA JSON records per part
PART_ROW_GROUPS = 4  # Parquet row groups per part


def _jsonl_parts(path: Path, part_bytes: int) -> list[Part]:
  """Line-aligned byte ranges of about part_bytes (one seek and one line read per part)."""
  size = path.stat().st_size
  if size <= part_bytes:
    return [Part()]
  parts, start = [], 0
  with open(path, "rb") as f:
    while start < size:
      f.seek(min(start + part_bytes, size))
      f.readline()  # to the next line start
      stop = min(f.tell(), size)
      parts.append(Part(start, stop))
      start = stop
  return parts


def _item_parts(count: int, per: int) -> list[Part]:
  return [Part(i, min(i + per, count)) for i in range(0, count, per)] or [Part()]


def _parquet_parts(path: Path, per: int) -> list[Part]:
  import pyarrow.parquet as pq  # noqa: PLC0415  (pyarrow: only for Parquet files)

  try:
    meta = pq.ParquetFile(path).metadata
  except (OSError, ValueError):
    return [Part()]  # unreadable: its one part reports it
  rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
  return [Part(g, min(g + per, len(rows)), sum(rows[:g])) for g in range(0, len(rows), per)] or [Part()]


def _count_items(path: Path, key: str | None) -> int:
  try:
    data = _json(path)
    return len(data[key] if key else data)
  except (OSError, ValueError, KeyError, TypeError):
    return 0  # an unreadable file: its one part reports it


def units(fmt: str, src: Path, image_root: Path | None = None, *, part_bytes: int = PART_BYTES,
          part_items: int = PART_ITEMS, part_row_groups: int = PART_ROW_GROUPS) -> list[Unit]:
  """The pieces `src` (a file, or a folder of files) in format `fmt` is read in, in
  order: one per file, and large JSONL, Parquet and JSON files in several parts, so a
  build parallelises within a file list and within a large file."""
  src = Path(src)
  root = str(Path(image_root) if image_root else (src.parent if src.is_file() else src))
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
  if not src.exists():
    raise FileNotFoundError(f"--src {src} does not exist")
  files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
  if fmt == "webdataset":
    return [Unit(fmt, str(p), root) for p in files if p.suffix == ".tar"]
  if fmt == "coco":
    jsons = [p for p in files if p.suffix == ".json"]
    if len(jsons) != 1:
      raise ValueError(f"--format=coco wants one annotation JSON as --src (found {len(jsons)})")
    return [Unit(fmt, str(jsons[0]), root, part)
            for part in _item_parts(_count_items(jsons[0], "annotations"), part_items)]
  suffixes = {"text": (".jsonl", ".txt", ".md", ""), "llava": (".json", ".jsonl")}.get(fmt, (".jsonl", ".parquet"))
  out = []
  for p in files:
    if p.suffix not in suffixes:
      continue
    if p.suffix == ".jsonl":
      parts = _jsonl_parts(p, part_bytes)
    elif p.suffix == ".parquet":
      parts = _parquet_parts(p, part_row_groups)
    elif p.suffix == ".json":
      parts = _item_parts(_count_items(p, None), part_items)
    else:
      parts = [Part()]
    out += [Unit(fmt, str(p), root, part) for part in parts]
  return out


def read_unit(unit: Unit) -> Iterator[Record]:
  """The records of one unit, in file order."""
  path, root = Path(unit.path), Path(unit.root)
  if unit.fmt == "webdataset":
    return read_webdataset([path])
  if unit.fmt == "coco":
    return read_coco(path, root, unit.part)
  if unit.fmt == "text":
    return read_text_file(path, unit.part)
  if unit.fmt == "llava":
    return read_llava(path, root, unit.part)
  return (read_obelics if unit.fmt == "obelics" else read_mmc4)(path, root, unit.part)


def read(fmt: str, src: Path, image_root: Path | None = None) -> Iterator[Record]:
  """All records of `src` (a file, or a folder of files) in format `fmt`, in order."""
  return (r for u in units(fmt, src, image_root) for r in read_unit(u))
