"""Captioning and VQA metrics: CIDEr-D and VQA accuracy.

CIDEr-D follows the COCO caption evaluation (n = 1..4, tf-idf over the reference
set, clipped candidate counts, Gaussian length penalty with sigma 6, x10). Its
sentences are tokenised in Python (lower case, punctuation removed) where the
COCO toolkit runs the Stanford PTB tokenizer.

VQA accuracy is min(#matching annotators / 3, 1) averaged over the leave-one-out
subsets of the annotators, after the official answer normalisation.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# --- CIDEr-D -----------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> list[str]:
  return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n: int = 4) -> Counter:
  counts: Counter = Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def cider(references: dict[str, list[str]], predictions: dict[str, str], n: int = 4,
          sigma: float = 6.0) -> float:
  """Corpus CIDEr-D of predictions[id] against references[id] (same ids)."""
  ids = sorted(predictions)
  if not ids:
    raise ValueError("no predictions to score")
  missing = [i for i in ids if i not in references or not references[i]]
  if missing:
    raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[0]!r}")
  cands = [_ngrams(tokenize_caption(predictions[i]), n) for i in ids]
  refs = [[_ngrams(tokenize_caption(r), n) for r in references[i]] for i in ids]

  doc_freq: Counter = Counter()
  for rs in refs:
    for gram in set(g for r in rs for g in r):
      doc_freq[gram] += 1
  log_num_docs = math.log(float(len(ids)))

  def vec(counts: Counter):
    v = [defaultdict(float) for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
      k = len(gram) - 1
      v[k][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
      norm[k] += v[k][gram] ** 2
      if k == 1:  # the reference implementation measures length in bigrams
        length += tf
    return v, [math.sqrt(x) for x in norm], length

  scores = []
  for cand, rs in zip(cands, refs):
    v_c, n_c, l_c = vec(cand)
    total = [0.0] * n
    for r in rs:
      v_r, n_r, l_r = vec(r)
      penalty = math.exp(-((l_c - l_r) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        val = sum(min(w, v_r[k][g]) * v_r[k][g] for g, w in v_c[k].items())
        if n_c[k] != 0 and n_r[k] != 0:
          val /= n_c[k] * n_r[k]
        total[k] += val * penalty
    scores.append(sum(total) / n / len(rs) * 10.0)
  return sum(scores) / len(scores)


# --- VQA accuracy ------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "hows": "how's", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am",
    "mightve": "might've", "mustve": "must've", "mustnt": "mustn't", "neednt": "needn't",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "whens": "when's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT_CHARS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
  """The official VQA answer normalisation (punctuation, digits, articles, contractions)."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  for p in _PUNCT_CHARS:
    if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  text = _PERIOD_STRIP.sub("", text)
  words = []
  for word in text.lower().split():
    word = _NUMBERS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """min(#annotators agreeing / 3, 1), averaged over the leave-one-out subsets."""
  if not answers:
    raise ValueError("vqa_accuracy needs at least one ground-truth answer")
  pred = normalize_answer(prediction)
  gts = [normalize_answer(a) for a in answers]
  if len(gts) == 1:
    return float(gts[0] == pred)
  accs = []
  for i in range(len(gts)):
    others = gts[:i] + gts[i + 1:]
    accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
  return sum(accs) / len(accs)
