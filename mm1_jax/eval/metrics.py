"""Captioning and VQA metrics: CIDEr-D, VQA accuracy and exact match.

CIDEr-D is the COCO caption evaluation's (pycocoevalcap `Cider`): n-grams n = 1..4,
tf-idf with document frequencies over the reference sets, candidate weights clipped at
the reference's, a Gaussian length penalty (sigma 6) on the bigram-counted lengths,
averaged over references and scaled by 10. tests/test_metrics.py checks it against
pycocoevalcap to 1e-6 on the same tokenised inputs. Sentences are tokenised by
`ptb_tokenize`, a Python rendering of what the toolkit's Stanford PTB tokenizer step
produces on captions (lower case, clitics split, punctuation tokens dropped); the Java
tokenizer itself is not run, so rare constructs may tokenise differently.

VQA accuracy is min(#matching annotators / 3, 1) averaged over the ten leave-one-out
subsets of the annotators, after the official answer normalisation (punctuation,
number words, articles, contractions). The original VQA toolkit normalises only when
the annotators disagree; here both sides are always normalised, as the EvalAI answer
processor does, so "Two" scores against ten "2"s.

GQA uses exact match after the same normalisation.

The seqio metric functions (`cider_metric`, `vqa_metric`, `exact_match_metric`) take
(targets, predictions) lists as seqio's predict metrics do.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# --- PTB-style caption tokenisation --------------------------------------------

# Tokens the COCO caption toolkit drops after PTB tokenisation (brackets appear in
# their PTB-escaped forms there; here they are dropped directly).
_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]",
         "{", "}", '"'}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_EDGE_PUNCT = "\"'`()[]{}.,;:?!"
_ABBREVIATION = re.compile(r"^([a-z]\.){2,}$|^(mr|mrs|ms|dr|st|jr|sr|vs|etc|no)\.$")
_NUMBER = re.compile(r"^[+-]?\d+(,\d{3})*(\.\d+)?$")


def _split_token(tok: str) -> list[str]:
  """One whitespace-separated word -> PTB-style tokens (lower case, before dropping)."""
  if tok in _DROP or _NUMBER.match(tok) or _ABBREVIATION.match(tok):
    return [tok]
  lead, trail = [], []
  while tok and tok[0] in _EDGE_PUNCT and not tok.startswith(("'s", "'re", "'ve", "'ll", "'d", "'m")):
    lead.append(tok[0])
    tok = tok[1:]
  while tok and tok[-1] in _EDGE_PUNCT:
    if tok.endswith("...") and len(tok) > 3:
      trail.insert(0, "...")
      tok = tok[:-3]
      continue
    if _NUMBER.match(tok) or _ABBREVIATION.match(tok):
      break
    trail.insert(0, tok[-1])
    tok = tok[:-1]
  core: list[str] = []
  if tok:
    if tok in _SPLIT_WORDS:
      core = list(_SPLIT_WORDS[tok])
    elif tok.endswith("%") and len(tok) > 1:
      core = [tok[:-1], "%"]
    elif tok.startswith("$") and len(tok) > 1:
      core = ["$", tok[1:]]
    else:
      m = _CLITIC.match(tok)
      core = [m.group(1), m.group(2)] if m and m.group(1) not in ("'", "n") else [tok]
  return lead + core + trail


def ptb_tokenize(text: str) -> list[str]:
  """Caption -> tokens as the COCO caption evaluation sees them: lower-cased, PTB-split
  ("don't" -> "do n't", "man's" -> "man 's", "cannot" -> "can not"), punctuation tokens
  dropped. Idempotent: tokenising the joined tokens gives the same tokens."""
  text = text.replace("\n", " ").lower()
  text = re.sub(r"(\.\.\.)", r" \1 ", text)
  out = []
  for word in text.split():
    for tok in _split_token(word):
      if tok not in _DROP:
        out.append(tok)
  return out


def tokenize_caption(text: str) -> list[str]:
  return ptb_tokenize(text)


# --- CIDEr-D -----------------------------------------------------------------


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

# The official evaluation's contraction table (apostrophe-less spellings -> standard).
# Keys are matched after lower-casing, as the official code does, so the capitalised
# entries of that table ("Im", "Ive", "Id've") never match and are left out here.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've",
    "i'dve": "i'd've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT_CHARS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!"]
# A period not between digits ("3.5" keeps its point). The official pattern's
# look-behind is written "(?!<=\d)", a negative look-ahead for the text "<=" + digit; the
# same pattern is kept so that results match.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
  out = text
  digit_comma = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT_CHARS:
    # Decided on the original text, as in the official code: a mark next to a space
    # (or any mark, when the answer has a digit-comma-digit) is deleted, else it
    # becomes a space.
    if p + " " in text or " " + p in text or digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def normalize_answer(answer: str) -> str:
  """The official VQA answer normalisation (punctuation, number words, articles, contractions)."""
  text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """min(#annotators agreeing / 3, 1), averaged over the leave-one-out subsets."""
  if not answers:
    raise ValueError("vqa_accuracy needs at least one ground-truth answer")
  pred = normalize_answer(prediction)
  gts = [normalize_answer(a) for a in answers]
  if len(gts) == 1:
    return float(gts[0] == pred)
  matches = sum(g == pred for g in gts)
  # Leaving out a matching annotator leaves matches - 1 agreeing, else matches.
  return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
  """GQA accuracy: 1.0 when the normalised prediction equals the normalised answer."""
  return float(normalize_answer(prediction) == normalize_answer(answer))


# --- seqio metric functions (targets, predictions) -----------------------------


def cider_metric(targets: list[list[str]], predictions: list[str]) -> dict[str, float]:
  """targets: the reference captions of each example."""
  ids = [str(i) for i in range(len(predictions))]
  return {"cider": cider(dict(zip(ids, targets)), dict(zip(ids, predictions)))}


def vqa_metric(targets: list[list[str]], predictions: list[str]) -> dict[str, float]:
  """targets: the annotators' answers of each question."""
  return {"accuracy": _mean([vqa_accuracy(p, t) for t, p in zip(targets, predictions, strict=True)])}


def exact_match_metric(targets: list[list[str]], predictions: list[str]) -> dict[str, float]:
  """targets: a one-answer list per question (the same layout as VQA's)."""
  return {"exact_match": _mean([exact_match(p, t[0]) for t, p in zip(targets, predictions, strict=True)])}


def _mean(xs: list[float]) -> float:
  if not xs:
    raise ValueError("no predictions to score")
  return sum(xs) / len(xs)
