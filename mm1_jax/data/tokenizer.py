"""SentencePiece tokenizer for the shapes-world corpus.

The trained model ships in the package (`assets/shapes_sp.model`, a few KB). Ids:
0 pad, 1 eos, 2 unk, 3 `<image>` placeholder, 4 newline (the separator that
few-shot decoding stops at). Rebuild it with `python -m mm1_jax.data.tokenizer`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import sentencepiece as spm

from mm1_jax.data import shapes_world

ASSETS = Path(__file__).parent / "assets"
SHAPES = "shapes_sp"  # the bundled model, by name
DEFAULT_SPM_PATH = ASSETS / f"{SHAPES}.model"
IMAGE_TOKEN = "<image>"
NEWLINE = "\n"
PAD_ID, EOS_ID, UNK_ID, IMAGE_ID, NEWLINE_ID = 0, 1, 2, 3, 4


def train_tokenizer(out_path: Path = DEFAULT_SPM_PATH, vocab_size: int = 256, seed: int = 0,
                    num_docs: int = 2000) -> Path:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=shapes_world.all_text(seed, num_docs), model_writer=model,
      vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      user_defined_symbols=[IMAGE_TOKEN, NEWLINE],
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_bytes(model.getvalue())
  return out_path


def resolve(name_or_path: str | Path) -> Path:
  """A SentencePiece model file from the name of one bundled in assets/ (e.g. "shapes_sp")
  or a path (`~` expanded)."""
  text = str(name_or_path)
  if "/" not in text and not text.endswith(".model") and (ASSETS / f"{text}.model").is_file():
    return ASSETS / f"{text}.model"
  path = Path(text).expanduser()
  if not path.is_file():
    bundled = sorted(p.stem for p in ASSETS.glob("*.model"))
    raise FileNotFoundError(f"tokenizer {text!r}: no such file, nor a bundled model ({', '.join(bundled)})")
  return path


def load(name_or_path: str | Path = SHAPES) -> spm.SentencePieceProcessor:
  """The SentencePiece model `resolve` finds, checked for the ids the pipeline relies on."""
  path = resolve(name_or_path)
  sp = spm.SentencePieceProcessor(model_file=str(path))
  if sp.piece_to_id(IMAGE_TOKEN) != IMAGE_ID or sp.piece_to_id(NEWLINE) != NEWLINE_ID:
    raise ValueError(f"{path} does not place {IMAGE_TOKEN!r} at {IMAGE_ID} and newline at {NEWLINE_ID}")
  return sp


def main(argv=None):
  parser = argparse.ArgumentParser(description="Train the shapes-world SentencePiece model.")
  parser.add_argument("--out", type=Path, default=DEFAULT_SPM_PATH, help="where to write the .model file")
  parser.add_argument("--vocab_size", type=int, default=256)
  parser.add_argument("--num_docs", type=int, default=2000, help="documents of each kind to train on")
  args = parser.parse_args(argv)
  path = train_tokenizer(args.out, args.vocab_size, num_docs=args.num_docs)
  sp = load(path)
  print(f"wrote {path} ({sp.get_piece_size()} pieces)")


if __name__ == "__main__":
  main()
