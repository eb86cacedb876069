"""The run's vocabulary: one seqio Vocabulary, and the ids the pipeline takes from it.

A run names its tokenizer once (the TOKENIZER macro of gin/runs/pretrain.gin);
`VOCABULARY = @vocabulary.load()` turns it into the seqio Vocabulary that the corpus
tasks, the loaders, SFT and the few-shot evaluator all read, so the operative config
records it and no id is a constant. `load` takes:

  "shapes_sp"                 a SentencePiece model bundled with the package
  PATH.model                  a SentencePiece model (Llama 2, Mistral, Gemma)
  PATH/tokenizer.json         a Hugging Face tokenizer (byte-level BPE: Llama 3, Qwen),
                              with tokenizer_config.json beside it naming the EOS token
  DIR                         a folder holding tokenizer.model or tokenizer.json, e.g.
                              the tokenizer/ folder `mm1-convert import` writes

`<image>` must be a single piece; `add_image_token` adds it to a tokenizer that lacks
it (`mm1-convert import` does, and grows the embedding to match). `special_ids` gives
the ids the pipeline needs: the image placeholder, EOS, padding, the ids that end a
generated answer (EOS and every piece whose text holds a newline) and the ids never
generated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax import paths
from mm1_jax.data import tokenizer as shapes_tokenizer
from mm1_jax.data.ids import SpecialIds

IMAGE_TOKEN = shapes_tokenizer.IMAGE_TOKEN
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# EOS pieces of common Hugging Face tokenizers, tried when tokenizer_config.json names none.
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>")


def _token_content(value) -> str | None:
  """tokenizer_config.json spells a token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizer.json` (the `tokenizers` package) as a seqio Vocabulary.

  Text is encoded without the tokenizer's post-processor (no BOS is added: packing
  adds EOS between documents, as for every vocabulary here) and decoded with special
  pieces kept, so `<image>` round-trips. EOS is the `eos_token` of tokenizer_config.json
  beside the file (else the first of `_EOS_CANDIDATES` the vocabulary holds); padding
  uses the `pad_token` there, else id 0 (padding positions are always masked).
  """

  def __init__(self, path: str | Path):
    import tokenizers  # noqa: PLC0415  (only for tokenizer.json vocabularies)

    self._path = Path(path).expanduser()
    self._tokenizer = tokenizers.Tokenizer.from_file(str(self._path))
    config_file = self._path.parent / HF_CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    names = [_token_content(config.get("eos_token"))] + list(_EOS_CANDIDATES)
    eos = next((self._tokenizer.token_to_id(n) for n in names
                if n and self._tokenizer.token_to_id(n) is not None), None)
    if eos is None:
      raise ValueError(f"{self._path}: no EOS token ({HF_CONFIG_FILE} beside it names none and the "
                       f"vocabulary has none of {', '.join(_EOS_CANDIDATES)})")
    self._eos = int(eos)
    pad = _token_content(config.get("pad_token"))
    pad_id = self._tokenizer.token_to_id(pad) if pad else None
    self._pad = int(pad_id) if pad_id is not None else None
    super().__init__(extra_ids=0)

  def __reduce__(self):  # grain workers rebuild it from the file
    return (HFTokenizerVocabulary, (str(self._path),))

  @property
  def path(self) -> Path:
    return self._path

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad if self._pad is not None else 0

  @property
  def dedicated_pad_id(self) -> int | None:
    """The pad piece, where the tokenizer has one of its own (never generated)."""
    return self._pad

  @property
  def unk_id(self) -> int | None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    # One past the largest id (a tokenizer may leave gaps between its ids and added tokens).
    return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    """Text up to the first EOS; EOS and a dedicated pad piece are not text (as SentencePiece
    drops its control pieces); `<image>` and other special pieces are kept."""
    ids = [int(i) for i in ids]
    if self._eos in ids:
      ids = ids[:ids.index(self._eos)]
    if self._pad is not None:
      ids = [i for i in ids if i != self._pad]
    return self._tokenizer.decode(ids, skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text) -> np.ndarray:  # a 0-d array of bytes
      return np.asarray(self._encode(np.asarray(text).item().decode("utf-8")), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """ids int[..., L] -> string[...]: each row decoded as `_decode` does (seqio has put
    pad_id after the first EOS; `_decode` stops at the EOS itself)."""
    def decode(rows: np.ndarray) -> np.ndarray:
      flat = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 1)
      texts = [self._decode(row.tolist()).encode("utf-8") for row in flat]
      return np.asarray(texts, dtype=object).reshape(rows.shape[:-1])

    out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    return tf.ensure_shape(out, ids.shape[:-1])

  def __eq__(self, other) -> bool:
    return (isinstance(other, HFTokenizerVocabulary)
            and self._tokenizer.to_str() == other._tokenizer.to_str() and self._eos == other._eos)

  def __hash__(self) -> int:
    return hash(self._tokenizer.to_str())

  def __repr__(self) -> str:
    return f"HFTokenizerVocabulary({str(self._path)!r})"


def find_tokenizer_file(directory: str | Path) -> Path | None:
  """The tokenizer a model folder ships: tokenizer.model (SentencePiece) when present, else
  tokenizer.json; None when it has neither."""
  directory = Path(directory).expanduser()
  for name in (SENTENCEPIECE_FILE, HF_FILE):
    if (directory / name).is_file():
      return directory / name
  return None


TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE, HF_CONFIG_FILE)


def local_copy(spec: str) -> Path:
  """A tokenizer in a bucket (a file, or a folder holding the files of TOKENIZER_FILES) copied
  to ~/.cache/mm1_jax/tokenizers/<hash of its location and contents>/: SentencePiece and
  the tokenizers package read local files only."""
  source = paths.path(spec)
  files = [source] if not source.is_dir() else [source / n for n in TOKENIZER_FILES if (source / n).exists()]
  blobs = {f.name: f.read_bytes() for f in files}
  if not blobs:
    raise FileNotFoundError(f"tokenizer {spec}: no such file, nor a folder holding {' or '.join(TOKENIZER_FILES[:2])}")
  digest = hashlib.sha1(spec.encode() + b"".join(blobs[n] for n in sorted(blobs))).hexdigest()[:16]
  folder = Path.home() / ".cache" / "mm1_jax" / "tokenizers" / digest
  folder.mkdir(parents=True, exist_ok=True)
  for name, data in blobs.items():
    if not (folder / name).is_file():
      tmp = folder / f".{name}.tmp"
      tmp.write_bytes(data)
      tmp.replace(folder / name)
  return folder / source.name if not source.is_dir() else folder


def _tokenizer_file(spec: str) -> Path:
  """The file `spec` names: a tokenizer file, a folder's tokenizer, or a bundled model."""
  path = Path(spec).expanduser()
  if path.is_dir():
    found = find_tokenizer_file(path)
    if found is None:
      raise FileNotFoundError(f"tokenizer folder {spec}: holds neither {SENTENCEPIECE_FILE} nor {HF_FILE}")
    return found
  return path if path.is_file() else shapes_tokenizer.resolve(spec)  # a bundled name, or a clear error


@functools.lru_cache(maxsize=16)
def _load(path: str, stamp: tuple[int, int]) -> seqio.Vocabulary:
  del stamp  # part of the cache key only: a rewritten file is read again
  vocab = HFTokenizerVocabulary(path) if path.endswith(".json") else seqio.SentencePieceVocabulary(path)
  special_ids(vocab)  # fails now, naming the file, if <image> is not one piece
  return vocab


def load(spec: str | Path | seqio.Vocabulary = shapes_tokenizer.SHAPES) -> seqio.Vocabulary:
  """The vocabulary `spec` names (see the module docstring); a Vocabulary is returned as is."""
  if isinstance(spec, seqio.Vocabulary):
    return spec
  if paths.is_remote(spec):
    spec = local_copy(str(spec))
  path = _tokenizer_file(str(spec))
  stat = path.stat()
  return _load(str(path), (stat.st_mtime_ns, stat.st_size))


def _dedicated_pad(vocab: seqio.Vocabulary) -> int | None:
  if isinstance(vocab, HFTokenizerVocabulary):
    return vocab.dedicated_pad_id
  sp = getattr(vocab, "tokenizer", None)
  if sp is not None and sp.pad_id() >= 0:
    return int(sp.pad_id())
  return None


def _piece_texts(vocab: seqio.Vocabulary) -> list[str]:
  """The text of each id alone."""
  if isinstance(vocab, HFTokenizerVocabulary):
    return vocab._tokenizer.decode_batch([[i] for i in range(vocab.vocab_size)], skip_special_tokens=False)
  sp = vocab.tokenizer
  out = []
  for i in range(vocab.vocab_size):
    piece = sp.id_to_piece(i)
    out.append("\n" if piece == "<0x0A>" else sp.decode([i]) if not sp.is_control(i) else piece)
  return out


def special_ids(vocab: seqio.Vocabulary) -> SpecialIds:
  """The ids of `vocab` the pipeline needs (computed once per vocabulary).

  Raises ValueError when `<image>` does not encode to one piece."""
  cached = getattr(vocab, "_mm1_special_ids", None)
  if cached is not None:
    return cached
  image = list(vocab.encode(IMAGE_TOKEN))
  # A SentencePiece model with add_dummy_prefix puts a lone "▁" before the first piece.
  if len(image) == 2 and vocab.decode(image[:1]).strip() == "":
    image = image[1:]
  if len(image) != 1:
    raise ValueError(f"{vocab!r}: {IMAGE_TOKEN!r} is not one piece (it encodes to {image}); add it with "
                     "`mm1-convert import` or mm1_jax.data.vocabulary.add_image_token")
  eos = vocab.eos_id
  if eos is None:
    raise ValueError(f"{vocab!r} has no EOS id")
  texts = _piece_texts(vocab)
  stops = sorted({int(eos)} | {i for i, t in enumerate(texts) if "\n" in t and i != image[0]})
  pad = _dedicated_pad(vocab)
  banned = tuple(sorted({image[0]} | ({pad} if pad is not None and pad != eos else set())))
  ids = SpecialIds(image=int(image[0]), eos=int(eos), pad=int(vocab.pad_id), stops=tuple(stops),
                   banned=banned, size=int(vocab.vocab_size))
  vocab._mm1_special_ids = ids  # on the object: equal vocabularies may still be distinct files
  return ids


def check_model(ids: SpecialIds, model_config, source: str) -> None:
  """A run's model must place images at the vocabulary's `<image>` id and hold a row for
  every piece; ValueError naming `source` (what the ids came from) and the gin binding to
  change otherwise."""
  if model_config.image_token_id != ids.image:
    raise ValueError(f"the model's image_token_id is {model_config.image_token_id} but {source} places "
                     f"{IMAGE_TOKEN} at {ids.image}: bind model.MM1Config.image_token_id = {ids.image} "
                     "(the model.gin of an `mm1-convert import` does)")
  if model_config.decoder.vocab_size < ids.size:
    raise ValueError(f"the decoder has {model_config.decoder.vocab_size} embedding rows but {source} has "
                     f"{ids.size} pieces: bind decoder.DecoderConfig.vocab_size >= {ids.size}")


# --- adding <image> to a tokenizer that lacks it (mm1-convert import) ----------------------


def add_image_token(src: str | Path, out_dir: str | Path) -> tuple[Path, int, bool]:
  """Copies the tokenizer file `src` (tokenizer.model or tokenizer.json) into `out_dir`,
  adding `<image>` as a special piece at the end when it is absent. Returns (the written
  file, the `<image>` id, whether it was added). Text without `<image>` encodes as before."""
  src, out_dir = Path(src), Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if src.suffix == ".json":
    import tokenizers  # noqa: PLC0415  (only for tokenizer.json vocabularies)

    tok = tokenizers.Tokenizer.from_file(str(src))
    out = out_dir / HF_FILE
    image, added = tok.token_to_id(IMAGE_TOKEN), False
    if image is None:
      tok.add_special_tokens([tokenizers.AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
      image, added = tok.token_to_id(IMAGE_TOKEN), True
    tok.save(str(out))
    if (src.parent / HF_CONFIG_FILE).is_file():
      shutil.copyfile(src.parent / HF_CONFIG_FILE, out_dir / HF_CONFIG_FILE)
    return out, int(image), added
  from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415  (protobuf, import only)

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(src.read_bytes())
  pieces = [p.piece for p in proto.pieces]
  added = IMAGE_TOKEN not in pieces
  if added:
    piece = proto.pieces.add()
    piece.piece, piece.score = IMAGE_TOKEN, 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    pieces.append(IMAGE_TOKEN)
  out = out_dir / SENTENCEPIECE_FILE
  out.write_bytes(proto.SerializeToString())
  return out, pieces.index(IMAGE_TOKEN), added
