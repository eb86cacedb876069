"""Conversations for supervised fine-tuning: the LLaVA format, a chat template, the loss mask.

LLaVA's instruction files are a JSON list of records such as

  {"id": "000123", "image": "coco/train2017/000123.jpg",      (or a list of paths, or absent)
   "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                     {"from": "gpt", "value": "A laptop and two mugs."},
                     {"from": "human", "value": "What colour are the mugs?"},
                     {"from": "gpt", "value": "White."}]}

with one `<image>` marker per image, in order. `ChatTemplate` renders the turns as text
with role prefixes; only the assistant's replies (the text after the role prefix, the
turn end that closes each reply, and the final EOS) carry loss. With the default template
the first exchange above becomes

  user: <image>\\nWhat is on the table?\\nassistant: A laptop and two mugs.\\n
                                                 ^^^^^^^^^^^^^^^^^^^^^^^^ trained

The mask is taken from the tokenization of the whole rendered text (token i is trained
when its first character lies in a reply), so a prompt that ends in the assistant
prefix tokenizes exactly as it did in training.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from mm1_jax.data.tokenizer import IMAGE_TOKEN  # the marker text, the same in every vocabulary

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadConversation(ValueError):
  """A record that is not a usable conversation (the loader skips and counts it)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How turns become text. The defaults use only characters the bundled tokenizer knows.

  Attributes:
    system, user: prefixes of those turns (each turn ends with `turn_end`).
    assistant: the prefix of an assistant turn; a generation prompt ends with it.
    reply_prefix: trained text between `assistant` and the reply.
    turn_end: closes every turn; the evaluator stops decoding at a newline.
  """

  system: str = "system: "
  user: str = "user: "
  assistant: str = "assistant:"
  reply_prefix: str = " "
  turn_end: str = "\n"

  def render(self, turns: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Turns ({"from", "value"}) -> (text, character spans of the assistant's replies)."""
    text, spans = "", []
    for turn in turns:
      role = ROLES.get(str(turn.get("from", "")).lower())
      value = turn.get("value")
      if role is None or not isinstance(value, str):
        raise BadConversation(f"turn {turn!r}: expected 'from' in {sorted(ROLES)} and a string 'value'")
      value = value.strip()
      if role == "assistant":
        text += self.assistant
        start = len(text)
        text += self.reply_prefix + value + self.turn_end
        spans.append((start, len(text)))
      else:
        text += getattr(self, role) + value + self.turn_end
    if not spans:
      raise BadConversation("no assistant turn: nothing to learn")
    return text, spans

  def prompt(self, turns: Sequence[dict]) -> str:
    """The text before the next assistant reply: the turns so far, then the assistant prefix."""
    text = ""
    for turn in turns:
      role = ROLES[str(turn["from"]).lower()]
      value = str(turn["value"]).strip()
      text += (self.assistant + self.reply_prefix if role == "assistant" else getattr(self, role)) \
          + value + self.turn_end
    return text + self.assistant


def parse(conversations: Any) -> list[dict]:
  """A record's "conversations" (a list, or its JSON text) -> list of turns."""
  if isinstance(conversations, (bytes, str)):
    try:
      conversations = json.loads(conversations)
    except (ValueError, UnicodeDecodeError) as e:
      raise BadConversation(f"conversations are not JSON: {e}") from None
  if not isinstance(conversations, list) or not conversations:
    raise BadConversation("conversations must be a non-empty list of turns")
  return conversations


def _piece_offsets(vocab, text: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(ids, character offset of each piece) when the vocabulary is SentencePiece; else None."""
  sp = getattr(vocab, "tokenizer", vocab)  # seqio.SentencePieceVocabulary wraps the processor
  if not hasattr(sp, "encode") or not hasattr(sp, "id_to_piece"):
    return None
  try:
    proto = sp.encode(text, return_type="proto")  # sentencepiece >= 0.2.1
  except TypeError:
    proto = sp.encode(text, out_type="immutable_proto")
  raw = text.encode("utf-8")
  ids = np.asarray([p.id for p in proto.pieces], np.int32)
  # Byte offsets -> character offsets.
  starts = np.asarray([len(raw[:p.begin].decode("utf-8", "ignore")) for p in proto.pieces], np.int64)
  return ids, starts


def eos_id_of(vocab) -> int:
  """The EOS id of a seqio Vocabulary (`eos_id` property) or a SentencePiece processor
  (`eos_id()`); TypeError for anything else (pass `eos_id` to `tokenize` then)."""
  eos = getattr(vocab, "eos_id", None)
  eos = eos() if callable(eos) else eos
  if eos is None or int(eos) < 0:
    raise TypeError(f"{vocab!r} names no EOS id: pass eos_id")
  return int(eos)


def tokenize(vocab, turns: Sequence[dict], template: ChatTemplate = ChatTemplate(), *,
             eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Turns -> (ids int32[L] ending in EOS, loss weights float32[L]: 1 on the assistant's tokens).

  weights[i] is the loss weight of predicting ids[i]. `vocab` is a SentencePiece processor,
  a seqio Vocabulary, or anything with `encode(str) -> ids` (then each part is tokenized
  on its own and the pieces concatenated, and `eos_id` must be given). eos_id: default the
  vocabulary's (`eos_id_of`).
  """
  eos_id = eos_id_of(vocab) if eos_id is None else int(eos_id)
  text, spans = template.render(turns)
  found = _piece_offsets(vocab, text)
  if found is not None:
    ids, starts = found
    trained = np.zeros(len(ids), bool)
    for a, b in spans:
      trained |= (starts >= a) & (starts < b)
  else:  # prompt and reply parts alternate: cuts at every span's ends
    cuts = [0, *[c for span in spans for c in span], len(text)]
    ids_list, trained_list = [], []
    for i in range(len(cuts) - 1):
      part = list(vocab.encode(text[cuts[i]:cuts[i + 1]])) if cuts[i + 1] > cuts[i] else []
      ids_list += part
      trained_list += [i % 2 == 1] * len(part)
    ids, trained = np.asarray(ids_list, np.int32), np.asarray(trained_list, bool)
  ids = np.concatenate([ids, [eos_id]]).astype(np.int32)
  weights = np.concatenate([trained, [True]]).astype(np.float32)
  return ids, weights


def count_images(turns: Sequence[dict]) -> int:
  return sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in turns)
